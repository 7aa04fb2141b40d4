"""The math of sampling: the velocity protocol, classifier-free guidance, the Euler step, the scan.

Every family exposes ``velocity(x, t, cond)`` (``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]``).
The sampler integrates ``dx/dt = v`` from t=1 to t=0 along a ``[S+1, B]`` grid: one time
column per element, so one batch can mix schedules (see ``schedules.stack``). Nothing here
knows about exported graphs: ``backends.sample`` (``sf.sample``) runs these same steps around
the velocity of whichever backend is asked for.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class VelocityModel(Protocol):
    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]`` -> ``[B, H, W, C]``."""


def _xp(a):
    """numpy for numpy arrays (a runner driven from the host), jax.numpy otherwise: the same
    step serves a compiled scan and a host loop around an exported graph."""
    return np if isinstance(a, np.ndarray) else jnp


def per_element(a: jax.Array, x: jax.Array) -> jax.Array:
    """``[B]`` -> ``[B, 1, 1, 1]`` (as many ones as ``x`` has trailing axes), in x's dtype."""
    return a.astype(x.dtype).reshape(a.shape + (1,) * (x.ndim - 1))


def euler_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One Euler step of every element by its own ``dt``; ``x``, ``v``: ``[B, ...]``; ``t``: ``[B]``."""
    return x + per_element(t_next - t, x) * v


def combine_guidance(v_uncond: jax.Array, v_cond: jax.Array, guidance_scale: jax.Array) -> jax.Array:
    """``v_u + g * (v_c - v_u)`` with one scale per element (``[B]``)."""
    return v_uncond + per_element(guidance_scale, v_uncond) * (v_cond - v_uncond)


def guided_velocity(model: VelocityModel, x, t, cond, guidance_scale=None, uncond=None):
    """``v_u + g * (v_c - v_u)`` from one call on the doubled batch ``[uncond; cond]``.

    Args:
        x: ``[B, H, W, C]``; t: ``[B]``; cond, uncond: dicts of ``[B, ...]``.
        guidance_scale: ``None`` (no guidance, ``uncond`` unused), or ``[B]`` scales.
    """
    if guidance_scale is None:
        return model.velocity(x, t, cond)
    b, xp = x.shape[0], _xp(x)
    both = jax.tree_util.tree_map(lambda u, c: xp.concatenate([u, c], axis=0), uncond, cond)
    v = model.velocity(xp.concatenate([x, x]), xp.concatenate([t, t]), both)
    return combine_guidance(v[:b], v[b:], guidance_scale)


def noise_to(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """A rectified flow's sample at time ``t`` (``[B]``) between data ``x0`` and ``noise``:
    ``(1 - t) x0 + t noise``, per element (diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``)."""
    t = per_element(jnp.asarray(t, jnp.float32), x0)
    return (1 - t) * x0 + t * noise


def step(model: VelocityModel, x, t, t_next, cond, guidance_scale=None, uncond=None):
    """One sampler step: the (guided) velocity, then the Euler update. ``t``, ``t_next``: ``[B]``."""
    return euler_step(x, guided_velocity(model, x, t, cond, guidance_scale, uncond), t, t_next)


def check_inputs(noise, grid, cond, guidance_scale=None, uncond=None):
    """Validates a sampling call; returns the ``[S+1, B]`` grid and the ``[B]`` scale (or None).

    Raises:
        ValueError: naming the argument whose shape does not fit.
    """
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


def scan(model: VelocityModel, noise, grid, cond, guidance_scale=None, uncond=None):
    """``lax.scan`` of ``step`` over a checked ``[S+1, B]`` grid; returns ``[B, H, W, C]``."""

    def body(x, times):
        t, t_next = times  # [B], [B]
        return step(model, x, t, t_next, cond, guidance_scale, uncond), None

    x, _ = jax.lax.scan(body, noise, (grid[:-1], grid[1:]))
    return x


scan_jit = jax.jit(scan)  # module-level: models of the same shapes share compiled code
