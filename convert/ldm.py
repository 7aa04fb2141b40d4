"""Stable Diffusion 1.x/2.x single files in the original LDM layout -> one tensor source per component.

The file holds the UNet (``model.diffusion_model.*``), the VAE (``first_stage_model.*``) and
SD 1.x's CLIP text encoder (``cond_stage_model.transformer.*``) but no configs: those come from
a diffusers pipeline directory, as with diffusers' ``from_single_file(config=...)``. The key
maps are ``models/sd_ldm.py``'s. Here the file's headers are read once, its keys split by
component, the known non-weights dropped (schedule buffers, EMA copies, CLIP's
``position_ids``), and each component's tensors handed to the planner under diffusers keys.
A key inside a component that no map knows keeps its file name, so the planner reports it as
unexpected; a key outside every component is reported here. Nothing is read but headers (and
the ``scale_factor`` scalar, where there is one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamflow_jax.errors import ConversionError
from streamflow_jax.models import sd_ldm

from . import MappedSource
from .common import CONFIG_NAME, TensorSource, read_json

PREFIXES = {"unet": sd_ldm.UNET_PREFIX, "vae": sd_ldm.VAE_PREFIX, "text_encoder": sd_ldm.CLIP_PREFIX}
CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
           "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection")}
DEFAULT_SCALING = 0.18215  # AutoencoderKL's default scaling_factor


def _drop_1x1(array: np.ndarray) -> np.ndarray:
    return array[:, :, 0, 0]


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _config(pipeline_dir: Path, name: str, file: Path) -> dict:
    path = pipeline_dir / name / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(f"{pipeline_dir}: no {name}/{CONFIG_NAME}, needed for the {PREFIXES[name]}* tensors "
                              f"of {file} (give the diffusers pipeline directory of this model family)")
    raw = read_json(path)
    cls = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
    if cls not in CLASSES[name]:
        raise ConversionError(f"{path}: {name} is a {cls}; an LDM file's {PREFIXES[name]}* tensors are a "
                              f"{' or '.join(CLASSES[name])}")
    return raw


def _check_scale_factor(tensors: TensorSource, vae_config: dict, file: Path) -> None:
    """``scale_factor`` (a buffer when trained with ``scale_by_std``) must be the VAE config's."""
    (_, value), = tensors.items(["scale_factor"])
    want = vae_config.get("scaling_factor", DEFAULT_SCALING)
    if not np.isclose(float(np.asarray(value, np.float64)), want, rtol=1e-6, atol=0):
        raise ConversionError(f"{file}: scale_factor {float(value)} differs from the pipeline's vae scaling_factor "
                              f"{want}: the latents would be scaled wrongly (use a pipeline directory of this model)")


def ldm_pipeline_sources(file, pipeline_dir) -> dict[str, tuple[dict, MappedSource]]:
    """``{component: (raw diffusers/transformers config, tensor source under diffusers keys)}``
    for the components an LDM single file holds (``unet``, ``vae``, ``text_encoder``).

    The UNet's non-EMA weights are taken (``model_ema.*`` copies are dropped, as diffusers does
    by default); an "EMA only" file already holds its EMA weights as ``model.diffusion_model.*``.

    Raises:
        ConversionError: not an LDM file; a key outside the components; SD 2.x's OpenCLIP text
            encoder (unsupported); a component the pipeline directory lacks (or of another class).
    """
    file, pipeline_dir = Path(file), Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ConversionError(f"{pipeline_dir}: no model_index.json (not a diffusers pipeline directory)")
    tensors = TensorSource.for_file(file)
    keys = tensors.keys()
    if not any(k.startswith(sd_ldm.UNET_PREFIX) for k in keys):
        raise ConversionError(f"{file}: not a Stable Diffusion checkpoint in the original LDM layout (no "
                              f"{sd_ldm.UNET_PREFIX}* tensors; found e.g. {_few(keys, 3) or 'nothing'})")
    openclip = [k for k in keys if k.startswith(sd_ldm.OPENCLIP_PREFIX)]
    if openclip:
        raise ConversionError(f"{file}: SD 2.x's OpenCLIP text encoder ({sd_ldm.OPENCLIP_PREFIX}*) is not supported "
                              "in LDM single files; convert the diffusers SD 2.x pipeline directory instead")
    split: dict[str, list[str]] = {name: [] for name in PREFIXES}
    stray = []
    for k in keys:
        if sd_ldm.is_non_weight(k):
            continue
        name = next((n for n, p in PREFIXES.items() if k.startswith(p)), None)
        (split[name] if name else stray).append(k)
    if stray:
        raise ConversionError(f"{file}: unexpected tensor(s) {_few(stray)} outside the LDM components "
                              f"({', '.join(p + '*' for p in PREFIXES.values())})")
    configs = {name: _config(pipeline_dir, name, file) for name, ks in split.items() if ks}
    if "scale_factor" in keys and "vae" in configs:
        _check_scale_factor(tensors, configs["vae"], file)
    out = {}
    for name, (prefix, key_map) in sd_ldm.component_maps(configs).items():
        parts: dict[str, tuple[str, tuple[int, ...] | None, object]] = {}
        for k in split[name]:
            new, shape, reshape = key_map(k[len(prefix):]), None, None
            if new is None:  # not an LDM name: kept as is, the planner reports it as unexpected
                new = k
            elif name == "vae" and sd_ldm.linear_from_conv(new):
                s = tuple(tensors.shape(k))
                if len(s) == 4 and s[2:] == (1, 1):  # [C, C, 1, 1] -> [C, C]; anything else: a shape error
                    shape, reshape = s[:2], _drop_1x1
            if new in parts:
                raise ConversionError(f"{file}: {parts[new][0]!r} and {k!r} both map to {name} {new!r}")
            parts[new] = (k, shape, reshape)
        out[name] = (configs[name], MappedSource(tensors, parts))
    return out
