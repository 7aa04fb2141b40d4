"""The stream engine: many requests, each at its own step, advanced by one batched call per tick.

The engine holds ``slots = streams * slots_per_stream`` latents on the device. A tick admits
queued requests into free slots (one compiled call for all of them, their noise made on the
device from their seeds), moves every occupied slot one Euler step along its own grid (one
compiled call with one batched model call), and gathers, and decodes, the slots that finish
with it (one compiled call). At most one request per stream is admitted per tick, so a
stream's slots end up one step apart: after warm-up each stream finishes one request per tick
(StreamFlow's stream batch).

Three parts, one job each:

- ``RequestValidator``: checks a request at ``submit`` (shapes, finite values, its grid); a bad
  request fails alone with a ``RequestError``.
- ``SlotScheduler``: host bookkeeping (queue, which slot holds which request at which step);
  plans each tick: admissions, the active slots and their times, the finishing slots.
- ``DeviceBuffers``: the slot latents and conditioning on the device, and the compiled tick.
  Only occupied slots are computed: they are gathered into a batch padded to a power of two
  (at most three compiled sizes of the program that holds the model), stepped, and scattered
  back. Admission and output programs are separate and small, so that their per-tick
  variation never recompiles the model.

The host never waits for the device inside a tick: finished outputs are copied to the host
asynchronously and collected when ready (``results`` fills as they arrive; ``run`` and
``result`` wait for what they need). Every submitted request yields exactly one result or one
error, by id.

Two ways to take results. In batch use, ``run`` and ``result`` read ``results``, which keeps
every result until the engine goes away. A long-running consumer (a server) calls
``pop_results`` instead: it hands over what is ready and forgets it, so nothing accumulates.
``cancel`` withdraws a request that is queued or in a slot (its slot is free at the next tick).
The engine is not thread-safe: one thread owns it (``streamflow_jax.serve`` runs one device
thread per engine).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax import ops, sampling, schedules
from streamflow_jax.backends import check_backend, runner_for
from streamflow_jax.errors import RequestError, ShapeError, check_count, is_real_dtype
from streamflow_jax.models import FlowModel, decode_latents
from streamflow_jax.sampling import Guidance, check_seed
from streamflow_jax.sharding import check_mesh, shard_batch

__all__ = ["DeviceBuffers", "Request", "RequestError", "RequestValidator", "SlotScheduler", "StreamEngine"]

PAD_TIME = 1.0  # the time given to padding rows of a bucket (finite for every family; discarded)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    id: int
    grid: np.ndarray  # [S+1] float32, from 1 down
    cond: dict[str, np.ndarray]  # each without the batch axis
    uncond: dict[str, np.ndarray] | None
    guidance: float
    seed: int | None  # the starting latent: jax.random.normal(key(seed)) made on the device...
    noise: np.ndarray | None  # ...or this [H, W, C] array
    init: np.ndarray | None = None  # image-to-image: the [H, W, C] latent noised to grid[0]

    @property
    def steps(self) -> int:
        return self.grid.shape[0] - 1


class RequestValidator:
    """Turns ``submit``'s arguments into a ``Request`` or raises ``RequestError`` naming the problem.

    Args:
        latent_shape: ``(H, W, C)`` every request's latent has.
        cond_shapes: name -> per-request shape of each conditioning entry.
        guided: the engine's slots have an unconditional branch: a request's scale resolves by
            the one guidance rule (``sampling.Guidance.resolve``: None or a scale <= 1 is no
            guidance, run as the conditional velocity exactly, ``uncond = cond`` at scale 1);
            above 1 it brings its ``uncond``.
    """

    def __init__(self, latent_shape: tuple[int, ...], cond_shapes: dict[str, tuple[int, ...]], guided: bool):
        self.latent_shape, self.cond_shapes, self.guided = latent_shape, cond_shapes, guided

    def __call__(self, rid: int, cond, *, steps=None, grid=None, shift: float = 1.0, seed=None, noise=None,
                 guidance_scale=None, uncond=None, init=None, strength=None) -> Request:
        try:
            req = self._validate(rid, cond, steps, grid, shift, seed, noise, guidance_scale, uncond)
            if init is not None:
                init = self._finite(rid, "init", init)
                if init.shape != self.latent_shape:
                    raise RequestError(f"request {rid}: init latent shape {init.shape}, the engine runs "
                                       f"{self.latent_shape}")
                req.grid = schedules.truncate(req.grid, schedules.DEFAULT_STRENGTH if strength is None else strength)
                req.init = init
            elif strength is not None:
                raise RequestError(f"request {rid}: strength is for image-to-image: give init too")
            return req
        except RequestError:
            raise
        except (ValueError, TypeError) as e:
            raise RequestError(f"request {rid}: {e}") from None

    def _validate(self, rid, cond, steps, grid, shift, seed, noise, guidance_scale, uncond) -> Request:
        grid = self._grid(rid, steps, grid, shift)
        if (noise is None) == (seed is None):
            raise RequestError(f"request {rid}: give exactly one of seed or noise")
        if noise is not None:
            noise = self._finite(rid, "noise", noise, floating=True)
            if noise.shape != self.latent_shape:
                raise RequestError(f"request {rid}: latent shape {noise.shape}, the engine runs {self.latent_shape}")
        else:
            seed = check_seed(seed)
        cond = self._cond(rid, "cond", cond)
        guidance = Guidance.resolve(guidance_scale, mode="cfg")
        if np.ndim(guidance.scale):
            raise RequestError(f"request {rid}: a request takes one guidance scale, not one per element")
        if self.guided and guidance.cfg:
            if uncond is None:
                raise RequestError(f"request {rid}: guidance_scale {guidance.scale} needs uncond (the unconditional "
                                   "conditioning)")
            uncond = self._cond(rid, "uncond", uncond)
        elif self.guided:  # no guidance in a guided engine: v_u = v_c, so v = v_c exactly
            uncond, guidance = cond, Guidance("cfg", 1.0)
        elif guidance.cfg:
            raise RequestError(f"request {rid}: guidance_scale {guidance.scale} asks for classifier-free guidance, and "
                               "this engine runs without it (construct it with guidance=True)")
        elif uncond is not None:
            raise RequestError(f"request {rid}: uncond without classifier-free guidance (this engine runs none)")
        return Request(rid, grid, cond, uncond, float(guidance.scale or 0.0), seed, noise)

    def _grid(self, rid, steps, grid, shift) -> np.ndarray:
        if grid is None:
            if steps is None:
                raise RequestError(f"request {rid}: give steps or grid")
            grid = schedules.flow_match(schedules.check_steps(steps), shift=shift)
        elif steps is not None:
            raise RequestError(f"request {rid}: give steps or grid, not both")
        grid = self._finite(rid, "grid", grid)
        if grid.ndim != 1 or grid.shape[0] < 2:
            raise RequestError(f"request {rid}: grid must be [S+1] with S >= 1, got shape {grid.shape}")
        if grid.shape[0] - 1 > schedules.MAX_STEPS:
            raise RequestError(f"request {rid}: grid has {grid.shape[0] - 1} steps; at most {schedules.MAX_STEPS}")
        if grid.min() < 0 or grid.max() > 1 or np.any(np.diff(grid) > 0):
            raise RequestError(f"request {rid}: grid must run down from at most 1 to at least 0")
        return grid

    def _cond(self, rid, what, cond) -> dict[str, np.ndarray]:
        if not isinstance(cond, dict) or set(cond) != set(self.cond_shapes):
            got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
            raise RequestError(f"request {rid}: {what} keys {got}, the engine takes {sorted(self.cond_shapes)}")
        out = {}
        for k, shape in self.cond_shapes.items():
            a = self._finite(rid, f"{what}[{k!r}]", cond[k])
            if a.shape != shape:
                raise RequestError(f"request {rid}: {what}[{k!r}] has shape {a.shape}, expected {shape}")
            out[k] = a
        return out

    @staticmethod
    def _finite(rid, what, value, floating: bool = False) -> np.ndarray:
        """``value`` as float32, refused unless it is real numbers (complex would lose its
        imaginary part, bools and strings mean nothing here; ``floating``: integers neither,
        as ``sf.sample`` refuses integer noise), all finite. bfloat16 and the other float
        types of ml_dtypes (numpy's kind ``V``) are floats: a bf16 pipeline's conditioning."""
        a = np.asarray(value)
        real = jnp.issubdtype(a.dtype, jnp.floating) if floating else is_real_dtype(a.dtype)
        if not real:
            kind = "real floating-point numbers" if floating else "real numbers"
            raise RequestError(f"request {rid}: {what} must be {kind}, got an array of {a.dtype}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise RequestError(f"request {rid}: {what} has non-finite values (NaN or inf)")
        return a


# ---------------------------------------------------------------------------------------------
# Slot scheduling (host)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TickPlan:
    """What one tick does; every array is host numpy, sized for the compiled call."""

    admissions: list[tuple[int, Request]]  # (slot, request) admitted before the step
    active: np.ndarray  # [b] int32 slots stepped, padded with num_slots (dropped) to a bucket size
    t: np.ndarray  # [b] float32
    t_next: np.ndarray  # [b] float32
    done: list[int]  # slots whose request finishes with this step
    done_index: np.ndarray | None  # [d] int32 the finishing slots, padded to a power of two


def bucket(n: int, limit: int, smallest: int = 1, multiple: int = 1) -> int:
    """Batches are padded to a power of two (at least ``smallest``, at most ``limit``; rounded
    up to a ``multiple``, a mesh's data axis): few compiled variants."""
    b = min(max(1 << max(n - 1, 0).bit_length(), smallest), limit)
    return min(-(-b // multiple) * multiple, limit)


class SlotScheduler:
    """Which slot holds which request at which step; plans ticks and retires finished requests."""

    def __init__(self, num_slots: int, admit_per_tick: int, min_batch: int | None = None, multiple: int = 1):
        self.num_slots, self.admit_per_tick, self.multiple = num_slots, admit_per_tick, multiple
        # by default at most three active-batch sizes (N/4, N/2, N as powers of two): under-filled
        # engines skip idle slots without compiling a program per occupancy
        self.smallest = max(1, -(-num_slots // 4)) if min_batch is None else min(max(1, int(min_batch)), num_slots)
        self.queue: collections.deque[Request] = collections.deque()
        self.requests: list[Request | None] = [None] * num_slots
        self.steps = [0] * num_slots  # next step of each slot: t = grid[step], t_next = grid[step + 1]

    @property
    def pending(self) -> int:
        """Requests queued or in a slot."""
        return len(self.queue) + sum(r is not None for r in self.requests)

    def plan(self) -> TickPlan | None:
        """Admits from the queue, then plans the step of every occupied slot (None: all idle)."""
        admissions = []
        for i in range(self.num_slots):
            if self.requests[i] is None and self.queue and len(admissions) < self.admit_per_tick:
                req = self.queue.popleft()
                self.requests[i], self.steps[i] = req, 0
                admissions.append((i, req))
        occupied = [i for i, r in enumerate(self.requests) if r is not None]
        if not occupied:
            return None
        b = bucket(len(occupied), self.num_slots, self.smallest, self.multiple)
        active = np.full(b, self.num_slots, np.int32)
        t = np.full(b, PAD_TIME, np.float32)
        t_next = np.full(b, PAD_TIME, np.float32)
        for j, i in enumerate(occupied):
            req, s = self.requests[i], self.steps[i]
            active[j], t[j], t_next[j] = i, req.grid[s], req.grid[s + 1]
        done = [i for i in occupied if self.steps[i] + 1 == self.requests[i].steps]
        done_index = None
        if done:
            size = bucket(len(done), self.num_slots)
            done_index = np.array(done + [done[0]] * (size - len(done)), np.int32)
        return TickPlan(admissions, active, t, t_next, done, done_index)

    def room(self, ticks: int = 1) -> int:
        """Requests the next ``plan`` would admit if the queue held them (free slots, at most
        ``admit_per_tick``), less those already queued. ``ticks``: the next that many plans,
        the slots that finish on the way admitting again (requests not yet submitted are
        counted as not finishing within them: a lower bound where some have fewer steps)."""
        free = sum(r is None for r in self.requests)
        left = [r.steps - s for r, s in zip(self.requests, self.steps) if r is not None]  # steps to go
        queued, more = [r.steps for r in self.queue], 0
        for _ in range(ticks):
            k = min(free, self.admit_per_tick)
            left += queued[:k]
            more += max(0, k - len(queued))
            queued, free = queued[k:], free - k
            left = [s - 1 for s in left]
            free += sum(s == 0 for s in left)
            left = [s for s in left if s > 0]
        return more

    def remove(self, rid: int) -> bool:
        """Withdraws request ``rid`` from the queue or from its slot (the slot is free for the
        next plan; its buffer rows are overwritten at the next admission). False: not here."""
        for req in self.queue:
            if req.id == rid:
                self.queue.remove(req)
                return True
        for i, req in enumerate(self.requests):
            if req is not None and req.id == rid:
                self.requests[i] = None
                return True
        return False

    def advance(self, plan: TickPlan) -> list[Request]:
        """After the tick's step: every occupied slot moves on; the finished ones are freed."""
        finished = [self.requests[i] for i in plan.done]
        for i, req in enumerate(self.requests):
            if req is not None:
                self.steps[i] += 1
        for i in plan.done:
            self.requests[i] = None
        return finished


# ---------------------------------------------------------------------------------------------
# Device buffers and the compiled tick
# ---------------------------------------------------------------------------------------------


_STRUCTURES: list = []  # the pytree structures of pinned models; a Pinned's key indexes it


@jax.tree_util.register_pytree_node_class
class Pinned:
    """A model as the engine's compiled programs take it: its leaves in one list, its pytree
    structure interned as a small integer (the static part).

    Handing the ``FlowModel`` itself to a jitted call flattens its NNX state through a Python
    callback per parameter and compares its structure (graph definitions) for the cache lookup,
    at every call: for SD1.5's UNet (686 leaves) 1.2 ms a call on the CI machine, against 0.31 ms
    for the same leaves in a list. A tick makes up to three such calls, and the first H200
    profile found the seed setting's tick waiting on the host (issue 22). Engines whose models
    have the same structure share the key, so they share compiled programs as before.
    """

    __slots__ = ("key", "leaves")

    def __init__(self, key: int, leaves):
        self.key, self.leaves = key, leaves

    @classmethod
    def of(cls, model) -> Pinned | None:
        if model is None:
            return None
        leaves, structure = jax.tree_util.tree_flatten(model)
        for key, known in enumerate(_STRUCTURES):
            if known == structure:
                return cls(key, leaves)
        _STRUCTURES.append(structure)
        return cls(len(_STRUCTURES) - 1, leaves)

    def model(self):
        return jax.tree_util.tree_unflatten(_STRUCTURES[self.key], self.leaves)

    def tree_flatten(self):
        return (self.leaves,), (self.key, ops.trace_switches())  # switches: as FlowModel's

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0])


def _unpin(model):
    return model.model() if isinstance(model, Pinned) else model


def _admit(model, state, admit):
    """Writes the admitted rows (slot index ``num_slots`` = padding, dropped) into the buffers:
    each row's noise (made from its seed, or given), noised from its starting latent by the
    model's forward process where it has one (image-to-image)."""
    model = _unpin(model)
    idx = admit["slot"]  # [K]
    shape = state["x"].shape[1:]
    seeded = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, state["x"].dtype))(admit["seed"])
    noise = jnp.where(admit["use_seed"][:, None, None, None], seeded, admit["noise"])
    if "init" in admit:
        mix = model.noise_to if model is not None else sampling.noise_to  # a runner: the plain flow's
        mixed = mix(admit["init"], noise, admit["t0"])
        noise = jnp.where(admit["has_init"][:, None, None, None], mixed, noise)
    put = lambda buf, rows: buf.at[idx].set(rows.astype(buf.dtype), mode="drop")  # noqa: E731
    out = {"x": put(state["x"], noise), "cond": jax.tree_util.tree_map(put, state["cond"], admit["cond"])}
    if state.get("uncond") is not None:
        out["uncond"] = jax.tree_util.tree_map(put, state["uncond"], admit["uncond"])
        out["guidance"] = put(state["guidance"], admit["guidance"])
    return out


def _noising_model(flow_model, admit):
    """What an admission program takes for ``noise_to``: the model only when a row starts from
    an image (image to image); text-to-image admissions take nothing, so that their calls do
    not pass the model's leaves."""
    return flow_model if admit is not None and "init" in admit else None


def _step(model, state, active, t, t_next):
    """One step of the ``active`` slots (padding rows ``num_slots`` read zeros, write nothing)."""
    model = _unpin(model)
    take = lambda buf: buf.at[active].get(mode="fill", fill_value=0)  # noqa: E731  [b, ...]
    guided = state.get("uncond") is not None
    x = sampling.step(model, take(state["x"]), t, t_next, jax.tree_util.tree_map(take, state["cond"]),
                      take(state["guidance"]) if guided else None,
                      jax.tree_util.tree_map(take, state["uncond"]) if guided else None)
    return {**state, "x": state["x"].at[active].set(x, mode="drop")}


def _outputs(decoder, x, done_index):
    """The finishing slots' latents, decoded when there is a decoder."""
    out, decoder = x[done_index], _unpin(decoder)
    return out if decoder is None else decode_latents(decoder, out)


def _tick(model, decoder, flow_model, state, admit, active, t, t_next, done_index):
    """Admission, step and outputs as one program (``tick="fused"``): ``admit`` and
    ``done_index`` may be None (no admission, no finishing slot), each None a variant."""
    if admit is not None:
        state = _admit(flow_model, state, admit)
    state = _step(model, state, active, t, t_next)
    return state, (None if done_index is None else _outputs(decoder, state["x"], done_index))


def _ticks(model, decoder, flow_model, state, admit, active, t, t_next, done_index):
    """K ticks as one program (``ticks_per_call``): a scan of the fused tick over the K plans'
    stacked arrays (each leaf ``[K, ...]``; ``admit`` or ``done_index`` None when no tick of
    the K admits, or finishes, anything). Returns the state and the outputs ``[K, d, ...]``."""

    def one(state, plan):
        return _tick(model, decoder, flow_model, state, *plan)

    return jax.lax.scan(one, state, (admit, active, t, t_next, done_index))


class Programs(NamedTuple):
    """The jitted programs a compiled tick runs. Three by default, so that the one holding the
    model has one variant per active-batch size only: admissions and outputs vary per tick and
    compile small programs of their own; ``tick`` runs the three as one (``tick="fused"``, a
    measurement lever of issue 22: no host gap between them, at the price of one model-holding
    variant per admission kind, active batch and finishing batch); ``ticks`` runs K fused ticks
    as one scan (``ticks_per_call``). The slot buffers are donated."""

    admit: Callable
    step: Callable
    outputs: Callable
    tick: Callable
    ticks: Callable


NO_GRAPH_MIN_SIZE = 1 << 30  # commands in a row before XLA makes a CUDA graph of them: never


def _programs(graphs: bool, platform: str | None = None) -> Programs:
    """The tick's programs with the library's compile options on ``platform``
    (``ops.compiler_options``: a GPU's GEMM choice) and, ``graphs=False``, without XLA's CUDA
    graphs, for these programs alone (see ``tick_graphs``): XLA forms a graph only from a run of
    at least ``xla_gpu_graph_min_graph_size`` commands, and none is that long (an int option
    every XLA parses; an empty ``xla_gpu_enable_command_buffer`` clears the list only in XLAs
    whose option parser takes repeated fields)."""
    options = dict(ops.compiler_options(platform) or {})
    if not graphs:
        options["xla_gpu_graph_min_graph_size"] = NO_GRAPH_MIN_SIZE
    return _programs_with(tuple(sorted(options.items())))


@functools.cache
def _programs_with(options: tuple) -> Programs:
    """Module-level (cached per options), so that engines of the same shapes share compiled code."""
    options = dict(options) or None
    return Programs(jax.jit(_admit, donate_argnums=(1,), compiler_options=options),
                    jax.jit(_step, donate_argnums=(1,), compiler_options=options),
                    jax.jit(_outputs, compiler_options=options),
                    jax.jit(_tick, donate_argnums=(3,), compiler_options=options),
                    jax.jit(_ticks, donate_argnums=(3,), compiler_options=options))


TICK_ENV = "STREAMFLOW_JAX_TICK"
TICK_MODES = ("split", "fused")
TICK_GRAPHS_ENV = "STREAMFLOW_JAX_TICK_GRAPHS"


def tick_graphs(setting: str | bool | None = None) -> bool:
    """Whether the engine's compiled tick programs keep XLA's CUDA graphs (command buffers):
    ``setting`` (a bool, or ``"on"``/``"off"``), else ``$STREAMFLOW_JAX_TICK_GRAPHS``
    (``auto``, ``on``, ``off``), else ``auto``: on, XLA's default. The H200's profile of the
    seed setting (2026-11-30) spends 3.4 ms of a 13 ms tick updating its 78 graphs, whose buffers
    move between ticks; ``off`` compiles the tick's programs without graphs, the other programs
    of the process keeping theirs. A measurement switch (``benchmarks/levers_gpu.py``'s
    ``tick_graphs_off``, beside ``cmdbuf_off``, which turns them off for the whole process);
    ``auto`` changes only on a measured win. Only GPUs have graphs: elsewhere it changes nothing."""
    if isinstance(setting, (bool, np.bool_)):
        return bool(setting)
    given = os.environ.get(TICK_GRAPHS_ENV, "auto") if setting is None else setting
    value = given.strip().lower() or "auto" if isinstance(given, str) else None
    if value not in ("auto", "on", "off"):
        if setting is None:
            raise ValueError(f"${TICK_GRAPHS_ENV}={given!r}: expected auto, on or off")
        raise ValueError(f"graphs={given!r}: expected True, False, 'auto', 'on' or 'off'")
    return value != "off"


TICKS_PER_CALL_ENV = "STREAMFLOW_JAX_TICKS_PER_CALL"
MAX_TICKS_PER_CALL = 64


def ticks_per_call_choice(setting: int | str | None = None) -> int:
    """How many ticks the engine plans ahead and runs as one compiled call (a scan of fused
    ticks): ``setting``, else ``$STREAMFLOW_JAX_TICKS_PER_CALL``, else 1. The H200's profile of
    the seed setting (2026-11-30) found the tick bound by the host: 12.6 ms of dispatch a
    13 ms tick against 10.3 ms of kernels, a third of it updating CUDA graphs whose buffers
    had moved. K ticks a call pay one dispatch, and inside the scan the buffers stay put. The
    price is latency: a request submitted while a call runs waits for the call's K ticks, and
    results come back K ticks at a time. A measurement switch (``benchmarks/levers_gpu.py``'s
    ``ticks_4``) of the XLA backend; at most ``MAX_TICKS_PER_CALL``."""
    given = os.environ.get(TICKS_PER_CALL_ENV, "1") if setting is None else setting
    src = f"${TICKS_PER_CALL_ENV}={given!r}" if setting is None else f"ticks_per_call={given!r}"
    if isinstance(given, str):
        given = given.strip() or "1"
        if not given.isdigit():
            raise ValueError(f"{src}: expected an integer from 1 to {MAX_TICKS_PER_CALL}")
        given = int(given)
    if isinstance(given, (bool, np.bool_)) or not isinstance(given, (int, np.integer)) \
            or not 1 <= given <= MAX_TICKS_PER_CALL:
        raise ValueError(f"{src}: expected an integer from 1 to {MAX_TICKS_PER_CALL}")
    return int(given)


def tick_mode(setting: str | None = None) -> str:
    """``setting``, else ``$STREAMFLOW_JAX_TICK``, else ``"split"``: how a tick runs on the XLA
    backend. ``split`` (the default) is three programs (admission, step, outputs); ``fused``
    is one program per tick, a switch measured by ``benchmarks/levers_gpu.py``."""
    mode = (os.environ.get(TICK_ENV, "split") if setting is None else setting).strip().lower() or "split"
    if mode not in TICK_MODES:
        src = "tick=" if setting is not None else f"${TICK_ENV}="
        raise ValueError(f"{src}{mode!r}: expected one of {', '.join(TICK_MODES)}")
    return mode


class DeviceBuffers:
    """The slots' latents and conditioning on the device, advanced by one call per tick.

    Args:
        num_slots: N.
        latent_shape, cond_shapes: per-slot shapes.
        guided: hold each slot's ``uncond`` and guidance scale too.
        admit_rows: admissions per tick (the admission arrays' padded size).
    """

    def __init__(self, num_slots: int, latent_shape: tuple[int, ...], cond_shapes: dict[str, tuple[int, ...]],
                 guided: bool, admit_rows: int, mesh=None):
        self.num_slots, self.latent_shape, self.cond_shapes = num_slots, latent_shape, cond_shapes
        self.admit_rows, self.guided, self.mesh = admit_rows, guided, mesh
        self.reset()
        self._no_noise = np.zeros((admit_rows, *latent_shape), np.float32)

    def reset(self) -> None:
        """Fresh slot buffers, all zeros (after a failed call, whose donated buffers may be gone)."""
        n, zeros = self.num_slots, lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
        self.state = {"x": zeros(n, *self.latent_shape),  # [N, H, W, C]
                      "cond": {k: zeros(n, *s) for k, s in self.cond_shapes.items()}}
        if self.guided:
            self.state["uncond"] = {k: zeros(n, *s) for k, s in self.cond_shapes.items()}
            self.state["guidance"] = zeros(n)  # [N]
        if self.mesh is not None:  # the slots over the mesh's data axis: one tick is one SPMD program
            self.state = shard_batch(self.state, self.mesh)

    def admission(self, admissions: list[tuple[int, Request]], *, padding: bool = False,
                  init: bool = False) -> dict | None:
        """The host arrays of one tick's admissions, padded to ``admit_rows`` (None: none;
        ``padding``: rows of padding alone then, for a tick of a scan whose other ticks admit).
        ``init``: with the image-to-image arrays even when no row starts from an image."""
        if not admissions and not padding:
            return None
        k, guided = self.admit_rows, "uncond" in self.state
        slot = np.full(k, self.num_slots, np.int32)
        seed = np.zeros(k, np.uint32)
        use_seed = np.zeros(k, bool)
        noise = self._no_noise if all(r.noise is None for _, r in admissions) else self._no_noise.copy()
        cond = {n: np.zeros((k, *s), np.float32) for n, s in self.cond_shapes.items()}
        uncond = {n: np.zeros((k, *s), np.float32) for n, s in self.cond_shapes.items()} if guided else None
        guidance = np.zeros(k, np.float32)
        for j, (i, req) in enumerate(admissions):
            slot[j] = i
            if req.noise is None:
                seed[j], use_seed[j] = req.seed, True
            else:
                noise[j] = req.noise
            for n in cond:
                cond[n][j] = req.cond[n]
                if guided:
                    uncond[n][j] = req.uncond[n]
            guidance[j] = req.guidance
        out = {"slot": slot, "seed": seed, "use_seed": use_seed, "noise": noise, "cond": cond}
        images = any(r.init is not None for _, r in admissions)
        if init or images:
            out["init"] = self._no_noise.copy() if images else self._no_noise  # shared, never written
            out["has_init"] = np.zeros(k, bool)
            out["t0"] = np.ones(k, np.float32)
            for j, (_, req) in enumerate(admissions):
                if req.init is not None:
                    out["init"][j], out["has_init"][j], out["t0"][j] = req.init, True, req.grid[0]
        if guided:
            out.update(uncond=uncond, guidance=guidance)
        return out

    def tick(self, model, decoder, plan: TickPlan, *, compiled: bool = True, flow_model=None,
             fused: bool = False, programs: Programs | None = None):
        """Admits, steps and gathers the outputs of one tick (device calls, no host wait);
        returns the finishing slots' outputs (a device array) or None. ``fused`` (compiled
        only): the three as one program. ``programs``: default ``_programs(True)``."""
        programs = programs or _programs(True)
        if compiled and fused:
            admit = self.admission(plan.admissions) if plan.admissions else None
            self.state, out = programs.tick(model, decoder, _noising_model(flow_model, admit), self.state, admit,
                                            plan.active, plan.t, plan.t_next, plan.done_index)
            return out
        step = programs.step if compiled else _step  # a runner (non-XLA backend) runs the step eagerly
        if plan.admissions:
            admit = self.admission(plan.admissions)
            self.state = programs.admit(_noising_model(flow_model, admit), self.state, admit)
        self.state = step(model, self.state, plan.active, plan.t, plan.t_next)
        if plan.done_index is None:
            return None
        return programs.outputs(decoder, self.state["x"], plan.done_index)

    def ticks(self, model, decoder, plans: list[TickPlan], *, flow_model=None, programs: Programs | None = None):
        """Runs ``plans`` (consecutive ticks) as one compiled scan: the plans' arrays padded to
        the largest active batch and finishing batch among them and stacked. Every tick of a
        scan admits (rows of padding when it takes nothing; with the image-to-image arrays) and
        gathers at least one output (a tick finishing nothing gathers, and decodes, a row of
        padding), so that the scans vary only by active batch and finishing batch: a few
        programs for ``warm_up`` to compile, at the price of a padding row's decode while the
        slots fill. Returns the outputs ``[K, d, ...]`` (a device array; row ``j`` of tick ``k``
        is the ``j``-th of ``plans[k].done``; rows of padding are not outputs)."""
        programs = programs or _programs(True)
        n = self.num_slots
        rows = [self.admission(p.admissions, padding=True, init=True) for p in plans]
        admit = jax.tree_util.tree_map(lambda *a: np.stack(a), *rows)
        b = max(p.active.shape[0] for p in plans)

        def padded(a, fill):
            return np.concatenate([a, np.full(b - a.shape[0], fill, a.dtype)])

        active = np.stack([padded(p.active, n) for p in plans])
        t = np.stack([padded(p.t, PAD_TIME) for p in plans])
        t_next = np.stack([padded(p.t_next, PAD_TIME) for p in plans])
        d = max((p.done_index.shape[0] for p in plans if p.done_index is not None), default=1)  # a bucket
        done_index = np.stack([np.zeros(d, np.int32) if p.done_index is None else  # slot 0's row, dropped
                               np.concatenate([p.done_index, np.full(d - p.done_index.shape[0],
                                                                     p.done_index[0], np.int32)])
                               for p in plans])
        self.state, out = programs.ticks(model, decoder, _noising_model(flow_model, admit), self.state, admit,
                                         active, t, t_next, done_index)
        return out


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def _shape(name: str, shape) -> tuple[int, ...]:
    """A shape given to the engine: a sequence of integers >= 1 (``16.5`` is not truncated)."""
    if not isinstance(shape, tuple | list):
        raise ValueError(f"{name} must be a tuple of integers >= 1, got {shape!r}")
    return tuple(check_count(f"{name}[{i}]", d) for i, d in enumerate(shape))


def _check_model_shapes(model: FlowModel, latent_shape: tuple[int, ...], cond_shapes: dict) -> None:
    """Refuses an engine whose latent or conditioning shapes ``model`` cannot take, at
    construction (they would fail inside the first tick's compiled step)."""
    if len(latent_shape) != 3 or latent_shape[2] != model.latent_channels:
        raise ValueError(f"latent_shape {latent_shape}: {model.class_name} takes (H, W, {model.latent_channels})")
    model.latent_shape(latent_shape[0], latent_shape[1])  # raises on sides the model cannot take
    text = cond_shapes.get("encoder_hidden_states")
    want = model.cond_shapes(text[0] if text else None)
    if set(cond_shapes) != set(want):
        raise ValueError(f"cond_shapes names {sorted(cond_shapes)}; {model.class_name} takes {sorted(want)}")
    for name, shape in cond_shapes.items():
        if tuple(shape) != tuple(want[name]):
            raise ValueError(f"cond_shapes[{name!r}] is {tuple(shape)}; {model.class_name} takes {tuple(want[name])}")


def _check_on_mesh(name: str, model, mesh) -> None:
    """A model whose weights are committed to other devices than the engine's mesh would fail
    at the first tick with JAX's "incompatible devices": said here, with the fix. Uncommitted
    weights (``sf.load``'s, on the default device) move to the mesh as they are used."""
    if not isinstance(model, FlowModel):
        return
    on_mesh, elsewhere = set(mesh.devices.flat), set()
    for leaf in jax.tree_util.tree_leaves(model.state):
        if isinstance(leaf, jax.Array) and getattr(leaf, "committed", True) and leaf.sharding.device_set != on_mesh:
            elsewhere |= leaf.sharding.device_set
    if elsewhere:
        raise ValueError(f"the {name}'s weights are on devices {sorted(d.id for d in elsewhere)} but the mesh has "
                         f"{sorted(d.id for d in on_mesh)}: shard the {name} onto this mesh (sf.shard({name}, mesh) "
                         "or sf.load(..., mesh=mesh)) or pass the mesh it was loaded with")


class StreamEngine:
    """Continuous batching of sampling requests over a fixed set of slots.

    Args:
        model: a ``FlowModel`` (or, with a non-XLA backend, a runner from ``backends``).
        latent_shape: ``(H, W, C)`` of every request's latent.
        cond_shapes: name -> per-request shape (no batch axis) of each conditioning entry
            (``model.cond_shapes(text_len)`` gives the family's).
        slots_per_stream: N, the slots of one stream (StreamFlow's stream batch size).
        streams: how many streams share each call (batch = N * streams).
        guidance: ``True`` gives every slot an unconditional branch, so that requests may be
            guided (each with its scale and ``uncond``; one without guidance runs its conditional
            velocity exactly); ``False`` runs none (a request asking for CFG fails alone).
        decoder: optional VAE/TAESD ``FlowModel``; its ``decode_latents`` runs on the finishing
            slots inside the tick's compiled call (padded to a power of two of them).
        postprocess: optional host function applied to each finished output (decoded image
            or, without a decoder, latent), e.g. conversion to uint8.
        backend: ``"xla"`` (the tick's step is compiled, its buffers donated) or another entry
            of ``backends.BACKENDS`` (the same step around the exported graph, run eagerly).
        admit_per_tick: requests admitted per tick (default: one per stream).
        min_batch: the smallest batch a step computes: occupied slots are padded to a power of
            two of at least this (default a quarter of the slots), each size one compiled
            program; ``min_batch=slots`` computes every slot every tick with one program.
        mesh: a ``("data", "model")`` mesh (``sf.make_mesh``): the slots are split over
            ``data`` (slots and batch sizes multiples of it), the model as it was sharded
            (``sf.shard``); a tick is one SPMD program over every device.
        tick: ``"split"`` (admission, step and outputs as three programs) or ``"fused"`` (one
            program per tick); default ``$STREAMFLOW_JAX_TICK``, else ``"split"``. A measurement
            switch of the XLA backend (``benchmarks/levers_gpu.py``): fused removes the host gaps
            between the three at the price of more compiled variants of the model (1.005x on
            an H200: within noise).
        graphs: whether the tick's programs keep XLA's CUDA graphs (``tick_graphs``); default
            ``$STREAMFLOW_JAX_TICK_GRAPHS``, else on. Another measurement switch.
        ticks_per_call: K, the ticks ``tick`` plans ahead and runs as one compiled call (a scan
            of K fused ticks; ``ticks_per_call_choice``); default
            ``$STREAMFLOW_JAX_TICKS_PER_CALL``, else 1. Throughput for latency: requests
            submitted during a call join at the next, and a run's last ticks (fewer than K
            left) run one call each. The XLA backend's; other backends tick one at a time.

    With backend ``xla`` the engine runs its own copies of ``model`` and ``decoder`` with their
    convolution kernels in ``$STREAMFLOW_JAX_CONV_LAYOUT``'s layout (``ops.conv_layout_choice``:
    OHWI on GPUs, where it measured faster, HWIO, the models' own, elsewhere) and their
    repeated blocks scanned or not as ``$STREAMFLOW_JAX_SCAN_BLOCKS`` says (``ops.scan_blocks_choice``:
    as given unless set; a third).
    """

    def __init__(self, model, latent_shape: tuple[int, int, int], cond_shapes: dict[str, tuple[int, ...]], *,
                 slots_per_stream: int = 4, streams: int = 1, guidance: bool = False,
                 decoder=None, postprocess: Callable | None = None, backend: str = "xla",
                 admit_per_tick: int | None = None, min_batch: int | None = None, mesh=None,
                 tick: str | None = None, graphs: bool | str | None = None, ticks_per_call: int | None = None):
        entry = check_backend(backend)
        self.tick_mode = tick_mode(tick)
        self.tick_graphs = tick_graphs(graphs)
        per_call = ticks_per_call_choice(ticks_per_call)  # the switch is checked on every backend
        if entry.exported and ticks_per_call is not None and per_call > 1:
            raise ValueError(f"ticks_per_call={ticks_per_call}: K ticks a call are a compiled scan, the xla "
                             f"backend's; backend {backend!r} runs one tick a call")
        self.ticks_per_call = 1 if entry.exported else per_call  # the process-wide switch: xla only
        for name, value in (("slots_per_stream", slots_per_stream), ("streams", streams)):
            check_count(name, value)
        if not hasattr(model, "velocity"):
            raise ValueError(f"model must be a velocity model (sf.load(...)) or a runner, got {type(model).__name__}")
        for name, value in (("admit_per_tick", admit_per_tick), ("min_batch", min_batch)):
            if value is not None:
                check_count(name, value)
        self.model, self.backend, self.decoder, self.postprocess = model, backend, decoder, postprocess
        self.latent_shape = _shape("latent_shape", latent_shape)
        if not isinstance(cond_shapes, dict) or not all(isinstance(k, str) for k in cond_shapes):
            raise ValueError(f"cond_shapes must be a dict of per-request shapes by input name, got {cond_shapes!r:.200}")
        if decoder is not None and not (isinstance(decoder, FlowModel) and hasattr(decoder.module, "decode_latents")):
            raise ValueError(f"decoder must be a VAE or TAESD model (sf.load(...)), got {type(decoder).__name__}")
        if postprocess is not None and not callable(postprocess):
            raise ValueError(f"postprocess must be callable, got {type(postprocess).__name__}")
        self.cond_shapes = {k: _shape(f"cond_shapes[{k!r}]", v) for k, v in cond_shapes.items()}
        if decoder is not None and decoder.latent_channels not in (None, self.latent_shape[-1]):
            raise ValueError(f"decoder: this {decoder.class_name} takes {decoder.latent_channels}-channel latents, "
                             f"and the engine's are {self.latent_shape} ({self.latent_shape[-1]} channels): give the "
                             "decoder of the model's family")
        if isinstance(model, FlowModel) and model.family.kind == "velocity":
            _check_model_shapes(model, self.latent_shape, self.cond_shapes)
        self.guided = bool(guidance)
        self.num_slots = slots_per_stream * streams
        admit = streams if admit_per_tick is None else int(admit_per_tick)
        if not 1 <= admit <= self.num_slots:
            raise ValueError(f"admit_per_tick must be in [1, {self.num_slots}], got {admit}")
        if min_batch is not None and min_batch > self.num_slots:
            raise ValueError(f"min_batch must be in [1, {self.num_slots}] (the slots), got {min_batch}")
        self.validate = RequestValidator(self.latent_shape, self.cond_shapes, self.guided)
        data = check_mesh(mesh).shape["data"] if mesh is not None else 1
        if mesh is not None:
            _check_on_mesh("model", model, mesh)
            _check_on_mesh("decoder", decoder, mesh)
        self._programs = _programs(self.tick_graphs, mesh.devices.flat[0].platform if mesh is not None else None)
        if self.num_slots % data:
            raise ValueError(f"{self.num_slots} slots do not split over the mesh's {data} data devices: the slots "
                             f"(slots per stream x streams; --slots x --streams) must be a multiple of {data}, or "
                             "place the model by tensor parallelism (--strategy tensor: data 1)")
        self.scheduler = SlotScheduler(self.num_slots, admit, min_batch, multiple=data)
        self.buffers = DeviceBuffers(self.num_slots, self.latent_shape, self.cond_shapes, self.guided, admit, mesh)
        self._ids = itertools.count()
        # (ids, outputs on the device, the rows of the ids' outputs: None, in order, or an index)
        self._in_flight: collections.deque[tuple[list[int], jax.Array, tuple | None]] = collections.deque()
        self.results: dict[int, Any] = {}
        self.ticks = 0
        self._velocity_model, self._decoder = model, decoder
        self._compiled = not entry.exported
        if self._compiled:  # the convolutions' kernel layout and block scanning the compiled tick reads (levers)
            platform = mesh.devices.flat[0].platform if mesh is not None else None
            layout, scan = ops.conv_layout_choice(platform=platform), ops.scan_blocks_choice()

            def relaid(m):
                if not isinstance(m, FlowModel):
                    return m
                m = m.with_conv_layout(layout)
                return m if scan is None else m.with_scanned_blocks(scan)

            self._velocity_model, self._decoder = relaid(model), relaid(decoder)
        # what the compiled programs take (Pinned: no per-call flattening of the models' state)
        self._pinned_decoder = Pinned.of(self._decoder)
        self._pinned_flow = Pinned.of(model) if isinstance(model, FlowModel) else None
        self._pinned_velocity = Pinned.of(self._velocity_model) if self._compiled else None
        if entry.exported:
            h, w, _ = self.latent_shape
            cond0 = {k: np.zeros((1, *s), np.float32) for k, s in self.cond_shapes.items()}
            rows = 2 * self.num_slots if self.guided else self.num_slots
            try:
                self._velocity_model = runner_for(model, backend, batch=rows, height=h, width=w, cond=cond0)
            except ShapeError as e:
                if f"B={rows} " not in str(e):
                    raise
                raise ShapeError(f"{e} (the engine calls the model with every slot: {self.num_slots} slots"
                                 + (", twice for guidance" if self.guided else "") + f", {rows} rows)") from None

    # -- requests ------------------------------------------------------------------------------

    def submit(self, cond: dict[str, Any], *, steps: int | None = None, grid=None, shift: float = 1.0,
               seed: int | None = None, noise=None, guidance_scale: float | None = None,
               uncond: dict[str, Any] | None = None, init=None, strength: float | None = None) -> int:
        """Queues one request and returns its id. An invalid request gets its error as its
        result (see ``result``); it never stops the engine.

        Args:
            cond: per-request conditioning (no batch axis), shapes as ``cond_shapes``.
            steps, shift: a ``schedules.flow_match(steps, shift)`` grid, or give ``grid``. The
                shift defaults to 1.0 (no shift, the scheduler class's default), where
                ``flow_match`` alone defaults to SD3's 3.0: give it to match such a grid.
            grid: ``[S+1]`` times from 1 down to 0.
            seed / noise: the starting latent, ``sampling.seeded_noise(seed, latent_shape)`` (made
                on the device; seed in [0, 2**32)) or the ``[H, W, C]`` array itself.
            guidance_scale, uncond: classifier-free guidance (an engine with ``guidance=True``);
                None or a scale <= 1: none (the one rule, ``sampling.Guidance.resolve``).
            init, strength: image-to-image: start from this ``[H, W, C]`` latent (an encoded
                image), noised by the model's forward process to where ``strength`` (in (0, 1],
                default 0.6) cuts the grid (diffusers' img2img rule); the noise is mixed in on
                the device at admission.
        """
        rid = next(self._ids)
        try:
            self.scheduler.queue.append(self.validate(rid, cond, steps=steps, grid=grid, shift=shift, seed=seed,
                                                      noise=noise, guidance_scale=guidance_scale, uncond=uncond,
                                                      init=init, strength=strength))
        except RequestError as e:
            self.results[rid] = e
        return rid

    def reject(self, error: Exception | str) -> int:
        """Records a request that failed before it could be queued (for example while its
        prompt was being encoded); returns its id, whose result is the error."""
        rid = next(self._ids)
        self.results[rid] = error if isinstance(error, RequestError) else RequestError(f"request {rid}: {error}")
        return rid

    # -- running -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests queued or in a slot (finished ones whose output is still being copied to
        the host are not pending: ``run`` and ``result`` wait for those)."""
        return self.scheduler.pending

    def tick(self) -> list[int]:
        """Admits queued requests into free slots, advances every occupied slot one step in one
        call, retires the finished ones (with ``ticks_per_call`` K: K such ticks, one call).
        Returns the ids retired by this tick (their outputs reach ``results`` when their copy
        to the host completes). If a device call raises, the requests it carried get the error
        as their result, the slots are emptied, and the error is raised; queued requests stay."""
        return self._tick(self.ticks_per_call)

    def _tick(self, most: int) -> list[int]:
        """``tick``, running at most ``most`` ticks."""
        self._collect(wait=False)
        if self.ticks_per_call > 1:
            return self._tick_many(most)
        held = self._held()
        plan = self.scheduler.plan()
        if plan is None:
            return []
        try:
            outputs = self._tick_one(plan)
        except BaseException as e:
            self._failed(held + [req.id for _, req in plan.admissions], e)
            raise
        finished = [req.id for req in self.scheduler.advance(plan)]
        self._send(finished, outputs)
        return finished

    def _held(self) -> list[int]:
        return [req.id for req in self.scheduler.requests if req is not None]

    def _failed(self, ids: list[int], error: BaseException) -> None:
        """A tick's device call raised: each request it carried (in a slot, admitted or finishing
        in it) whose output was not already on its way gets the error as its result; the slots
        are emptied and the buffers made anew (the call's donated buffers may be gone). Queued
        requests stay queued: the engine runs on."""
        sent = {rid for sent_ids, _, _ in self._in_flight for rid in sent_ids}
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        for rid in ids:
            if rid not in sent and rid not in self.results:
                self.results[rid] = RequestError(f"request {rid}: the engine's tick failed ({why})")
        self.scheduler.requests = [None] * self.num_slots
        self.scheduler.steps = [0] * self.num_slots
        self.buffers.reset()

    def _tick_one(self, plan: TickPlan):
        outputs = self.buffers.tick(self._pinned_velocity or self._velocity_model, self._pinned_decoder, plan,
                                    compiled=self._compiled, flow_model=self._pinned_flow,
                                    fused=self.tick_mode == "fused", programs=self._programs)
        self.ticks += 1
        return outputs

    def _send(self, ids: list[int], outputs, index: tuple | None = None) -> None:
        """Starts the host copy of finished requests' outputs (collected by ``_collect``)."""
        if ids:
            outputs.copy_to_host_async()
            self._in_flight.append((ids, outputs, index))

    def _tick_many(self, most: int) -> list[int]:
        """``ticks_per_call`` ticks planned ahead and run as one call; fewer (the run drains, or
        ``most`` is less) run one call each, as a plain tick."""
        plans, finished, held = [], [], self._held()
        while len(plans) < min(self.ticks_per_call, most) and (plan := self.scheduler.plan()) is not None:
            plans.append(plan)
            finished.append([req.id for req in self.scheduler.advance(plan)])
        try:
            if len(plans) < self.ticks_per_call:
                for plan, ids in zip(plans, finished):
                    self._send(ids, self._tick_one(plan))
            else:
                outputs = self.buffers.ticks(self._pinned_velocity, self._pinned_decoder, plans,
                                             flow_model=self._pinned_flow, programs=self._programs)
                self.ticks += len(plans)
                rows = [(k, j) for k, ids in enumerate(finished) for j in range(len(ids))]
                self._send([rid for ids in finished for rid in ids], outputs,
                           (np.array([k for k, _ in rows], np.int32), np.array([j for _, j in rows], np.int32)))
        except BaseException as e:
            self._failed(held + [req.id for p in plans for _, req in p.admissions], e)
            raise
        return [rid for ids in finished for rid in ids]

    def _collect(self, wait: bool, until: int | None = None) -> None:
        """Moves finished outputs whose host copy is complete into ``results`` (in order)."""
        while self._in_flight:
            ids, outputs, index = self._in_flight[0]
            if not (wait or outputs.is_ready()):
                return
            self._in_flight.popleft()
            host = np.asarray(outputs) if index is None else np.asarray(outputs)[index]
            for k, rid in enumerate(ids):
                self.results[rid] = self._postprocessed(rid, host[k])
            if until is not None and until in ids:
                return

    def _postprocessed(self, rid: int, output: np.ndarray):
        """``postprocess(output)``, or the request's ``RequestError`` when it raises: one
        request's failure is its own, and the others finishing in the same tick get theirs."""
        if self.postprocess is None:
            return output
        try:
            return self.postprocess(output)
        except Exception as e:  # noqa: BLE001 (any error of the caller's function)
            return RequestError(f"request {rid}: postprocess failed ({type(e).__name__}: {e})")

    def pop_results(self, wait: bool = False) -> dict[int, Any]:
        """Hands over every result that is ready (outputs and ``RequestError``s, by id) and
        forgets them: the consumer's way to take results (a server's), so that a long-running
        engine keeps nothing it has delivered. ``wait``: first wait for the outputs still being
        copied to the host."""
        self._collect(wait=wait)
        out, self.results = self.results, {}
        return out

    def cancel(self, rid: int) -> bool:
        """Withdraws a request that is queued or in a slot (a client that went away): its slot
        is free at the next tick, and its result is a ``RequestError`` saying it was cancelled.
        False when the request is not pending (unknown, failed at submit, or finished: its output
        is delivered as usual)."""
        if not self.scheduler.remove(rid):
            return False
        self.results[rid] = RequestError(f"request {rid}: cancelled")
        return True

    @property
    def room(self) -> int:
        """How many more requests the next tick would admit if they were submitted now (free
        slots, at most ``admit_per_tick``, less the queue; with ``ticks_per_call`` K, the next
        call's K ticks): a caller that prepares requests just in time (``PromptStream`` encodes
        the prompts a tick admits) submits this many."""
        return self.scheduler.room(self.ticks_per_call)

    def wait(self) -> None:
        """Blocks until the device has run every tick dispatched so far. A loop that ticks as
        fast as it can otherwise queues ticks far ahead of the device, and a request submitted
        then waits behind all of them; calling this before each ``tick`` keeps one tick ahead."""
        jax.block_until_ready(self.buffers.state["x"])

    def warm_up(self, image_to_image: bool = True) -> None:
        """Compiles every program the engine's ticks can run, without a request: the admission
        (text to image, and image to image unless told not to), the step at each batch size, and
        the outputs (with their decode) for each number of slots finishing together (fused:
        every combination of the three; with ``ticks_per_call`` K, a scan of K ticks for each
        active batch and finishing batch too: six for 4 slots and the default ``min_batch``).
        Each call writes nothing (its rows are padding); a server calls this before reporting
        ready."""
        n, sched, bufs, jits = self.num_slots, self.scheduler, self.buffers, self._programs
        flow_model, velocity, decoder = self._pinned_flow, self._pinned_velocity, self._pinned_decoder
        dummy = Request(-1, np.array([1.0, 0.0], np.float32), {k: np.zeros(s, np.float32) for k, s in
                                                                  self.cond_shapes.items()}, None, 1.0, 0, None)
        if self.guided:
            dummy.uncond = dummy.cond
        variants = [dummy] + ([dataclasses.replace(dummy, init=np.zeros(self.latent_shape, np.float32))]
                              if image_to_image else [])

        actives = sorted({bucket(k, n, sched.smallest, sched.multiple) for k in range(1, n + 1)})

        def padding(b: int, d: int | None, admissions=()) -> TickPlan:  # a plan of padding rows only
            pad = np.full(b, PAD_TIME, np.float32)
            return TickPlan(list(admissions), np.full(b, n, np.int32), pad, pad, [],
                            None if d is None else np.zeros(d, np.int32))

        def every_tick():  # a plan of each (admission, active batch, finishing batch) a tick can hold
            for b in actives:
                for d in [None] + sorted({bucket(k, n) for k in range(1, b + 1)}):
                    for admissions in [[]] + [[(n, req)] for req in variants]:
                        yield padding(b, d, admissions)

        if self._compiled and self.ticks_per_call > 1:  # the scans: one per active and finishing batch
            for b in actives:
                for d in sorted({bucket(k, n) for k in range(1, b + 1)}):
                    bufs.ticks(velocity, decoder, [padding(b, d)] * self.ticks_per_call, flow_model=flow_model,
                               programs=jits)
            jax.block_until_ready(bufs.state)  # then the single ticks a run ends with, below
        if self._compiled and self.tick_mode == "fused":
            for plan in every_tick():
                bufs.tick(velocity, decoder, plan, flow_model=flow_model, fused=True, programs=jits)
            jax.block_until_ready(bufs.state)
            return
        for req in variants:  # slot index n: padding, dropped
            admit = bufs.admission([(n, req)])
            bufs.state = jits.admit(_noising_model(flow_model, admit), bufs.state, admit)
        if self._compiled:
            for b in actives:
                p = padding(b, None)
                bufs.state = jits.step(velocity, bufs.state, p.active, p.t, p.t_next)
        for d in sorted({bucket(k, n) for k in range(1, n + 1)}):
            jax.block_until_ready(jits.outputs(decoder, bufs.state["x"], np.zeros(d, np.int32)))

    def run(self, max_ticks: int | None = None) -> dict[int, Any]:
        """Ticks until every submitted request has a result (or ``max_ticks`` ticks; with
        ``ticks_per_call``, the scans that fit, then single ticks); returns ``results``."""
        start = self.ticks
        while self.pending and (max_ticks is None or self.ticks - start < max_ticks):
            self._tick(self.ticks_per_call if max_ticks is None else max_ticks - (self.ticks - start))
        self._collect(wait=True)
        return self.results

    def result(self, rid: int):
        """The request's output; raises its ``RequestError`` if it failed, KeyError if not done."""
        if rid not in self.results and any(rid in ids for ids, _, _ in self._in_flight):
            self._collect(wait=True, until=rid)
        out = self.results[rid]
        if isinstance(out, Exception):
            raise out
        return out
