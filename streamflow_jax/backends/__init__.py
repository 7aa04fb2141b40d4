"""Backends behind ``sf.sample(..., backend=...)``: ``xla`` (jit), ``onnxruntime``, ``tensorrt``.

This is the one place that dispatches to a backend. ``xla`` runs ``sampling.scan`` compiled;
the others run the same ``sampling.step`` around a velocity runner (an object with
``velocity(x, t, cond)`` and a ``backend`` name) built on an exported graph. ``runner_for``
finds or makes one for a ``FlowModel``: it exports the model on first use with a profile that
covers the call (batch up to max(8, batch), any latent size the model allows) into a cache
directory keyed by the model's fingerprint and the spec, and re-exports when a cached export
fails its integrity check.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax import sampling
from streamflow_jax.errors import ExportError
from streamflow_jax.export.onnx import export_onnx, load_export
from streamflow_jax.export.spec import Range, build_velocity_spec, latent_range
from streamflow_jax.models import FlowModel

BACKENDS = ("xla", "onnxruntime", "tensorrt")
CACHE_ENV = "STREAMFLOW_JAX_CACHE"
_RUNNERS: dict[tuple, object] = {}


def cache_root() -> Path:
    """Where exports, engines and compiled programs are cached: ``$STREAMFLOW_JAX_CACHE``, else
    ``~/.cache/streamflow-jax`` (read at each use, so the variable can be set at any time)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamflow-jax")


XLA_CACHE_ENV = "STREAMFLOW_JAX_XLA_CACHE"  # "0" turns the persistent compilation cache off


def enable_compilation_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache under ``cache_root()/xla``, so that a second
    process reuses the programs a first one compiled (all of them: the library sets
    ``jax_persistent_cache_min_compile_time_secs`` to 0 from JAX's 1 s). Left alone when
    ``$STREAMFLOW_JAX_XLA_CACHE`` is ``0`` or when the application set a cache directory itself.

    Returns:
        The cache directory in use, or None when off.
    """
    if os.environ.get(XLA_CACHE_ENV, "1").lower() in ("0", "false", "off", "no"):
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = cache_root() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every program, not only those over 1 s: a pipeline compiles many sub-second ones
    # (scan, admission, decode), which together are most of a first call
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def clear_runners() -> None:
    """Forgets the runners made in this process (their files stay in the cache)."""
    _RUNNERS.clear()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def runner_class(backend: str):
    if backend == "onnxruntime":
        from streamflow_jax.backends.onnxruntime import OnnxRuntimeRunner  # onnxruntime: optional, heavy

        return OnnxRuntimeRunner
    if backend == "tensorrt":
        from streamflow_jax.backends.tensorrt import TensorRTRunner  # tensorrt: optional, heavy

        return TensorRTRunner
    check_backend(backend)
    raise ValueError(f"backend {backend!r} runs models directly, not exported graphs")


def open_export(path, backend: str, **kwargs):
    """A runner for an export directory made by ``export_onnx`` / ``streamflow-jax export``."""
    return runner_class(backend)(load_export(path), **kwargs)


def auto_spec(model, batch: int, height: int, width: int, text_len: int | None):
    """The spec ``runner_for`` exports: this call's shapes as 'opt', generous min/max."""
    return build_velocity_spec(model, batch=Range(1, batch, max(8, batch)), height=latent_range(model, height),
                               width=latent_range(model, width), text_len=text_len, dtype=str(model.dtype))


def runner_for(model, backend: str, *, batch: int, height: int, width: int, cond: dict, cache_dir=None):
    """The ``backend`` runner to use for ``model`` on inputs of these shapes.

    Args:
        model: a ``FlowModel`` (exported on first use) or a runner (returned as is).
        batch: the batch of each velocity call (CFG's doubled batch included).
        height, width: latent sides; cond: the conditioning (its shapes set the graph's).
        cache_dir: the cache root (default ``cache_root()``).
    """
    if getattr(model, "backend", None) is not None:
        if model.backend != backend:
            raise ValueError(f"model is a {model.backend} runner, but backend={backend!r} was asked for")
        return model
    if model.family.kind != "velocity":
        raise ValueError(f"backend {backend!r}: {model.class_name} is not a velocity model")
    text = cond.get("encoder_hidden_states")
    text_len = None if text is None else int(text.shape[1])
    model.latent_shape(height, width)  # raises on sizes the model cannot take
    feeds = {"x": (batch, height, width, model.latent_channels), "t": (batch,),
             **{k: (batch,) + tuple(jnp.shape(v)[1:]) for k, v in cond.items()}}
    feeds = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in feeds.items()}
    root = Path(cache_dir or cache_root())
    for (fingerprint, _, kind, where), runner in _RUNNERS.items():  # an earlier export may cover this call
        if fingerprint == model.fingerprint() and kind == backend and where == str(root):
            try:
                runner.spec.check(feeds)
                return runner
            except ValueError:
                pass
    spec = auto_spec(model, batch, height, width, text_len)
    key = (model.fingerprint(), spec.key(), backend, str(root))
    name = f"{model.family.name}-{model.fingerprint()[:16]}-{hashlib.sha256(spec.key().encode()).hexdigest()[:12]}"
    path = root / "exports" / name
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
        exported = export_onnx(model, spec, path, progress=False, shared=True)
    runner = runner_class(backend)(exported, **({"cache_dir": root} if backend == "tensorrt" else {}))
    _RUNNERS[key] = runner
    return runner


