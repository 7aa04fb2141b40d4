"""``benchmarks/hlo_gpu.py``: reading programs XLA compiled for an H200 on a CPU machine.

The programs under ``tests/data/hlo_gpu/`` are XLA's own output (jaxlib 0.10.2 with
jax-cuda13-plugin 0.10.2, deviceless, the script's H200 target), written by
``python benchmarks/hlo_gpu.py --smoke --workloads fp8_forms sd3 --variants default fp8_static
--hlo-dir DIR``: one 4096x3072x3072 product written as ``ops.fp8_matmul`` writes it and as
dequantized operands; the tiny SD3 config's velocity with static FP8 scales; the tiny TAESD
decoder with HWIO and with OHWI kernels (``--workloads taesd --variants default conv_ohwi``); the
tiny SD3 with cuDNN's FP8 attention (``--workloads sd3 --variants attention_fp8``); the tiny Flux
(2 double and 2 single blocks) unrolled and with its blocks scanned (``--workloads flux --variants
default scan_blocks``); the tiny Flux with its single blocks' product split and cuBLAS GEMMs
(``--workloads flux --variants split_concat_cublas_nomerge``); the tiny Flux with static FP8
scales (``--workloads flux --variants fp8_static``). The CUDA plugin itself (4 GB) is not
installed for the suite.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
DATA = Path(__file__).parent / "data" / "hlo_gpu"
sys.path.insert(0, str(BENCH))
from hlo_gpu import summarize_hlo  # noqa: E402


def _program(name: str) -> str:
    with gzip.open(DATA / f"{name}.hlo.txt.gz", "rt") as f:
        return f.read()


def test_fp8_matmul_compiles_to_one_fp8_gemm():
    """The library's form: the activation's quantization, then one Triton GEMM fusion on e4m3
    operands with the scale in its epilogue (two kernels, no bf16 GEMM)."""
    got = summarize_hlo(_program("fp8_forms.default.fp8_matmul"))
    assert (got["gemms_fp8"], got["gemms_half"], got["kernels"]) == (1, 0, 2)
    assert got["by_category"] == {"GEMM": 1, "elementwise": 1}
    # traffic from the shapes: the quantization reads x in bf16 (24 MiB) and writes it in e4m3
    # (12 MiB, a few scalars beside); the GEMM reads both e4m3 operands (12 + 9 MiB) and writes
    # bf16 (24 MiB)
    mib = 2**20
    assert got["traffic_mb"] == {"GEMM": round((4096 * 3072 + 3072 * 3072 + 2 * 4096 * 3072) / mib, 1),
                                 "elementwise": round((2 * 4096 * 3072 + 4096 * 3072) / mib, 1)}
    assert got["memory_bound_ms"] == pytest.approx(36 * mib / 4.8e12 * 1e3, abs=1e-3)


def test_dequantized_operands_compile_to_a_bf16_gemm():
    """The form the library wrote before (openxla's GemmRewriter pattern): under XLA's default
    flags each operand is dequantized by a kernel of its own and the GEMM runs in bf16."""
    got = summarize_hlo(_program("fp8_forms.default.dequantized"))
    assert (got["gemms_fp8"], got["gemms_half"], got["kernels"]) == (0, 1, 3)


def test_static_fp8_projections_of_one_input_are_one_gemm():
    """Tiny SD3 with calibrated scales: every quantized linear is in an FP8 GEMM, and the
    queries, keys and values of each input (image and text in each joint attention) are one
    merged GEMM, as in bf16 (``layers.project`` gives them one scale, so XLA sees one e4m3
    operand); the count is made from our model, not from XLA. cuDNN's fused attention for
    every block."""
    from hlo_gpu import abstract_model
    from profile_gpu import configs

    from streamflow_jax.models.layers import Attention
    from streamflow_jax.quantization import quantized_layers

    spec = configs(True)["sd3"]
    model = abstract_model("SD3Transformer2DModel", spec["config"], "fp8_static", None)
    triples = sum(2 if node.joint else 1 for _, node in nnx.iter_graph(model.module) if isinstance(node, Attention))
    got = summarize_hlo(_program("sd3.fp8_static"))
    assert got["gemms_fp8"] == len(quantized_layers(model)) - 2 * triples == 25 - 8
    assert got["cudnn_attention"] == spec["config"].num_layers == 2
    assert got["kernels"] == sum(got["by_category"].values())


def test_flux_single_blocks_quantize_their_input_once():
    """Tiny Flux with calibrated scales: each single block quantizes its normed ``[B, L+M, D]``
    tokens to e4m3 in one kernel, which the attention's q/k/v and the MLP's input projection
    all read (``layers.project`` over the four; with a scale each, XLA quantized them twice a
    block, 4 kernels here, 76 more kernels and 0.67 ms of traffic at bandwidth on Flux-dev)."""
    from hlo_gpu import _NO_KERNEL, gemm_kind
    from profile_gpu import configs
    from profile_summary import parse_hlo

    spec = configs(True)["flux"]
    cfg = spec["config"]
    tokens = spec["text"] + (spec["latent"] // 2) ** 2
    _, entry, comps = parse_hlo(_program("flux.fp8_static"))
    types = {i["name"]: i["type"] for i in comps[entry]}
    quantizing = [i for i in comps[entry] if i["op"] not in _NO_KERNEL and not gemm_kind(i, comps, types)
                  and i["type"].startswith(f"f8e4m3fn[{spec['batch']},{tokens},{cfg.inner_dim}]")]
    assert len(quantizing) == cfg.num_single_layers == 2
    got = summarize_hlo(_program("flux.fp8_static"))
    assert got["gemms_fp8"] > 0 and got["cudnn_attention"] == cfg.num_layers + cfg.num_single_layers


def test_kernel_groups_add_up_to_the_summary():
    """``kernel_groups`` (``--summarize DIR --top N``): on the tiny static-FP8 Flux, its groups
    hold every memory-bound kernel and byte the summary counts, largest traffic first, and
    the one quantization of a single block's input is one group (2 kernels, e4m3 result)."""
    from hlo_gpu import kernel_groups

    text = _program("flux.fp8_static")
    summary = summarize_hlo(text)
    groups = kernel_groups(text, top=1000)
    cats = ("copy", "elementwise", "norm")
    assert sum(g["count"] for g in groups) == sum(summary["by_category"].get(c, 0) for c in cats)
    for c in cats:
        mine = sum(g["traffic_mb"] for g in groups if g["category"] == c)
        assert mine == pytest.approx(summary["traffic_mb"].get(c, 0.0), abs=0.1 * len(groups))
    assert [g["traffic_mb"] for g in groups] == sorted((g["traffic_mb"] for g in groups), reverse=True)
    assert len(kernel_groups(text, top=3)) == 3
    single = [g for g in groups if g["result"] == "f8e4m3fn[1,72,32]"]
    assert len(single) == 1 and single[0]["count"] == 2 and "convert" in single[0]["ops"]


def test_fp8_attention_compiles_to_cudnn_fp8_attention():
    """$STREAMFLOW_JAX_ATTENTION=fp8 on the tiny SD3 (head dim 64): every attention is cuDNN's
    FP8 flash attention (``__cudnn$fmhaSoftmaxF8``, e4m3 operands), none is left in bf16, and
    the linears stay bf16 GEMMs."""
    from profile_gpu import configs

    got = summarize_hlo(_program("sd3.attention_fp8"))
    assert got["cudnn_attention"] == got["cudnn_attention_fp8"] == configs(True)["sd3"]["config"].num_layers == 2
    assert got["custom_call_targets"].get("__cudnn$fmhaSoftmax", 0) == 0
    assert got["gemms_fp8"] == 0 and got["gemms_half"] > 0
    assert "f8e4m3fn[2," in _program("sd3.attention_fp8")  # the operands: [B, L, N, K] in e4m3


def test_scanned_blocks_count_per_iteration_and_copy_their_weights():
    """$STREAMFLOW_JAX_SCAN_BLOCKS=on, the tiny Flux: two loops (double and single blocks), each
    body counted once per iteration (XLA's known trip count), so that the call holds the same
    GEMMs and attentions as the unrolled program; and each iteration first copies its block's
    slice of the stacked weights (dynamic-slice fusions: the scan's price per call)."""
    unrolled, scanned = summarize_hlo(_program("flux.default")), summarize_hlo(_program("flux.scan_blocks"))
    assert unrolled["loops"] == 0 and scanned["loops"] == 2
    assert scanned["cudnn_attention"] == unrolled["cudnn_attention"] == 4  # 2 double + 2 single blocks
    assert scanned["gemms_half"] == unrolled["gemms_half"] > 0
    assert scanned["loop_copies"] >= 20 and scanned["kernels"] > unrolled["kernels"]


def test_ohwi_kernels_are_not_transposed_at_every_call():
    """The tiny TAESD decoder (``profile_gpu.py``'s smoke config): with HWIO kernels each of its
    convolutions is preceded, at every call, by a kernel that transposes its weight into cuDNN's
    filter layout; stored OHWI ($STREAMFLOW_JAX_CONV_LAYOUT=ohwi) none is, and nothing else
    changes."""
    from hlo_gpu import abstract_model
    from profile_gpu import configs

    from streamflow_jax.models.layers import Conv2d

    model = abstract_model("AutoencoderTiny", configs(True)["stream"]["taesd"], "bf16", None)
    convs = sum(isinstance(node, Conv2d) for _, node in nnx.iter_graph(model.module.decoder))
    hwio, ohwi = summarize_hlo(_program("taesd.default")), summarize_hlo(_program("taesd.conv_ohwi"))
    assert hwio["cudnn_convs"] == ohwi["cudnn_convs"] == hwio["param_transposes"] == convs
    assert ohwi["param_transposes"] == 0 and hwio["kernels"] - ohwi["kernels"] == convs


def test_without_the_cuda_plugin_it_says_what_to_install():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(BENCH / "hlo_gpu.py"), "--smoke"], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode == 0:
        pytest.skip("JAX's CUDA plugin is installed here: the script ran")
    assert "jax-cuda13-plugin" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_summarize_reads_programs_written_before(tmp_path):
    """``--summarize DIR`` reads compiled programs again, without the CUDA plugin (a device
    run's, or ``--hlo-dir``'s), one row per file; an empty directory is an error naming it."""
    import json

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / "hlo_gpu.py"), "--summarize", str(DATA), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["program"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {p.name.split(".hlo.txt")[0] for p in DATA.glob("*.hlo.txt.gz")}
    assert rows["fp8_forms.default.fp8_matmul"] == {"program": "fp8_forms.default.fp8_matmul",
                                                    **summarize_hlo(_program("fp8_forms.default.fp8_matmul"))}
    proc = subprocess.run([sys.executable, str(BENCH / "hlo_gpu.py"), "--summarize", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no *.hlo.txt or *.hlo.txt.gz file in" in proc.stderr


def test_a_kernel_that_slices_its_operand_reads_the_slice():
    """The tiny Flux with its single blocks' ``proj_out`` split ($STREAMFLOW_JAX_CONCAT_PRODUCT=
    split) and cuBLAS GEMMs: every call copies each block's two row blocks of the kernel (slice
    kernels: a library call reads no slice in place). Such a kernel reads the rows it copies, not
    the whole weight; a kernel that reads its operands otherwise reads them whole."""
    from hlo_gpu import operand_read_bytes, shape_bytes
    from profile_summary import parse_hlo

    _, entry, comps = parse_hlo(_program("flux.split_concat_cublas_nomerge"))
    insts = comps[entry]
    types = {i["name"]: i["type"] for i in insts}
    slices = [i for i in insts if i["op"] == "fusion" and i["called"][0].startswith("wrapped_slice")]
    weights = {i["operands"][0] for i in slices}
    assert len(slices) == 4 and len(weights) == 2 and all("proj_out" in w for w in weights)  # 2 single blocks
    for weight in weights:  # the two slices of a weight make the whole of it
        parts = [i for i in slices if i["operands"][0] == weight]
        assert sum(shape_bytes(i["type"]) for i in parts) == shape_bytes(types[weight])
        for inst in parts:
            assert operand_read_bytes(inst, comps, types) == shape_bytes(inst["type"]) < shape_bytes(types[weight])
    others = [i for i in insts if i["op"] == "fusion" and not i["called"][0].startswith("wrapped_slice")
              and any(c["op"] == "concatenate" for c in comps[i["called"][0]])]
    assert others
    for inst in others:
        assert operand_read_bytes(inst, comps, types) == sum(shape_bytes(types[o]) for o in inst["operands"])
