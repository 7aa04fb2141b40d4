"""Time to first image, and what JAX's persistent compilation cache saves (issue 22); JSON.

Three fresh processes, each building the workloads (random weights, bf16) and timing their
first result, compilation included:

1. ``no_cache``: ``$STREAMFLOW_JAX_XLA_CACHE=0`` (every program compiled);
2. ``cache_cold``: the cache on, in an empty directory (compiles, and writes the cache);
3. ``cache_warm``: the cache on, in that same directory (what a restarted server sees);
4. ``no_cache_scanned``: as ``no_cache``, with ``$STREAMFLOW_JAX_SCAN_BLOCKS=on`` (repeated blocks
   compiled once per run of them; SD3's first call, the stream's UNet has none), if the budget
   allows.

Workloads, as ``profile_gpu.py`` builds them:

- ``stream``: the seed setting (SD1.5 UNet + TAESD, 512^2, 4 steps, ``StreamEngine`` N=4): a
  fresh engine given one request, ``run()`` until its image (compiles admission, the step and
  the outputs, then 4 ticks); what ``streamflow-jax serve`` pays before its first answer, less
  the text encoder;
- ``sd3``: SD3-medium velocity call, batch 2, 1024^2: the first call (compile + run).

Reported per process: the seconds to build the weights (``build_s``; their small random
programs are cached too), to the first image / first call (``first_s``; SD3 also its
``ms_per_call`` after it), and the process's wall time; and the ratios ``cache_warm / no_cache`` of
``first_s`` (target of the CPU measurement in ``compile_cpu.py``: <= 0.5) and ``no_cache_scanned /
no_cache``.

    python benchmarks/first_image_gpu.py [--workloads stream sd3] [--budget-s 220] [--out FILE]
    python benchmarks/first_image_gpu.py --smoke   # tiny configs on this CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import child_env, emit, environment, run_child  # noqa: E402

RUNS = ("no_cache", "cache_cold", "cache_warm", "no_cache_scanned")


def child(workloads: list[str], smoke: bool) -> dict:
    """One process's figures (the cache set up by its environment)."""
    t_start = time.perf_counter()
    import jax

    from profile_gpu import SLOTS, configs, run_velocity, stream_setup, velocity_setup
    from streamflow_jax.backends.cache import enable_compilation_cache

    cache = enable_compilation_cache()
    dtype = "float32" if smoke else "bfloat16"
    specs = configs(smoke)
    out = {"device": str(jax.devices()[0].device_kind), "cache": str(cache) if cache else None,
           "import_s": round(time.perf_counter() - t_start, 2)}
    for name in workloads:
        try:
            t0 = time.perf_counter()
            if name == "stream":
                _, _, engine = stream_setup(specs[name], dtype, requests=1)
                build_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                (image,) = engine.run().values()
                jax.block_until_ready(image)
                first_s = time.perf_counter() - t0
                out[name] = {"build_s": round(build_s, 2), "first_s": round(first_s, 2), "slots": SLOTS}
            else:
                model, inputs = velocity_setup(name, specs[name], dtype)
                build_s = time.perf_counter() - t0
                res = run_velocity(model, inputs, repeats=3)
                out[name] = {"build_s": round(build_s, 2), "first_s": res["first_call_s"],
                             "ms_per_call": res["ms_per_call"]}
                del model, inputs
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        jax.clear_caches()
    out["process_s"] = round(time.perf_counter() - t_start, 2)
    out["env"] = environment()  # after the clock: torch's import is not part of a first image
    return out


def ratios(results: dict[str, dict], workloads: list[str], run: str = "cache_warm") -> dict[str, float]:
    """``{workload: <run> first_s / no_cache first_s}`` (below 1: the cache, or the scan, saves)."""
    out = {}
    for w in workloads:
        a = results.get("no_cache", {}).get(w, {}).get("first_s")
        b = results.get(run, {}).get(w, {}).get("first_s")
        if a and b:
            out[w] = round(b / a, 3)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["stream", "sd3"], choices=["stream", "sd3", "flux"])
    p.add_argument("--budget-s", type=float, default=220.0, help="launch no process past this (the part's limit)")
    p.add_argument("--smoke", action="store_true", help="tiny configs, float32, on the CPU")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.workloads, args.smoke)), flush=True)
        return

    start = time.perf_counter()
    results: dict[str, dict] = {}
    runs = []
    with tempfile.TemporaryDirectory(prefix="sf-xla-cache-") as cache_dir:
        for name in RUNS:
            elapsed = time.perf_counter() - start
            longest = max((r.get("process_s", 0) for r in runs), default=0.0)
            if elapsed + longest * 1.1 > args.budget_s:
                runs.append({"run": name, "skipped": f"budget: {elapsed:.0f} s used, a run takes ~{longest:.0f} s"})
                continue
            env = {**os.environ, "STREAMFLOW_JAX_XLA_CACHE": cache_dir if name.startswith("cache") else "0"}
            if name == "no_cache_scanned":
                env["STREAMFLOW_JAX_SCAN_BLOCKS"] = "on"
            if args.smoke:
                env["JAX_PLATFORMS"] = "cpu"
            cmd = [sys.executable, __file__, "--child", "--workloads", *args.workloads] + (["--smoke"] if args.smoke else [])
            t0 = time.perf_counter()
            res = run_child(cmd, env, max(30.0, args.budget_s - elapsed))
            results[name] = res
            runs.append({"run": name, "process_s": round(time.perf_counter() - t0, 1), **res})
            print(runs[-1], file=sys.stderr, flush=True)
    rows = [{"run": r["run"], **{f"{w}_{k}": r.get(w, {}).get(k) for w in args.workloads
                                  for k in ("build_s", "first_s")},
             "process_s": r.get("process_s"),
             "note": r.get("skipped") or r.get("error") or next(
                 (r[w]["error"] for w in args.workloads if isinstance(r.get(w), dict) and "error" in r[w]), "")}
            for r in runs]
    emit({"benchmark": "first_image_gpu", "model": "random weights" + (" (SMOKE: tiny, CPU)" if args.smoke else ""),
          "env": child_env(runs), "workloads": args.workloads, "results": rows,
          "ratios": {f"{run}/no_cache first_s {w}": r for run in ("cache_warm", "no_cache_scanned")
                     for w, r in ratios(results, args.workloads, run).items()},
          "runs": runs}, args.out)


if __name__ == "__main__":
    main()
