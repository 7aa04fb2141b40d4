"""Helpers shared by the benchmark scripts: timing, thread settings, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def set_cpu_threads(n: int) -> None:
    """Gives XLA:CPU and PyTorch the same number of intra-op threads (call before importing jax)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}".strip()


def timed(fn, *, warmup: int = 1, repeats: int = 3, sync=lambda out: out) -> dict:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds per call."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"mean_s": statistics.mean(times), "min_s": min(times), "repeats": repeats}


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


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.flush()
