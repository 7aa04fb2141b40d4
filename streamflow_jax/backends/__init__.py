"""Backends behind ``sf.sample(..., backend=...)``: the registry, and the one dispatch.

``BACKENDS`` lists every backend once (the CLI takes its choices from it). ``xla`` runs
``sampling``'s scan compiled; every other backend is a ``Runner`` (``backends.base``) of an
exported graph, around which the same ``sampling.step`` runs. ``runner_for`` finds or makes one
for a ``FlowModel``: it exports the model on first use with a profile that covers the call
(batch up to max(8, batch), any latent size the model allows) into a cache directory keyed by
the model's fingerprint and the spec, and re-exports when a cached export fails its integrity
check. Adding a backend = a ``Runner`` subclass in its own module + one line in ``BACKENDS``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from streamflow_jax import sampling
from streamflow_jax.backends.base import Backend, Runner
from streamflow_jax.backends.cache import cache_root, enable_compilation_cache
from streamflow_jax.errors import ConversionError, ExportError, ShapeError, is_real_dtype
from streamflow_jax.fsutil import discard_dir
from streamflow_jax.export.onnx import META_NAME, _versions, export_onnx, load_export, made_here, read_export_meta
from streamflow_jax.export.spec import Range, build_velocity_spec, latent_range
from streamflow_jax.models import FlowModel

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("xla", "jax.jit-compiled scan (default)"),
    Backend("onnxruntime", "the ONNX export run by ONNX Runtime", "streamflow_jax.backends.onnxruntime:OnnxRuntimeRunner"),
    Backend("tensorrt", "the ONNX export built into a TensorRT engine", "streamflow_jax.backends.tensorrt:TensorRTRunner"),
)}
SEGMENT_SECONDS = 0.5  # a long grid runs in segments of about this long: progress, and Ctrl-C gets in
_RUNNERS: dict[tuple, Runner] = {}
_GIVEN: dict[tuple[str, str], Runner] = {}  # (model fingerprint, backend) -> a pre-built export (use_export)

__all__ = ["BACKENDS", "Backend", "Runner", "cache_root", "check_backend", "clear_runners",
           "enable_compilation_cache", "given_export", "open_export", "runner_class", "runner_for", "sample",
           "use_export"]


def clear_runners() -> None:
    """Forgets the runners made in this process (their files stay in the cache) and the exports
    given with ``use_export``."""
    _RUNNERS.clear()
    _GIVEN.clear()


def check_backend(backend: str) -> Backend:
    """The registry entry of ``backend``, or a ValueError listing the choices."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[backend]


def runner_class(backend: str) -> type[Runner]:
    """The ``Runner`` class of a backend that runs exported graphs (imported now: its engine is an
    optional extra)."""
    entry = check_backend(backend)
    if entry.runner is None:
        raise ValueError(f"backend {backend!r} runs models directly, not exported graphs")
    module, _, name = entry.runner.partition(":")
    return getattr(importlib.import_module(module), name)


def open_export(path, backend: str, *, cache_dir=None) -> Runner:
    """A runner for an export directory made by ``export_onnx`` / ``streamflow-jax export``."""
    return runner_class(backend)(load_export(path), cache_dir=Path(cache_dir or cache_root()))


