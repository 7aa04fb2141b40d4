"""The math of sampling: the velocity protocol, guidance, the Euler step, the scan.

Every family exposes ``velocity(x, t, cond)`` (``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]``).
The sampler integrates ``dx/dt = v`` from t=1 to t=0 along a ``[S+1, B]`` grid: one time
column per element, so one batch can mix schedules (see ``schedules.stack``). Nothing here
knows about exported graphs: ``backends.sample`` (``sf.sample``) runs these same steps around
the velocity of whichever backend is asked for.

``Guidance.resolve`` is the one rule that turns a requested guidance scale into what a call
runs with (none, classifier-free guidance with a scale, or a scale the model takes as an input);
pipelines, the stream engine, the CLI and the server all take it from there. ``check_seed`` is
the one rule for seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax.schedules import MAX_STEPS, SEED_LIMIT

GUIDANCE_MODES = ("cfg", "embedded", "none")  # what a model or pipeline does with a guidance scale


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What one call (or one request) is guided by.

    Attributes:
        kind: ``"none"``; ``"cfg"``: classifier-free guidance ``v_u + g (v_c - v_u)`` against an
            unconditional branch; ``"embedded"``: the scale is an input of the model
            (guidance-distilled Flux-dev), no second branch.
        scale: a float, or ``[B]`` float32 (one per element); None for ``"none"``.
    """

    kind: str = "none"
    scale: Any = None

    @classmethod
    def resolve(cls, scale=None, *, mode: str = "cfg", default=None) -> Guidance:
        """The one guidance rule.

        Args:
            scale: the requested scale: None (the default), a number, or one per element.
            mode: what the model does with a scale: ``"cfg"``, ``"embedded"``, or ``"none"``
                (neither, e.g. Flux-schnell: a scale is ignored, as diffusers ignores it).
            default: the pipeline's default scale (None: no guidance by default).

        Returns:
            ``"none"`` when the mode takes no scale, when no scale is given and there is no
            default, or for classifier-free guidance at scales <= 1 (as diffusers: CFG only
            above 1, where it changes the result; one per element: every one of them); else
            the scale with its kind. Per element, a scale <= 1 among larger ones means the same
            (the pipelines run that element's conditional velocity: ``PromptPipeline.conditioning``).

        Raises:
            ValueError: a scale that is not a finite number (NaN, inf, a string), or an
                embedded-guidance model without a scale.
        """
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode {mode!r} not in {GUIDANCE_MODES}")
        scale = default if scale is None else scale
        if scale is None:
            if mode == "embedded":
                raise ValueError("this model takes the guidance scale as an input: give guidance_scale")
            return cls()
        scale = _finite_scale(scale)  # checked where it is ignored too (mode "none"): NaN is no scale
        if mode == "none" or mode == "cfg" and np.all(np.asarray(scale) <= 1):
            return cls()
        return cls(mode, scale)

    @property
    def cfg(self) -> bool:
        return self.kind == "cfg"

    @property
    def cfg_scale(self):
        """The scale of classifier-free guidance (None without it): ``sample``'s ``guidance_scale``."""
        return self.scale if self.kind == "cfg" else None


def per_element_rule(cond: dict, uncond: dict, scale):
    """``(uncond, scale)`` for ``sample`` with the scalar rule applied per element: where one
    element's classifier-free guidance scale is <= 1 it runs no guidance, its conditional
    velocity exactly (its ``uncond`` rows are its ``cond`` rows, at scale 1: ``v_u = v_c``), as
    that scale alone would (``Guidance.resolve``); a scalar scale passes unchanged."""
    if not np.ndim(scale) or not np.any(off := np.asarray(scale) <= 1):
        return uncond, scale
    rows = {k: jnp.where(off.reshape(-1, *[1] * (jnp.ndim(v) - 1)), cond[k], v) for k, v in uncond.items()}
    return rows, np.where(off, np.float32(1), scale).astype(np.float32)


F32_MAX = float(np.finfo(np.float32).max)


