"""Checkpoint readers: diffusers/transformers directories -> ``FlowModel``, strictly.

This package reads files; what the keys and config fields mean is each family's ``KeyMap``,
declared beside its model (``models/*.py``). It is imported as ``streamflow_jax.converters``
(``streamflow_jax/converters`` is a link to this folder, see the README's Layout); users call
``streamflow_jax.convert`` / ``streamflow_jax.load`` or ``streamflow-jax convert``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from streamflow_jax.errors import ConversionError
from streamflow_jax.models import FAMILIES, FlowModel, abstract_module, family_of, flat_params

from .common import (
    CONFIG_NAME,
    TensorSource,
    check_model_source,
    config_from_dict,
    map_tensor,
    read_json,
)

# Bumped whenever converted output changes meaning; stored in every converted config.json.
CONVERTER_VERSION = 1
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}

__all__ = ["CONVERTER_VERSION", "ConversionError", "class_name_of", "convert_diffusers", "convert_tensors",
           "read_config", "resolve_dtype"]


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
    """Reads a diffusers model directory into a ``FlowModel``, strictly.

    Returns:
        The model and the raw diffusers config it came from.

    Raises:
        ConversionError: naming the file and the key of whatever does not fit.
    """
    model_dir = _find_supported_dir(Path(src))
    raw = read_json(model_dir / CONFIG_NAME)
    family = _family(raw, str(model_dir))
    tensors = TensorSource(model_dir, family.keys.weights)
    model = convert_tensors(raw, tensors, dtype=dtype, progress=progress, source=str(model_dir))
    return model, raw


def class_name_of(raw: dict) -> str | None:
    """diffusers writes ``_class_name``; transformers writes ``architectures``."""
    if raw.get("_class_name"):
        return raw["_class_name"]
    arch = raw.get("architectures")
    return arch[0] if isinstance(arch, list) and arch else None


def _family(raw: dict, source: str):
    class_name = class_name_of(raw)
    if class_name not in FAMILIES:
        raise ConversionError(f"{source}: unsupported model class {class_name!r} "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return family_of(class_name)


def parse_config(raw: dict, *, source: str):
    """``(family, config)`` of a raw diffusers/transformers config dict, strictly."""
    family = _family(raw, source)
    keys = family.keys
    if keys.prepare_config is not None:
        raw = keys.prepare_config(raw)
    config = config_from_dict(family.config_cls, raw, source=f"{source}/{CONFIG_NAME}", ignorable=keys.ignorable,
                              any_value=keys.any_value)
    return family, config


def read_config(model_dir):
    """``(family, config)`` of a diffusers model directory, without reading its weights."""
    model_dir = Path(model_dir)
    return parse_config(read_json(model_dir / CONFIG_NAME), source=str(model_dir))


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
    family, config = parse_config(raw_config, source=source)
    cast = resolve_dtype(dtype)
    if not isinstance(tensors, TensorSource):
        tensors = DictSource(tensors)

    _, abstract_state = nnx.split(abstract_module(family, config))
    targets, treedef, paths = flat_params(nnx.to_pure_dict(abstract_state))

    key_to_target, unexpected = {}, []
    for key in tensors.keys():
        target = _target_for(family.keys.rename(key), targets)
        (unexpected.append(key) if target is None else key_to_target.__setitem__(key, target))
    missing = sorted(set(targets) - set(key_to_target.values()))
    class_name = class_name_of(raw_config)
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
    return FlowModel.from_params(family, config, params, class_name=class_name)


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
