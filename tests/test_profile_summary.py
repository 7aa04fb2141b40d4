"""The profile summarizer (benchmarks/profile_summary.py) on real XLA:CPU traces made here, and on
the GPU layout (stream lines, derived lines, kernel names) written out by hand."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_summary import (  # noqa: E402
    CATEGORIES,
    Kernel,
    categorize,
    device_kernels,
    gap_histogram,
    hlo_entry_ops,
    hlo_op_categories,
    host_time,
    launches,
    op_coverage,
    program_flops,
    read_events,
    summarize,
    timeline,
)

from streamflow_jax.ops import ATTENTION_ENV  # noqa: E402

M, K, N = 192, 256, 128
CALLS = 3


def matmul_conv(a, b, k):
    """A [M, K] x [K, N] matmul, then a 3x3 convolution of its output, then a reduction."""
    y = a @ b
    z = jax.lax.conv_general_dilated(y[None, :, :, None], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(z), axis=(0, 3))


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """CALLS calls of a compiled ``matmul_conv`` under ``jax.profiler.trace``; the wall time."""
    args = (jnp.ones((M, K)), jnp.full((K, N), 0.01), jnp.ones((3, 3, 1, 8)))
    compiled = jax.jit(matmul_conv).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    path = tmp_path_factory.mktemp("trace")
    with jax.profiler.trace(str(path)):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            jax.block_until_ready(compiled(*args))
        wall_us = (time.perf_counter() - t0) * 1e6
    return path, compiled, args, wall_us


def test_cpu_trace(traced):
    path, compiled, args, wall_us = traced
    flops, source = program_flops(matmul_conv, *args)
    assert source == "xla"  # the CPU's cost analysis answers
    s = summarize(path, flops=flops, hlo=[compiled.as_text()])
    assert s["device"] == "cpu" and s["source"] == "xplane" and s["hlo_modules"] == ["jit_matmul_conv"]
    assert s["calls"] == CALLS  # from the trace's run ids
    assert s["kernels"] % CALLS == 0 and s["kernels_per_call"] == s["kernels"] / CALLS >= 2
    cats = s["categories"]
    assert list(cats) == list(CATEGORIES)
    assert cats["GEMM"]["kernels"] == CALLS and cats["conv"]["kernels"] == CALLS  # one of each per call
    assert abs(sum(c["share"] for c in cats.values()) - 1) < 1e-3
    assert {t["category"] for t in s["top"]} >= {"GEMM", "conv"}
    assert all(t["per_call"] == 1 for t in s["top"])
    # the timeline: busy + idle = span, no negative gap, inside the measured wall time
    assert s["gaps"]["count"] >= CALLS - 1 and min(s["gaps"]["largest_us"]) >= 0
    # every op of the program that launches work shows up in the trace (XLA:CPU's ops)
    cover = s["op_coverage"]["jit_matmul_conv"]
    assert cover["hlo_ops"] >= 2 and cover["seen"] >= 2, cover
    assert abs(s["busy_us"] + s["idle_us"] - s["span_us"]) < 0.05
    assert abs(s["gaps"]["total_us"] - s["idle_us"]) < 0.05
    assert 0 < s["busy_us"] <= s["kernel_time_us"] + 0.05 and s["span_us"] <= wall_us
    assert s["per_call_us"] == pytest.approx(s["span_us"] / CALLS, abs=0.01)
    # each XLA:CPU op is a launch of its own; the idle time is all between launches or inside them
    got = s["launches"]
    assert got["per_call"] == pytest.approx(s["kernels_per_call"], abs=0.5) and got["graphs_per_call"] == 0
    assert got["idle_between_launches_us"] + got["idle_within_launches_us"] == pytest.approx(s["idle_us"], abs=0.05)
    # FLOPs from XLA's cost analysis: the matmul's 2MNK, the convolution's, and a few per element
    assert 2 * M * N * K + 2 * 9 * 8 * M * N <= flops <= 2 * M * N * K + 2 * 9 * 8 * M * N + 8 * 8 * M * N
    assert s["flops_per_call"] == flops
    assert s["tflops_per_s"] == pytest.approx(flops * CALLS / (s["span_us"] * 1e6), rel=1e-2, abs=1e-3)
    assert s["tflops_per_s_busy"] >= s["tflops_per_s"]


def test_json_trace_agrees(traced):
    path, compiled, _, _ = traced
    a = summarize(path, hlo=[compiled.as_text()], calls=CALLS)
    b = summarize(path, hlo=[compiled.as_text()], calls=CALLS, source="json")
    assert b["source"] == "json"
    assert (a["kernels"], a["categories"]) == (b["kernels"], b["categories"])
    assert a["busy_us"] == pytest.approx(b["busy_us"], abs=0.01)


def test_module_filter_and_name_fallback(traced):
    path, *_ = traced
    assert summarize(path, modules="^jit_other$")["kernels"] == 0
    s = summarize(path, modules="matmul_conv")  # no HLO: categories from the op names
    assert s["kernels"] > 0 and s["categories"]["conv"]["kernels"] == CALLS


def test_while_body_counts_once(tmp_path):
    """XLA:CPU's ``while`` event encloses its body's ops: only the body's ops count."""
    def loop(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=4)[0]

    args = (jnp.ones((64, 64)), jnp.full((64, 64), 0.01))
    compiled = jax.jit(loop).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(str(tmp_path)):
        jax.block_until_ready(compiled(*args))
    s = summarize(tmp_path, hlo=[compiled.as_text()])
    assert s["categories"]["GEMM"]["kernels"] == 4 and s["categories"]["other"]["kernels"] == 0
    assert s["busy_us"] <= s["kernel_time_us"] + 0.05


