"""Levers of issue 22, each measured against the default in the same run; JSON with ratios.

Every variant runs in a fresh process with its own ``XLA_FLAGS`` or environment switch (XLA
reads its flags once per process) and times the same workloads, built as ``profile_gpu.py``
builds them (random weights, bf16):

- ``stream``: the seed's setting, SD1.5 UNet + TAESD, 512^2, 4 steps, stream N=4: images/s;
- ``sd3``: SD3-medium velocity call, batch 2, 1024^2: ms per call;
- ``flux``: Flux.1-dev velocity call, batch 1, 1024^2: ms per call (costly: opt in).

A ratio above 1 is a win over the default (``default_ms / variant_ms``); ``default_again``
closes the run so that the noise between processes can be read off. No default changes here:
a lever becomes the default only on a measured win. Variants are run in order while the time
budget (``--budget-s``) allows; a variant whose flag this XLA does not know fails alone.

    python benchmarks/levers_gpu.py [--workloads stream] [--group a|b|all | --variants NAME ...]
        [--budget-s 270] [--out FILE]
    python benchmarks/levers_gpu.py --smoke   # tiny configs on this CPU (flags parse, plumbing)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import child_env, emit, environment, run_child  # noqa: E402

# name -> (extra XLA_FLAGS, extra environment). In the order they run: likeliest wins first.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "default": ("", {}),
    # CUDA graphs: none at all, and graphs of any size (XLA's default skips graphs under 5 ops)
    "cmdbuf_off": ("--xla_gpu_enable_command_buffer=", {}),
    "cmdbuf_min1": ("--xla_gpu_graph_min_graph_size=1", {}),
    # graphs off for the stream engine's tick programs alone (a compile option of theirs,
    # $STREAMFLOW_JAX_TICK_GRAPHS=off): what the library itself can apply, where cmdbuf_off is
    # the process's XLA_FLAGS; equal to cmdbuf_off if the option does what the flag does
    "tick_graphs_off": ("", {"STREAMFLOW_JAX_TICK_GRAPHS": "off"}),
    # graphs kept, with the temp buffers at stable virtual addresses (XLA's VA remapping,
    # openxla/xla#35315), so that only commands touching a new parameter or output update. The
    # value is newer than the flag (NEWER_XLA): jaxlib 0.10.2 knows the flag with ALWAYS_UPDATE,
    # NEVER_UPDATE and CAPTURE_CMD_NEVER_UPDATE only, and refuses SKIP_TEMP; 0.11.2's (the
    # device's) libjax_common.so names ALWAYS_UPDATE and SKIP_TEMP (read there, 2026-12-02). On
    # an XLA without it the variant's process fails alone
    "cmdbuf_skip_temp": ("--xla_gpu_command_buffer_update_mode=SKIP_TEMP", {}),
    # the device allocator: stream-ordered (cudaMallocAsync), where a program's temp buffer, freed
    # in stream order, comes back at the same address at the next call (the tick's graphs then
    # need no update for it); and the virtual-memory allocator (jaxlib 0.10.2 takes both names)
    "allocator_cuda_async": ("", {"XLA_PYTHON_CLIENT_ALLOCATOR": "cuda_async"}),
    "allocator_vmm": ("", {"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"}),
    # one program per stream tick instead of three (admission, step, outputs): no host gaps
    # between them (the stream workload only)
    "tick_fused": ("", {"STREAMFLOW_JAX_TICK": "fused"}),
    # K ticks planned ahead and run as one compiled scan of fused ticks
    # ($STREAMFLOW_JAX_TICKS_PER_CALL): one dispatch for K ticks, and inside the scan the
    # buffers keep their addresses (no graph updates after the first tick); the stream only
    "ticks_4": ("", {"STREAMFLOW_JAX_TICKS_PER_CALL": "4"}),
    "ticks_8": ("", {"STREAMFLOW_JAX_TICKS_PER_CALL": "8"}),
    # attention per head dim: SD1.5's levels have head dims 40, 80, 160; SD3/Flux 64/128
    "attention_xla": ("", {"STREAMFLOW_JAX_ATTENTION": "xla"}),
    "attention_40_xla": ("", {"STREAMFLOW_JAX_ATTENTION": "40=xla"}),
    # repeated blocks as one lax.scan over stacked weights (FlowModel.with_scanned_blocks): one
    # compiled block body (first_call_s: XLA:CPU compiles Flux-dev in 0.27x the time,
    # compile_cpu.py); per call, a loop whose body first copies its block's slice of the
    # weights (compiled for an H200 here: 2270 kernels instead of 1070, hlo_gpu.py); and with
    # XLA's dynamic-slice fusion, meant to let a library GEMM read its slice in place (it did
    # not for the deviceless jaxlib 0.10.2; the device's XLA may differ). The transformer
    # workloads only: SD1.5 has no run of blocks to scan
    "scan_blocks": ("", {"STREAMFLOW_JAX_SCAN_BLOCKS": "on"}),
    "scan_blocks_dsf": ("--xla_gpu_enable_dynamic_slice_fusion=true", {"STREAMFLOW_JAX_SCAN_BLOCKS": "on"}),
    # cuDNN's FP8 attention where it serves (SD1.5's head dims 80 and 160; SD3's 64), per-call
    # scales, the linears left in bf16 (fp8_gpu.py measures it with FP8 linears); compiled for
    # an H200 the UNet step takes 1122 kernels instead of 892 (hlo_gpu.py): a likely loss there
    "attention_fp8": ("", {"STREAMFLOW_JAX_ATTENTION": "fp8"}),
    # convolution kernels stored [out, kh, kw, in], cuDNN's filter layout: compiled for an H200
    # the UNet transposes its 98 HWIO kernels at every call (hlo_gpu.py); the stream workload only
    "conv_ohwi": ("", {"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi"}),
    # GroupNorm's statistics as per-channel column reductions, then per group (the UNet's and
    # VAE's ~60 norms; the stream workload only): the CPU's default, measured faster there
    "groupnorm_channels": ("", {"STREAMFLOW_JAX_GROUPNORM": "channels"}),
    # both moments in one (shifted) pass: one reduction kernel per norm instead of two (hlo_gpu.py)
    "groupnorm_onepass": ("", {"STREAMFLOW_JAX_GROUPNORM": "onepass"}),
    # 1x1 convolutions (46 of the UNet's 98) as GEMMs: off cuDNN, so into the CUDA graphs (the
    # profile shows every cuDNN convolution launched on its own between graphs), no transposes
    "conv1x1_dot": ("", {"STREAMFLOW_JAX_CONV1X1": "dot"}),
    # convolutions as cuDNN fusions (XLA's experimental conv fusion; kernels stored OHWI, else
    # each is transposed at every call): bias and residual adds in the fusion, and, unlike
    # cuDNN convolution calls, capturable in CUDA graphs; the biases are broadcast to full
    # tensors first (hlo_gpu.py: 892 kernels, as the default, 98 of them those broadcasts)
    "conv_fusion_ohwi": ("--xla_gpu_experimental_enable_conv_fusion=true", {"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi"}),
    # the four that cut kernels or gaps from the tick, together: do their wins add up? (H200,
    # 2026-11-30: 1.133x; OHWI, one-pass GroupNorm and 1x1 GEMMs are the GPU's defaults since)
    "fewer_kernels": ("", {"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi", "STREAMFLOW_JAX_GROUPNORM": "onepass",
                           "STREAMFLOW_JAX_CONV1X1": "dot", "STREAMFLOW_JAX_TICK": "fused"}),
    # the defaults before that measurement (HWIO kernels, two-pass GroupNorm by groups, 1x1
    # convolutions on cuDNN): does the win hold against today's defaults?
    "more_kernels": ("", {"STREAMFLOW_JAX_CONV_LAYOUT": "hwio", "STREAMFLOW_JAX_GROUPNORM": "groups",
                          "STREAMFLOW_JAX_CONV1X1": "conv"}),
    # GEMMs: cuBLAS everywhere (no Triton), cuBLASLt (bias/GELU epilogues), cuDNN GEMM fusions,
    # a wider Triton tiling search
    "triton_gemm_off": ("--xla_gpu_enable_triton_gemm=false", {}),
    "cublaslt": ("--xla_gpu_enable_cublaslt=true", {}),
    "cudnn_gemm_fusion": ("--xla_gpu_cudnn_gemm_fusion_level=2", {}),
    "exhaustive_tiling": ("--xla_gpu_exhaustive_tiling_search=true", {}),
    # what autotuning buys (its compile time against its run time)
    "autotune_0": ("--xla_gpu_autotune_level=0", {}),
    # JAX's default allocation (one pool of 75% of the GPU at start; gpu_all.sh turns it off so
    # that torch can share the GPU in the comparisons): does growing on demand cost anything?
    "prealloc": ("", {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}),
    # graphs around loops and conditionals too
    "cmdbuf_all": ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE", {}),
    # XLA's DotMerger off: products of one input stay separate GEMMs. The H200 profile of
    # Flux-dev (2026-11-30) shows what merging costs there: the merged products' weights are
    # concatenated at every call (proj_mlp with to_v, 94 MB a single block; to_q with to_k),
    # about 3.5 ms of copies a call; hlo_gpu item 10 counts more GEMMs and norms without it
    "dot_merger_off": ("--xla_gpu_dot_merger_threshold_mb=0", {}),
    # both: cuBLAS(Lt) GEMMs (what the H200's autotuner picked for the transformers' products
    # anyway: nvjet kernels in the profile) with XLA's GemmRewriter fusing their epilogues (bias,
    # Flux's tanh GELU, the residual add), and no concatenated weights. Compiled for an H200
    # here (hlo_gpu.py, 2026-12-01, recounted), the memory-bound kernels' traffic falls from 3.9 to
    # 2.3 ms a call at full bandwidth for SD3-medium, 9.4 to 7.5 ms for Flux-dev
    "triton_gemm_off_nomerge": ("--xla_gpu_enable_triton_gemm=false --xla_gpu_dot_merger_threshold_mb=0", {}),
    # the same as the library's switch ($STREAMFLOW_JAX_GEMM=cublas, ops.gemm_choice): the two
    # options on the library's programs only (sampling, velocity, the tick; the benchmarks'
    # jits take them through common.library_jit). If it wins, it becomes auto's choice on GPUs
    "gemm_cublas": ("", {"STREAMFLOW_JAX_GEMM": "cublas"}),
    # Flux's single blocks: proj_out of [attention, MLP] as two products summed, instead of the
    # concatenation written out (141 MB a block in the H200 profile of 2026-11-30, about 4.2 ms
    # of the 136.8 ms call); $STREAMFLOW_JAX_CONCAT_PRODUCT=split, ops.concat_product_choice.
    # Changes nothing for SD3 or the UNet; then with cuBLAS GEMMs, whose GemmRewriter can fuse
    # the sum as the second product's C operand
    "split_concat": ("", {"STREAMFLOW_JAX_CONCAT_PRODUCT": "split"}),
    "split_concat_cublas": ("", {"STREAMFLOW_JAX_CONCAT_PRODUCT": "split", "STREAMFLOW_JAX_GEMM": "cublas"}),
    # each block's modulation product apart ($STREAMFLOW_JAX_MODULATION=apart,
    # ops.modulation_choice): DotMerger no longer makes all the blocks' modulation products one
    # GEMM whose weights it concatenates at every call (2.5 GB SD3-medium, 4.4 GB Flux-dev);
    # q/k/v still merge. Compiled for an H200 here: memory-bound traffic 3.93 -> 3.37 ms a call
    # (SD3-medium, +23 kernels), 9.39 -> 8.43 (Flux-dev, 2 kernels fewer)
    "modulation_apart": ("", {"STREAMFLOW_JAX_MODULATION": "apart"}),
    "default_again": ("", {}),
}
# flags that the XLA of this project's CPU tests (jaxlib 0.10.2) does not know
NEWER_XLA = {"cmdbuf_skip_temp"}
# One device command fits about six variants (a process builds, compiles and times in ~40 s):
# the variants come in groups, each measured against its own run of the default.
GROUPS = {
    # after the first run of group a (H200, 2026-11-30: the tick is host-bound, 78 CUDA graph
    # updates and executions per tick take 5.5 ms of the host's 8.2 in the step program): graphs
    # off (for the process, then for the tick's programs alone), JAX's own preallocation (users'
    # default; gpu_all.sh turns it off), the old defaults,
    # then the convolutions as graph-capturable cuDNN fusions
    # (2026-12-02: ticks_4 first, ticks_8 after it: K ticks a call, the host's dispatch paid once)
    "a": ("default", "ticks_4", "ticks_8", "cmdbuf_off", "tick_graphs_off", "prealloc", "allocator_cuda_async",
          "cmdbuf_skip_temp", "allocator_vmm", "more_kernels", "conv_fusion_ohwi", "cmdbuf_min1", "default_again"),
    # the first run's group a (1.133, 0.94, 1.005, 1.031, 1.062 on the H200): kept to rerun
    "a0": ("default", "fewer_kernels", "conv_fusion_ohwi", "tick_fused", "conv1x1_dot", "conv_ohwi", "default_again"),
    # (2026-12-01: the GEMM levers first; compiled for an H200 here the UNet step's memory-bound
    # traffic is 1.42 ms a call at full bandwidth, 1.30 without DotMerger, 1.04 with cuBLAS too)
    "b": ("default", "gemm_cublas", "dot_merger_off", "groupnorm_channels", "attention_fp8",
          "attention_40_xla", "triton_gemm_off", "cublaslt", "cudnn_gemm_fusion",
          "exhaustive_tiling", "autotune_0", "cmdbuf_all", "cmdbuf_min1", "attention_xla", "default_again"),
    # the transformers' call (SD3-medium, Flux-dev): the UNet's switches (convolutions, GroupNorm,
    # the tick) change nothing there; graphs, GEMM backends, attention do
    # (H200, 2026-11-30, SD3-medium: cmdbuf_off 0.983, attention_fp8 1.013, prealloc 1.009 of the
    # default's speed: noise; those go last)
    # (2026-12-01: the GEMM backend and DotMerger first: hlo_gpu.py's traffic favours both off)
    # (2026-12-02: modulation_apart third: DotMerger's cost without unmerging q/k/v)
    "transformer": ("default", "gemm_cublas", "dot_merger_off", "modulation_apart", "triton_gemm_off", "scan_blocks",
                    "cublaslt", "cudnn_gemm_fusion", "autotune_0", "scan_blocks_dsf", "cmdbuf_off", "attention_fp8",
                    "prealloc", "default_again"),
    # Flux-dev (levers-flux): the same GEMM levers, then the scan, where it compiles the most blocks (57)
    # (2026-12-01: and the single blocks' concatenation split, after DotMerger: compiled for an
    # H200 here it barely moves the memory-bound traffic, 9.39 -> 9.28 ms a call at bandwidth, and
    # 7.49 -> 6.75 on top of cuBLAS, which adds 76 slice kernels: split_concat_cublas stays out of
    # the group; a variant past the budget is skipped and said so)
    "scan": ("default", "gemm_cublas", "dot_merger_off", "modulation_apart", "split_concat", "scan_blocks",
             "scan_blocks_dsf", "default_again"),
    "all": tuple(VARIANTS),
    "smoke": ("default", "cmdbuf_off", "tick_fused", "ticks_4", "attention_xla", "groupnorm_channels", "groupnorm_onepass",
              "conv_ohwi", "conv1x1_dot", "scan_blocks", "default_again"),
}


def child(workloads: list[str], smoke: bool, repeats: int) -> dict:
    """One variant's measurements (run in its own process)."""
    import jax

    from profile_gpu import SLOTS, configs, run_stream, run_velocity, stream_setup, velocity_setup

    dtype = "float32" if smoke else "bfloat16"
    specs = configs(smoke)
    out = {"device": str(jax.devices()[0].device_kind)}
    for name in workloads:
        t0 = time.perf_counter()
        try:
            if name == "stream":
                ticks = 8 if smoke else 48
                _, _, engine = stream_setup(specs[name], dtype, requests=3 * SLOTS + ticks)
                out[name] = run_stream(engine, ticks)
            else:
                model, inputs = velocity_setup(name, specs[name], dtype)
                out[name] = run_velocity(model, inputs, repeats)
                del model, inputs
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        out[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        jax.clear_caches()
    out["env"] = environment()
    return out


def ratios(results: dict[str, dict], workloads: list[str]) -> dict[str, dict[str, float]]:
    """``{variant: {workload: default_ms / variant_ms}}`` (above 1: faster than the default)."""
    base = results.get("default", {})
    out = {}
    for variant, res in results.items():
        if variant == "default":
            continue
        row = {}
        for w in workloads:
            a, b = base.get(w, {}).get("ms_per_call"), res.get(w, {}).get("ms_per_call")
            if a and b:
                row[w] = round(a / b, 3)
        out[variant] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["stream"], choices=["stream", "sd3", "flux"])
    p.add_argument("--group", choices=sorted(GROUPS), default=None, help="a named list of variants (default: a; smoke)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"instead of a group (the default runs first anyway): {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=270.0, help="launch no variant past this (the part's limit)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny configs, float32, on the CPU")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.workloads, args.smoke, args.repeats)), flush=True)
        return

    names = list(args.variants or GROUPS[args.group or ("smoke" if args.smoke else "a")])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    if "default" not in names:  # every ratio is to a default measured in the same run
        names.insert(0, "default")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    runs = []
    longest = 0.0
    for name in names:
        elapsed = time.perf_counter() - start
        if elapsed + longest * 1.2 > args.budget_s:
            runs.append({"variant": name, "skipped": f"budget: {elapsed:.0f} s used, a variant takes ~{longest:.0f} s"})
            continue
        flags, env_extra = VARIANTS[name]
        env = {**os.environ, **env_extra}
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        if args.smoke:
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, __file__, "--child", "--workloads", *args.workloads, "--repeats", str(args.repeats)]
        if args.smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        res = run_child(cmd, env, max(30.0, args.budget_s - elapsed))
        wall = time.perf_counter() - t0
        longest = max(longest, wall)
        results[name] = res
        runs.append({"variant": name, "xla_flags": flags, "env": env_extra, "process_s": round(wall, 1), **res})
        print(runs[-1], file=sys.stderr, flush=True)
    rows = []
    for r in runs:
        row = {"variant": r["variant"]}
        for w in args.workloads:
            m = r.get(w, {})
            row[f"{w}_ms"] = m.get("ms_per_call")
            if w == "stream":
                row["stream_images_per_s"] = m.get("images_per_s")
            row[f"{w}_compile_s"] = m.get("first_tick_s", m.get("first_call_s"))
        row["note"] = r.get("skipped") or r.get("error") or next(
            (r[w]["error"] for w in args.workloads if isinstance(r.get(w), dict) and "error" in r[w]), "")
        rows.append(row)
    emit({"benchmark": "levers_gpu", "model": "random weights" + (" (SMOKE: tiny, CPU)" if args.smoke else ""),
          "env": child_env(runs),
          "workloads": args.workloads, "results": rows,
          "ratios": {f"{v}/{w}": r for v, by in ratios(results, args.workloads).items() for w, r in by.items()},
          "runs": runs}, args.out)


if __name__ == "__main__":
    main()
