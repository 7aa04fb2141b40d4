"""LoRA: low-rank weight updates merged into a model, at conversion, at load, or at run time.

The merge happens on the host (``W + scale * B @ A`` in float32, cast back to the weight's
dtype) and gives a ``FlowModel`` with the same structure, shapes and dtypes: the programs
compiled for the base model run it as they are, so swapping one LoRA (or scale) for another
on a live model compiles nothing (``apply_loras(base, other)``; keep the base model).
Formats (diffusers/PEFT and kohya) and the key rules: ``converters.lora``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamflow_jax.converters.lora import lora_deltas, read_lora_file
from streamflow_jax.errors import ConversionError, is_real_number
from streamflow_jax.models import FlowModel, flat_params

LoraSpec = str | Path | tuple[str | Path, float]


def parse_loras(loras: Sequence[LoraSpec] | None) -> list[tuple[Path, float]]:
    """``[file, (file, scale), "file:scale", ...]`` -> ``[(Path, scale)]``; one file (a string or
    a path) alone stands for a list of one."""
    if isinstance(loras, str | Path):
        loras = [loras]
    out = []
    for item in loras or ():
        if isinstance(item, tuple | list) and not isinstance(item, str):
            if len(item) != 2 or not isinstance(item[0], str | Path):
                raise ConversionError(f"LoRA {item!r}: a pair is (file, scale)")
            path, scale = item
            if not is_real_number(scale):
                raise ConversionError(f"LoRA {item!r}: its scale {scale!r} is not a number")
        elif not isinstance(item, str | Path):
            raise ConversionError(f"LoRA {item!r}: give a file, (file, scale) or 'file:scale'")
        else:
            text = str(item)
            path, sep, scale = text.rpartition(":")
            if not sep or not _is_number(scale):
                if sep and Path(path).exists() and not Path(text).exists():
                    raise ConversionError(f"{text}: the LoRA file {path} exists, but its scale {scale!r} is not a "
                                          "number (FILE:SCALE)")
                path, scale = text, 1.0
        out.append((Path(path), float(scale)))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def merged_deltas(family, config, targets: dict, loras, component: str | None = None, *,
                  strict_other: bool = False) -> dict[str, np.ndarray]:
    """The summed per-parameter deltas of several LoRAs for one component.

    Keys for other components are warned about (``strict_other``: an error), keys of this
    component that match no weight are an error (``converters.lora``).
    """
    component = component or family.component
    total: dict[str, np.ndarray] = {}
    for path, scale in parse_loras(loras):
        tensors, metadata = read_lora_file(path)
        deltas, others = lora_deltas(family, config, targets, tensors, metadata, component, source=str(path),
                                     scale=scale)
        if others:
            message = (f"{path}: {len(others)} LoRA key(s) are for other components than {component} "
                       f"(e.g. {sorted(others)[0]!r})")
            if strict_other:
                raise ConversionError(message)
            warnings.warn(message + "; not applied here", stacklevel=3)
        if not deltas:
            raise ConversionError(f"{path}: no LoRA weights for {component}")
        for name, d in deltas.items():
            total[name] = total.get(name, 0) + d
    return total


def apply_loras(model: FlowModel, loras: Sequence[LoraSpec], *, component: str | None = None) -> FlowModel:
    """``model`` with the LoRAs merged (``W + sum scale_i * B_i @ A_i``); ``model`` unchanged.

    Args:
        model: the base model.
        loras: files, ``(file, scale)`` pairs or ``"file:scale"`` strings, summed (or one file).
        component: which of a file's components to take (default: the model's: ``unet``,
            ``transformer``, ``text_encoder``; e.g. ``"text_encoder_2"`` for SD3's CLIP-G).

    Raises:
        ValueError: ``model`` is quantized (a LoRA merges into float weights; an FP8 weight is
            stored divided by its scale, so a merged delta would land in the wrong units).
        ConversionError: a bad file, a key matching no weight, a shape that does not fit.
    """
    from streamflow_jax.quantization import is_quantized

    if model.scanned:  # the files name the blocks one by one
        return model.unrolled_edit(lambda m: apply_loras(m, loras, component=component))
    if is_quantized(model):
        raise ValueError("this model's linears are FP8 (sf.quantize): LoRAs merge into float weights; apply them "
                         "first (sf.load(..., loras=...) or sf.apply_loras on the float model), then quantize")
    flat, treedef, names = flat_params(nnx.to_pure_dict(model.state))
    deltas = merged_deltas(model.family, model.config, flat, loras, component)
    leaves = []
    for name in names:
        w = flat[name]
        if name in deltas:
            host = np.asarray(w)
            with np.errstate(over="ignore", invalid="ignore"):  # said below, naming the weight
                merged = (host.astype(np.float32) + deltas[name]).astype(host.dtype)
            if not np.isfinite(merged.astype(np.float32)).all() and np.isfinite(host).all():  # host: rare path
                raise ValueError(f"merging the LoRAs into {name!r} makes non-finite weights (inf or NaN in "
                                 f"{host.dtype}): a scale too large? The model is unchanged")
            w = jax.device_put(merged, w.sharding) if isinstance(w, jax.Array) else jnp.asarray(merged)
        leaves.append(w)
    state = jax.tree_util.tree_map(lambda x: x, model.state)  # a new state object, same structure
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    return model._replace(state=state)