def test_program_flops_count_attention_and_restore_the_switch(monkeypatch):
    from streamflow_jax import ops

    monkeypatch.setenv(ATTENTION_ENV, "cudnn")
    b, n, h, k = 2, 100, 4, 16
    q = jnp.ones((b, n, h, k), jnp.float32)
    flops, _ = program_flops(lambda q: ops.attention(q, q, q), q)
    assert flops >= 2 * (2 * b * h * n * n * k)  # q k^T and p v
    assert os.environ[ATTENTION_ENV] == "cudnn"


# ---------------------------------------------------------------------------------------------
# The GPU layout, written out: what XLA's CUPTI tracer and GPU compiler produce
# ---------------------------------------------------------------------------------------------

GPU_HLO = """HloModule jit_velocity_call, is_scheduled=true

%fused_norm (param_0: bf16[4,64]) -> bf16[4,64] {
  %param_0 = bf16[4,64]{1,0} parameter(0)
  %c = f32[] constant(0)
  %cv = f32[4,64]{1,0} convert(%param_0)
  %r = f32[4]{0} reduce(%cv, %c), dimensions={1}, to_apply=%add
  %rs = f32[4]{0} rsqrt(%r)
  %b = f32[4,64]{1,0} broadcast(%rs), dimensions={0}
  %m = f32[4,64]{1,0} multiply(%cv, %b)
  ROOT %o = bf16[4,64]{1,0} convert(%m)
}

%fused_transpose (param_0.1: bf16[4,64]) -> bf16[64,4] {
  %param_0.1 = bf16[4,64]{1,0} parameter(0)
  ROOT %t = bf16[64,4]{1,0} transpose(%param_0.1), dimensions={1,0}
}

%fused_add (param_0.2: bf16[4,64], param_1.2: bf16[4,64]) -> bf16[4,64] {
  %param_0.2 = bf16[4,64]{1,0} parameter(0)
  %param_1.2 = bf16[4,64]{1,0} parameter(1)
  ROOT %a = bf16[4,64]{1,0} add(%param_0.2, %param_1.2)
}

%triton_gemm_computation (p0: bf16[4,64], p1: bf16[64,64]) -> bf16[4,64] {
  %p0 = bf16[4,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  ROOT %d = bf16[4,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[4,64]) -> bf16[4,64] {
  %x = bf16[4,64]{1,0} parameter(0)
  %input_reduce_fusion = bf16[4,64]{1,0} fusion(%x), kind=kInput, calls=%fused_norm
  %transpose_fusion = bf16[64,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_transpose
  %cublas-lt-matmul.2 = (bf16[4,64]{1,0}, s8[8]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul$f8"
  %custom-call.7 = (bf16[4,64]{1,0}, u8[0]{0}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax"
  %cudnn-conv.1 = (bf16[4,64]{1,0}, u8[0]{0}) custom-call(%x, %x), custom_call_target="__cudnn$convForward"
  %gemm_fusion_dot.3 = bf16[4,64]{1,0} fusion(%x, %x), kind=kCustom, calls=%triton_gemm_computation
  ROOT %loop_add_fusion = bf16[4,64]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
}
"""