def use_export(model, path, backend: str) -> Runner:
    """Runs ``model``'s velocity calls on ``backend`` from the export directory ``path`` (made by
    ``streamflow-jax export`` or ``export_onnx``) instead of exporting on demand: from now on, in
    this process, ``sf.sample(model, ..., backend=backend)``, a pipeline or stream engine running
    ``model`` with that backend, uses it.

    The export must be of this very model: its recorded fingerprint (class, config, adapter and
    every weight, as loaded: dtype and FP8 included) must be ``model.fingerprint()``, or a
    ValueError says how the two differ. A call the export's profile does not take (a larger
    batch, another size) is a ``ShapeError`` naming the export, not a new export.

    Returns:
        the runner (``open_export``'s).
    """
    entry = check_backend(backend)
    if not entry.exported:
        raise ValueError(f"backend {backend!r} runs models directly; an export runs on "
                         f"{' or '.join(b for b, e in BACKENDS.items() if e.exported)}")
    if not isinstance(model, FlowModel) or model.family.kind != "velocity":
        raise ValueError(f"use_export needs the velocity model the export was made from (sf.load(...)), got "
                         f"{getattr(model, 'class_name', type(model).__name__)}")
    runner = open_export(path, backend)
    meta = runner.exported.meta
    made_from = meta.get("class_name")
    if runner.method != "velocity":
        raise ValueError(f"{path}: an export of {made_from}'s {runner.method}, not of a velocity model")
    if made_from != model.class_name:
        raise ValueError(f"{path}: an export of {made_from}, and this model is {model.class_name}")
    if meta.get("model_fingerprint") != model.fingerprint():
        there, here = _model_facts(meta), _model_facts(model)
        facts = f"{there} there; {here} here" if there != here else f"{here} both: another checkpoint, LoRA or adapter"
        raise ValueError(f"{path}: exported from other weights than this model's ({facts}): the same checkpoint must "
                         "be loaded the same way (dtype, FP8, LoRA, adapter), or exported again from this one")
    _GIVEN[(model.fingerprint(), backend)] = runner
    return runner


def given_export(model, backend: str) -> Runner | None:
    """The runner ``use_export`` registered for this model (as it is now: its fingerprint) and
    ``backend``, or None."""
    return _GIVEN.get((model.fingerprint(), backend))


def _model_facts(source) -> str:
    """What may tell two loads of a model apart: its parameters' dtype and FP8 (``source``: a
    model, or an export's metadata, whose ``model`` record holds them)."""
    if isinstance(source, Mapping):
        facts = source.get("model") or {}
        if not facts:
            return "an export of an older version, which did not record how the model was loaded"
        dtype, fp8 = facts.get("dtype"), facts.get("fp8")
    else:
        from streamflow_jax.quantization import is_quantized

        dtype, fp8 = str(jnp.dtype(source.dtype)), is_quantized(source)
    return f"{dtype} weights" + (", FP8" if fp8 else "")


def auto_spec(model, batch: int, height: int, width: int, text_len: int | None):
    """The spec ``runner_for`` exports: this call's shapes as 'opt', generous min/max."""
    return build_velocity_spec(model, batch=Range(1, batch, max(8, batch)), height=latent_range(model, height),
                               width=latent_range(model, width), text_len=text_len, dtype=str(model.dtype))


def _covering_entry(exports: Path, prefix: str, model, feeds: dict):
    """An export already in the cache, of this model, made by the versions installed here, whose
    profile covers these shapes (a call of another batch or size in a new process re-exported
    the whole model); its metadata is read first, its files verified only for the one taken."""
    if not exports.is_dir():
        return None
    for entry in sorted(exports.iterdir()):
        if not entry.name.startswith(prefix) or not (entry / META_NAME).is_file():
            continue
        try:
            meta, spec = read_export_meta(entry)
            if meta.get("model_fingerprint") != model.fingerprint() or not made_here(meta):
                continue
            spec.check(feeds)
            return load_export(entry)
        except (ShapeError, ExportError, OSError, AttributeError, TypeError):
            continue  # another profile, or an entry being replaced or broken: not this one
    return None


