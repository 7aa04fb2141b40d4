"""Model families and the loaded-model handle ``FlowModel``.

Each family lives in one file (config dataclass, NNX modules, its ``FAMILY`` record) and is
registered by naming that file in ``FAMILY_MODULES``; nothing else in the package needs to know
the architecture.
"""

from __future__ import annotations

import importlib

from streamflow_jax.models.family import Family, KeyMap
from streamflow_jax.models.flow import (
    FlowModel,
    abstract_module,
    abstract_split,
    decode_latents,
    encode_latents,
    flat_params,
    pixels_to_latent,
    velocity_of,
)

# The registry: adding a family = adding its model file's name here.
FAMILY_MODULES = ("mmdit", "flux", "unet", "vae", "taesd", "clip", "t5")

FAMILIES: dict[str, Family] = {}
for _name in FAMILY_MODULES:
    _family = importlib.import_module(f"{__name__}.{_name}").FAMILY
    FAMILIES.update({class_name: _family for class_name in _family.class_names})


VELOCITY_COMPONENTS = tuple(dict.fromkeys(f.component for f in FAMILIES.values() if f.kind == "velocity"))


def family_of(class_name: str | None) -> Family:
    """The family that converts and runs ``class_name`` (a diffusers/transformers class)."""
    try:
        return FAMILIES[class_name]
    except (KeyError, TypeError):  # TypeError: a name that is not a string (a list in a config)
        raise ValueError(
            f"unsupported model class {class_name!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


__all__ = ["FAMILIES", "FAMILY_MODULES", "VELOCITY_COMPONENTS", "Family", "FlowModel", "KeyMap", "abstract_module", "abstract_split", "decode_latents",
           "encode_latents", "family_of", "flat_params", "pixels_to_latent", "velocity_of"]
