"""What XLA compiles for an H200, without one: issue 22's workloads compiled ahead of time for a
GPU target on this CPU machine (deviceless), their optimized HLO summarized; JSON.

Needs JAX's CUDA plugin and CUDA's libraries (``pip install "jax-cuda13-plugin[with-cuda]==$(jax
version)"``, about 4 GB), not a GPU nor a driver; run with ``JAX_PLATFORMS=cpu`` and
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (the plugin's version check asks a driver). The target is
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`` with the
H200's published figures (compute capability 9.0, 132 SMs; ``--target-config FILE`` for
another). Weights are abstract (``jax.ShapeDtypeStruct``): nothing is allocated, so Flux.1-dev
compiles on a 24 GB machine. The platform choices made at trace time follow the target: ours
(cuDNN attention, GroupNorm's reduction: ``ops.target_device``) and JAX's own check of cuDNN
attention's head dims, which asks the local GPU's compute capability (without one it would
refuse SD1.5's head dim 160, which Hopper takes; ``target_capability`` answers for the target).

For each workload and variant, from the compiled program's text:

- ``kernels``: kernel launches per call (fusions, custom calls and unfused ops of the entry
  computation, into loops and command buffers), and their categories (``profile_summary.py``'s
  rules: conv, GEMM, attention, norm, elementwise, copy, other);
- ``gemms``: FP8 GEMMs (Triton GEMM fusions whose dot takes e4m3 operands, cuBLASLt FP8 calls)
  against half-precision ones (Triton fusions, cuBLAS/cuBLASLt calls, cuDNN GEMM fusions);
- ``attention``: cuDNN fused attention calls; ``convs``: cuDNN convolution calls;
- ``param_transposes``: kernels that only lay a parameter out again (a weight transposed at
  every call);
- ``traffic_mb``: what each category's kernels read and write a call (operands whole, or the
  slices a kernel takes of them; results without a library call's workspace; a bound, as a
  fusion may still read part of an operand it uses otherwise), and
  ``memory_bound_ms``: the copy, elementwise and norm kernels' traffic at the H200's 4.8 TB/s,
  the least time they take (what removing a copy can save; GEMMs and attention are not in it);
- ``command_buffers``: CUDA graphs visible in the HLO (XLA 0.10 forms them afterwards, from
  the sequence of thunks, so 0 here does not mean none);
- ``compile_s``: this CPU's deviceless compile (no autotuning), not the device's.

What it cannot say: times. Autotuning needs the device, so GEMMs keep XLA's default
configurations, and where the autotuner would choose between a Triton fusion and cuBLAS the
device may differ from this. The structure (what is fused, what stays FP8, what is cuDNN's) is
XLA's own for the target.

Workloads (``profile_gpu.py``'s configs): ``unet`` (SD1.5 UNet with the PeRFlow adapter,
batch 4, 512^2: the seed setting's step), ``taesd`` (TAESD decode, batch 1, 512^2), ``tick``
(the stream engine's fused tick of the two: admission, step, decode of one finishing slot),
``ticks4`` (four such ticks as one scan, ``ticks_per_call=4``; kernels count each tick), ``sd3``
(SD3-medium, batch 2, 1024^2), ``flux`` (Flux.1-dev, batch 1, 1024^2), ``fp8_forms`` (one
4096x3072x3072 product written as ``ops.fp8_matmul`` writes it, and as dequantized operands
into a bf16 dot: the form that compiled into dequantizing kernels and a bf16 GEMM).

Variants: ``default`` (bf16), ``fp8`` / ``fp8_static`` (``sf.quantize``; static: calibrated
scales), ``triton_gemm_off`` (XLA flag, per compile), ``groupnorm_channels`` / ``_onepass``, ``attention_xla``
and ``conv_ohwi`` (environment switches; its layout is applied to the model, as the
stream engine applies it), ``ohwi_onepass`` (``conv_ohwi`` and ``groupnorm_onepass`` together),
``conv1x1_dot`` (1x1 convolutions as GEMMs) and ``ohwi_onepass_dot`` (all three),
``attention_fp8`` (cuDNN's FP8 attention) and ``fp8_static_attention_fp8`` (with static FP8
linears), ``dot_merger_off`` (XLA does not merge the products of one input), ``scan_blocks``
(repeated blocks as one ``lax.scan``) alone, with XLA's dynamic-slice fusion (``_dsf``), with it
and cuBLAS GEMMs (``_dsf_cublas``), and without DotMerger too (``_dsf_cublas_nomerge``), and
unrolled again by XLA (``_unrolled``), ``split_concat`` (Flux's single blocks: ``proj_out`` as
one product per part, no concatenated [attention, MLP]), with cuBLAS and no DotMerger
(``_cublas_nomerge``), and in FP8 (``fp8_split_concat``); static FP8 on cuBLASLt without
DotMerger (``fp8_static_cublas_nomerge``), split (``fp8_static_split_concat``), and both
(``fp8_static_split_concat_cublas_nomerge``); each block's modulation product apart
(``modulation_apart``, also in FP8: ``fp8_``, ``fp8_static_``). A variant that does not apply to a
workload is skipped.

    python benchmarks/hlo_gpu.py [--workloads unet taesd sd3 flux fp8_forms] [--variants ...]
        [--out FILE] [--hlo-dir DIR]
    python benchmarks/hlo_gpu.py --smoke   # tiny configs (still needs the CUDA plugin)
    python benchmarks/hlo_gpu.py --summarize DIR [--top N] [--out FILE]   # programs written by
        # --hlo-dir (or any compiled GPU HLO text, gzipped or not), read again: no plugin needed;
        # --top N adds the N memory-bound kernel groups moving the most bytes
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment  # noqa: E402
from profile_summary import op_categories, parse_hlo  # noqa: E402

# The H200 (SXM, 141 GB HBM3e) as XLA's GpuTargetConfig: its published figures; the cuDNN and
# CUDA versions are those JAX's CUDA 13 wheels bring.
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H200"
"""

