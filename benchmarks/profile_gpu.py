"""Profiles of issue 22's three GPU workloads with ``jax.profiler``, each summarized by
``profile_summary.py``; JSON, and the traces themselves where their size allows.

Workloads (random weights made on the device, bf16, nothing from torch):

- ``stream``: stream ticks in the seed's setting: SD1.5 UNet (PeRFlow ``diff_eps`` adapter) +
  TAESD, 512^2 (latent 64x64x4), 4 steps, ``sf.StreamEngine`` N=4 slots, ``min_batch=4`` (one
  step program). In steady state a tick admits one request, steps 4 slots and decodes one: one
  image per tick. FLOPs per tick: the UNet at batch 4 plus TAESD's decoder at batch 1.
- ``sd3``: SD3-medium velocity call, batch 2, 1024^2 (latent 128x128x16), 154 text tokens.
- ``flux``: Flux.1-dev velocity call, batch 1, 1024^2, 512 text tokens, guidance 3.5.

For each: FLOPs by XLA's cost analysis (attention counted through XLA's lowering; where XLA
gives none, the program's products counted from its jaxpr: ``flops_source``), compile and
warm up, time ``--calls`` calls, then trace ``--calls`` calls dispatched back to back (one sync
at the end), twice: with JAX's default profiler options (the Python tracer on: Python functions
in the host timeline), and lean, without the Python tracer (``*_lean``: its timeline is the
less perturbed one; ``lean_*`` fields in the row). The compiled HLO comes from XLA's own dump (``--xla_dump_to``, these programs
only) and gives the kernels their categories. Each workload's HLO dumps and traces (lean first)
are packed into ``--trace-dir/NAME.tar.gz`` (default: ``profile_traces/`` beside ``--out``)
while they fit ``--max-file-mb`` a workload and ``--max-trace-mb`` in all.

    python benchmarks/profile_gpu.py [--workloads stream sd3 flux] [--calls 4] [--out FILE]
    python benchmarks/profile_gpu.py --smoke      # tiny configs on this CPU, well under a minute
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, random_flowmodel, save, timed  # noqa: E402

MODULES = {"stream": r"^jit__(step|admit|outputs)\b", "sd3": r"^jit_velocity_call\b", "flux": r"^jit_velocity_call\b"}
STEPS, WINDOWS, SLOTS = 4, 4, 4


def configs(smoke: bool) -> dict:
    from streamflow_jax.models.flux import FluxConfig
    from streamflow_jax.models.mmdit import SD3Config
    from streamflow_jax.models.taesd import TinyConfig
    from streamflow_jax.models.unet import UNetConfig

    if not smoke:
        return {"stream": dict(unet=UNetConfig.sd15(), taesd=TinyConfig(), latent=64, text=(77, 768)),
                "sd3": dict(config=SD3Config.sd3_medium(), batch=2, latent=128, text=154),
                "flux": dict(config=FluxConfig.dev(), batch=1, latent=128, text=512)}
    return {
        "stream": dict(unet=UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                       norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                       taesd=TinyConfig(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(8,) * 4,
                                        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)),
                       latent=16, text=(8, 32)),
        "sd3": dict(config=SD3Config(num_layers=2, num_attention_heads=2, caption_projection_dim=128,
                                     pos_embed_max_size=16), batch=2, latent=16, text=8),
        "flux": dict(config=FluxConfig(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                                       axes_dims_rope=(4, 6, 6), joint_attention_dim=32, pooled_projection_dim=32,
                                       guidance_embeds=True), batch=1, latent=16, text=8),
    }


def velocity_call(model, x, t, cond):
    return model.velocity(x, t, cond)


@functools.lru_cache(maxsize=None)
def velocity_jit():
    """``jax.jit(velocity_call)`` with the library's compile options (``common.library_jit``),
    made once (jax is imported after XLA_FLAGS is set)."""
    from common import library_jit

    return library_jit(velocity_call)


def stream_setup(spec: dict, dtype: str, requests: int):
    """The seed setting's models and a stream engine with ``requests`` queued:
    ``(unet, taesd, engine)`` (random weights; N=SLOTS slots, one step program)."""
    import numpy as np

    import streamflow_jax as sf
    from streamflow_jax.models.perflow import PeRFlowAdapter

    unet = random_flowmodel("UNet2DConditionModel", spec["unet"], dtype)
    unet = unet.with_adapter(PeRFlowAdapter("diff_eps", WINDOWS))
    taesd = random_flowmodel("AutoencoderTiny", spec["taesd"], dtype, seed=1)
    lat, (text_len, text_dim) = spec["latent"], spec["text"]
    emb = np.random.default_rng(0).standard_normal((text_len, text_dim)).astype(np.float32)
    grid = sf.schedules.perflow(STEPS, WINDOWS)
    engine = sf.StreamEngine(unet, (lat, lat, 4), {"encoder_hidden_states": (text_len, text_dim)},
                             slots_per_stream=SLOTS, decoder=taesd, min_batch=SLOTS)
    for i in range(requests):
        engine.submit({"encoder_hidden_states": emb}, grid=grid, seed=i)
    return unet, taesd, engine


def stream_flops(unet, taesd, spec: dict) -> tuple[float | None, str | None]:
    """One steady-state tick: the UNet at batch SLOTS and TAESD's decoder at batch 1."""
    import jax.numpy as jnp

    from profile_summary import program_flops

    lat, (text_len, text_dim) = spec["latent"], spec["text"]
    x = jnp.zeros((SLOTS, lat, lat, 4), jnp.float32)
    t = jnp.full((SLOTS,), 0.5, jnp.float32)
    cond = {"encoder_hidden_states": jnp.zeros((SLOTS, text_len, text_dim), jnp.float32)}
    return program_flops(lambda u, d, x, t, c, z: (u.velocity(x, t, c), d.module.decode_latents(z)),
                         unet, taesd, x, t, cond, x[:1])


