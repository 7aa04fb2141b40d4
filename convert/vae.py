"""Stable Diffusion VAE: diffusers ``AutoencoderKL`` -> ``models.vae`` (identity key map)."""

from streamflow_jax.models.vae import VAEConfig

CLASS_NAME = "AutoencoderKL"
CONFIG_CLS = VAEConfig
IGNORABLE: dict = {}


def rename(key: str) -> str:
    return key