H200_BANDWIDTH = 4.8e12  # bytes/s, the target's memory_bandwidth above

VARIANTS = {  # name -> (environment, compiler options, model form)
    "default": ({}, {}, "bf16"),
    "fp8": ({}, {}, "fp8"),
    "fp8_static": ({}, {}, "fp8_static"),
    "triton_gemm_off": ({}, {"xla_gpu_enable_triton_gemm": False}, "bf16"),
    "fp8_triton_gemm_off": ({}, {"xla_gpu_enable_triton_gemm": False}, "fp8"),
    "groupnorm_channels": ({"STREAMFLOW_JAX_GROUPNORM": "channels"}, {}, "bf16"),
    "groupnorm_onepass": ({"STREAMFLOW_JAX_GROUPNORM": "onepass"}, {}, "bf16"),
    "attention_xla": ({"STREAMFLOW_JAX_ATTENTION": "xla"}, {}, "bf16"),
    "conv_ohwi": ({"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi"}, {}, "bf16"),
    # the two that take kernels off the UNet step, together (levers_gpu.py's ``fewer_kernels``)
    "ohwi_onepass": ({"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi", "STREAMFLOW_JAX_GROUPNORM": "onepass"}, {}, "bf16"),
    # cuDNN's FP8 attention ($STREAMFLOW_JAX_ATTENTION=fp8), alone and with static FP8 linears
    "attention_fp8": ({"STREAMFLOW_JAX_ATTENTION": "fp8"}, {}, "bf16"),
    "fp8_static_attention_fp8": ({"STREAMFLOW_JAX_ATTENTION": "fp8"}, {}, "fp8_static"),
    # ... with static (calibrated) q/k/v scales: no reduction before each attention
    "fp8_static_attention_fp8_static": ({"STREAMFLOW_JAX_ATTENTION": "fp8"}, {}, "fp8_static_attention"),
    # no merging of the products of one input (XLA's DotMerger: q/k/v in one GEMM whose output
    # is sliced apart again, a copy kernel each, for cuDNN's attention; weights concatenated per call)
    "dot_merger_off": ({}, {"xla_gpu_dot_merger_threshold_mb": 0}, "bf16"),
    # cuBLAS(Lt) GEMMs, as the H200's autotuner picked for Flux's and SD3's products anyway (its
    # profile: nvjet kernels), with their epilogues fused by XLA's GemmRewriter (bias, Flux's
    # tanh GELU), and without DotMerger's concatenated weights too
    "triton_gemm_off_nomerge": ({}, {"xla_gpu_enable_triton_gemm": False, "xla_gpu_dot_merger_threshold_mb": 0},
                                "bf16"),
    # convolutions as cuDNN fusions (graph API: epilogues fused, capturable in CUDA graphs)
    "conv_fusion": ({}, {"xla_gpu_experimental_enable_conv_fusion": True}, "bf16"),
    "conv_fusion_ohwi": ({"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi"}, {"xla_gpu_experimental_enable_conv_fusion": True},
                         "bf16"),
    # LayerNorm as cuDNN's kernel
    "cudnn_layer_norm": ({}, {"xla_gpu_enable_cudnn_layer_norm": True}, "bf16"),
    # 1x1 convolutions as GEMMs ($STREAMFLOW_JAX_CONV1X1=dot), alone and with the two above
    "conv1x1_dot": ({"STREAMFLOW_JAX_CONV1X1": "dot"}, {}, "bf16"),
    "ohwi_onepass_dot": ({"STREAMFLOW_JAX_CONV_LAYOUT": "ohwi", "STREAMFLOW_JAX_GROUPNORM": "onepass",
                          "STREAMFLOW_JAX_CONV1X1": "dot"}, {}, "bf16"),
    # repeated blocks as one lax.scan ($STREAMFLOW_JAX_SCAN_BLOCKS=on): kernels per block body,
    # and whether the body copies its slice of the stacked weights; then with XLA's
    # dynamic-slice fusion (a GEMM reads its slice in place)
    "scan_blocks": ({"STREAMFLOW_JAX_SCAN_BLOCKS": "on"}, {}, "bf16"),
    "scan_blocks_dsf": ({"STREAMFLOW_JAX_SCAN_BLOCKS": "on"}, {"xla_gpu_enable_dynamic_slice_fusion": True}, "bf16"),
    # ... with cuBLAS GEMMs (dynamic-slice fusion applies to library calls, not Triton fusions)
    "scan_blocks_dsf_cublas": ({"STREAMFLOW_JAX_SCAN_BLOCKS": "on"}, {"xla_gpu_enable_dynamic_slice_fusion": True,
                                                                     "xla_gpu_enable_triton_gemm": False}, "bf16"),
    # ... and no merged products (DotMerger concatenates the sliced q/k/v weights: copies)
    "scan_blocks_dsf_cublas_nomerge": ({"STREAMFLOW_JAX_SCAN_BLOCKS": "on"},
                                       {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False,
                                        "xla_gpu_dot_merger_threshold_mb": 0}, "bf16"),
    # ... unrolled again by XLA after its HLO passes (the slices become static)
    "scan_blocks_unrolled": ({"STREAMFLOW_JAX_SCAN_BLOCKS": "on"},
                             {"xla_gpu_enable_while_loop_unrolling": "WHILE_LOOP_UNROLLING_FULL_UNROLL"}, "bf16"),
    # Flux's single blocks: proj_out as one product per part, no concatenated [attention, MLP]
    # ($STREAMFLOW_JAX_CONCAT_PRODUCT=split); then with cuBLAS GEMMs and no merged products
    "split_concat": ({"STREAMFLOW_JAX_CONCAT_PRODUCT": "split"}, {}, "bf16"),
    "split_concat_cublas_nomerge": ({"STREAMFLOW_JAX_CONCAT_PRODUCT": "split"},
                                    {"xla_gpu_enable_triton_gemm": False, "xla_gpu_dot_merger_threshold_mb": 0},
                                    "bf16"),
    "fp8_split_concat": ({"STREAMFLOW_JAX_CONCAT_PRODUCT": "split"}, {}, "fp8"),
    # each block's modulation product apart ($STREAMFLOW_JAX_MODULATION=apart): no GEMM of all
    # the blocks' modulation weights concatenated at every call; in static FP8 too
    "modulation_apart": ({"STREAMFLOW_JAX_MODULATION": "apart"}, {}, "bf16"),
    "fp8_modulation_apart": ({"STREAMFLOW_JAX_MODULATION": "apart"}, {}, "fp8"),
    "fp8_static_modulation_apart": ({"STREAMFLOW_JAX_MODULATION": "apart"}, {}, "fp8_static"),
    # static FP8 (the form the FP8 target is timed in) on cuBLASLt's FP8 GEMMs without merged
    # products ($STREAMFLOW_JAX_GEMM=cublas), and with the single blocks' product split, on
    # either GEMM
    # (the library's switch too: with it ops.fp8_matmul gives one-row products 16 rows, which
    # cuBLASLt's FP8 GEMM takes)
    "fp8_static_cublas_nomerge": ({"STREAMFLOW_JAX_GEMM": "cublas"},
                                  {"xla_gpu_enable_triton_gemm": False, "xla_gpu_dot_merger_threshold_mb": 0},
                                  "fp8_static"),
    "fp8_static_split_concat": ({"STREAMFLOW_JAX_CONCAT_PRODUCT": "split"}, {}, "fp8_static"),
    "fp8_static_split_concat_cublas_nomerge": ({"STREAMFLOW_JAX_CONCAT_PRODUCT": "split", "STREAMFLOW_JAX_GEMM": "cublas"},
                                               {"xla_gpu_enable_triton_gemm": False,
                                                "xla_gpu_dot_merger_threshold_mb": 0}, "fp8_static"),
}
APPLIES = {  # which variants make a different program for which workload
    "unet": ("default", "fp8", "groupnorm_channels", "groupnorm_onepass", "attention_xla", "triton_gemm_off",
             "conv_ohwi", "ohwi_onepass", "conv1x1_dot", "ohwi_onepass_dot", "dot_merger_off",
             "triton_gemm_off_nomerge", "conv_fusion",
             "conv_fusion_ohwi", "cudnn_layer_norm", "attention_fp8"),
    "taesd": ("default", "groupnorm_channels", "conv_ohwi", "conv_fusion", "conv_fusion_ohwi"),
    "tick": ("default",),
    "ticks4": ("default",),
    "sd3": ("default", "fp8", "fp8_static", "fp8_static_cublas_nomerge", "modulation_apart",
            "fp8_modulation_apart", "fp8_static_modulation_apart", "attention_xla", "triton_gemm_off", "fp8_triton_gemm_off",
            "attention_fp8", "fp8_static_attention_fp8", "fp8_static_attention_fp8_static", "dot_merger_off",
            "triton_gemm_off_nomerge",
            "scan_blocks", "scan_blocks_dsf", "scan_blocks_dsf_cublas", "scan_blocks_dsf_cublas_nomerge",
            "scan_blocks_unrolled"),
    "flux": ("default", "dot_merger_off", "triton_gemm_off", "triton_gemm_off_nomerge", "fp8", "fp8_static", "attention_fp8", "fp8_static_attention_fp8",
             "fp8_static_attention_fp8_static", "scan_blocks", "scan_blocks_dsf", "scan_blocks_dsf_cublas",
             "scan_blocks_dsf_cublas_nomerge", "scan_blocks_unrolled", "split_concat", "split_concat_cublas_nomerge",
             "fp8_split_concat", "fp8_static_cublas_nomerge", "fp8_static_split_concat",
             "fp8_static_split_concat_cublas_nomerge", "modulation_apart", "fp8_modulation_apart",
             "fp8_static_modulation_apart"),
    "fp8_forms": ("default", "triton_gemm_off"),
}