def test_hlo_categories():
    module, table = hlo_op_categories(GPU_HLO)
    assert module == "jit_velocity_call"
    assert {op: table[op] for op in ("input_reduce_fusion", "transpose_fusion", "cublas-lt-matmul.2", "custom-call.7",
                                     "cudnn-conv.1", "gemm_fusion_dot.3", "loop_add_fusion")} == {
        "input_reduce_fusion": "norm", "transpose_fusion": "copy", "cublas-lt-matmul.2": "GEMM",
        "custom-call.7": "attention", "cudnn-conv.1": "conv", "gemm_fusion_dot.3": "GEMM",
        "loop_add_fusion": "elementwise"}


def test_softmax_is_not_any_reduce_with_an_exponential():
    """XLA's attention softmax (exp(x - max) / sum) is attention; the SD1.5 UNet's GEGLU fused
    with its dynamic FP8 amax (its op set as XLA compiled it for an H200, ``hlo_gpu.py``) and a
    LayerNorm fused with a SiLU are memory-bound norms: they were read as softmax once, and left
    out of the memory-bound traffic. (The tiny Flux's norm+SiLU kernel, compiled, is checked in
    ``test_hlo_gpu.py::test_kernel_groups_add_up_to_the_summary``.)"""
    from profile_summary import _classify

    softmax = {"fusion", "reduce", "maximum", "subtract", "exponential", "add", "divide", "broadcast"}
    geglu_amax = {"fusion", "abs", "add", "compare", "convert", "divide", "exponential", "multiply", "negate",
                  "reduce", "select", "slice", "subtract", "tuple"}
    norm_silu = {"fusion", "reduce", "add", "multiply", "rsqrt", "exponential", "negate", "divide", "subtract"}
    assert _classify(softmax, set()) == "attention"
    assert _classify(geglu_amax, set()) == "norm"
    assert _classify(norm_silu, set()) == "norm"


def test_gpu_planes():
    stats = lambda op: {"hlo_op": op, "hlo_module": "jit_velocity_call"}  # noqa: E731
    gpu = ("/device:GPU:0", "Stream #13(Compute)")
    events = [
        ("/host:CPU", "tf_XLAPjRtGpuClient", "ThunkExecutor", 0.0, 500.0, stats("loop_add_fusion")),
        (*gpu, "sm90_xmma_gemm_bf16bf16_bf16f32", 10.0, 20.0, stats("cublas-lt-matmul.2")),
        (*gpu, "cudnn_generated_sdpa_sm90_flash_fprop", 32.0, 30.0, stats("custom-call.7")),
        (*gpu, "loop_add_fusion", 70.0, 5.0, stats("loop_add_fusion")),
        ("/device:GPU:0", "Stream #14(Memcpy)", "MemcpyD2D", 71.0, 10.0, {}),
        ("/device:GPU:0", "XLA Ops", "loop_add_fusion", 70.0, 5.0, stats("loop_add_fusion")),
        ("/device:GPU:0", "XLA Modules", "jit_velocity_call", 10.0, 71.0, {}),
    ]
    device, kernels = device_kernels(events)
    assert device == "gpu" and [k.name for k in kernels] == [
        "sm90_xmma_gemm_bf16bf16_bf16f32", "cudnn_generated_sdpa_sm90_flash_fprop", "loop_add_fusion", "MemcpyD2D"]
    _, table = hlo_op_categories(GPU_HLO)
    tables = {"jit_velocity_call": table}
    assert [categorize(k, tables) for k in kernels] == ["GEMM", "attention", "elementwise", "copy"]
    assert [categorize(k, {}) for k in kernels] == ["GEMM", "attention", "elementwise", "copy"]  # by name
    line = timeline(kernels)  # 10-30, 32-62, 70-81 (two streams overlap)
    assert line["span_us"] == 71.0 and line["busy_us"] == 61.0 and line["gaps"] == [2.0, 8.0]
    assert categorize(Kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "", "", "s", 0, 1), {}) == "GEMM"
    assert categorize(Kernel("input_reduce_fusion_3", "", "", "s", 0, 1), {}) == "norm"