def _finite_scale(scale):
    if isinstance(scale, bool | str | bytes):
        raise ValueError(f"guidance_scale must be a number, got {scale!r}")
    try:
        arr = np.asarray(scale, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number or one number per element, got {scale!r}") from None
    if arr.ndim > 1:
        raise ValueError(f"guidance_scale must be a number or [B] numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"guidance_scale {scale!r} is not finite")
    if np.any(np.abs(arr) > F32_MAX):  # sampled in float32, where it would be inf
        raise ValueError(f"guidance_scale {scale!r} is beyond float32's range (|scale| <= {F32_MAX:.3g})")
    return float(arr) if arr.ndim == 0 else arr.astype(np.float32)


def check_seed(seed) -> int:
    """A seed as an int in ``[0, 2**32)``, the one rule everywhere (pipelines, the stream engine,
    the CLI, the server); anything else is a ValueError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed {seed} outside [0, 2**32)")
    return int(seed)


def seeded_noise(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The starting latents of a seed: ``jax.random.normal(key(seed), shape)``, as every path makes them."""
    return jax.random.normal(jax.random.key(check_seed(seed)), shape, dtype)


def is_traced(*arrays) -> bool:
    """Whether any of these is a tracer (inside a caller's jit, grad or vmap): values unknown."""
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(arrays))


def check_finite(**arrays) -> None:
    """Raises a ValueError naming the first argument with NaN or inf values. Only concrete values
    are looked at: under a caller's trace (a jit whose closure holds concrete arrays included)
    there are none, and the check is left out."""
    for name, value in arrays.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(value):
            if leaf is None or is_traced(leaf):
                continue
            finite = jnp.isfinite(jnp.asarray(leaf)).all()  # on the device: no copy of the inputs
            if is_traced(finite):  # inside a trace: a constant of the caller's program
                return
            if not bool(finite):
                where = name + jax.tree_util.keystr(path)
                raise ValueError(f"{where} has non-finite values (NaN or inf)")


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
        ValueError: naming the argument whose shape does not fit, or (outside a caller's trace)
            whose values are not finite.
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must be NHWC [B, H, W, C], got shape {noise.shape}")
    if not jnp.issubdtype(noise.dtype, jnp.floating):  # the integration dtype: ints would round every step
        raise ValueError(f"noise must be a real floating-point array (its dtype is the integration dtype), "
                         f"got {noise.dtype}")
    if 0 in noise.shape:
        raise ValueError(f"noise has shape {noise.shape}: every axis needs at least one element")
    b = noise.shape[0]
    given = grid.shape  # the caller's, for the message (a 1-D grid is broadcast over the batch)
    if grid.ndim == 1:
        grid = jnp.broadcast_to(grid[:, None], (grid.shape[0], b))
    if grid.ndim != 2 or grid.shape[1] != b or grid.shape[0] < 2:
        raise ValueError(f"time grid must be [S+1] or [S+1, B={b}] with S >= 1, got shape {given}")
    if grid.shape[0] - 1 > MAX_STEPS:
        raise ValueError(f"time grid has {grid.shape[0] - 1} steps; at most {MAX_STEPS} (schedules.MAX_STEPS)")
    for name, arr in cond.items():
        if jnp.shape(arr)[:1] != (b,):
            raise ValueError(f"cond[{name!r}] has shape {jnp.shape(arr)}; expected a leading batch axis of {b}")
    if guidance_scale is None and uncond is not None:  # it was dropped without a word
        raise ValueError("uncond is given without guidance_scale: classifier-free guidance needs both (a scale "
                         "<= 1 turns guidance off in the pipelines; here, leave uncond out)")
    if guidance_scale is not None:
        if uncond is None:
            raise ValueError("guidance_scale needs uncond (the unconditional/negative conditioning)")
        if set(uncond) != set(cond):
            raise ValueError(f"uncond keys {sorted(uncond)} differ from cond keys {sorted(cond)}")
        for name, arr in uncond.items():
            if jnp.shape(arr) != jnp.shape(cond[name]):
                raise ValueError(f"uncond[{name!r}] has shape {jnp.shape(arr)}, cond has {jnp.shape(cond[name])}")
        if not is_traced(guidance_scale):  # the scale rule's checks: a number, finite, within float32
            guidance_scale = _finite_scale(guidance_scale)
        scale = jnp.asarray(guidance_scale, jnp.float32)
        if scale.ndim > 1 or scale.ndim == 1 and scale.shape[0] not in (1, b):
            raise ValueError(f"guidance_scale has shape {scale.shape}; expected a scalar or one per element, [B={b}]")
        guidance_scale = jnp.broadcast_to(scale, (b,))
    check_finite(noise=noise, grid=grid, cond=cond, guidance_scale=guidance_scale, uncond=uncond)
    check_grid_values(grid)
    return grid, guidance_scale


def check_grid_values(grid) -> None:
    """A concrete ``[S+1, B]`` grid runs down from at most 1 to at least 0 (equal neighbours
    allowed: ``schedules.stack``'s zero-length padding steps), and moves every element (a
    column that stays at one time is noise returned as it came, often a grid given as
    ``[B, S+1]``); under a trace, not looked at."""
    if is_traced(grid):
        return
    ok = (grid.min() >= 0) & (grid.max() <= 1) & jnp.all(jnp.diff(grid, axis=0) <= 0)
    if is_traced(ok):
        return
    ok, still = jax.device_get((ok, grid[0] == grid[-1]))  # one transfer for both
    if not ok:
        raise ValueError("time grid must run down from at most 1 to at least 0 (t = 1 is noise, 0 data)")
    still = np.flatnonzero(still)
    if still.size:  # sampled, it would come back as the noise itself
        raise ValueError(f"time grid moves no time for element {int(still[0])} (it stays at "
                         f"t={float(grid[0, still[0]]):g}); a grid is [S+1, B], times down the first axis")


def scan(model: VelocityModel, noise, grid, cond, guidance_scale=None, uncond=None):
    """``lax.scan`` of ``step`` over a checked ``[S+1, B]`` grid; returns ``[B, H, W, C]``."""

    def body(x, times):
        t, t_next = times  # [B], [B]
        return step(model, x, t, t_next, cond, guidance_scale, uncond), None

    x, _ = jax.lax.scan(body, noise, (grid[:-1], grid[1:]))
    return x


def steps_between(model: VelocityModel, x, grid, start, stop, cond, guidance_scale=None, uncond=None):
    """Steps ``start .. stop-1`` of a checked ``[S+1, B]`` grid: the same step as ``scan``, in a
    loop whose bounds are traced values, so one compiled program runs any segment of the grid
    (``backends.sample`` runs long grids a segment at a time, to show progress and to let Ctrl-C in)."""

    def body(i, x):
        return step(model, x, grid[i], grid[i + 1], cond, guidance_scale, uncond)

    return jax.lax.fori_loop(start, stop, body, x)


scan_jit = jax.jit(scan)  # module-level: models of the same shapes share compiled code
def steps_between_jit(*args):
    """``steps_between`` jitted with the library's compile options (``ops.compiler_options``:
    none on a CPU)."""
    from streamflow_jax import ops

    return ops.jitted(steps_between)(*args)
