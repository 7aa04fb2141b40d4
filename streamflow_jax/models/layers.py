"""Leaf modules shared by the convolutional models (UNet, VAE, TAESD), NHWC.

Parameter names mirror PyTorch's (``weight``/``bias`` on norms; ``kernel``/``bias`` on convs
and linears, whose weights the converter transposes), so conversion stays renaming.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax import ops


class Conv2d(nnx.Module):
    """2-D convolution, NHWC, kernel ``[kh, kw, in, out]``.

    Written on ``lax.conv_general_dilated`` rather than ``nnx.Conv``: jax2onnx 0.17's
    ``nnx.Conv`` converter emits a float32 kernel into half-precision graphs.
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, bias: bool = True):
        self.kernel = nnx.Param(jnp.zeros((kernel, kernel, cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if bias else None
        self.stride, self.padding = stride, padding

    def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', Cout]
        p = self.padding
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (self.stride, self.stride),
                                         ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups, self.eps = groups, eps

    def __call__(self, x):  # [B, H, W, C]
        y = ops.group_norm(x, self.groups, self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):  # [..., D]
        return (ops.layer_norm(x, self.eps) * self.weight[...] + self.bias[...]).astype(x.dtype)


class Placeholder(nnx.Module):
    """Holds a list index without parameters (PyTorch's Dropout slots in ``to_out``/``ff.net``)."""

    def __call__(self, x):
        return x


def linear(din: int, dout: int, *, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, rngs=nnx.Rngs(0))


class Attention(nnx.Module):
    """Multi-head attention with diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention when ``context`` is None, cross-attention on ``context`` otherwise.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = False):
        cdim = context_dim or dim
        self.heads = heads
        self.to_q = linear(dim, dim, bias=qkv_bias)
        self.to_k = linear(cdim, dim, bias=qkv_bias)
        self.to_v = linear(cdim, dim, bias=qkv_bias)
        self.to_out = nnx.List([linear(dim, dim), Placeholder()])

    def __call__(self, x, context=None):  # [B, L, D], [B, S, Dc] | None -> [B, L, D]
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda a: a.reshape(b, a.shape[1], self.heads, d // self.heads)  # noqa: E731
        out = ops.attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out[0](out.reshape(b, n, d))


def upsample_nearest2x(x, size=None):
    """Nearest 2x upsampling, ``[B, H, W, C] -> [B, 2H, 2W, C]``, or to ``size = (H', W')``.

    With a ``size`` that is not plainly twice the input (odd skip sizes, or symbolic sizes in
    an ONNX export) pixel ``i`` copies input pixel ``i // 2``, written as a gather so the
    result has exactly the shape ``size`` names.
    """
    h, w = x.shape[1], x.shape[2]
    if size is None or (isinstance(size[0], int) and isinstance(size[1], int) and tuple(size) == (2 * h, 2 * w)):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, jnp.arange(size[0]) // 2, axis=1)
    return jnp.take(x, jnp.arange(size[1]) // 2, axis=2)