def test_op_coverage_names_the_ops_a_trace_never_shows():
    """The check on a trace: of the entry computation's ops that launch work (not parameters
    or bitcasts), which ones have kernels in it; a module whose kernels run inside CUDA graphs
    (named ``command_buffer_N``) cannot be checked and says so."""
    ops = hlo_entry_ops([GPU_HLO])
    assert ops == {"jit_velocity_call": [{"input_reduce_fusion", "transpose_fusion", "cublas-lt-matmul.2",
                                          "custom-call.7", "cudnn-conv.1", "gemm_fusion_dot.3", "loop_add_fusion"}]}

    def k(op, module="jit_velocity_call"):
        return Kernel(f"kernel_of_{op}", op, module, "s", 0, 1)

    seen = [k("cublas-lt-matmul.2"), k("cublas-lt-matmul.2"), k("custom-call.7"), k("loop_add_fusion"),
            k("fusion.1", module="jit_other")]
    assert op_coverage(seen, ops) == {"jit_velocity_call": {
        "hlo_ops": 7, "seen": 3, "missing": 4,
        "missing_examples": ["cudnn-conv.1", "gemm_fusion_dot.3", "input_reduce_fusion", "transpose_fusion"]}}
    graphs = op_coverage([k("command_buffer_1"), k("cudnn-conv.1")], ops)["jit_velocity_call"]
    assert graphs == {"hlo_ops": 7, "note": "kernels inside CUDA graphs carry the graph's name"}
    assert op_coverage([k("x", module="jit_unknown")], ops) == {}
    # a module compiled for two shapes dumps two programs: the trace's is the one it ran
    other = {"fusion.9", "custom-call.7", "loop_add_fusion"}
    two = {"jit_velocity_call": [other, ops["jit_velocity_call"][0]]}
    assert op_coverage(seen, two)["jit_velocity_call"]["missing"] == 4
    ran_other = [k("fusion.9"), k("custom-call.7"), k("loop_add_fusion")]
    assert op_coverage(ran_other, two)["jit_velocity_call"] == {"hlo_ops": 3, "seen": 3, "missing": 0,
                                                                "missing_examples": []}


def test_launches_split_the_idle_time():
    """Runs of kernels of one op are one launch (a CUDA graph's many kernels, a convolution's
    one): the idle time splits into the gaps between launches (the host's) and inside them,
    and the largest gaps name the ops on either side."""
    def k(op, start, end, module="jit__step"):
        return Kernel(f"kernel_of_{op}", op, module, "s", start, end - start)

    kernels = [k("command_buffer_1", 0, 10), k("command_buffer_1", 11, 20),   # 1 us inside a graph
               k("cudnn-conv-bias-activation.4", 50, 60),                      # 30 us before it
               k("command_buffer_2", 62, 70), k("command_buffer_2", 70, 80),   # 2 us before, none inside
               k("fusion.3", 200, 210, module="jit__outputs")]                 # 120 us before
    got = launches(kernels, calls=2)
    assert (got["per_call"], got["graphs_per_call"], got["kernels_in_graphs_per_call"]) == (2.0, 1.0, 2.0)
    assert (got["idle_between_launches_us"], got["idle_within_launches_us"]) == (152.0, 1.0)
    assert got["largest_gaps"][:2] == [
        {"us": 120.0, "after": "jit__step:command_buffer_2", "before": "jit__outputs:fusion.3"},
        {"us": 30.0, "after": "jit__step:command_buffer_1", "before": "jit__step:cudnn-conv-bias-activation.4"}]
    assert timeline(kernels)["idle_us"] == 153.0
    # the gaps inside launches by size: the graph's 1 us and the second graph's 0 us, per call
    hist = got["gaps_within_launches"]
    assert hist["<2us"] == {"count_per_call": 1.0, "us_per_call": 0.5}
    assert all(v == {"count_per_call": 0.0, "us_per_call": 0.0} for b, v in hist.items() if b != "<2us")
    assert got["largest_gaps_within"][0] == {"us": 1.0, "launch": "jit__step:command_buffer_1",
                                             "after": "kernel_of_command_buffer_1", "before": "kernel_of_command_buffer_1"}
    assert launches([Kernel("nvjet", "", "", "s", 0, 1)], calls=1) is None  # no op names: no launches


