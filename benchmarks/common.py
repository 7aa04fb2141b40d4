"""Helpers shared by the benchmark scripts: timing, thread settings, JSON output."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path


def set_cpu_threads(n: int) -> None:
    """Gives XLA:CPU and PyTorch the same number of intra-op threads (call before importing jax)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}".strip()


def cpu_switch_args(doc: str):
    """The arguments of a CPU benchmark of a switch (``group_norm.py``, ``conv1x1.py``):
    ``--repeats``, ``--threads`` (given to XLA:CPU here, before jax is imported) and ``--out``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    set_cpu_threads(args.threads)
    return args


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the flag when it refuses)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def timed(fn, *, warmup: int = 1, repeats: int = 3, sync=lambda out: out, queued: bool = False) -> dict:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds per call, each call
    from its dispatch to its synced result. ``queued``: then ``repeats`` calls dispatched back
    to back with one sync after the last (``queued_s`` a call): the device's rate with each
    call's dispatch hidden behind the one before, as in a sampler's loop of steps."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    out = {"mean_s": statistics.mean(times), "min_s": min(times), "repeats": repeats}
    if queued:
        t0 = time.perf_counter()
        last = None
        for _ in range(repeats):
            last = fn()
        sync(last)
        out["queued_s"] = (time.perf_counter() - t0) / repeats
    return out


def sampler_grid(steps: int):
    """The shared ``[steps + 1]`` time grid of the sampler timings: 1 -> 0, evenly spaced."""
    import numpy as np

    return np.linspace(1.0, 0.0, steps + 1).astype(np.float32)


def library_jit(fn):
    """``jax.jit(fn)`` compiled as the library compiles its own programs (``ops.compiler_options``:
    a GPU's ``$STREAMFLOW_JAX_GEMM`` choice), so that a benchmark's jit around the library's calls
    measures what its switches do."""
    import jax

    from streamflow_jax import ops

    return jax.jit(fn, compiler_options=ops.compiler_options())


def ours_sampler(model, x, cond, steps: int, *, warmup: int = 1, repeats: int = 3) -> tuple[dict, object]:
    """Our sampler as a user runs it: ``sf.sample`` over ``steps`` Euler steps, jitted whole (one
    ``lax.scan``, one dispatch), timed to its synced result; ms per step (the velocity calls and
    their updates) and the compile, and the sampled latents."""
    import jax

    import streamflow_jax as sf

    ts = sampler_grid(steps)
    run = library_jit(lambda m, x, c: sf.sample(m, x, ts, c))
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(model, x, cond))
    first = time.perf_counter() - t0
    t = timed(lambda: run(model, x, cond), warmup=warmup, repeats=repeats, sync=jax.block_until_ready)
    return {"sampler_steps": steps, "ours_sampler_ms_per_step": 1e3 * t["mean_s"] / steps,
            "ours_sampler_compile_s": first}, out


def torch_sampler(velocity, x, steps: int, sync, *, warmup: int = 1, repeats: int = 3) -> tuple[float, object]:
    """The same Euler loop around a torch velocity (``velocity(x, t)``, ``t`` a float in [0, 1]),
    as diffusers' schedulers step it: one call a step, no sync inside; ms per step, and the
    sampled latents."""
    import torch

    ts = [float(v) for v in sampler_grid(steps)]

    def loop():
        with torch.inference_mode():
            h = x
            for t, t_next in zip(ts, ts[1:]):
                h = h + (t_next - t) * velocity(h, t)
            return h

    return 1e3 * timed(loop, warmup=warmup, repeats=repeats, sync=sync)["mean_s"] / steps, loop()


def rel_diff(ours, ref) -> float:
    """Largest difference over the reference's largest magnitude (float32 numpy arrays of one
    shape: a layout mix-up, NHWC against NCHW, is an error, not a figure); 0 when both are zero."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if ours.shape != ref.shape:
        raise ValueError(f"rel_diff: shapes differ, {ours.shape} against the reference's {ref.shape}")
    scale, diff = float(np.max(np.abs(ref), initial=0.0)), float(np.max(np.abs(ours - ref), initial=0.0))
    return diff / scale if scale else (0.0 if diff == 0 else float("inf"))