def runner_for(model, backend: str, *, batch: int, height: int, width: int, cond: dict, cache_dir=None,
               progress: bool = False) -> Runner:
    """The ``backend`` runner to use for ``model`` on inputs of these shapes.

    Args:
        model: a ``FlowModel`` (exported on first use) or a runner (returned as is).
        batch: the batch of each velocity call (CFG's doubled batch included).
        height, width: latent sides; cond: the conditioning (its shapes set the graph's).
        cache_dir: the cache root (default ``cache_root()``).
        progress: a progress bar over an export this call makes (none when the cache has one).
    """
    if isinstance(model, Runner):
        if model.backend != backend:
            raise ValueError(f"model is a {model.backend} runner, but backend={backend!r} was asked for")
        return model
    if model.family.kind != "velocity":
        raise ValueError(f"backend {backend!r}: {model.class_name} is not a velocity model")
    given = given_export(model, backend)
    if given is not None:  # use_export's: this export or none
        _check_given(given, _feeds(model, batch, height, width, cond))
        return given
    if backend == "tensorrt":
        from streamflow_jax.quantization import TENSORRT_REFUSAL, activation_scales

        if activation_scales(model) == "dynamic":
            raise ValueError(TENSORRT_REFUSAL)
        from streamflow_jax.backends.tensorrt import TensorRTUnavailable, local_gpu, tensorrt_flavour

        flavour = tensorrt_flavour(None)  # an engine that cannot run here is refused before exporting
        reason = flavour.cannot_run(flavour.targets(None, fp8=activation_scales(model) is not None), local_gpu())
        if reason:
            raise TensorRTUnavailable(f"a {flavour.name} engine cannot run here: {reason}")
    if backend == "onnxruntime" and jnp.dtype(model.dtype) == jnp.bfloat16:
        from streamflow_jax.backends.onnxruntime import default_providers

        if "CUDAExecutionProvider" not in default_providers():  # refused before a useless export
            raise ValueError("backend 'onnxruntime': this model's weights are bfloat16, and ONNX Runtime's CPU "
                             "provider has no bfloat16 kernels (its Conv, for one): use float32 or float16 weights "
                             "(dtype= when loading; generate's and serve's --dtype; convert --dtype), or backend "
                             "'xla' or 'tensorrt'")
    text = cond.get("encoder_hidden_states")
    text_len = None if text is None else int(text.shape[1])
    model.latent_shape(height, width)  # raises on sizes the model cannot take
    feeds = _feeds(model, batch, height, width, cond)
    root = Path(cache_dir or cache_root())
    for (fingerprint, _, kind, where), runner in _RUNNERS.items():  # an earlier export may cover this call
        if fingerprint == model.fingerprint() and kind == backend and where == str(root) and runner.covers(feeds):
            return runner
    spec = auto_spec(model, batch, height, width, text_len)
    key = (model.fingerprint(), spec.key(), backend, str(root))
    versions = json.dumps(_versions(), sort_keys=True)  # an upgrade (an export fix) makes new entries
    prefix = f"{model.family.name}-{model.fingerprint()[:16]}-"
    path = root / "exports" / (prefix + hashlib.sha256((spec.key() + versions).encode()).hexdigest()[:12])
    exported = _covering_entry(root / "exports", prefix, model, feeds)  # another process's, of other shapes
    if exported is None and path.exists():
        inode = _inode(path)
        try:
            exported = load_export(path)
            if exported.meta.get("model_fingerprint") != model.fingerprint():
                raise ExportError(f"{path}: made from another model")
            if not made_here(exported.meta):
                raise ExportError(f"{path}: made by other versions")
        except ExportError:
            discard_dir(path, inode=inode)  # stale or corrupt: rebuilt, never used (a newer one is kept)
            exported = None
    if exported is None:
        try:
            exported = export_onnx(model, spec, path, progress=progress, shared=True)
        except ConversionError:
            if not path.is_dir():
                raise
            exported = load_export(path)  # another process finished this entry meanwhile
    runner = runner_class(backend)(exported, cache_dir=root)
    _RUNNERS[key] = runner
    return runner


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _feeds(model, batch: int, height: int, width: int, cond: dict) -> dict:
    """The velocity graph's inputs for a call of these shapes, as shapes (float32)."""
    feeds = {"x": (batch, height, width, model.latent_channels), "t": (batch,),
             **{k: (batch,) + tuple(jnp.shape(v)[1:]) for k, v in cond.items()}}
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in feeds.items()}


def _check_given(runner: Runner, feeds: dict) -> None:
    """A ``ShapeError`` naming a ``use_export`` export whose profile does not take this call, with
    the profile it has."""
    path = runner.exported.path
    try:
        runner.spec.check(feeds)
    except ShapeError as e:
        profile = ", ".join(f"{k} {v}" for k, v in runner.spec.dims.items())
        raise ShapeError(f"export {path} does not take this call: {e} (its profile: {profile}; H and W in latent "
                         "pixels)") from None


