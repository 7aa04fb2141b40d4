"""Backends behind ``sample(..., backend=...)``: ``xla`` (jit), ``onnxruntime``, ``tensorrt``.

Non-XLA backends are velocity runners (objects with ``velocity(x, t, cond)`` and a ``backend``
name) around an exported graph. ``runner_for`` finds or makes one for a ``FlowModel``: it
exports the model on first use with a profile that covers the call (batch up to
max(8, batch), any latent size the model allows) into a cache directory keyed by the model's
fingerprint and the spec, and re-exports when a cached export fails its integrity check.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from streamflow_jax.export.onnx import ExportError, export_onnx, load_export
from streamflow_jax.export.spec import FAMILY_SPECS, Range, latent_limit, latent_range

BACKENDS = ("xla", "onnxruntime", "tensorrt")
# exports and engines made on demand; override with $STREAMFLOW_JAX_CACHE
DEFAULT_CACHE = Path(os.environ.get("STREAMFLOW_JAX_CACHE", Path.home() / ".cache" / "streamflow-jax"))
_RUNNERS: dict[tuple, object] = {}


def runner_class(backend: str):
    if backend == "onnxruntime":
        from streamflow_jax.backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner
    if backend == "tensorrt":
        from streamflow_jax.backends.tensorrt import TensorRTRunner

        return TensorRTRunner
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def open_export(path, backend: str, **kwargs):
    """A runner for an export directory made by ``export_onnx`` / ``streamflow-jax export``."""
    return runner_class(backend)(load_export(path), **kwargs)


def auto_spec(model, batch: int, height: int, width: int, text_len: int):
    """The spec ``runner_for`` exports: this call's shapes as 'opt', generous min/max."""
    return FAMILY_SPECS[model.class_name](
        model.config, batch=Range(1, batch, max(8, batch)), height=latent_range(model, height),
        width=latent_range(model, width), text_len=text_len, dtype=str(model.dtype))


def runner_for(model, backend: str, *, batch: int, height: int, width: int, cond: dict, cache_dir=None):
    """The ``backend`` runner to use for ``model`` on inputs of these shapes."""
    if getattr(model, "backend", None) is not None:
        if model.backend != backend:
            raise ValueError(f"model is a {model.backend} runner, but backend={backend!r} was asked for")
        return model
    if model.class_name not in FAMILY_SPECS:
        raise ValueError(f"backend {backend!r}: {model.class_name} has no export spec")
    text = cond.get("encoder_hidden_states")
    text_len = 0 if text is None else int(text.shape[1])
    limit = latent_limit(model)
    if height > limit or width > limit:
        raise ValueError(f"latent {height}x{width} is larger than {model.family} exports allow ({limit}x{limit})")
    feeds = {"x": (batch, height, width, model.config.in_channels), "t": (batch,),
             **{k: (batch,) + tuple(v.shape[1:]) for k, v in cond.items()}}
    feeds = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in feeds.items()}
    for (fingerprint, _, kind), runner in _RUNNERS.items():  # an earlier export may cover this call
        if fingerprint == model.fingerprint() and kind == backend:
            try:
                runner.spec.check(feeds)
                return runner
            except ValueError:
                pass
    spec = auto_spec(model, batch, height, width, text_len)
    key = (model.fingerprint(), spec.key(), backend)
    root = Path(cache_dir or DEFAULT_CACHE) / "exports"
    name = f"{model.family}-{model.fingerprint()[:16]}-{hashlib.sha256(spec.key().encode()).hexdigest()[:12]}"
    path = root / name
    exported = None
    if path.exists():
        try:
            exported = load_export(path)
            if exported.meta.get("model_fingerprint") != model.fingerprint():
                raise ExportError(f"{path}: made from another model")
        except ExportError:
            shutil.rmtree(path, ignore_errors=True)  # stale or corrupt: rebuilt, never used
            exported = None
    if exported is None:
        exported = export_onnx(model, spec, path, progress=False)
    runner = runner_class(backend)(exported)
    _RUNNERS[key] = runner
    return runner
