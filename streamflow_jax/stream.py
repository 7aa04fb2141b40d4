"""The stream engine: many requests, each at its own step, advanced by one batched call per tick.

The engine holds ``slots = streams * slots_per_stream`` latents. A tick is one compiled
function ``(x [B,H,W,C], t [B], t_next [B], cond, ..., done [K]) -> (x', decoded [K,...])``
that moves every slot one Euler step along its own grid (idle slots have ``t == t_next`` and
stay put) and decodes the slots that finish with it; then those are retired and queued
requests admitted into the free slots. At most one
request per stream is admitted per tick, so a stream's slots end up one step apart: after
warm-up each stream finishes one request per tick (StreamFlow's stream batch).

Requests may differ in conditioning, seed, step count, schedule and guidance scale. Every
submitted request yields exactly one result or one error (``RequestError``), by id.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.models import decode_latents
from streamflow_jax.sampling import BACKENDS, _step


class RequestError(ValueError):
    """Why one request failed; the engine goes on with the others."""


@dataclasses.dataclass
class _Request:
    id: int
    noise: np.ndarray  # [H, W, C]
    grid: np.ndarray  # [S+1] float32
    cond: dict[str, np.ndarray]  # each without the batch axis
    uncond: dict[str, np.ndarray] | None
    guidance: float


@dataclasses.dataclass
class _Slot:
    request: _Request | None = None
    step: int = 0  # next step to take: t = grid[step], t_next = grid[step + 1]


def _tick(model, x, t, t_next, cond, guidance, uncond):
    return _step(model, x, t, t_next, cond, guidance, uncond)


def _tick_decode(model, decoder, x, t, t_next, cond, guidance, uncond, done):
    """The step, then the decoder on the finishing slots ``done`` ``[K]``, in one program."""
    x = _step(model, x, t, t_next, cond, guidance, uncond)
    return x, decode_latents(decoder, x[done])


def _write(buf, index, value):
    return buf.at[index].set(value)


# module-level, so engines of the same shapes share compiled code; the slot buffer is donated
_tick_jit = jax.jit(_tick, donate_argnums=(1,))
_tick_decode_jit = jax.jit(_tick_decode, donate_argnums=(2,))
_write_jit = jax.jit(_write, donate_argnums=(0,))


def _bucket(k: int, limit: int) -> int:
    """Decode batches are padded to a power of two (at most ``limit``): few compiled variants."""
    return min(1 << max(k - 1, 0).bit_length(), limit)


class StreamEngine:
    """Continuous batching of sampling requests over a fixed set of slots.

    Args:
        model: a ``FlowModel`` (or, with a non-XLA backend, a runner from ``backends``).
        latent_shape: ``(H, W, C)`` of every request's latent.
        cond_shapes: name -> per-request shape (no batch axis) of each conditioning entry.
        slots_per_stream: N, the slots of one stream (StreamFlow's stream batch size).
        streams: how many streams share each call (batch = N * streams).
        guidance: ``True`` runs classifier-free guidance on every slot (each request brings
            its ``uncond`` and scale); ``False`` runs none. CFG is all or nothing per engine.
        decoder: optional VAE/TAESD ``FlowModel``; its ``decode_latents`` runs on the finishing
            slots inside the tick's compiled call (padded to a power of two of them).
        postprocess: optional host function applied to each finished output (decoded image
            or, without a decoder, latent), e.g. conversion to uint8.
        backend: ``"xla"`` (the tick is one jitted call, its buffers donated) or
            ``"onnxruntime"`` / ``"tensorrt"`` (the same step around the exported graph).
        admit_per_tick: requests admitted per tick (default: one per stream).
    """

    def __init__(self, model, latent_shape: tuple[int, int, int], cond_shapes: dict[str, tuple[int, ...]], *,
                 slots_per_stream: int = 4, streams: int = 1, guidance: bool = False,
                 decoder=None, postprocess: Callable | None = None, backend: str = "xla",
                 admit_per_tick: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if slots_per_stream < 1 or streams < 1:
            raise ValueError("slots_per_stream and streams must be >= 1")
        self.model, self.backend, self.decoder, self.postprocess = model, backend, decoder, postprocess
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.cond_shapes = {k: tuple(int(d) for d in v) for k, v in cond_shapes.items()}
        self.guided = bool(guidance)
        self.num_slots = slots_per_stream * streams
        self.admit_per_tick = streams if admit_per_tick is None else int(admit_per_tick)
        b = self.num_slots
        self._x = jnp.zeros((b, *self.latent_shape), jnp.float32)  # [B, H, W, C]
        self._cond = {k: jnp.zeros((b, *s), jnp.float32) for k, s in self.cond_shapes.items()}
        self._uncond = {k: jnp.zeros((b, *s), jnp.float32) for k, s in self.cond_shapes.items()} if self.guided else None
        self._guidance = np.zeros(b, np.float32)  # [B]
        self._slots = [_Slot() for _ in range(b)]
        self._queue: collections.deque[_Request] = collections.deque()
        self._ids = itertools.count()
        self.results: dict[int, Any] = {}
        self.ticks = 0
        if backend == "xla":
            self._tick_fn = _tick_jit
            self._velocity_model = model
        else:
            from streamflow_jax.backends import runner_for

            cond0 = {k: np.zeros((b, *s), np.float32) for k, s in self.cond_shapes.items()}
            h, w, _ = self.latent_shape
            self._velocity_model = runner_for(model, backend, batch=2 * b if self.guided else b, height=h, width=w,
                                              cond=cond0)
            self._tick_fn = _tick
        self._write = _write_jit

    # -- requests ------------------------------------------------------------------------------

    def submit(self, cond: dict[str, Any], *, steps: int | None = None, grid=None, shift: float = 1.0,
               seed: int | None = None, noise=None, guidance_scale: float | None = None,
               uncond: dict[str, Any] | None = None) -> int:
        """Queues one request and returns its id. An invalid request gets its error as its
        result (see ``result``); it never stops the engine.

        Args:
            cond: per-request conditioning (no batch axis), shapes as ``cond_shapes``.
            steps, shift: a ``schedules.flow_match(steps, shift)`` grid, or give ``grid``.
            grid: ``[S+1]`` times from 1 down to 0.
            seed / noise: the starting latent, ``jax.random.normal(key(seed), latent_shape)``
                or the ``[H, W, C]`` array itself.
            guidance_scale, uncond: for an engine with ``guidance=True``.
        """
        rid = next(self._ids)
        try:
            self._queue.append(self._validate(rid, cond, steps, grid, shift, seed, noise, guidance_scale, uncond))
        except (RequestError, ValueError, TypeError) as e:
            self.results[rid] = e if isinstance(e, RequestError) else RequestError(f"request {rid}: {e}")
        return rid

    def reject(self, error: Exception | str) -> int:
        """Records a request that failed before it could be queued (for example while its
        prompt was being encoded); returns its id, whose result is the error."""
        rid = next(self._ids)
        self.results[rid] = error if isinstance(error, RequestError) else RequestError(f"request {rid}: {error}")
        return rid

    def _validate(self, rid, cond, steps, grid, shift, seed, noise, guidance_scale, uncond) -> _Request:
        if grid is None:
            if steps is None:
                raise RequestError(f"request {rid}: give steps or grid")
            grid = schedules.flow_match(int(steps), shift=shift)
        grid = np.asarray(grid, np.float32)
        if grid.ndim != 1 or grid.shape[0] < 2:
            raise RequestError(f"request {rid}: grid must be [S+1] with S >= 1, got shape {grid.shape}")
        if (noise is None) == (seed is None):
            raise RequestError(f"request {rid}: give exactly one of seed or noise")
        if noise is None:
            noise = jax.random.normal(jax.random.key(int(seed)), self.latent_shape, jnp.float32)
        noise = np.asarray(noise, np.float32)
        if noise.shape != self.latent_shape:
            raise RequestError(f"request {rid}: latent shape {noise.shape}, the engine runs {self.latent_shape}")
        cond = self._check_cond(rid, "cond", cond)
        if self.guided:
            if guidance_scale is None or uncond is None:
                raise RequestError(f"request {rid}: this engine runs CFG; give guidance_scale and uncond")
            uncond = self._check_cond(rid, "uncond", uncond)
        elif guidance_scale is not None or uncond is not None:
            raise RequestError(f"request {rid}: this engine runs without CFG (construct it with guidance=True)")
        return _Request(rid, noise, grid, cond, uncond, float(guidance_scale or 0.0))

    def _check_cond(self, rid, what, cond) -> dict[str, np.ndarray]:
        if not isinstance(cond, dict) or set(cond) != set(self.cond_shapes):
            got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
            raise RequestError(f"request {rid}: {what} keys {got}, the engine takes {sorted(self.cond_shapes)}")
        out = {}
        for k, shape in self.cond_shapes.items():
            a = np.asarray(cond[k], np.float32)
            if a.shape != shape:
                raise RequestError(f"request {rid}: {what}[{k!r}] has shape {a.shape}, expected {shape}")
            out[k] = a
        return out

    # -- running -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests queued or in flight."""
        return len(self._queue) + sum(s.request is not None for s in self._slots)

    def tick(self) -> list[int]:
        """Admits queued requests into free slots, advances every slot one step in one call,
        retires the finished ones. Returns the ids finished by this tick."""
        admitted = 0
        for i, slot in enumerate(self._slots):
            if slot.request is None and self._queue and admitted < self.admit_per_tick:
                self._admit(i, self._queue.popleft())
                admitted += 1
        if all(s.request is None for s in self._slots):
            return []
        t = np.zeros(self.num_slots, np.float32)
        t_next = np.zeros(self.num_slots, np.float32)
        for i, slot in enumerate(self._slots):
            if slot.request is not None:  # idle slots: t == t_next == 0, a zero-length step
                t[i], t_next[i] = slot.request.grid[slot.step], slot.request.grid[slot.step + 1]
        g = jnp.asarray(self._guidance) if self.guided else None
        done = [i for i, s in enumerate(self._slots)
                if s.request is not None and s.step + 1 == s.request.grid.shape[0] - 1]
        args = (self._velocity_model, self._x, jnp.asarray(t), jnp.asarray(t_next), self._cond, g, self._uncond)
        outputs = None
        if self.decoder is not None and done and self.backend == "xla":
            idx = np.array(done + [done[0]] * (_bucket(len(done), self.num_slots) - len(done)), np.int32)
            self._x, outputs = _tick_decode_jit(args[0], self.decoder, *args[1:], jnp.asarray(idx))
        else:
            self._x = self._tick_fn(*args)
            if done:
                latents = self._x[np.array(done)]
                outputs = decode_latents(self.decoder, latents) if self.decoder is not None else latents
        self.ticks += 1
        finished = []
        for i, slot in enumerate(self._slots):
            if slot.request is not None:
                slot.step += 1
        for k, i in enumerate(done):
            rid = self._slots[i].request.id
            out = np.asarray(outputs[k])
            self.results[rid] = self.postprocess(out) if self.postprocess is not None else out
            self._slots[i].request = None
            finished.append(rid)
        return finished

    def _admit(self, i: int, req: _Request) -> None:
        self._x = self._write(self._x, i, req.noise)
        self._cond = {k: self._write(v, i, req.cond[k]) for k, v in self._cond.items()}
        if self.guided:
            self._uncond = {k: self._write(v, i, req.uncond[k]) for k, v in self._uncond.items()}
            self._guidance[i] = req.guidance
        self._slots[i] = _Slot(req, 0)

    def run(self, max_ticks: int | None = None) -> dict[int, Any]:
        """Ticks until every submitted request has a result (or ``max_ticks``); returns ``results``."""
        n = 0
        while self.pending and (max_ticks is None or n < max_ticks):
            self.tick()
            n += 1
        return self.results

    def result(self, rid: int):
        """The request's output; raises its ``RequestError`` if it failed, KeyError if not done."""
        out = self.results[rid]
        if isinstance(out, Exception):
            raise out
        return out