# ---------------------------------------------------------------------------------------------
# Reading a compiled GPU program
# ---------------------------------------------------------------------------------------------

# instructions that launch no kernel of their own
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
              "replica-id", "opt-barrier", "add-dependency", "domain"}
_F8 = ("f8e4m3fn", "f8e5m2")


def _contains(comps: dict, comp: str, pred, seen=()) -> bool:
    for inst in comps.get(comp, []):
        if pred(inst) or any(c not in seen and _contains(comps, c, pred, seen + (comp,)) for c in inst["called"]):
            return True
    return False


def gemm_kind(inst: dict, comps: dict, types: dict[str, str]) -> str | None:
    """``"fp8"``, ``"half"`` or None: whether a kernel is a GEMM, and of which operands."""
    target = inst["target"] or ""
    if inst["op"] == "custom-call" and "cublas" in target:
        return "fp8" if "f8" in target else "half"
    if inst["op"] == "fusion" and any(_contains(comps, c, lambda i: i["op"] in ("dot", "ragged-dot"))
                                      for c in inst["called"]):
        if inst["kind"] and re.search(r"triton|cudnn|gemm", inst["kind"]) or "gemm" in inst["name"]:
            f8 = any(types.get(o, "").startswith(_F8) for o in inst["operands"])
            return "fp8" if f8 else "half"
    return None


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
          "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def shape_bytes(type_text: str, first_only: bool = False) -> float:
    """Bytes of an HLO shape's arrays (``bf16[4608,3072]{1,0}``, or a tuple of them);
    ``first_only``: the first array of a tuple (a library call's result, without its workspace)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += _BYTES.get(dtype, 0) * n
        if first_only:
            break
    return total


_SLICES = {"slice", "dynamic-slice"}
_VIEWS = {"bitcast", "reshape"}  # a parameter seen through these is still read where it is sliced


def operand_read_bytes(inst: dict, comps: dict, types: dict) -> float:
    """What a kernel reads of its operands: each whole, except an operand that a fusion (or a
    bare slice) only slices, which is read as the slices' bytes (a kernel that copies a weight's
    rows reads those rows, not the weight)."""
    operands = [shape_bytes(types.get(o, "")) for o in inst["operands"]]
    if inst["op"] in _SLICES:
        return shape_bytes(inst["type"]) + sum(operands[1:])  # dynamic-slice: + its index scalars
    if inst["op"] != "fusion" or not inst["called"]:
        return sum(operands)
    body = comps.get(inst["called"][0], [])
    users: dict[str, list[dict]] = {}
    for i in body:
        for o in i["operands"]:
            users.setdefault(o, []).append(i)

    def sliced(name: str, depth: int = 0) -> float | None:  # bytes of its slices, or None if read whole
        uses = users.get(name, [])
        total = 0.0
        for use in uses:
            if use["op"] in _SLICES and use["operands"][0] == name:
                total += shape_bytes(use["type"])
            elif use["op"] in _VIEWS and depth < 8:
                part = sliced(use["name"], depth + 1)
                if part is None:
                    return None
                total += part
            else:
                return None
        return total if uses else None

    read = 0.0
    params = {int(i["operands"][0]): i["name"] for i in body if i["op"] == "parameter" and i["operands"]
              and i["operands"][0].isdigit()}
    for k, whole in enumerate(operands):
        part = sliced(params[k]) if k in params else None
        read += whole if part is None else min(part, whole)
    return read


def summarize_hlo(text: str) -> dict:
    """Kernel launches per call of a compiled GPU program, by category and by kind (see the
    module's docstring). A loop's body counts once per iteration where XLA knows the trip count
    (scanned blocks), else once; ``loop_kernels`` counts the bodies' kernels once each."""
    _, entry, comps = parse_hlo(text)
    categories = op_categories(comps)
    cats: Counter = Counter()
    traffic: Counter = Counter()  # bytes each category's kernels read and write, a call
    gemms: Counter = Counter()
    counts = Counter()

    def walk(comp: str, in_graph: bool, times: int = 1, in_loop: bool = False):
        types = {i["name"]: i["type"] for i in comps.get(comp, [])}
        params = {i["name"] for i in comps.get(comp, []) if i["op"] == "parameter"}
        for inst in comps.get(comp, []):
            op = inst["op"]
            if op in _NO_KERNEL:
                continue
            if op in ("while", "conditional"):
                counts["loops"] += op == "while"
                n = (inst["trip"] or 1) if op == "while" else 1
                for c in inst["called"]:
                    walk(c, in_graph, times * n, in_loop or op == "while")
                continue
            if op == "call" or (op == "custom-call" and not inst["target"]):
                graph = any(c.startswith("command_buffer") for c in inst["called"])
                counts["command_buffers"] += graph
                for c in inst["called"]:
                    walk(c, in_graph or graph, times, in_loop)
                continue
            if op in ("async-start", "async-update", "async-done", "copy-start", "copy-done"):
                if op.endswith("start"):
                    for c in inst["called"]:
                        walk(c, in_graph, times, in_loop)
                continue
            counts["kernels"] += times
            counts["loop_kernels"] += in_loop
            counts["loop_copies"] += in_loop and categories.get(inst["name"]) == "copy"
            counts["kernels_in_graphs"] += in_graph * times
            if comp == entry and inst["operands"] and set(inst["operands"]) <= params and (
                    op in ("copy", "transpose") or any(_contains(comps, c, lambda i: i["op"] == "transpose")
                                                       for c in inst["called"])):
                counts["param_transposes"] += 1
            category = categories.get(inst["name"], "other")
            cats[category] += times
            # what the kernel reads (its operands, whole, or the slices it takes of them) and
            # writes (a library call's result without its scratch workspace): a memory-bound
            # kernel's time at full bandwidth
            traffic[category] += times * (shape_bytes(inst["type"], first_only=op == "custom-call")
                                          + operand_read_bytes(inst, comps, types))
            kind = gemm_kind(inst, comps, types)
            if kind:
                gemms[kind] += times
            target = inst["target"] or ""
            if "fmha" in target or "fused_attention" in target.lower():
                counts["cudnn_attention"] += times
                counts["cudnn_attention_fp8"] += times * target.endswith("F8")
            if target.startswith("__cudnn$conv"):
                counts["cudnn_convs"] += times

    walk(entry, False)
    memory_bound = sum(traffic[c] for c in ("copy", "elementwise", "norm"))
    return {"kernels": counts["kernels"], "by_category": dict(sorted(cats.items())),
            "traffic_mb": {c: round(b / 2**20, 1) for c, b in sorted(traffic.items())},
            "memory_bound_ms": round(memory_bound / H200_BANDWIDTH * 1e3, 3),
            "gemms_fp8": gemms["fp8"], "gemms_half": gemms["half"],
            "cudnn_attention": counts["cudnn_attention"], "cudnn_attention_fp8": counts["cudnn_attention_fp8"],
            "cudnn_convs": counts["cudnn_convs"],
            "param_transposes": counts["param_transposes"],
            "command_buffers": counts["command_buffers"], "kernels_in_graphs": counts["kernels_in_graphs"],
            "loops": counts["loops"], "loop_kernels": counts["loop_kernels"], "loop_copies": counts["loop_copies"],
            "custom_call_targets": dict(sorted(Counter(
                i["target"] for insts in comps.values() for i in insts if i["target"]).items()))}


_TRIVIAL = {"parameter", "constant", "bitcast", "broadcast", "reshape"}  # left out of a kernel's op set


def kernel_groups(text: str, categories=("copy", "elementwise", "norm"), top: int = 20) -> list[dict]:
    """The entry computation's kernels of ``categories``, grouped by what they are (category,
    result type, the first four operand types, the set of ops in the fused body) and sorted by
    the traffic they move a call: where memory-bound time goes, kernel by kernel (how the
    single blocks' second quantization of static FP8 Flux was found). Each group: ``count``,
    ``traffic_mb`` (reads and writes, as ``summarize_hlo`` counts them), ``category``,
    ``result``, ``operands``, ``ops``. Loops' bodies are not entered."""
    _, entry, comps = parse_hlo(text)
    cats = op_categories(comps)
    types = {i["name"]: i["type"] for i in comps.get(entry, [])}
    groups: dict[tuple, list] = {}
    for inst in comps.get(entry, []):
        category = cats.get(inst["name"], "other")
        if inst["op"] in _NO_KERNEL or category not in categories:
            continue
        body = comps.get(inst["called"][0], []) if inst["called"] else [inst]
        key = (category, inst["type"].split("{")[0],
               tuple(types.get(o, "").split("{")[0] for o in inst["operands"][:4]),
               tuple(sorted({i["op"] for i in body} - _TRIVIAL)))
        moved = (shape_bytes(inst["type"], first_only=inst["op"] == "custom-call")
                 + operand_read_bytes(inst, comps, types))
        group = groups.setdefault(key, [0, 0.0])
        group[0] += 1
        group[1] += moved
    rows = [{"count": n, "traffic_mb": round(b / 2**20, 1), "category": k[0], "result": k[1],
             "operands": list(k[2]), "ops": list(k[3])} for k, (n, b) in groups.items()]
    return sorted(rows, key=lambda r: -r["traffic_mb"])[:top]


# ---------------------------------------------------------------------------------------------
# Workloads, abstract
# ---------------------------------------------------------------------------------------------


def abstract_model(class_name: str, config, form: str, sharding, adapter=None):
    """A ``FlowModel`` with ``jax.ShapeDtypeStruct`` bf16 parameters placed by ``sharding``, as
    it is (``bf16``) or quantized (``fp8``; ``fp8_static``: with calibrated input scales;
    ``fp8_static_attention``: and calibrated q/k/v scales for FP8 attention), its
    convolutions in ``$STREAMFLOW_JAX_CONV_LAYOUT``'s layout, its repeated blocks scanned under
    ``$STREAMFLOW_JAX_SCAN_BLOCKS=on``."""
    import jax
    import jax.numpy as jnp

    from streamflow_jax import ops
    from streamflow_jax.models import FlowModel, abstract_split, family_of
    from streamflow_jax.quantization import quantize, quantized_layers, quantized_structure

    family = family_of(class_name)
    graphdef, state = abstract_split(family, config)
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype),
        state)
    model = FlowModel(class_name, config, graphdef, state, adapter, family=family)
    if form != "bf16":
        q = jax.eval_shape(lambda m: quantize(m, "fp8"), model)
        if form in ("fp8_static", "fp8_static_attention"):
            q = quantized_structure(model, "fp8", quantized_layers(q), activation_scales="static",
                                    attention_scales="static" if form == "fp8_static_attention" else None)
        model = q
    layout, scan = ops.conv_layout_choice(), ops.scan_blocks_choice()
    model = jax.eval_shape(lambda m: m.with_conv_layout(layout).with_scanned_blocks(bool(scan)), model)
    model.state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                         model.state)
    return model


