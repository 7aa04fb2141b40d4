"""Checkpoint converters: diffusers directories -> ``FlowModel`` (in memory) or an orbax directory.

Shipped inside the distribution as ``streamflow_jax.converters`` (see ``pyproject.toml``); users
call ``streamflow_jax.convert`` / ``streamflow_jax.load`` or ``streamflow-jax convert``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from streamflow_jax.models import FlowModel, abstract_module, flat_params

from . import clip, sd3, taesd, unet, vae
from .common import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ConversionError,
    TensorSource,
    check_model_source,
    config_from_dict,
    map_tensor,
    read_json,
)

# class name -> converter module: CLASS_NAME (or CLASS_NAMES), CONFIG_CLS,
# IGNORABLE, rename; optionally WEIGHTS (file names), ANY_VALUE (free config keys), prepare_config.
CONVERTERS = {name: m for m in (sd3, unet, vae, taesd, clip) for name in getattr(m, "CLASS_NAMES", (m.CLASS_NAME,))}
# Bumped whenever converted output changes meaning; stored in every converted config.json.
CONVERTER_VERSION = 1
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}

__all__ = ["CONVERTERS", "CONVERTER_VERSION", "ConversionError", "convert_diffusers", "convert_tensors", "resolve_dtype"]


def resolve_dtype(dtype):
    """``None`` (keep the checkpoint's), a name from ``DTYPES``, or a numpy/jax dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return np.dtype(DTYPES[dtype])
    return np.dtype(dtype)


def _target_for(key: str, targets: dict) -> str | None:
    """The Flax parameter path a (renamed) diffusers key fills, or None."""
    if key in targets:
        return key
    prefix, _, leaf = key.rpartition(".")
    if leaf == "weight":
        for alt in ("kernel", "scale"):
            if f"{prefix}.{alt}" in targets:
                return f"{prefix}.{alt}"
    return None


def convert_diffusers(src, *, dtype=None, progress: bool = True) -> tuple[FlowModel, dict]:
    """Reads a diffusers model or pipeline directory into a ``FlowModel``, strictly.

    Returns:
        The model and the raw diffusers config it came from.

    Raises:
        ConversionError: naming the file and the key of whatever does not fit.
    """
    model_dir = _find_supported_dir(Path(src))
    raw = read_json(model_dir / CONFIG_NAME)
    conv = CONVERTERS.get(class_name_of(raw))
    names = getattr(conv, "WEIGHTS", None) or (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    tensors = TensorSource(model_dir, names) if conv is not None else None
    model = convert_tensors(raw, tensors, dtype=dtype, progress=progress, source=str(model_dir))
    return model, raw


def class_name_of(raw: dict) -> str | None:
    """diffusers writes ``_class_name``; transformers writes ``architectures``."""
    if raw.get("_class_name"):
        return raw["_class_name"]
    arch = raw.get("architectures")
    return arch[0] if isinstance(arch, list) and arch else None


def convert_tensors(raw_config: dict, tensors, *, dtype=None, progress: bool = True,
                    source: str = "<tensors>") -> FlowModel:
    """Converts a diffusers config dict plus its tensors (PyTorch layout) into a ``FlowModel``.

    Args:
        raw_config: the model's ``config.json`` contents (with ``_class_name``).
        tensors: a ``TensorSource``, or a mapping from diffusers key to numpy array (for
            example ``{k: v.float().numpy() for k, v in torch_model.state_dict().items()}``).
        dtype: cast floating-point parameters (``None`` keeps each tensor's dtype).
        source: names the origin in error messages.
    """
    class_name = class_name_of(raw_config)
    conv = CONVERTERS.get(class_name)
    if conv is None:
        raise ConversionError(
            f"{source}: unsupported model class {class_name!r} (supported: {', '.join(sorted(CONVERTERS))})"
        )
    if hasattr(conv, "prepare_config"):
        raw_config = conv.prepare_config(raw_config)
    config = config_from_dict(conv.CONFIG_CLS, raw_config, source=f"{source}/{CONFIG_NAME}",
                              ignorable=conv.IGNORABLE, any_value=getattr(conv, "ANY_VALUE", frozenset()))
    cast = resolve_dtype(dtype)
    if not isinstance(tensors, TensorSource):
        tensors = DictSource(tensors)

    _, abstract_state = nnx.split(abstract_module(class_name, config))
    targets, treedef, paths = flat_params(nnx.to_pure_dict(abstract_state))

    key_to_target, unexpected = {}, []
    for key in tensors.keys():
        target = _target_for(conv.rename(key), targets)
        (unexpected.append(key) if target is None else key_to_target.__setitem__(key, target))
    missing = sorted(set(targets) - set(key_to_target.values()))
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensor(s) {_few(unexpected)} for {class_name}")
    if missing:
        raise ConversionError(f"{source}: missing tensor(s) {_few(missing)} for {class_name}")

    values = {}
    keys = list(key_to_target)
    name = Path(source).name or source
    with tqdm(total=len(keys), desc=f"converting {name}", unit="tensor", disable=not progress) as bar:
        for key, array in tensors.items(keys):
            target = key_to_target[key]
            array = map_tensor(key, array, targets[target].shape, target.rpartition(".")[2])
            if cast is not None and jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
                array = array.astype(cast)
            values[target] = array
            bar.update()
    params = jax.tree_util.tree_unflatten(treedef, [values[p] for p in paths])
    return FlowModel.from_params(class_name, config, params)


class DictSource:
    """A mapping of diffusers keys to arrays, read like a ``TensorSource``."""

    def __init__(self, tensors):
        self._tensors = tensors

    def keys(self):
        return list(self._tensors)

    def items(self, keys):
        for key in keys:
            yield key, np.asarray(self._tensors[key])


def _find_supported_dir(src: Path) -> Path:
    """``src`` as a model directory (pipelines are handled by ``checkpoint.convert``/``load``)."""
    check_model_source(src)
    if not (src / CONFIG_NAME).is_file():
        raise ConversionError(f"{src}: a pipeline directory; convert it with sf.convert or load a component "
                              "with sf.load(path, component=...)")
    return src


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