def run_stream(engine, ticks: int) -> dict:
    """Compiles, fills the slots, then times ``ticks`` steady-state ticks (one image each; a
    multiple of the engine's ``ticks_per_call``)."""
    t0 = time.perf_counter()
    engine.run(max_ticks=1)  # compiles admission and the step
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # fills every slot (compiles the outputs with TAESD): steady state; with ticks_per_call K, in
    # whole scans (at least one: compiled before the timing), so that the timed ticks are scans
    per_call = engine.ticks_per_call
    engine.run(max_ticks=-(-(2 * SLOTS - 1) // per_call) * per_call)
    fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.run(max_ticks=ticks)
    per_tick = (time.perf_counter() - t0) / ticks
    return {"first_tick_s": round(compile_s, 2), "fill_s": round(fill_s, 2), "ms_per_call": round(1e3 * per_tick, 3),
            "images_per_s": round(1 / per_tick, 2)}


def velocity_setup(name: str, spec: dict, dtype: str):
    """``(model, (x, t, cond))`` of an SD3 or Flux workload (random weights and inputs)."""
    import jax.numpy as jnp
    import numpy as np

    class_name = "SD3Transformer2DModel" if name == "sd3" else "FluxTransformer2DModel"
    b, lat = spec["batch"], spec["latent"]
    model = random_flowmodel(class_name, spec["config"], dtype)
    jd = model.dtype
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, lat, lat, model.latent_channels)), jd)
    cond = {k: jnp.asarray(rng.standard_normal((b, *s)), jd) for k, s in model.cond_shapes(spec["text"]).items()}
    if "guidance" in cond:
        cond["guidance"] = jnp.full((b,), 3.5, jnp.float32)
    t = jnp.asarray(np.linspace(0.9, 0.3, b), jnp.float32)
    return model, (x, t, cond)


def run_velocity(model, inputs, repeats: int) -> dict:
    """Compiles ``velocity_call`` (first call) and times ``repeats`` calls."""
    import jax

    call = velocity_jit()
    t0 = time.perf_counter()
    jax.block_until_ready(call(model, *inputs))
    compile_s = time.perf_counter() - t0
    per_call = timed(lambda: call(model, *inputs), warmup=1, repeats=repeats, sync=jax.block_until_ready)["mean_s"]
    # the same calls dispatched back to back, one sync at the end: the device's rate with the
    # host's dispatch (and the first kernel's wait for it) hidden behind the previous call, as
    # inside a sampler's loop; ms_per_call is one call from dispatch to result, as the
    # torch.compile reference is timed
    t0 = time.perf_counter()
    jax.block_until_ready([call(model, *inputs) for _ in range(repeats)])
    queued = (time.perf_counter() - t0) / repeats
    return {"first_call_s": round(compile_s, 2), "ms_per_call": round(1e3 * per_call, 3),
            "queued_ms_per_call": round(1e3 * queued, 3)}


