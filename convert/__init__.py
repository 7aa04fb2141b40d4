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

from streamflow_jax.models import FlowModel, abstract_module

from . import sd3
from .common import CONFIG_NAME, ConversionError, TensorSource, check_model_source, config_from_dict, map_tensor, read_json

# diffusers class name -> converter module (CLASS_NAME, PIPELINE_COMPONENT, CONFIG_CLS, IGNORABLE, rename)
CONVERTERS = {m.CLASS_NAME: m for m in (sd3,)}
# Bumped whenever converted output changes meaning; stored in every converted config.json.
CONVERTER_VERSION = 1
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}

__all__ = ["CONVERTERS", "CONVERTER_VERSION", "ConversionError", "convert_diffusers", "resolve_dtype"]


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
    src = Path(src)
    model_dir = _find_supported_dir(src)
    raw = read_json(model_dir / CONFIG_NAME)
    class_name = raw.get("_class_name")
    conv = CONVERTERS.get(class_name)
    if conv is None:
        raise ConversionError(
            f"{model_dir / CONFIG_NAME}: unsupported model class {class_name!r} "
            f"(supported: {', '.join(sorted(CONVERTERS))})"
        )
    config = config_from_dict(conv.CONFIG_CLS, raw, source=model_dir / CONFIG_NAME, ignorable=conv.IGNORABLE)
    cast = resolve_dtype(dtype)

    _, abstract_state = nnx.split(abstract_module(class_name, config))
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_state))
    paths = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    targets = {p: leaf for p, (_, leaf) in zip(paths, flat)}

    tensors = TensorSource(model_dir)
    key_to_target, unexpected = {}, []
    for key in tensors.keys():
        target = _target_for(conv.rename(key), targets)
        (unexpected.append(key) if target is None else key_to_target.__setitem__(key, target))
    missing = sorted(set(targets) - set(key_to_target.values()))
    if unexpected:
        raise ConversionError(f"{model_dir}: unexpected tensor(s) {_few(unexpected)} for {class_name}")
    if missing:
        raise ConversionError(f"{model_dir}: missing tensor(s) {_few(missing)} for {class_name}")

    values = {}
    keys = list(key_to_target)
    bar = tqdm(total=len(keys), desc=f"converting {model_dir.name or model_dir}", unit="tensor", disable=not progress)
    with bar:
        for key, array in tensors.items(keys):
            target = key_to_target[key]
            array = map_tensor(key, array, targets[target].shape, target.rpartition(".")[2])
            if cast is not None and jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
                array = array.astype(cast)
            values[target] = array
            bar.update()
    params = jax.tree_util.tree_unflatten(treedef, [values[p] for p in paths])
    return FlowModel.from_params(class_name, config, params), raw


def _find_supported_dir(src: Path) -> Path:
    """``src`` as a model directory, or the first supported component of a pipeline."""
    check_model_source(src)
    if (src / CONFIG_NAME).is_file():
        return src
    components = [c.PIPELINE_COMPONENT for c in CONVERTERS.values()]
    for comp in components:
        if (src / comp / CONFIG_NAME).is_file():
            return src / comp
    raise ConversionError(f"{src}: pipeline has none of the supported components ({', '.join(components)})")


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