def test_gap_histogram_buckets():
    got = gap_histogram([0.5, 3.0, 9.9, 10.0, 60.0, 250.0, 1000.0], calls=1)
    assert [v["count_per_call"] for v in got.values()] == [1.0, 2.0, 1.0, 1.0, 2.0]
    assert list(got) == ["<2us", "2-10us", "10-50us", "50-200us", ">=200us"] and got[">=200us"]["us_per_call"] == 1250.0


def test_host_time_and_dispatch(tmp_path):
    """The host's side of a trace: each jitted function's dispatch (``PjitFunction(f)`` on the
    calling thread) per call, and the named host spans by thread kind; the CPU's kernels (HLO
    op spans) are not host time."""
    def scaled_sum(x, w):
        return jnp.sum(jnp.tanh(x @ w))

    f = jax.jit(scaled_sum)
    args = (jnp.ones((128, 128)), jnp.full((128, 128), 0.01))
    jax.block_until_ready(f(*args))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(CALLS):
            jax.block_until_ready(f(*args))
    s = summarize(tmp_path, calls=CALLS)
    host = s["host"]
    assert list(host["dispatch_us_per_call"]) == ["scaled_sum"]
    assert 0 < host["dispatch_mean_us"]["scaled_sum"] == pytest.approx(host["dispatch_us_per_call"]["scaled_sum"])
    names = {(t["thread"], t["name"]) for t in host["top"]}
    assert any(name == "PjitFunction(scaled_sum)" for _, name in names)
    assert not any("/" in thread and thread.rsplit("/", 1)[1].lstrip("-").isdigit() for thread, _ in names)
    ops = {k.op for k in device_kernels(read_events(tmp_path)[1])[1]}
    assert ops and not any(name in ops for _, name in names)
    assert host_time([("/device:GPU:0", "Stream #1", "k", 0.0, 1.0, {})], calls=1) is None


def test_gpu_json_trace_without_module_names(tmp_path):
    """A GPU trace in the JSON layout whose kernels do not name their module: the module filter
    cannot apply, so every kernel is kept and the summary says so."""
    import gzip
    import json

    run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 13, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 99, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}}]
    kernels = [{"ph": "X", "pid": 1, "tid": 13, "ts": 100.0 + 10 * i, "dur": 8.0, "name": name, "args": {}}
               for i, name in enumerate(["nvjet_tst_64x8", "loop_add_fusion", "nvjet_tst_64x8", "loop_add_fusion"])]
    derived = [{"ph": "X", "pid": 1, "tid": 99, "ts": 100.0, "dur": 40.0, "name": "fusion", "args": {}}]
    host = [{"ph": "X", "pid": 701, "tid": 5, "ts": 0.0, "dur": 500.0, "name": "op", "args": {"hlo_op": "op"}}]
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + kernels + derived + host}, f)
    s = summarize(tmp_path, calls=2, modules="^jit_velocity_call", flops=2e9)
    assert (s["source"], s["device"], s["kernels"], s["kernels_per_call"]) == ("json", "gpu", 4, 2.0)
    assert "not applied" in s["note"]
    assert s["categories"]["GEMM"]["kernels"] == 2 and s["categories"]["elementwise"]["kernels"] == 2
    assert (s["span_us"], s["busy_us"], s["idle_us"], s["gaps"]["count"]) == (38.0, 32.0, 6.0, 3)
    assert s["tflops_per_s"] == pytest.approx(2e9 * 2 / 38e6, abs=1e-3)


