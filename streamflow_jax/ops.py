"""Stateless math shared by every model: attention, norms, timestep embeddings, RoPE, patchify.

Axis letters used in shape comments across the project, each with one meaning:

- ``B``: batch (one element per request or CFG branch)
- ``H``, ``W``: latent height and width (NHWC layout); ``C``: latent channels
- ``S``: sampler steps (a time grid is ``[S+1]`` or ``[S+1, B]``)
- ``L``: text tokens (the context sequence); ``M``: image tokens (``(H/P) * (W/P)``)
- ``D``: model width; ``J``: width of the text embeddings a model takes; ``E``: pooled text width
- ``N``: attention heads; ``K``: head dimension (``D = N * K``)
- ``P``: patch size; ``A``: position-id axes (Flux: text, row, column)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
ATTENTION_ENV = "STREAMFLOW_JAX_ATTENTION"
_TARGET = contextvars.ContextVar("streamflow_jax_target_device", default=None)


@contextlib.contextmanager
def target_device(device):
    """Within it, functions are traced for ``device`` instead of the default device: the
    choices made for a platform (``attention_implementation``, ``group_norm_choice``,
    ``conv1x1_choice``, ``conv_layout_choice``) follow it. The target is part of the models'
    trace key (``trace_switches``): a model's jitted function traced under a target traces
    again outside it. A function of plain arrays keyed by nothing of the library's keeps the
    choices of its first trace. For compiling ahead of time for a device this process
    does not drive, such as a GPU of a ``jax.experimental.topologies`` description compiled on
    a CPU machine (``benchmarks/hlo_gpu.py``)."""
    token = _TARGET.set(device)
    try:
        yield device
    finally:
        _TARGET.reset(token)


def _target():
    """The device functions are traced for: ``target_device``'s, else the first device."""
    return _TARGET.get() or jax.devices()[0]


def cudnn_head_dim_limit(device) -> int:
    """The largest head dim JAX's cuDNN fused attention takes on ``device``: 256 from compute
    capability 9.0 (Hopper) on, 128 below it (A100, RTX 30xx/40xx)."""
    cc = str(getattr(device, "compute_capability", "") or "0")
    return 256 if int(cc.split(".")[0]) >= 9 else 128


def attention_choice(head_dim: int, setting: str | None = None) -> str:
    """What ``$STREAMFLOW_JAX_ATTENTION`` (or ``setting``) asks for at ``head_dim``: ``"auto"``,
    ``"cudnn"``, ``"xla"`` or ``"fp8"``.

    The setting is ``auto`` (unset: the rule in ``attention_implementation``), ``cudnn``, ``xla``,
    ``fp8`` (``fp8_attention``), or a per-head-dim list such as ``40=xla,80=cudnn`` (head dims
    not named stay ``auto``). It is a measurement switch (``benchmarks/levers_gpu.py``,
    ``fp8_gpu.py``), read when a function is traced: a program already compiled keeps the
    choice it was traced with.
    """
    setting = (os.environ.get(ATTENTION_ENV, "auto") if setting is None else setting).strip().lower() or "auto"
    choices = ("auto", "cudnn", "xla", "fp8")
    if "=" not in setting:
        if setting not in choices:
            raise ValueError(f"{ATTENTION_ENV}={setting!r}: expected auto, cudnn, xla, fp8 or HEAD_DIM=IMPL,...")
        return setting
    for item in setting.split(","):
        dim, _, impl = item.partition("=")
        if not dim.strip().isdigit() or impl.strip() not in choices:
            raise ValueError(f"{ATTENTION_ENV}={setting!r}: {item!r} is not HEAD_DIM=auto|cudnn|xla|fp8")
        if int(dim) == head_dim:
            return impl.strip()
    return "auto"


def fp8_attention_fits(head_dim: int, device) -> bool:
    """Whether cuDNN's FP8 fused attention (inference) serves ``head_dim`` on ``device``: FP8
    tensor cores (compute capability 8.9 on: Ada, Hopper) and a head dim that is a multiple of
    16 up to 256 (SD3's 64, Flux's 128, SD1.5's 80 and 160; not SD1.5's 40)."""
    cc = tuple(int(v) for v in (str(getattr(device, "compute_capability", "") or "0").split(".") + ["0"])[:2])
    return device.platform == "gpu" and cc >= (8, 9) and head_dim % 16 == 0 and head_dim <= 256


