"""Stateless math: which attention lowering a device gets, and attention with a bias and scale."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from streamflow_jax import ops


def _device(platform, cc=None):
    return types.SimpleNamespace(platform=platform, compute_capability=cc)


@pytest.mark.parametrize("cc,head_dim,dtype,want", [
    ("9.0", 160, jnp.bfloat16, "cudnn"),   # H100/H200: up to 256
    ("8.0", 160, jnp.bfloat16, "xla"),     # A100: cuDNN takes at most 128 -> SD1.5's 160 falls back
    ("8.9", 128, jnp.float16, "cudnn"),    # RTX 4090, 128: fine
    ("8.6", 64, jnp.float32, "xla"),       # fp32 never goes to cuDNN
    ("12.0", 256, jnp.bfloat16, "cudnn"),  # Blackwell
    ("9.0", 260, jnp.bfloat16, "xla"),     # over 256 anywhere
    ("9.0", 100, jnp.bfloat16, "xla"),     # not a multiple of 8
    (None, 64, jnp.bfloat16, "xla"),       # CPU
])
def test_attention_implementation_follows_the_device_limits(cc, head_dim, dtype, want):
    q = jnp.zeros((1, 4, 2, head_dim), dtype)
    device = _device("cpu") if cc is None else _device("gpu", cc)
    assert ops.attention_implementation(q, device) == want


def test_attention_bias_and_scale_against_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    for scale in (None, 1.0):
        s = 1 / np.sqrt(4) if scale is None else scale
        logits = np.einsum("blnk,bmnk->bnlm", q, k) * s + bias
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want = np.einsum("bnlm,bmnk->blnk", p / p.sum(-1, keepdims=True), v)
        got = ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias), scale=scale)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
