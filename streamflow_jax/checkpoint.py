"""Converted checkpoints on disk: ``config.json`` + an orbax ``params/`` directory.

``convert`` writes into a temporary sibling directory and renames it into place, so a failed
conversion leaves nothing behind. ``load`` takes a converted directory or, converting in
memory, a diffusers one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from streamflow_jax import __version__
from streamflow_jax.models import FlowModel, abstract_module, family_of

PARAMS_DIR = "params"
META_KEY = "streamflow_jax"  # present in our config.json, absent from diffusers'


def _flat(tree) -> tuple[dict, object, list[str]]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    return dict(zip(names, (leaf for _, leaf in leaves))), treedef, names


def save(model: FlowModel, dst, *, source: str | None = None) -> Path:
    """Writes ``model`` to a new directory ``dst`` atomically (temporary dir + rename)."""
    from streamflow_jax.converters import CONVERTER_VERSION
    from streamflow_jax.converters.common import free_path

    dst = Path(dst).absolute()
    free_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        config = {"_class_name": model.class_name, **dataclasses.asdict(model.config)}
        config[META_KEY] = {
            "version": __version__,
            "converter_version": CONVERTER_VERSION,
            "dtype": str(np.dtype(model.dtype)),
            "source": source,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        flat, _, _ = _flat(nnx.to_pure_dict(model.state))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / PARAMS_DIR, {k: np.asarray(v) for k, v in flat.items()})
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def convert(src, dst, *, dtype=None, progress: bool = True) -> Path:
    """Converts a diffusers model or pipeline directory into a streamflow-jax directory.

    Args:
        src: diffusers model directory (``config.json`` + safetensors, sharded or not), or a
            pipeline directory (``model_index.json``), whose supported component is converted.
        dst: output directory; must not exist. Written atomically.
        dtype: ``None`` keeps the checkpoint's dtype; or ``"float32"``, ``"bfloat16"``, ``"float16"``.
        progress: show a progress bar over tensors.

    Returns:
        The output path.

    Raises:
        ConversionError: the source does not fit (the message names the file and the key).
    """
    from streamflow_jax.converters import convert_diffusers
    from streamflow_jax.converters.common import free_path

    free_path(Path(dst))  # fail before the (possibly long) read
    model, _ = convert_diffusers(src, dtype=dtype, progress=progress)
    return save(model, dst, source=str(Path(src).absolute()))


def load(path, dtype=None, *, progress: bool = False) -> FlowModel:
    """Loads a converted directory, or converts a diffusers directory in memory.

    Args:
        path: a directory written by ``convert``, or a diffusers model/pipeline directory.
        dtype: cast floating-point parameters to this dtype (``None`` keeps them).
    """
    from streamflow_jax.converters import ConversionError, resolve_dtype

    path = Path(path)
    cfg_path = path / "config.json"
    raw = None
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
    if not (isinstance(raw, dict) and META_KEY in raw):
        from streamflow_jax.converters import convert_diffusers

        model, _ = convert_diffusers(path, dtype=dtype, progress=progress)
        return model

    class_name = raw.get("_class_name")
    try:
        fam = family_of(class_name)
    except ValueError as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    config = fam.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    _, abstract_state = nnx.split(abstract_module(class_name, config))
    shapes, treedef, names = _flat(nnx.to_pure_dict(abstract_state))
    params_dir = (path / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise ConversionError(f"{params_dir}: missing (incomplete converted checkpoint)")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            flat = ckpt.restore(params_dir)
    except Exception as e:  # orbax raises many types; name the directory and pass the reason on
        raise ConversionError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    if set(flat) != set(names):
        odd = sorted(set(flat) ^ set(names))[:5]
        raise ConversionError(f"{params_dir}: parameters do not match {class_name} (differing keys {odd})")
    for n in names:
        if tuple(flat[n].shape) != tuple(shapes[n].shape):
            raise ConversionError(f"{params_dir}: {n!r} has shape {flat[n].shape}, expected {shapes[n].shape}")
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[n]) for n in names])
    model = FlowModel.from_params(class_name, config, params)
    cast = resolve_dtype(dtype)
    return model.astype(cast) if cast is not None else model