def attention_implementation(q: jax.Array, device=None, *, fp8: bool = True) -> str:
    """Which lowering serves ``q`` on ``device`` (default: the ``target_device``, else the first
    device): ``"cudnn"`` or ``"xla"`` (``jax.nn.dot_product_attention``'s), or, asked for with
    ``fp8``, ``"cudnn_fp8"`` / ``"xla_fp8"`` (``fp8_attention``).

    cuDNN's fused attention is several times faster on NVIDIA GPUs but only takes half
    precision and head dims that are multiples of 8 up to its device's limit (SD1.5's head dim
    160 fits an H100, not an A100), so everything else (fp32 parity runs, CPU, odd head sizes)
    takes the XLA lowering. ``$STREAMFLOW_JAX_ATTENTION`` overrides the rule per head dim (see
    ``attention_choice``): ``xla`` always takes XLA's lowering; ``cudnn`` asks cuDNN for any
    head dim on a GPU in half precision (what cuDNN refuses still falls back to XLA); ``fp8``
    takes cuDNN's FP8 attention where it serves (``fp8_attention_fits``, half precision), the
    same quantization written in XLA ops on a CPU (numerics, not speed), and the rule above
    elsewhere. ``fp8=False``: the caller cannot take FP8 (a bias, a causal mask: text
    encoders; an ONNX export).
    """
    device = device or _target()
    head_dim = q.shape[-1]
    choice = attention_choice(head_dim)
    if choice == "fp8":
        if fp8 and device.platform == "cpu":
            return "xla_fp8"
        if fp8 and q.dtype in _CUDNN_DTYPES and fp8_attention_fits(head_dim, device):
            return "cudnn_fp8"
        choice = "auto"
    if choice == "xla" or device.platform != "gpu" or q.dtype not in _CUDNN_DTYPES:
        return "xla"
    if choice == "cudnn" or (head_dim % 8 == 0 and head_dim <= cudnn_head_dim_limit(device)):
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, bias: jax.Array | None = None,
              scale: float | None = None, fp8_scales: jax.Array | None = None) -> jax.Array:
    """Multi-head attention, full or causal, with an optional additive bias.

    Sequence lengths are written ``L`` (queries) and ``L'`` (keys) here: any token sequence.

    Args:
        q: ``[B, L, N, K]`` queries.
        k: ``[B, L', N, K]`` keys.
        v: ``[B, L', N, K]`` values.
        causal: query i attends to keys 0..i only (text encoders).
        bias: added to the logits, broadcastable to ``[B, N, L, L']`` (T5's position bias).
        scale: multiplies ``q k^T`` (default ``1/sqrt(K)``; T5 uses 1).
        fp8_scales: ``[3]`` static per-tensor scales of q, k, v (``quantization.calibrate(...,
            attention=True)``), used where FP8 attention runs; None: each call's own.

    Returns:
        ``[B, L, N, K]``, softmax(scale * q k^T + bias) v per head.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    implementation = attention_implementation(q, fp8=bias is None and not causal and not is_exporting())
    if implementation == "xla_fp8":
        return fp8_attention(q, k, v, scale=scale, cudnn=False, scales=fp8_scales)
    if implementation == "cudnn_fp8":
        try:
            return fp8_attention(q, k, v, scale=scale, scales=fp8_scales)
        except (NotImplementedError, ValueError):  # cuDNN (or this JAX) refused it at trace time
            implementation = attention_implementation(q, fp8=False)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                                scale=scale, is_causal=causal, implementation="cudnn")
        except (NotImplementedError, ValueError):  # cuDNN refused these shapes at trace time
            pass
    # Written out rather than jax.nn.dot_product_attention(implementation="xla"): that asks for
    # fp32 accumulation of half-precision dots, which XLA:CPU rejects. Softmax runs in fp32.
    # matmul on [B, N, L, K] (not einsum) because it exports to ONNX MatMul, which takes
    # bfloat16, where ONNX Einsum does not.
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, L, K]
    if scale != 1.0:
        qh = qh * jnp.asarray(scale, q.dtype)
    logits = jnp.matmul(qh, kh.transpose(0, 1, 3, 2)).astype(jnp.float32)  # [B, N, L, L']
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if causal:
        allowed = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.matmul(probs, vh).transpose(0, 2, 1, 3)


FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448


def _fp8_attention_operands(q, k, v, scales=None):
    """Each of q, k, v in e4m3 with its per-tensor scale: ``scales[i]`` (static: saturating
    beyond 448 of it), else ``fp8_scale`` of its amax (this call's)."""
    out = []
    for i, a in enumerate((q, k, v)):
        if scales is None:
            s = fp8_scale(jnp.max(jnp.abs(a)))
            out.append(((a.astype(jnp.float32) / s).astype(FP8), s))
        else:
            s = scales[i].astype(jnp.float32)
            out.append((quantize_fp8(a.astype(jnp.float32), s), s))
    return out


def fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, cudnn: bool = True,
                  scales: jax.Array | None = None) -> jax.Array:
    """Attention with its two products in FP8 (e4m3), as cuDNN's FP8 flash attention runs it
    on Hopper: ``q``, ``k``, ``v`` each quantized with a per-tensor scale (this call's amax),
    the logits and the softmax in float32, the probabilities quantized with scale 448 (they are
    at most 1), the output quantized with ``v``'s scale (it is a convex combination of ``v``'s
    rows) and returned in ``q``'s dtype.

    ``cudnn``: cuDNN's kernel (``jax._src.cudnn``'s FP8 ``dot_product_attention``, JAX's own
    FP8 attention, not exported under ``jax.nn``); else the same steps in XLA ops (a CPU's
    check of the numerics: slow, and not the kernel). Non-causal, no bias.

    Args:
        q: ``[B, L, N, K]`` queries; ``k``, ``v``: ``[B, L', N, K]``.
        scale: multiplies ``q k^T``.
        scales: ``[3]`` static scales of q, k, v (calibrated); None: this call's amaxes (a
            reduction over each before the kernel, and a result that depends on the batch).
    """
    (q8, sq), (k8, sk), (v8, sv) = _fp8_attention_operands(q, k, v, scales)
    if cudnn:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        one = jnp.ones((1, 1, 1, 1), jnp.float32)
        params = dict.fromkeys(cudnn_attention.fp8_params_keys, one)
        params.update(descale_q=sq * one, descale_k=sk * one, descale_v=sv * one, descale_s=one / FP8_MAX,
                      scale_s=one * FP8_MAX, scale_o=one / sv)
        out, _, _ = cudnn_attention.dot_product_attention(q8, k8, v8, fp8_params=params, scale=scale, use_fp8=True,
                                                          qkv_layout="BTNH")
        return (out.astype(jnp.float32) * sv).astype(q.dtype)
    qh, kh, vh = (a.astype(jnp.float32).transpose(0, 2, 1, 3) for a in (q8, k8, v8))  # [B, N, L, K]
    logits = jnp.matmul(qh, kh.transpose(0, 1, 3, 2)) * (sq * sk * scale)
    probs = (jax.nn.softmax(logits, axis=-1) * FP8_MAX).astype(FP8).astype(jnp.float32)
    out = jnp.matmul(probs, vh) * (sv / FP8_MAX)
    out = (out / sv).astype(FP8).astype(jnp.float32) * sv
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def fp8_scale(amax: jax.Array) -> jax.Array:
    """The per-tensor scale of a tensor whose largest magnitude is ``amax``: the power of two
    that brings ``amax`` into ``(224, 448]`` (float32 scalar; 1 for an all-zero tensor).

    A power of two, so that dividing by it and multiplying back are exact in every float type
    (a bfloat16 copy of the scale is the scale itself), and e4m3's relative precision is the
    same as with ``amax / 448``.
    """
    amax = jnp.asarray(amax, jnp.float32)
    r = jnp.where(amax > 0, amax, FP8_MAX) / FP8_MAX
    # log(r) / log(2), not jnp.log2: since JAX 0.11 that is a primitive of its own, which jax2onnx
    # (0.17) cannot export. Either is approximate next to powers of two: the next two lines mend it
    s = _exact_exp2(jnp.clip(jnp.ceil(jnp.log(r) * (1 / math.log(2))), -126, 126))
    s = jnp.where(r <= s * 0.5, s * 0.5, s)
    return jnp.where(r > s, s * 2, s)


