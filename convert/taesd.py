"""TAESD: diffusers ``AutoencoderTiny`` -> ``models.taesd`` (identity key map)."""

from streamflow_jax.models.taesd import TinyConfig

CLASS_NAME = "AutoencoderTiny"
CONFIG_CLS = TinyConfig
IGNORABLE: dict = {}


def rename(key: str) -> str:
    return key