def profile_stream(spec: dict, dtype: str, calls: int, trace_dir: Path) -> tuple[dict, float]:
    import jax

    unet, taesd, engine = stream_setup(spec, dtype, requests=3 * SLOTS + 2 * calls + 16)
    flops = stream_flops(unet, taesd, spec)
    row = {"workload": "stream", "batch": SLOTS, **run_stream(engine, 16)}
    with jax.profiler.trace(str(trace_dir)):
        engine.run(max_ticks=calls)
    jax.block_until_ready(engine.buffers.state["x"])
    with jax.profiler.trace(str(lean_dir(trace_dir)), profiler_options=lean_options()):
        engine.run(max_ticks=calls)
    return row, flops


def lean_dir(trace_dir: Path) -> Path:
    return trace_dir.with_name(trace_dir.name + "_lean")


def lean_options():
    """Profiler options without the Python tracer: the traced calls run closer to their untraced
    speed (the first H200 profile's tick took 26.5 ms traced against 20.0 untimed), with the
    runtime's own host spans (``PjitFunction(...)``) kept."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options


def profile_velocity(name: str, spec: dict, dtype: str, calls: int, trace_dir: Path,
                     repeats: int) -> tuple[dict, float]:
    import jax

    from profile_summary import program_flops

    model, inputs = velocity_setup(name, spec, dtype)
    flops = program_flops(velocity_call, model, *inputs)
    row = {"workload": name, "batch": spec["batch"], **run_velocity(model, inputs, repeats)}
    call = velocity_jit()
    with jax.profiler.trace(str(trace_dir)):
        jax.block_until_ready([call(model, *inputs) for _ in range(calls)])
    with jax.profiler.trace(str(lean_dir(trace_dir)), profiler_options=lean_options()):
        jax.block_until_ready([call(model, *inputs) for _ in range(calls)])
    return row, flops


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def pack_traces(dest: Path, traces: list[Path], hlo: list[Path], max_mb: float) -> dict | None:
    """One ``.tar.gz`` per workload, so that it comes back from the device (which returns a few
    files at most two folders down, 16 MiB each): the compiled HLO, then the traces from the last
    (the lean one) to the first, as many as stay under ``max_mb``; None if not even the HLO fits."""
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    traces = [t for t in traces if Path(t).exists()]  # a trace not written: the others still go
    parts = [("hlo", [(f, f"hlo/{f.name}") for f in hlo if Path(f).exists()])]
    parts += [(t.name, [(t, t.name)]) for t in reversed(traces)]
    fitted, written = None, None
    for n in range(1, len(parts) + 1):
        with tarfile.open(dest, "w:gz") as tar:
            for _, entries in parts[:n]:
                for path, arcname in entries:
                    tar.add(path, arcname=arcname)
        written = n
        mb = dest.stat().st_size / 2**20
        if mb > max_mb:
            break
        fitted = (n, round(mb, 2))
    if fitted is None:
        dest.unlink(missing_ok=True)
        return None
    if written != fitted[0]:  # the last try did not fit: write the largest that did
        with tarfile.open(dest, "w:gz") as tar:
            for _, entries in parts[:fitted[0]]:
                for path, arcname in entries:
                    tar.add(path, arcname=arcname)
    return {"mb": fitted[1], "holds": [name for name, _ in parts[:fitted[0]]]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["stream", "sd3", "flux"], choices=["stream", "sd3", "flux"])
    p.add_argument("--calls", type=int, default=None, help="calls (ticks) traced; default 4 (smoke: 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny configs, float32, on the CPU")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--max-trace-mb", type=float, default=45.0, help="all workloads' trace archives together")
    p.add_argument("--max-file-mb", type=float, default=15.0, help="one workload's archive (the device returns <= 16 MiB a file)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    calls = args.calls or (2 if args.smoke else 4)
    work = Path(tempfile.mkdtemp(prefix="profile_gpu_"))
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_dump_to={work / 'hlo'} --xla_dump_hlo_as_text "
                               f"--xla_dump_hlo_module_re=jit_(velocity_call|_step|_admit|_outputs)").strip()
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import gc

    import jax

    from profile_summary import summarize

    dtype = "float32" if args.smoke else "bfloat16"
    specs = configs(args.smoke)
    trace_root = Path(args.trace_dir) if args.trace_dir else None
    if trace_root is None and args.out:
        trace_root = Path(args.out).parent / "profile_traces"
    result = {"benchmark": "profile_gpu", "model": "random weights" + (" (SMOKE: tiny, CPU)" if args.smoke else ""),
              "dtype": dtype, "calls_traced": calls, "env": environment(), "results": [], "summaries": {}}
    copied_mb = 0.0
    for name in args.workloads:
        t0 = time.perf_counter()
        trace_dir = work / "traces" / name
        hlo_before = set((work / "hlo").glob("*")) if (work / "hlo").exists() else set()
        try:
            if name == "stream":
                row, (flops, flops_source) = profile_stream(specs[name], dtype, calls, trace_dir)
            else:
                row, (flops, flops_source) = profile_velocity(name, specs[name], dtype, calls, trace_dir, args.repeats)
            hlo = sorted(f for f in (work / "hlo").glob("*after_optimizations.txt") if f not in hlo_before)
            s = summarize(trace_dir, calls=calls, flops=flops, hlo=hlo, modules=MODULES[name])
            cats = {c: v["share"] for c, v in s["categories"].items() if v["kernels"]}
            row.update(kernels_per_call=s["kernels_per_call"], device_ms_per_call=round(s["per_call_us"] / 1e3, 3),
                       busy_fraction=s["busy_fraction"], idle_ms_per_call=round(s["idle_us"] / calls / 1e3, 3),
                       tflop_per_call=round(flops / 1e12, 4) if flops else None, flops_source=flops_source,
                       tflops_per_s=s.get("tflops_per_s"),
                       tflops_per_s_busy=s.get("tflops_per_s_busy"), shares=cats)
            if s.get("host"):
                row["dispatch_ms_per_call"] = round(sum(s["host"]["dispatch_us_per_call"].values()) / 1e3, 3)
            if s.get("launches"):
                row.update(launches_per_call=s["launches"]["per_call"], graphs_per_call=s["launches"]["graphs_per_call"],
                           idle_between_launches_ms_per_call=round(
                               s["launches"]["idle_between_launches_us"] / calls / 1e3, 3))
            result["summaries"][name] = s
            lean = summarize(lean_dir(trace_dir), calls=calls, hlo=hlo, modules=MODULES[name])
            result["summaries"][f"{name}_lean"] = lean
            row.update(lean_device_ms_per_call=round(lean["per_call_us"] / 1e3, 3),
                       lean_busy_fraction=lean["busy_fraction"])
            if lean.get("launches"):
                row["lean_idle_between_launches_ms_per_call"] = round(
                    lean["launches"]["idle_between_launches_us"] / calls / 1e3, 3)
                row["lean_idle_within_launches_ms_per_call"] = round(
                    lean["launches"]["idle_within_launches_us"] / calls / 1e3, 3)
                # the idle time inside launches by gap size (many small: the graphs' per-kernel latency)
                row["lean_gaps_within_ms"] = {k: round(v["us_per_call"] / 1e3, 3)
                                              for k, v in lean["launches"]["gaps_within_launches"].items()}
            cover = [c for c in lean.get("op_coverage", {}).values() if "missing" in c]
            if cover:  # without CUDA graphs: ops of the program with no kernel in the trace
                row["lean_ops_missing"] = sum(c["missing"] for c in cover)
            if lean.get("host"):
                row["lean_dispatch_ms_per_call"] = round(sum(lean["host"]["dispatch_us_per_call"].values()) / 1e3, 3)
            if trace_root is not None:
                packed = pack_traces(trace_root / f"{name}.tar.gz", [trace_dir, lean_dir(trace_dir)], hlo,
                                     min(args.max_file_mb, args.max_trace_mb - copied_mb))
                if packed is not None:
                    copied_mb += packed["mb"]
                    row["trace"] = f"{trace_root / name}.tar.gz ({', '.join(packed['holds'])}; {packed['mb']:.1f} MB)"
                else:
                    row["trace"] = f"not copied ({copied_mb:.1f} of {args.max_trace_mb} MB used)"
        except Exception as e:  # one workload's failure (memory, a compile error) keeps the others
            import traceback

            row = {"workload": name, "error": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc()[-1500:]}
        row["part_s"] = round(time.perf_counter() - t0, 1)
        result["results"].append(row)
        print(row, file=sys.stderr, flush=True)
        save(result, args.out)  # partial results survive a time limit
        jax.clear_caches()
        gc.collect()
    emit(result, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