def sample(
    model: Any,
    noise: jax.Array,
    ts: jax.Array,
    cond: dict[str, Any],
    guidance_scale=None,
    uncond: dict[str, Any] | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Integrates the RF ODE from ``noise`` at t=ts[0] to ts[-1] with Euler steps.

    Args:
        model: anything with ``velocity(x, t, cond)``; usually ``sf.load(...)``.
        noise: ``[B, H, W, C]`` starting latents (their dtype is the integration dtype).
        ts: ``[S+1]`` (one grid for all) or ``[S+1, B]`` (one column per element; pad shorter
            schedules with ``schedules.stack``).
        cond: dict of ``[B, ...]`` conditioning arrays, named as in diffusers.
        guidance_scale: ``None`` for no classifier-free guidance, or a scalar / ``[B]`` scale.
        uncond: conditioning of the unconditional branch, same keys and shapes as ``cond``.
        backend: ``"xla"`` (jit-compiled scan), or ``"onnxruntime"`` / ``"tensorrt"``: the same
            steps around an exported graph. ``model`` is then a ``FlowModel`` (exported on first
            use into the cache directory, see ``runner_for``) or a runner from ``open_export``.

    Returns:
        ``[B, H, W, C]`` latents at the grid's last time.

    Works inside a caller's ``jax.jit`` with the XLA backend. The other backends return the
    same result within the tolerance of the exported graph's precision.
    """
    check_backend(backend)
    noise = jnp.asarray(noise)
    cond = dict(cond)
    uncond = None if uncond is None else dict(uncond)
    grid, guidance_scale = sampling.check_inputs(noise, jnp.asarray(ts, jnp.float32), cond, guidance_scale, uncond)
    if backend == "xla":
        if getattr(model, "backend", None) is not None:
            raise ValueError(f"backend='xla' needs a FlowModel, got a {model.backend} runner")
        run = sampling.scan_jit if isinstance(model, FlowModel) else sampling.scan
        return run(model, noise, grid, cond, guidance_scale, uncond)
    b, h, w, _ = noise.shape
    runner = runner_for(model, backend, batch=b if guidance_scale is None else 2 * b, height=h, width=w, cond=cond)
    if not getattr(runner, "on_device", False):
        # a runner computing on the host (ONNX Runtime on CPU): the loop in numpy, so each step
        # is one graph call and a few numpy ops, with no device dispatch or copy around it
        to_host = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
        noise, grid, guidance_scale = to_host(noise), to_host(grid), to_host(guidance_scale)
        cond = jax.tree_util.tree_map(to_host, cond)
        uncond = None if uncond is None else jax.tree_util.tree_map(to_host, uncond)
    x = noise
    for i in range(grid.shape[0] - 1):
        x = sampling.step(runner, x, grid[i], grid[i + 1], cond, guidance_scale, uncond)
    return jnp.asarray(x)