def workload(name: str, spec: dict, form: str, sharding):
    """``(function, abstract args)`` of one workload."""
    import jax
    import jax.numpy as jnp

    from profile_gpu import SLOTS, WINDOWS

    def arg(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    def velocity(graphdef, adapter):
        from flax import nnx

        from streamflow_jax.models import velocity_of
        return lambda state, x, t, cond: velocity_of(nnx.merge(graphdef, state), adapter, x, t, cond)

    if name == "fp8_forms":
        from streamflow_jax import ops

        def dequantized(x, w, xs, ws):  # convert(f8) * scale on both operands, into a bf16 dot
            xd = ops.quantize_fp8(x, xs).astype(x.dtype) * xs.astype(x.dtype)
            return jax.lax.dot_general(xd, w.astype(x.dtype) * ws.astype(x.dtype), (((1,), (1,)), ((), ())))

        fn = ops.fp8_matmul if form == "bf16" else dequantized
        return fn, (arg((4096, 3072), jnp.bfloat16), arg((3072, 3072), jnp.float8_e4m3fn), arg(()), arg(()))
    if name == "unet":
        from streamflow_jax.models.perflow import PeRFlowAdapter

        m = abstract_model("UNet2DConditionModel", spec["unet"], form, sharding, PeRFlowAdapter("diff_eps", WINDOWS))
        lat, (text_len, text_dim) = spec["latent"], spec["text"]
        return velocity(m.graphdef, m.adapter), (m.state, arg((SLOTS, lat, lat, 4)), arg((SLOTS,)),
                                                 {"encoder_hidden_states": arg((SLOTS, text_len, text_dim))})
    if name in ("tick", "ticks4"):  # the stream engine's fused tick, and a scan of four (ticks_per_call)
        from streamflow_jax import stream
        from streamflow_jax.models.perflow import PeRFlowAdapter

        u = abstract_model("UNet2DConditionModel", spec["unet"], form, sharding, PeRFlowAdapter("diff_eps", WINDOWS))
        d = abstract_model("AutoencoderTiny", spec["taesd"], form, sharding)
        lat, text = spec["latent"], spec["text"]
        k = () if name == "tick" else (4,)
        state = {"x": arg((SLOTS, lat, lat, 4)), "cond": {"encoder_hidden_states": arg((SLOTS, *text))}}
        admit = {"slot": arg((*k, 1), jnp.int32), "seed": arg((*k, 1), jnp.uint32), "use_seed": arg((*k, 1), jnp.bool_),
                 "noise": arg((*k, 1, lat, lat, 4)), "cond": {"encoder_hidden_states": arg((*k, 1, *text))}}
        if k:  # a scan's ticks always carry the image-to-image arrays (``DeviceBuffers.ticks``)
            admit.update(init=arg((*k, 1, lat, lat, 4)), has_init=arg((*k, 1), jnp.bool_), t0=arg((*k, 1)))
        program = stream._tick if name == "tick" else stream._ticks
        return ((lambda u, d, state, admit, active, t, t_next, done:
                 program(u, d, u if k else None, state, admit, active, t, t_next, done)),
                (u, d, state, admit, arg((*k, SLOTS), jnp.int32), arg((*k, SLOTS)), arg((*k, SLOTS)),
                 arg((*k, 1), jnp.int32)))
    if name == "taesd":
        from flax import nnx

        m = abstract_model("AutoencoderTiny", spec["taesd"], form, sharding)
        lat = spec["latent"]
        return (lambda state, z: nnx.merge(m.graphdef, state).decode_latents(z)), (m.state, arg((1, lat, lat, 4)))
    class_name = "SD3Transformer2DModel" if name == "sd3" else "FluxTransformer2DModel"
    m = abstract_model(class_name, spec["config"], form, sharding)
    b, lat = spec["batch"], spec["latent"]
    cond = {k: arg((b, *s), jnp.bfloat16) for k, s in m.cond_shapes(spec["text"]).items()}
    if "guidance" in cond:
        cond["guidance"] = arg((b,))
    return velocity(m.graphdef, None), (m.state, arg((b, lat, lat, m.latent_channels), jnp.bfloat16), arg((b,)), cond)


@contextlib.contextmanager
def target_capability(device):
    """JAX's cuDNN attention checks answer with ``device``'s compute capability, not the local
    GPU's (there is none). Patches two functions of ``jax._src.cudnn.fused_attention_stablehlo``
    while tracing; where this JAX has neither, nothing is patched."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    have = tuple(int(v) for v in str(device.compute_capability).split("."))
    patched = {"check_compute_capability": lambda c: have >= tuple(int(v) for v in c.split(".")),
               "is_cuda_compute_capability_equal": lambda c: have == tuple(int(v) for v in c.split("."))}
    saved = {name: getattr(fa, name) for name in patched if hasattr(fa, name)}
    for name in saved:
        setattr(fa, name, patched[name])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(fa, name, fn)


def compile_one(name: str, variant: str, spec: dict, device, sharding, hlo_dir: Path | None) -> list[dict]:
    """Rows of one workload under one variant (``fp8_forms``: one row per form)."""
    import jax

    from streamflow_jax import ops

    env, options, form = VARIANTS[variant]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        jax.clear_caches()  # the switches are read at trace time
        rows = []
        forms = ("bf16", "dequantized") if name == "fp8_forms" else (form,)
        for f in forms:
            with ops.target_device(device), target_capability(device):  # the GPU's defaults (conv layout too)
                fn, args = workload(name, spec, f, sharding)
                t0 = time.perf_counter()
                lowered = jax.jit(fn).lower(*args)
            lower_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled = lowered.compile(compiler_options=options or None)
            compile_s = time.perf_counter() - t0
            text = compiled.as_text()
            label = variant if name != "fp8_forms" else f"{variant}/{'fp8_matmul' if f == 'bf16' else 'dequantized'}"
            if hlo_dir is not None:
                hlo_dir.mkdir(parents=True, exist_ok=True)
                with gzip.open(hlo_dir / f"{name}.{label.replace('/', '.')}.hlo.txt.gz", "wt") as out:
                    out.write(text)
            rows.append({"workload": name, "variant": label, "lower_s": round(lower_s, 2),
                         "compile_s": round(compile_s, 2), **summarize_hlo(text)})
        return rows
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(APPLIES), choices=list(APPLIES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--target-config", default=None, help="a GpuTargetConfig text proto (default: the H200's)")
    p.add_argument("--smoke", action="store_true", help="tiny configs")
    p.add_argument("--hlo-dir", default=None, help="write each compiled program's text here, gzipped")
    p.add_argument("--out", default=None)
    p.add_argument("--summarize", metavar="DIR", default=None,
                   help="summarize the programs (*.hlo.txt[.gz]) in DIR instead of compiling")
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="with --summarize: also each program's N memory-bound kernel groups that move the most "
                        "bytes (kernel_groups)")
    args = p.parse_args()
    if args.top < 0:
        p.error(f"--top must be 0 or more, got {args.top}")
    if args.summarize:
        rows = []
        for path in sorted(Path(args.summarize).glob("*.hlo.txt*")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as f:
                text = f.read()
            row = {"program": path.name.split(".hlo.txt")[0], **summarize_hlo(text)}
            if args.top:
                row["top_memory_bound"] = kernel_groups(text, top=args.top)
            rows.append(row)
        if not rows:
            sys.exit(f"hlo_gpu: no *.hlo.txt or *.hlo.txt.gz file in {args.summarize}")
        emit({"benchmark": "hlo_gpu", "summarized": args.summarize, "results": rows}, args.out)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

    import jax
    from jax.experimental import topologies

    from profile_gpu import configs

    target = Path(args.target_config).read_text() if args.target_config else H200
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target, topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the plugin's absence has several faces
        sys.exit(f"hlo_gpu: cannot describe a CUDA target ({type(e).__name__}: {e}); this needs JAX's CUDA plugin: "
                 f'pip install "jax-cuda13-plugin[with-cuda]=={jax.__version__}"')
    mesh = topologies.make_mesh(topology, (1,), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    specs = configs(args.smoke)
    rows = []
    for name in args.workloads:
        spec = specs["stream"] if name in ("unet", "taesd", "tick", "ticks4") else specs.get(name, {})
        for variant in args.variants:
            if variant not in APPLIES[name]:
                continue
            t0 = time.perf_counter()
            try:
                got = compile_one(name, variant, spec, topology.devices[0], sharding,
                                  Path(args.hlo_dir) if args.hlo_dir else None)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the rest run
                got = [{"workload": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]}]
            for row in got:
                print(row, file=sys.stderr, flush=True)
            rows += got
            print(f"{name}/{variant}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    emit({"benchmark": "hlo_gpu", "target": topology.devices[0].device_kind, "smoke": args.smoke,
          "env": environment(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
