"""The velocity protocol, classifier-free guidance, and the scan-based Euler sampler.

Every family exposes ``velocity(x, t, cond)`` (``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]``).
The sampler integrates ``dx/dt = v`` from t=1 to t=0 along a ``[S+1, B]`` grid: one time
column per element, so one batch can mix schedules (see ``schedules.stack``).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from streamflow_jax.backends import BACKENDS
from streamflow_jax.models import FlowModel


class VelocityModel(Protocol):
    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]`` -> ``[B, H, W, C]``."""


def _per_element(a: jax.Array, x: jax.Array) -> jax.Array:
    """``[B]`` -> ``[B, 1, 1, 1]`` (as many ones as ``x`` has trailing axes), in x's dtype."""
    return a.astype(x.dtype).reshape(a.shape + (1,) * (x.ndim - 1))


def euler_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One Euler step of every element by its own ``dt``; ``x``, ``v``: ``[B, ...]``; ``t``: ``[B]``."""
    return x + _per_element(t_next - t, x) * v


def guided_velocity(model: VelocityModel, x, t, cond, guidance_scale=None, uncond=None):
    """``v_u + g * (v_c - v_u)`` from one call on the doubled batch ``[uncond; cond]``.

    Args:
        x: ``[B, H, W, C]``; t: ``[B]``; cond, uncond: dicts of ``[B, ...]``.
        guidance_scale: ``None`` (no guidance, ``uncond`` unused), or ``[B]`` scales.
    """
    if guidance_scale is None:
        return model.velocity(x, t, cond)
    b = x.shape[0]
    both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    v = model.velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    v_u, v_c = v[:b], v[b:]
    return v_u + _per_element(guidance_scale, v_u) * (v_c - v_u)


def _check_inputs(noise, grid, cond, guidance_scale, uncond):
    if noise.ndim != 4:
        raise ValueError(f"noise must be NHWC [B, H, W, C], got shape {noise.shape}")
    b = noise.shape[0]
    if grid.ndim == 1:
        grid = jnp.broadcast_to(grid[:, None], (grid.shape[0], b))
    if grid.ndim != 2 or grid.shape[1] != b or grid.shape[0] < 2:
        raise ValueError(f"time grid must be [S+1] or [S+1, B={b}] with S >= 1, got shape {grid.shape}")
    for name, arr in cond.items():
        if jnp.shape(arr)[:1] != (b,):
            raise ValueError(f"cond[{name!r}] has shape {jnp.shape(arr)}; expected a leading batch axis of {b}")
    if guidance_scale is not None:
        if uncond is None:
            raise ValueError("guidance_scale needs uncond (the unconditional/negative conditioning)")
        if set(uncond) != set(cond):
            raise ValueError(f"uncond keys {sorted(uncond)} differ from cond keys {sorted(cond)}")
        for name, arr in uncond.items():
            if jnp.shape(arr) != jnp.shape(cond[name]):
                raise ValueError(f"uncond[{name!r}] has shape {jnp.shape(arr)}, cond has {jnp.shape(cond[name])}")
        guidance_scale = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (b,))
    return grid, guidance_scale


def _step(model, x, t, t_next, cond, guidance_scale, uncond):
    """One sampler step, shared by every backend: guided velocity, then the Euler update."""
    return euler_step(x, guided_velocity(model, x, t, cond, guidance_scale, uncond), t, t_next)


def _scan(model, noise, grid, cond, guidance_scale, uncond):
    def body(x, times):
        t, t_next = times  # [B], [B]
        return _step(model, x, t, t_next, cond, guidance_scale, uncond), None

    x, _ = jax.lax.scan(body, noise, (grid[:-1], grid[1:]))
    return x


_scan_jit = jax.jit(_scan)


def _loop(runner, noise, grid, cond, guidance_scale, uncond):
    """The same steps as ``_scan``, driven from Python around an exported graph's runner."""
    x = noise
    for i in range(grid.shape[0] - 1):
        x = _step(runner, x, grid[i], grid[i + 1], cond, guidance_scale, uncond)
    return x


def sample(
    model: VelocityModel,
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
            use into the cache directory, see ``backends.runner_for``) or a runner from
            ``backends.open_export``.

    Returns:
        ``[B, H, W, C]`` latents at the grid's last time.

    Works inside a caller's ``jax.jit`` with the XLA backend. The other backends return the
    same result within the tolerance of the exported graph's precision.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    noise = jnp.asarray(noise)
    cond = dict(cond)
    uncond = None if uncond is None else dict(uncond)
    grid, guidance_scale = _check_inputs(noise, jnp.asarray(ts, jnp.float32), cond, guidance_scale, uncond)
    if backend == "xla":
        if getattr(model, "backend", None) is not None:
            raise ValueError(f"backend='xla' needs a FlowModel, got a {model.backend} runner")
        run = _scan_jit if isinstance(model, FlowModel) else _scan
        return run(model, noise, grid, cond, guidance_scale, uncond)
    from streamflow_jax.backends import runner_for

    b, h, w, _ = noise.shape
    runner = runner_for(model, backend, batch=b if guidance_scale is None else 2 * b, height=h, width=w, cond=cond)
    return _loop(runner, noise, grid, cond, guidance_scale, uncond)
