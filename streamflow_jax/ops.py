"""Stateless math shared by every model: attention, norms, timestep embeddings, patchify.

Axis letters used in shape comments across the project:

- ``B``: batch (one element per request or CFG branch)
- ``H``, ``W``: latent height and width (NHWC layout); ``C``: latent channels
- ``L``: token sequence length; ``S``: text (context) length; ``D``: model width
- ``N``: attention heads; ``K``: head dimension (``D = N * K``)
- ``P``: patch size; ``T``: number of sampler steps
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def attention_implementation(q: jax.Array) -> str:
    """Which ``jax.nn.dot_product_attention`` lowering serves ``q`` on this machine.

    cuDNN's fused attention is several times faster on NVIDIA GPUs but only takes half
    precision and head dims that are multiples of 8 up to 256, so everything else
    (fp32 parity runs, CPU, odd head sizes) takes the XLA lowering.
    """
    head_dim = q.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and q.dtype in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 256
    ):
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
    """Multi-head attention, full or causal.

    Args:
        q: ``[B, L, N, K]`` queries.
        k: ``[B, L', N, K]`` keys.
        v: ``[B, L', N, K]`` values.
        causal: query i attends to keys 0..i only (text encoders).

    Returns:
        ``[B, L, N, K]``, softmax(q k^T / sqrt(K)) v per head.
    """
    if attention_implementation(q) == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    # Written out rather than jax.nn.dot_product_attention(implementation="xla"): that asks for
    # fp32 accumulation of half-precision dots, which XLA:CPU rejects. Softmax runs in fp32.
    # matmul on [B, N, L, K] (not einsum) because it exports to ONNX MatMul, which takes
    # bfloat16, where ONNX Einsum does not.
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, L, K]
    logits = jnp.matmul(qh * scale, kh.transpose(0, 1, 3, 2))  # [B, N, L, L']
    if causal:
        allowed = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.matmul(probs, vh).transpose(0, 2, 1, 3)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, statistics in fp32.

    Args:
        x: ``[..., D]``.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def group_norm(x: jax.Array, groups: int, eps: float) -> jax.Array:
    """GroupNorm statistics without affine parameters, in fp32.

    Args:
        x: ``[B, H, W, C]`` with ``C`` divisible by ``groups``.

    Returns:
        float32 ``[B, H, W, C]`` (the caller applies its scale and bias, then casts).
    """
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
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