def _exact_exp2(e: jax.Array) -> jax.Array:
    """``2 ** e`` for integral float32 ``e`` in [-126, 126], exactly: products of exact powers
    of two. (XLA's ``exp2`` is not exact; ``frexp`` / bit casts are, but ONNX has no BitCast.)"""
    a, s = jnp.abs(e), jnp.ones_like(e)
    for k in (64, 32, 16, 8, 4, 2, 1):
        take = a >= k
        s, a = jnp.where(take, s * float(2**k), s), jnp.where(take, a - k, a)
    return jnp.where(e < 0, 1 / s, s)


def quantize_fp8(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x / scale`` rounded to ``float8_e4m3fn`` (saturating at +-448: e4m3fn has no inf).
    float16 divides in float32: a small tensor's scale (at most 2^-15: amax <= 448 * 2^-16) is
    subnormal or below float16's range, which backends flush to zero, so every value saturated
    and zeros became NaN."""
    if x.dtype == jnp.float16:
        x = x.astype(jnp.float32)
    y = x / scale.astype(x.dtype)
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(FP8)


_EXPORTING = contextvars.ContextVar("streamflow_jax_exporting", default=False)


@contextlib.contextmanager
def exporting():
    """Within it, functions are traced for ONNX (``export.trace_onnx``): ``fp8_matmul`` writes
    its product as MatMul of a transposed weight, which ONNX takes in every float type (jax2onnx
    writes the ``dot_general`` as Einsum, which ONNX refuses in bfloat16)."""
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def is_exporting() -> bool:
    """Whether functions are being traced for ONNX now (inside ``exporting()``)."""
    return _EXPORTING.get()


def _fake_quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` rounded to e4m3 with ``scale`` and back, in ``x``'s dtype (float16 through float32,
    as ``quantize_fp8``)."""
    wide = jnp.float32 if x.dtype == jnp.float16 else x.dtype
    return (quantize_fp8(x, scale).astype(wide) * scale.astype(wide)).astype(x.dtype)


def _dequantize(q: jax.Array, scale: jax.Array, *, dtype) -> jax.Array:
    return q.astype(dtype) * scale.astype(dtype)


FP8_QDQ = "streamflow_fp8_qdq"  # x -> QuantizeLinear(x, scale, e4m3 zero) -> DequantizeLinear
FP8_DEQUANTIZE = "streamflow_fp8_dequantize"  # an e4m3 weight -> DequantizeLinear(weight, scale)


@functools.cache
def fp8_primitives() -> dict:
    """The JAX primitives ``fp8_matmul`` binds while exporting (name -> primitive): each computes
    what its jnp ops would, and jax2onnx writes it as ONNX's QuantizeLinear / DequantizeLinear
    (``export.qdq``) where the jnp ops would be Casts. Made on first use (an export), so that
    importing this module touches no JAX extension API."""
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    try:
        from jax.core import ShapedArray
    except ImportError:  # pragma: no cover  (a JAX that moved it)
        from jax._src.core import ShapedArray

    def make(name, impl, abstract):
        p = Primitive(name)
        p.def_impl(impl)
        p.def_abstract_eval(abstract)
        mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=False))
        return p

    return {FP8_QDQ: make(FP8_QDQ, _fake_quantize, lambda x, scale: ShapedArray(x.shape, x.dtype)),
            FP8_DEQUANTIZE: make(FP8_DEQUANTIZE, _dequantize,
                                 lambda q, scale, *, dtype: ShapedArray(q.shape, dtype))}