def test_benchmark_summary_of_sections_and_of_rows(tmp_path):
    """``summarize.py`` (what gpu_all.sh prints after each part): a table of ``results`` rows, or,
    for a benchmark of named sections like serve_gpu's, every figure under them by its path."""
    import json

    from summarize import summarize as summarize_json

    sections = {"benchmark": "serve_gpu", "env": {"device": "NVIDIA H200"}, "setting": {"image": [512, 512]},
                "generations": {"images_per_s": 61.5, "latency_ms": {"p50": 210.0}}, "big": list(range(20))}
    rows = {"benchmark": "sd3_gpu", "env": {"device": "cpu"}, "results": [{"batch": 1, "ours_ms": 3.25}],
            "ratios": {"ours_vs_compiled_b1": 0.91}}
    (tmp_path / "a.json").write_text(json.dumps(sections))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    a, b = summarize_json(str(tmp_path / "a.json")).splitlines(), summarize_json(str(tmp_path / "b.json")).splitlines()
    assert a == ["== serve_gpu:  on NVIDIA H200", "setting.image: [512, 512]", "generations.images_per_s: 61.5",
                 "generations.latency_ms.p50: 210"]
    assert b == ["== sd3_gpu:  on cpu", "batch | ours_ms", "1 | 3.25", "ours_vs_compiled_b1: 0.91"]
    assert "no result" in summarize_json(str(tmp_path / "missing.json"))


def test_profile_benchmark_runs_on_the_cpu(tmp_path):
    """profile_gpu.py's plumbing on a tiny SD3 on this CPU (its ``--smoke``): both traces (the
    default and the lean one without the Python tracer) are summarized into the row, the host's
    launches and dispatch included (the device run's script must not be the first to run it)."""
    import json
    import subprocess

    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "profile_gpu.py"),
                           "--smoke", "--workloads", "sd3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert "error" not in row, row
    assert set(result["summaries"]) == {"sd3", "sd3_lean"}
    assert row["kernels_per_call"] > 0 and row["launches_per_call"] > 0 and row["dispatch_ms_per_call"] > 0
    assert row["lean_device_ms_per_call"] > 0 and row["lean_dispatch_ms_per_call"] > 0
    assert row["queued_ms_per_call"] > 0 and row["tflop_per_call"] > 0 and row["flops_source"] == "xla"  # the CPU answers
    assert row["lean_ops_missing"] == 0  # XLA:CPU: every op of the program shows in the trace
    assert set(row["lean_gaps_within_ms"]) == {"<2us", "2-10us", "10-50us", "50-200us", ">=200us"}
    import tarfile

    with tarfile.open(tmp_path / "profile_traces" / "sd3.tar.gz") as tar:  # one file a workload: it comes back
        names = tar.getnames()
    assert any(n.startswith("hlo/") and "jit_velocity_call" in n for n in names)
    assert any(n.startswith("sd3_lean/") and n.endswith(".xplane.pb") for n in names)
    assert any(n.startswith("sd3/") and n.endswith(".xplane.pb") for n in names), names