def sample(
    model: Any,
    noise: jax.Array,
    ts: jax.Array,
    cond: dict[str, Any],
    guidance_scale=None,
    uncond: dict[str, Any] | None = None,
    backend: str = "xla",
    progress: bool = False,
) -> jax.Array:
    """Integrates the RF ODE from ``noise`` at t=ts[0] to ts[-1] with Euler steps.

    Args:
        model: anything with ``velocity(x, t, cond)``; usually ``sf.load(...)``.
        noise: ``[B, H, W, C]`` starting latents (their dtype is the integration dtype with
            ``xla``; the exported backends integrate in float32 and return this dtype).
        ts: ``[S+1]`` (one grid for all) or ``[S+1, B]`` (one column per element; pad shorter
            schedules with ``schedules.stack``).
        cond: dict of ``[B, ...]`` conditioning arrays, named as in diffusers.
        guidance_scale: ``None`` for no classifier-free guidance, or a scalar / ``[B]`` scale:
            ``v_u + g (v_c - v_u)`` as written, whatever ``g`` is (the pipelines apply the
            guidance rule, ``sampling.Guidance.resolve``, before they get here).
        uncond: conditioning of the unconditional branch, same keys and shapes as ``cond``.
        backend: ``"xla"`` (jit-compiled scan), or another entry of ``BACKENDS``: the same steps
            around an exported graph. ``model`` is then a ``FlowModel`` (exported on first use
            into the cache directory, see ``runner_for``) or a runner from ``open_export``.
        progress: show a progress bar over the steps (it appears for runs longer than 2 s).

    Returns:
        ``[B, H, W, C]`` latents at the grid's last time.

    Works inside a caller's ``jax.jit`` with the XLA backend (one scan). Called with concrete
    arrays, inputs with NaN or inf are refused, and a grid of more than a few steps runs in
    compiled segments of about half a second, so that Ctrl-C stops it between two. The other
    backends return the same result within the tolerance of the exported graph's precision.
    """
    entry = check_backend(backend)
    if not hasattr(model, "velocity"):
        raise ValueError(f"model must be a velocity model (sf.load(...)) or a runner, got {type(model).__name__}")
    noise = jnp.asarray(noise)
    ts = _grid_array(ts)
    for name, value in (("cond", cond), ("uncond", uncond)):
        if not (isinstance(value, Mapping) or value is None and name == "uncond"):
            raise ValueError(f"{name} must be a dict of [B, ...] arrays, got {type(value).__name__}")
    cond = dict(cond)
    uncond = None if uncond is None else dict(uncond)
    grid, guidance_scale = sampling.check_inputs(noise, ts, cond, guidance_scale, uncond)
    if isinstance(model, FlowModel) and model.family.kind == "velocity":
        model.check_call(noise, grid[0], cond, x_name="noise")  # before an export or a trace
    if not entry.exported:
        if isinstance(model, Runner):
            raise ValueError(f"backend='xla' needs a FlowModel, got a {model.backend} runner")
        if not isinstance(model, FlowModel) or sampling.is_traced(model, noise, grid, cond, guidance_scale, uncond):
            return sampling.scan(model, noise, grid, cond, guidance_scale, uncond)
        return _segments(model, noise, grid, cond, guidance_scale, uncond, progress)
    b, h, w, _ = noise.shape
    dtype = noise.dtype  # what the result comes back as
    try:
        runner = runner_for(model, backend, batch=b if guidance_scale is None else 2 * b, height=h, width=w,
                            cond=cond, progress=progress)
    except ShapeError as e:
        raise _doubled(e, b, guidance_scale) from None
    if not runner.on_device:
        # a runner computing on the host (ONNX Runtime on CPU): the loop in numpy, so each step
        # is one graph call and a few numpy ops, with no device dispatch or copy around it
        to_host = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
        noise, grid, guidance_scale = to_host(noise), to_host(grid), to_host(guidance_scale)
        cond = jax.tree_util.tree_map(to_host, cond)
        uncond = None if uncond is None else jax.tree_util.tree_map(to_host, uncond)
    x = noise
    try:
        for i in tqdm(range(grid.shape[0] - 1), disable=not progress, delay=2, unit="step", leave=False):
            x = sampling.step(runner, x, grid[i], grid[i + 1], cond, guidance_scale, uncond)
    except ShapeError as e:
        raise _doubled(e, b, guidance_scale) from None
    return jnp.asarray(x, dtype)