def fp8_matmul(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
               x_scale: jax.Array | None = None) -> jax.Array:
    """``x @ (weight * weight_scale).T`` with ``x`` quantized to e4m3 per tensor.

    One ``dot`` of the two e4m3 operands (accumulating in float32; bfloat16 out for bfloat16
    ``x``, float32 otherwise), then one multiply by ``x_scale * weight_scale``: the same numbers
    as the dequantized product (both scales are powers of two, and e4m3 values are exact in
    every wider float), in a form XLA keeps in FP8 on Hopper and Ada. Compiled for an H200
    (``benchmarks/hlo_gpu.py``, XLA 0.10.2), the dot becomes one Triton GEMM fusion on e4m3
    operands with the scale in its epilogue, or, with Triton GEMMs off, cuBLASLt's FP8 GEMM
    (``__cublas$lt$matmul$f8``, the scale as its alpha); XLA's autotuner picks between them on
    the device. Dequantized operands (``convert(f8) * scale`` into a bfloat16 ``dot``, the
    GemmRewriter pattern of openxla RFC 22) reach cuBLASLt only with Triton GEMMs off: by
    default XLA dequantized them in separate kernels, writing a bfloat16 copy of every weight
    per call, before a bfloat16 GEMM. On CPUs and older GPUs the dot runs upcast, with the same
    numbers. The weight is ``[out, in]`` (K minor), the layout FP8 GEMMs take, so no transpose
    runs per call.

    Under ``exporting()``: the weight is written as DequantizeLinear of the e4m3 initializer,
    a static ``x_scale`` as QuantizeLinear + DequantizeLinear (TensorRT's explicit FP8
    quantization); a dynamic one as Casts (TensorRT refuses those).

    Args:
        x: ``[..., in]`` activations, any float dtype (the compute dtype).
        weight: ``[out, in]`` ``float8_e4m3fn``.
        weight_scale: float scalar.
        x_scale: float scalar, the activation's static scale (calibrated: ``sf.calibrate``;
            values beyond ``448 * x_scale`` saturate), or None: computed from this call's
            ``x`` (its largest magnitude, over the whole batch).

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    static = x_scale is not None
    if static:
        x_scale = jnp.asarray(x_scale, jnp.float32)
    else:
        # lax.reduce_max, not jnp.max: no emptiness check, which symbolic (exported) sizes cannot answer
        x_scale = fp8_scale(jax.lax.reduce_max(jnp.abs(x), tuple(range(x.ndim))))
    if _EXPORTING.get():
        xd = fp8_primitives()[FP8_QDQ].bind(x, x_scale) if static else _fake_quantize(x, x_scale)
        return jnp.matmul(xd, fp8_primitives()[FP8_DEQUANTIZE].bind(weight, weight_scale, dtype=x.dtype).T)
    # bfloat16 has float32's range; float16 would overflow on the unscaled sums (up to K * 448^2)
    out = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
    rows = math.prod(x.shape[:-1])
    if rows < FP8_GEMM_MIN_ROWS and _on_gpu() and gemm_choice() == "cublas":
        # cuBLASLt's FP8 GEMM does not take a product of one row (a modulation's silu(temb) at
        # batch 1, which XLA makes a matrix-vector product): XLA then dequantized the weight to
        # bfloat16 at every call for a bf16 GEMM (Flux-dev: 76 such products, 1.15 B weights).
        # Zero rows up to 16 keep it an FP8 GEMM; each row's result is its own
        padded = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, FP8_GEMM_MIN_ROWS - rows), (0, 0)))
        y = jax.lax.dot_general(quantize_fp8(padded, x_scale), weight, (((1,), (1,)), ((), ())),
                                preferred_element_type=out)[:rows].reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = jax.lax.dot_general(quantize_fp8(x, x_scale), weight, (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=out)
    return (y * (x_scale * jnp.asarray(weight_scale, jnp.float32)).astype(out)).astype(x.dtype)


# the fewest rows ``fp8_matmul`` gives a product with cuBLAS GEMMs on a GPU (``gemm_choice``)
FP8_GEMM_MIN_ROWS = 16


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, statistics in fp32.

    Args:
        x: ``[..., D]``.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


GROUPNORM_ENV = "STREAMFLOW_JAX_GROUPNORM"


def _platform(platform: str | None = None) -> str:
    """``platform``, else the ``target_device``'s, else ``jax.default_backend()``'s; lower case."""
    if not platform:
        target = _TARGET.get()
        platform = target.platform if target is not None else jax.default_backend()
    return platform.lower()


def _on_gpu(platform: str | None = None) -> bool:
    """Whether the choices measured on a GPU apply: JAX's ``gpu``/``cuda`` platforms (measured
    on an NVIDIA H200; ROCm devices also say ``gpu``, and get the same choices unmeasured)."""
    return _platform(platform) in ("gpu", "cuda")


def group_norm_choice(setting: str | None = None, platform: str | None = None) -> str:
    """How ``group_norm`` reduces: ``"groups"`` (over ``[B, H, W, G, C/G]``'s axes 1, 2 and 4)
    or ``"channels"`` (over ``H, W`` per channel: column reductions with the channels minor;
    then over each group's channels on the small ``[B, C]``), both in two passes (the mean,
    then the squared deviations), or ``"onepass"`` (both moments per channel in one pass over
    ``x``, shifted by each channel's first value so that they do not cancel, then combined per
    group: compiled for an H200, one reduction kernel per norm instead of two). The same
    numbers up to float32 rounding.

    ``$STREAMFLOW_JAX_GROUPNORM`` (or ``setting``): ``auto`` (unset) takes ``channels`` on the
    CPU, where it measured 1.2-1.8x faster for GroupNorm + SiLU on SD1.5's and a VAE's
    activations (``benchmarks/group_norm.py``) and 2-13% more images/s for the seed setting's
    reduced UNet end to end; ``onepass`` on a GPU, where it measured 1.046x the images/s of
    ``groups`` in the seed setting on an H200 (``benchmarks/levers_gpu.py``'s
    ``groupnorm_onepass``, 2026-11-30); ``groups`` elsewhere. Or one by name.
    Read when a function is traced (``platform``: default the ``target_device``'s, else
    ``jax.default_backend()``).
    """
    setting = _switch(GROUPNORM_ENV, setting, ("auto", "groups", "channels", "onepass"))
    if setting == "auto":
        platform = _platform(platform)
        return "channels" if platform == "cpu" else "onepass" if _on_gpu(platform) else "groups"
    return setting


CONV_LAYOUT_ENV = "STREAMFLOW_JAX_CONV_LAYOUT"


def conv_layout_choice(setting: str | None = None, platform: str | None = None) -> str:
    """The convolution kernel layout the stream engine runs its models in: ``"HWIO"`` or
    ``"OHWI"`` (``FlowModel.with_conv_layout``).

    ``$STREAMFLOW_JAX_CONV_LAYOUT`` (or ``setting``): ``auto`` (unset) takes ``ohwi`` on a GPU,
    where it measured 1.062x the images/s of ``hwio`` in the seed setting on an H200
    (``benchmarks/levers_gpu.py``'s ``conv_ohwi``, 2026-11-30: compiled for an H200, the UNet
    transposes each of its 98 HWIO kernels at every call, 1.2 GB written, and TAESD's decoder
    35, ``benchmarks/hlo_gpu.py``), and keeps ``hwio``, the layout models are converted in,
    elsewhere; or either by name. Read when an engine is made (``platform``: the engine's
    devices', default as ``group_norm_choice``).
    """
    setting = _switch(CONV_LAYOUT_ENV, setting, ("auto", "hwio", "ohwi"))
    if setting == "auto":
        return "OHWI" if _on_gpu(platform) else "HWIO"
    return "OHWI" if setting == "ohwi" else "HWIO"


CONV1X1_ENV = "STREAMFLOW_JAX_CONV1X1"


def conv1x1_choice(setting: str | None = None, platform: str | None = None) -> str:
    """How a 1x1 convolution of stride 1 without padding runs: ``"conv"`` (a convolution: on
    a GPU a cuDNN call) or ``"dot"`` (the same product as a matrix product over the channels:
    a GEMM). The same numbers up to float32 rounding.

    SD1.5's UNet has 46 of its 98 convolutions 1x1 (the transformers' ``proj_in``/``proj_out``
    and the resnets' shortcuts). Compiled for an H200, each cuDNN convolution is a call of its
    own between CUDA graphs (the first H200 profile), and each HWIO kernel is transposed at
    every call; as GEMMs they join the graphs and need no transpose (``benchmarks/hlo_gpu.py``'s
    ``conv1x1_dot``).

    ``$STREAMFLOW_JAX_CONV1X1`` (or ``setting``): ``auto`` (unset) takes ``dot`` on a GPU, where
    it measured 1.031x the images/s of ``conv`` in the seed setting on an H200
    (``benchmarks/levers_gpu.py``'s ``conv1x1_dot``, 2026-11-30), and keeps ``conv`` elsewhere
    (on this project's CPU the whole UNet ran 0-6% slower as GEMMs, ``benchmarks/conv1x1.py``); or either
    by name. Read when a function is traced (``platform``: as ``group_norm_choice``).
    """
    setting = _switch(CONV1X1_ENV, setting, ("auto", "conv", "dot"))
    if setting == "auto":
        return "dot" if _on_gpu(platform) else "conv"
    return setting


CONCAT_PRODUCT_ENV = "STREAMFLOW_JAX_CONCAT_PRODUCT"


def concat_product_choice(setting: str | None = None) -> str:
    """How a linear layer of concatenated inputs runs (Flux's single blocks: ``proj_out`` of
    the attention's and the MLP's outputs side by side, ``layers.linear_of_concat``):
    ``"concat"`` (the concatenation written out, then one product, as diffusers does) or
    ``"split"`` (one product per part with its rows of the kernel, summed: the same numbers up
    to float rounding, and no concatenated copy). The H200 profile of Flux-dev (2026-11-30)
    shows that copy: 141 MB a single block, about 4.2 ms of its 136.8 ms call. Compiled for an
    H200 on a CPU, split saves little: XLA's GEMMs get the concatenation written by the GELU's
    kernel anyway, and cuBLAS GEMMs (which take the first product as the second's C operand)
    copy the kernel's row blocks at every call instead (``benchmarks/RESULTS.md``).

    ``$STREAMFLOW_JAX_CONCAT_PRODUCT`` (or ``setting``): ``auto`` (unset) keeps ``concat`` until
    a device measures ``split`` (``benchmarks/levers_gpu.py``'s ``split_concat``); or either by
    name. Read when a function is traced; an ONNX export always writes the concatenation.
    """
    setting = _switch(CONCAT_PRODUCT_ENV, setting, ("auto", "concat", "split"))
    return "concat" if setting == "auto" else setting


MODULATION_ENV = "STREAMFLOW_JAX_MODULATION"


def modulation_choice(setting: str | None = None) -> str:
    """How the blocks' modulation products run (``layers.AdaLayerNormZero``, ``...Continuous``:
    each block's ``linear(silu(temb))``): ``"merged"`` (as written: every block's product reads
    the one ``silu(temb)``, so XLA's DotMerger makes them one GEMM, and, the weights being
    arguments of the program, concatenates all the blocks' modulation weights at every call) or
    ``"apart"`` (each block's input tied to its own layer by an optimization barrier, so no two
    products share an operand: one GEMM a block reading its weights where they lie; products
    within a block, q/k/v, still merge). The same numbers either way. Compiled for an H200 on a
    CPU, the concatenation is a copy of 2.5 GB a SD3-medium call (1536 x 439296 bf16 weights)
    and 4.4 GB a Flux-dev call (3072 x 374784); apart, SD3-medium's memory-bound traffic falls
    from 3.93 to 3.37 ms a call at full bandwidth for 23 more kernels (``dot_merger_off`` gets
    3.47 with 119 more, unmerging q/k/v too; ``benchmarks/RESULTS.md``).

    ``$STREAMFLOW_JAX_MODULATION`` (or ``setting``): ``auto`` (unset) keeps ``merged`` until a
    device times ``apart`` (``benchmarks/levers_gpu.py``'s ``modulation_apart``); or either by
    name. Read when a function is traced; an ONNX export has no barrier.
    """
    setting = _switch(MODULATION_ENV, setting, ("auto", "merged", "apart"))
    return "merged" if setting == "auto" else setting


def _switch(env: str, setting: str | None, choices: tuple[str, ...]) -> str:
    """An environment switch's value (``setting``, else ``$env``; unset or blank: ``auto``),
    lower case, one of ``choices``, else a ValueError naming the variable and the choices."""
    setting = (os.environ.get(env, "auto") if setting is None else setting).strip().lower() or "auto"
    if setting not in choices:
        raise ValueError(f"{env}={setting!r}: expected {', '.join(choices[:-1])} or {choices[-1]}")
    return setting


def trace_switches() -> tuple[str, ...]:
    """What a model's function reads while it is traced: the environment switches
    (``$STREAMFLOW_JAX_ATTENTION``, ``$STREAMFLOW_JAX_GROUPNORM``, ``$STREAMFLOW_JAX_CONV1X1``,
    ``$STREAMFLOW_JAX_CONCAT_PRODUCT``, ``$STREAMFLOW_JAX_MODULATION``, and ``$STREAMFLOW_JAX_GEMM``,
    which ``fp8_matmul`` reads too) as they are set now, and the ``target_device`` (its
    platform, kind and compute capability; empty outside one). Part of a model's pytree structure (``FlowModel``, the stream engine's
    pinned models) and of its velocity's static arguments, so that a jitted function taking a
    model traces again when one of them changes within a process, instead of running the
    program traced under the old setting (a trace made for a GPU target, reused on this CPU)."""
    target = _TARGET.get()
    where = "" if target is None else (f"{target.platform}:{getattr(target, 'device_kind', '')}:"
                                       f"{getattr(target, 'compute_capability', '')}")
    return (*(os.environ.get(name, "") for name in (ATTENTION_ENV, GROUPNORM_ENV, CONV1X1_ENV, CONCAT_PRODUCT_ENV,
                                                     MODULATION_ENV, GEMM_ENV)),
            where)


SCAN_BLOCKS_ENV = "STREAMFLOW_JAX_SCAN_BLOCKS"


def scan_blocks_choice(setting: str | None = None) -> bool | None:
    """Whether models run their repeated blocks as one ``lax.scan`` (``FlowModel.with_scanned_blocks``:
    the blocks' weights stacked once, one compiled block body) rather than unrolled.

    Scanned, XLA compiles one block body per run instead of every block: on this CPU Flux.1-dev
    compiles in 0.27-0.28x the time, SD3-medium 0.43-0.51x, SDXL's UNet 0.53x (two runs of
    ``benchmarks/compile_cpu.py``); compiled for an H200 without one, 0.21x and 0.29x
    (``benchmarks/hlo_gpu.py``). The price is
    per call: each iteration first copies its block's slice of the stacked weights (XLA 0.10's
    GPU program: 2270 kernels for Flux.1-dev instead of 1070, 1068 for SD3-medium instead of
    585; every weight byte read and written once more per call), and products of one input
    across blocks no longer merge. So it serves a first image (a one-shot ``generate``), not
    throughput; ``benchmarks/levers_gpu.py``'s ``scan_blocks`` measures both on a device.

    ``$STREAMFLOW_JAX_SCAN_BLOCKS`` (or ``setting``): ``on`` (True), ``off`` (False), or
    ``auto`` (unset; None): models as given, and loaded unrolled, until a GPU measures the scan.
    Read by ``sf.load`` and the stream engine when they make a model, not per call.
    """
    setting = _switch(SCAN_BLOCKS_ENV, setting, ("auto", "on", "off"))
    return None if setting == "auto" else setting == "on"


GEMM_ENV = "STREAMFLOW_JAX_GEMM"
# compile options per GEMM setting on GPUs: ``cublas`` is cuBLAS(Lt) for every product (XLA's
# GemmRewriter then fuses their epilogues: bias, tanh GELU, a residual add as the C operand) and
# no DotMerger (no weights concatenated at every call, no slices of merged outputs)
GEMM_OPTIONS = {"xla": {}, "cublas": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_dot_merger_threshold_mb": 0}}


def gemm_choice(setting: str | None = None, platform: str | None = None) -> str:
    """How the library's programs compute their products on a GPU: ``"xla"`` (XLA's default:
    Triton GEMM fusions where its autotuner picks them, products of one input merged) or
    ``"cublas"`` (``GEMM_OPTIONS``).

    ``$STREAMFLOW_JAX_GEMM`` (or ``setting``): ``auto`` (unset), ``xla``, ``cublas``. ``auto``
    is ``xla`` until a device measures ``cublas`` (``benchmarks/levers_gpu.py``'s ``gemm_cublas``;
    compiled for an H200 on a CPU, it cuts SD3-medium's memory-bound traffic by 41%, see RESULTS.md).
    Read when a program is compiled (``compiler_options``) and when ``fp8_matmul`` is traced
    (``cublas``: one-row FP8 products padded to 16 rows, which cuBLASLt's FP8 GEMM takes); a
    CPU has no such choice."""
    setting = _switch(GEMM_ENV, setting, ("auto", "xla", "cublas"))
    return "xla" if setting == "auto" else setting


def compiler_options(platform: str | None = None) -> dict | None:
    """The compile options of the library's programs (``sf.sample``'s compiled segments,
    ``FlowModel.velocity``, the stream engine's tick) on ``platform`` (default: the target
    device's, ``_platform``): the GPU's ``gemm_choice``; None where there are none (a CPU).
    A caller's own ``jax.jit`` around them compiles with the caller's options instead."""
    if not _on_gpu(platform):
        return None
    return dict(GEMM_OPTIONS[gemm_choice(platform=platform)]) or None


@functools.cache
def _jit_with(fn, options: tuple, static_argnums: tuple, donate_argnums: tuple):
    return jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums,
                   compiler_options=dict(options) or None)


def _top_level() -> bool:
    """Whether no trace is running (JAX refuses compile options on a jit nested in another's
    trace). JAX's own check, a private one: where it is missing, False (no options)."""
    try:
        from jax._src import core

        return bool(core.trace_ctx.is_top_level())
    except (ImportError, AttributeError):
        return False


def jitted(fn, options: dict | None = None, *, static_argnums=(), donate_argnums=()):
    """``jax.jit(fn, ...)`` compiled with ``options`` (default ``compiler_options()``), one
    jitted function per function and options, kept: calls reuse its compiled programs. Inside
    a caller's trace (a jit around the library's call) without options: the caller's compile
    holds the whole program."""
    options = (compiler_options() if options is None else options) if _top_level() else None
    return _jit_with(fn, tuple(sorted((options or {}).items())), tuple(static_argnums), tuple(donate_argnums))


def check_switches() -> None:
    """Parses every environment switch the library reads (attention, GroupNorm, 1x1
    convolutions, convolution layout, concatenated products, modulation, scanned blocks, GEMMs,
    and the stream engine's tick, graphs and ticks per call),
    so that a typo is refused at once, naming the variable, rather than when a model is traced
    or an engine made, or not at all where no model reads it. The CLI calls it before loading."""
    attention_choice(0)
    group_norm_choice(platform="cpu")
    conv1x1_choice(platform="cpu")
    conv_layout_choice(platform="cpu")
    concat_product_choice()
    modulation_choice()
    scan_blocks_choice()
    gemm_choice()
    from streamflow_jax.stream import tick_graphs, tick_mode, ticks_per_call_choice

    tick_mode()
    tick_graphs()
    ticks_per_call_choice()


def group_norm(x: jax.Array, groups: int, eps: float) -> jax.Array:
    """GroupNorm statistics without affine parameters, in fp32 (``group_norm_choice``: two
    passes, the mean then the mean squared deviation from it, or one shifted pass).

    Args:
        x: ``[B, H, W, C]`` with ``C`` divisible by ``groups``.

    Returns:
        float32 ``[B, H, W, C]`` (the caller applies its scale and bias, then casts).
    """
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    choice = group_norm_choice()
    if choice == "onepass":
        # one pass over x for both moments, per channel, shifted by the channel's first value
        # (so that the sum of squares does not cancel against a large mean); then the channels'
        # moments are combined into their group's (Chan et al.'s parallel variance)
        # (means, not sums: no element count, which an export's symbolic sides do not give)
        x32 = g.reshape(b, h, w, c)
        d = x32 - x32[:, :1, :1, :]
        m1, m2 = jnp.mean(d, axis=(1, 2)), jnp.mean(jnp.square(d), axis=(1, 2))  # [B, C]
        mean_c = (x32[:, 0, 0, :] + m1).reshape(b, groups, c // groups)
        var_c = jnp.maximum(m2 - jnp.square(m1), 0.0).reshape(b, groups, c // groups)
        mean = jnp.mean(mean_c, axis=-1, keepdims=True)
        var = jnp.mean(var_c + jnp.square(mean_c - mean), axis=-1, keepdims=True)
        mean, var = mean[:, None, None], var[:, None, None]  # [B, 1, 1, G, 1]
    elif choice == "channels":
        # per channel over H, W (every channel has H*W elements: the mean of the channel means
        # is the group mean), then over the group's channels
        def group_mean(v):  # [B, H, W, G, C/G] -> [B, 1, 1, G, 1]
            return jnp.mean(jnp.mean(v.reshape(b, h, w, c), axis=(1, 2)).reshape(b, groups, c // groups),
                            axis=-1)[:, None, None, :, None]

        mean = group_mean(g)
        var = group_mean(jnp.square(g - mean))
    else:
        mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis, statistics in fp32 (as diffusers' ``RMSNorm``).

    Args:
        x: ``[..., D]``.
        weight: ``[D]`` scale, or ``None``.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of one scalar timestep per element (diffusers' convention).

    Args:
        timesteps: ``[B]`` native timesteps (for example ``sigma * 1000``), any float dtype.
        dim: embedding width.

    Returns:
        ``[B, dim]`` float32 embedding: ``[sin, cos]`` (or ``[cos, sin]`` when flipped).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def unpatchify(tokens: jax.Array, height: int, width: int, patch: int) -> jax.Array:
    """Tokens back to an NHWC latent.

    Args:
        tokens: ``[B, (H/P)*(W/P), P*P*C]``, each token's channels ordered (row, col, channel).
        height, width: the latent's ``H`` and ``W``; patch: ``P``.

    Returns:
        ``[B, H, W, C]``.
    """
    b, _, d = tokens.shape
    h, w = height // patch, width // patch
    c = d // (patch * patch)
    x = tokens.reshape(b, h, w, patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, P, w, P, C]
    return x.reshape(b, h * patch, w * patch, c)


def rope_angles(positions, axes_dims: tuple[int, ...], theta: float = 10000.0):
    """Rotary angles of positions, one frequency band per position axis (Flux's ``FluxPosEmbed``).

    Args:
        positions: one ``[L]`` (or ``[B, L]``) array per axis (numpy: computed in float64 on
            the host, as diffusers does; traced arrays, e.g. symbolic sizes in an ONNX export:
            float32 in the graph).
        axes_dims: the rotary width of each axis (summing to the head dim ``K``).

    Returns:
        ``(cos, sin)``, each ``[L, K/2]`` (or ``[B, L, K/2]``): axis ``a`` contributes
        ``axes_dims[a] / 2`` frequencies ``theta ** (-2j / axes_dims[a])``.
    """
    xp = np if all(isinstance(p, np.ndarray) for p in positions) else jnp
    dtype = np.float64 if xp is np else jnp.float32
    parts = []
    for pos, dim in zip(positions, axes_dims):
        freqs = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(dtype)
        parts.append(xp.expand_dims(xp.asarray(pos).astype(dtype), -1) * xp.asarray(freqs))
    angles = xp.concatenate(parts, axis=-1)
    return xp.cos(angles).astype(np.float32), xp.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates each pair ``(x[2i], x[2i+1])`` of every head by its angle, in float32.

    Args:
        x: ``[B, L, N, K]`` queries or keys; cos, sin: ``[L, K/2]`` or ``[B, L, K/2]``.
    """
    b, n, h, k = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, h, k // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = jnp.expand_dims(jnp.asarray(cos), -2), jnp.expand_dims(jnp.asarray(sin), -2)  # [(B,) L, 1, K/2]
    out = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return out.reshape(b, n, h, k).astype(x.dtype)