def environment() -> dict:
    import jax

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "jax": jax.__version__, "jax_backend": jax.default_backend(),
           "device": str(jax.devices()[0].device_kind)}
    try:
        import diffusers
        import torch

        env.update(torch=torch.__version__, diffusers=diffusers.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return env


def child_env(runs: list[dict]) -> dict:
    """The first child process's ``environment()`` (a parent that runs its variants in children
    imports no JAX itself: it would hold the GPU), ``{"device": "?"}`` if none reported one."""
    return next((r["env"] for r in runs if isinstance(r.get("env"), dict)), {"device": "?"})


def save(result: dict, out: str | None) -> str:
    """Writes ``result`` to ``out`` (when given) and returns its JSON text; called after each
    workload too, so that what finished survives a part's time limit."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


def emit(result: dict, out: str | None) -> None:
    print(save(result, out))
    sys.stdout.flush()


class _TorchShapes:
    """A torch state dict seen by the converter's planner: keys and shapes only."""

    def __init__(self, state_dict):
        self.sd = state_dict

    def keys(self):
        return list(self.sd)

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def items(self, keys):  # not used: torch_to_flowmodel moves the tensors itself
        raise NotImplementedError


def torch_to_flowmodel(raw_config: dict, torch_model):
    """The same weights as a ``FlowModel``, tensor by tensor over DLPack on the model's device
    (no host copy): the converter plans (keys and shapes checked), the kernels are transposed
    on the device."""
    import jax
    import jax.numpy as jnp

    from streamflow_jax.converters import plan
    from streamflow_jax.models import FlowModel

    sd = torch_model.state_dict()
    p = plan(raw_config, _TorchShapes(sd), source=raw_config.get("_class_name", "torch model"))
    leaves = []
    for name in p.targets:
        a = jax.dlpack.from_dlpack(sd[p.origin[name]].detach().contiguous())
        if name.endswith(".kernel"):
            a = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)
        leaves.append(jnp.array(a, copy=True))
    params = jax.tree_util.tree_unflatten(p.treedef, leaves)
    return FlowModel.from_params(p.family, p.config, params, class_name=p.class_name)


def random_flowmodel(class_name: str, config, dtype: str = "bfloat16", seed: int = 0):
    """A ``FlowModel`` of ``config`` with random weights made on the default device (no torch,
    no files): kernels N(0, 1/fan_in) so that activations stay of order one through deep
    stacks, 1-D ``weight`` (norm scales) ones, biases zeros, other tables N(0, 0.02). One small
    program per distinct shape (not one per leaf, nor one for the whole tree: XLA takes minutes
    to compile a thousand random generators at once). As ``sf.load``, the model comes back
    with its repeated blocks scanned under ``$STREAMFLOW_JAX_SCAN_BLOCKS=on`` (a lever)."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    from flax import nnx

    from streamflow_jax.models import FlowModel, abstract_module, family_of, flat_params

    @functools.partial(jax.jit, static_argnums=(2, 3, 4))
    def normal(key, i, shape, std, dt):
        return (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * std).astype(dt)

    family = family_of(class_name)
    _, state = nnx.split(abstract_module(family, config))
    named, treedef, names = flat_params(nnx.to_pure_dict(state))
    key = jax.random.key(seed, impl="unsafe_rbg")  # XLA's RngBitGenerator: small programs, quick compiles
    host_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    leaves = []
    for i, name in enumerate(names):
        a = named[name]
        shape = tuple(a.shape)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            leaves.append(jnp.asarray(np.zeros(shape, a.dtype)))
        elif name.endswith(".bias") or (name.endswith(".weight") and len(shape) == 1):
            leaves.append(jnp.asarray((np.zeros if name.endswith(".bias") else np.ones)(shape, host_dtype)))
        else:
            fan_in = (shape[0] if len(shape) == 2 else int(np.prod(shape[:3])) if len(shape) == 4 else 0) \
                if name.endswith(".kernel") else 0
            leaves.append(normal(key, i, shape, float(fan_in ** -0.5) if fan_in else 0.02, dtype))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    model = FlowModel.from_params(family, config, params, class_name=class_name)
    from streamflow_jax import ops

    return model.with_scanned_blocks() if ops.scan_blocks_choice() else model


def run_child(cmd: list[str], env: dict, timeout: float) -> dict:
    """Runs a benchmark's ``--child`` process and returns the JSON of its ``RESULT `` line, or
    ``{"error": ...}`` (its output's tail, or "timed out")."""
    import subprocess

    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line:
        return json.loads(line[7:])
    out = proc.stderr or proc.stdout
    # XLA aborts on a flag it does not know ("Unknown flag in XLA_FLAGS: ..."), or on one whose
    # value it cannot parse ("Flag parsing failed", then a "usage:" line and every flag it knows)
    unknown = re.search(r"Unknown flag in XLA_FLAGS: (.*)", out)
    if unknown or "Flag parsing failed" in out:
        usage = next((ln.removeprefix("usage:").strip() for ln in out.splitlines() if ln.startswith("usage:")), "")
        return {"error": f"this XLA does not know a flag ({unknown[1].strip() if unknown else usage or 'XLA_FLAGS'})"}
    return {"error": out[-600:]}
