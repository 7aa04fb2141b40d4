"""Stable Diffusion 1.x/2.x and SDXL single files (the original LDM/SGM layout) -> one tensor source per component.

The file holds the UNet (``model.diffusion_model.*``), the VAE (``first_stage_model.*``) and
the text encoders (SD 1.x's CLIP ``cond_stage_model.transformer.*``, SD 2.x's OpenCLIP
``cond_stage_model.model.*``, SDXL's ``conditioner.embedders.{0,1}.*``) but no configs: those
come from a diffusers pipeline directory, as with diffusers' ``from_single_file(config=...)``.
Where each component sits and how its keys become diffusers' is ``models/sd_ldm.py``'s
(``SLOTS``, ``slot_parts``). Here the file's headers are read once, its keys split by slot,
the known non-weights dropped (schedule buffers, EMA copies, CLIP's ``position_ids``,
OpenCLIP's ``logit_scale``), and each component's tensors handed to the planner under
diffusers keys, split or transposed on read where the layouts differ. A key inside a slot that
no map knows keeps its file name, so the planner reports it as unexpected; a key outside every
slot is reported here. Nothing is read but headers (and the ``scale_factor`` scalar, where
there is one).
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from streamflow_jax.errors import ConversionError
from streamflow_jax.models import sd_ldm

from . import MappedSource
from .common import CONFIG_NAME, TensorSource, read_json

DEFAULT_SCALING = 0.18215  # AutoencoderKL's default scaling_factor


def _drop_1x1(array: np.ndarray) -> np.ndarray:
    return array[:, :, 0, 0]


def _transpose(array: np.ndarray) -> np.ndarray:
    return array.T


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _config(pipeline_dir: Path, slot: sd_ldm.Slot, file: Path) -> dict:
    name = slot.component
    path = pipeline_dir / name / CONFIG_NAME
    if not path.is_file():
        raise ConversionError(f"{pipeline_dir}: no {name}/{CONFIG_NAME}, needed for the {slot.prefix}* tensors "
                              f"of {file} (give the diffusers pipeline directory of this model family)")
    raw = read_json(path)
    cls = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
    if cls not in slot.classes:
        raise ConversionError(f"{path}: {name} is a {cls}; an LDM file's {slot.prefix}* tensors are a "
                              f"{' or '.join(slot.classes)}")
    return raw


def _check_scale_factor(tensors: TensorSource, vae_config: dict, file: Path) -> None:
    """``scale_factor`` (a buffer when trained with ``scale_by_std``) must be the VAE config's."""
    (_, value), = tensors.items(["scale_factor"])
    want = vae_config.get("scaling_factor", DEFAULT_SCALING)
    if not np.isclose(float(np.asarray(value, np.float64)), want, rtol=1e-6, atol=0):
        raise ConversionError(f"{file}: scale_factor {float(value)} differs from the pipeline's vae scaling_factor "
                              f"{want}: the latents would be scaled wrongly (use a pipeline directory of this model)")


def _part(file_key: str, shape: tuple[int, ...], how) -> tuple[str, tuple[int, ...] | None, object]:
    """``(file key, shape after the transform, transform)`` of one part (``MappedSource``'s).
    A tensor whose shape does not allow the transform is read as is: the planner reports its shape."""
    if how is None:
        return file_key, None, None
    if how == sd_ldm.CONV_AS_LINEAR:
        if len(shape) == 4 and shape[2:] == (1, 1):  # [C, C, 1, 1] -> [C, C]
            return file_key, shape[:2], _drop_1x1
        return file_key, None, None
    if how == sd_ldm.TRANSPOSED:
        return (file_key, shape[::-1], _transpose) if len(shape) == 2 else (file_key, None, None)
    rows = how  # a slice: one of a fused projection's parts
    return file_key, (len(range(*rows.indices(shape[0]))), *shape[1:]), operator.itemgetter(rows)


def ldm_pipeline_sources(file, pipeline_dir) -> dict[str, tuple[dict, MappedSource]]:
    """``{component: (raw diffusers/transformers config, tensor source under diffusers keys)}``
    for the components an LDM/SGM single file holds (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``), in the order of ``sd_ldm.SLOTS``.

    The UNet's non-EMA weights are taken (``model_ema.*`` copies are dropped, as diffusers does
    by default); an "EMA only" file already holds its EMA weights as ``model.diffusion_model.*``.

    Raises:
        ConversionError: not an LDM file; a key outside the slots; two slots of one component;
            a component the pipeline directory lacks (or of another class).
    """
    file, pipeline_dir = Path(file), Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ConversionError(f"{pipeline_dir}: no model_index.json (not a diffusers pipeline directory)")
    tensors = TensorSource.for_file(file)
    keys = tensors.keys()
    if not any(k.startswith(sd_ldm.UNET.prefix) for k in keys):
        raise ConversionError(f"{file}: not a Stable Diffusion checkpoint in the original LDM layout (no "
                              f"{sd_ldm.UNET.prefix}* tensors; found e.g. {_few(keys, 3) or 'nothing'})")
    split: dict[sd_ldm.Slot, list[str]] = {}
    stray = []
    for k in keys:
        slot = next((s for s in sd_ldm.SLOTS if k.startswith(s.prefix)), None)
        if slot is not None:
            split.setdefault(slot, []).append(k)
        elif not sd_ldm.is_non_weight(k):
            stray.append(k)
    if stray:
        raise ConversionError(f"{file}: unexpected tensor(s) {_few(stray)} outside the LDM components "
                              f"({', '.join(s.prefix + '*' for s in sd_ldm.SLOTS)})")
    slots = [s for s in sd_ldm.SLOTS if s in split]  # the table's order, not the file's
    by_component: dict[str, sd_ldm.Slot] = {}
    for slot in slots:
        if slot.component in by_component:
            raise ConversionError(f"{file}: both {by_component[slot.component].prefix}* and {slot.prefix}* tensors, "
                                  f"two encoders for one {slot.component} (a file mixing layouts)")
        by_component[slot.component] = slot
    configs = {s.component: _config(pipeline_dir, s, file) for s in slots}
    if "scale_factor" in keys and "vae" in configs:
        _check_scale_factor(tensors, configs["vae"], file)
    out = {}
    for slot in slots:
        name = slot.component
        try:
            map_key = sd_ldm.slot_parts(slot, configs[name])
        except (TypeError, ValueError, KeyError) as e:
            raise ConversionError(f"{pipeline_dir / name / CONFIG_NAME}: not a config the LDM layout can number "
                                  f"({type(e).__name__}: {e})") from None
        parts: dict[str, tuple[str, tuple[int, ...] | None, object]] = {}
        for k in split[slot]:
            shape = tuple(tensors.shape(k))
            mapped = map_key(k[len(slot.prefix):], shape)
            if mapped is None:  # not an LDM name: kept as is, the planner reports it as unexpected
                mapped = [(k, None)]
            for new, how in mapped:
                if new in parts:
                    raise ConversionError(f"{file}: {parts[new][0]!r} and {k!r} both map to {name} {new!r}")
                parts[new] = _part(k, shape, how)
        out[name] = (configs[name], MappedSource(tensors, parts))
    return out