def _doubled(e: ShapeError, b: int, guidance_scale) -> ShapeError:
    """A graph's refusal of a batch, saying so where classifier-free guidance doubled it."""
    if guidance_scale is None or f"B={2 * b} " not in str(e):
        return e
    return ShapeError(f"{e} (classifier-free guidance runs the batch twice: {2 * b} rows for {b} samples)")


def _grid_array(ts) -> jax.Array:
    """``sample``'s ``ts`` as float32, or a ValueError naming it (not numbers, not one shape)."""
    if sampling.is_traced(ts):
        return jnp.asarray(ts, jnp.float32)
    try:
        arr = np.asarray(ts)
    except ValueError:  # grids of different lengths
        raise ValueError("ts: grids of different lengths; pad them into one [S+1, B] grid with "
                         "schedules.stack") from None
    if not is_real_dtype(arr.dtype):  # bfloat16 too
        raise ValueError(f"ts must be times (real numbers), got {ts!r:.80}")
    return jnp.asarray(arr, jnp.float32)


def pad_grid(grid: jax.Array, least: int = 8) -> jax.Array:
    """``[S+1, B]`` -> ``[N+1, B]``, N the power of two >= max(S, least), the last row repeated."""
    steps = grid.shape[0] - 1
    rows = max(least, 1 << (steps - 1).bit_length()) + 1
    if rows == grid.shape[0]:
        return grid
    return jnp.concatenate([grid, jnp.broadcast_to(grid[-1:], (rows - grid.shape[0], *grid.shape[1:]))])


def _segments(model, x, grid, cond, guidance_scale, uncond, progress: bool):
    """The compiled steps of a whole grid, run a segment at a time (``sampling.steps_between``,
    one program for every segment), each about ``SEGMENT_SECONDS`` long once the step time is
    known. Two segments are in flight, so the device never waits for the host; when the older
    one completes the host updates the progress bar, and a pending Ctrl-C is raised there. Short
    grids run in one call.

    The grid is padded to a bucket of steps (8, 16, 32...; the padding is never read), so that
    every run of 1 to 8 steps uses one compiled program, 9 to 16 the next, and so on: another
    step count does not compile again."""
    steps = grid.shape[0] - 1
    grid = pad_grid(grid)
    if steps <= 8:
        return sampling.steps_between_jit(model, x, grid, np.int32(0), np.int32(steps), cond, guidance_scale, uncond)
    done, size, finished_at, bar = 0, 1, None, None
    in_flight: list[tuple[jax.Array, int]] = []
    try:
        while done < steps or in_flight:
            if done < steps and len(in_flight) < 2:
                n = min(size, steps - done)
                x = sampling.steps_between_jit(model, x, grid, np.int32(done), np.int32(done + n), cond,
                                               guidance_scale, uncond)
                in_flight.append((x, n))
                done += n
                continue
            oldest, n = in_flight.pop(0)
            oldest.block_until_ready()  # the host waits here: Ctrl-C lands between two segments
            now = time.perf_counter()
            if finished_at is not None:  # completion to completion: one segment's run, compiling excluded
                size = max(1, min(steps, int(n * SEGMENT_SECONDS / max(now - finished_at, 1e-6))))
                if bar is None:  # the bar shows runs still going 2 s after they compiled
                    bar = tqdm(total=steps, initial=done - n - sum(k for _, k in in_flight), disable=not progress,
                               delay=2, unit="step", leave=False)
            if bar is not None:
                bar.update(n)
            finished_at = now
    except BaseException:
        for y, _ in in_flight:  # never leave a computation running under an exiting interpreter
            y.block_until_ready()
        raise
    finally:
        if bar is not None:
            bar.close()
    return x