def test_pack_traces_keeps_what_fits(tmp_path):
    """The per-workload archive: the HLO first, then the lean trace, then the full one, each only
    while the archive stays under the limit; nothing when not even the HLO fits."""
    import tarfile

    from profile_gpu import pack_traces

    rng = np.random.default_rng(0)
    hlo = tmp_path / "m.after_optimizations.txt"
    hlo.write_text("HloModule m\n" * 100)
    full, lean = tmp_path / "t" / "full", tmp_path / "t" / "full_lean"
    for d, n in ((full, 3 << 20), (lean, 1 << 20)):  # random bytes: gzip cannot shrink them
        d.mkdir(parents=True)
        (d / "host.xplane.pb").write_bytes(rng.bytes(n))
    dest = tmp_path / "out" / "w.tar.gz"
    assert pack_traces(dest, [full, lean], [hlo], max_mb=10)["holds"] == ["hlo", "full_lean", "full"]
    packed = pack_traces(dest, [full, lean], [hlo], max_mb=2)
    assert packed["holds"] == ["hlo", "full_lean"] and 0.9 < packed["mb"] <= 2
    with tarfile.open(dest) as tar:
        assert sorted(tar.getnames()) == ["full_lean", "full_lean/host.xplane.pb", f"hlo/{hlo.name}"]
    assert pack_traces(dest, [full, lean], [hlo], max_mb=0.5)["holds"] == ["hlo"]
    assert pack_traces(dest, [full, lean], [hlo], max_mb=1e-6) is None and not dest.exists()


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_jaxpr_flops_match_torch_flop_counter(tmp_path, kind, monkeypatch):
    """``jaxpr_flops`` (the device's fallback when XLA gives no cost analysis) counts what
    torch's ``FlopCounterMode`` counts on the diffusers reference: the matmuls, convolutions and
    attention products of one call, for a tiny SD1.5-like UNet (convolutions, cross-attention)
    and a tiny SD3 transformer (joint attention, patch embedding)."""
    import diffusers
    import torch
    from conftest import SD3_TINY, UNETS, randomize
    from profile_summary import jaxpr_flops
    from torch.utils.flop_counter import FlopCounterMode

    import streamflow_jax as sf
    from streamflow_jax import ops

    monkeypatch.setenv(ATTENTION_ENV, "xla")  # attention as products (cuDNN's would be one custom call)
    monkeypatch.setenv(ops.CONV1X1_ENV, "conv")
    rng = np.random.default_rng(0)
    if kind == "unet":
        ref = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0, std=0.1).eval()
        x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
        t = np.array([999.0, 3.0], np.float32)
        ehs = rng.standard_normal((2, 5, 768), dtype=np.float32)
        args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ehs))
        ref.save_pretrained(tmp_path / "m")
        model = sf.load(tmp_path / "m")
        ours = jax.make_jaxpr(lambda m, x, t, e: m.module(x, t, e))(model, x.transpose(0, 2, 3, 1), t, ehs)
    else:
        ref = randomize(diffusers.SD3Transformer2DModel(**SD3_TINY), 0, std=0.1).eval()
        x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        t = np.array([0.9, 0.3], np.float32)
        ehs = rng.standard_normal((2, 7, 12), dtype=np.float32)
        pooled = rng.standard_normal((2, 10), dtype=np.float32)
        args = (torch.from_numpy(x), torch.from_numpy(ehs), torch.from_numpy(pooled), torch.from_numpy(t * 1000))
        ref.save_pretrained(tmp_path / "m")
        model = sf.load(tmp_path / "m")
        cond = {"encoder_hidden_states": ehs, "pooled_projections": pooled}
        ours = jax.make_jaxpr(lambda m, x, t, c: m.velocity(x, t, c))(model, x.transpose(0, 2, 3, 1), t, cond)
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        # torch's own SDPA kernel on this CPU is not one the flop counter knows: the same
        # attention written out, so that its two products count
        w = torch.softmax((q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5), dim=-1)
        return w @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ref(*args)
    want = counter.get_total_flops()
    got = jaxpr_flops(ours)
    assert want > 0 and abs(got - want) <= 1e-3 * want, (got, want)


def test_jaxpr_flops_of_a_transposed_convolution_match_torch():
    """A transposed convolution (``lhs_dilation``: most of each window is the dilation's zeros)
    counts each input element against the kernel, as torch's flop counter counts
    ``conv_transpose2d``; a plain convolution counts output x window."""
    import torch
    from profile_summary import jaxpr_flops
    from torch.utils.flop_counter import FlopCounterMode

    x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 12))
    up = jax.make_jaxpr(lambda x, k: jax.lax.conv_transpose(x, k, (2, 2), "SAME",
                                                            dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, k)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch.nn.functional.conv_transpose2d(torch.ones(2, 8, 16, 16), torch.ones(8, 12, 3, 3), stride=2)
    assert jaxpr_flops(up) == counter.get_total_flops() == 2 * 2 * 16 * 16 * 8 * 9 * 12
    plain = jax.make_jaxpr(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, k)
    assert jaxpr_flops(plain) == 2 * 2 * 16 * 16 * 12 * (8 * 9)
