"""Stable Diffusion 3 / 3.5 MMDiT: diffusers ``SD3Transformer2DModel`` -> ``models.mmdit``.

The Flax module's attribute names mirror the diffusers keys, so the key map is the identity
(``weight`` -> ``kernel`` and the transposes are done generically in ``common.map_tensor``).
"""

from streamflow_jax.models.mmdit import SD3Config

CLASS_NAME = "SD3Transformer2DModel"
CONFIG_CLS = SD3Config
# Config fields diffusers has that change nothing in inference, with the value we accept.
IGNORABLE: dict = {}


def rename(key: str) -> str:
    return key
