"""The MMDiT of Stable Diffusion 3 / 3.5 (diffusers' ``SD3Transformer2DModel``) in Flax NNX.

Module attribute names mirror the diffusers checkpoint keys (``transformer_blocks.3.attn.to_q``,
``ff.net.2``), so conversion is renaming plus kernel transposes. Latents are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax import ops
from streamflow_jax.models.layers import Conv2d, Placeholder

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SD3Config:
    """Hyperparameters of ``SD3Transformer2DModel``; field names as in its ``config.json``."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"unsupported: qk_norm={self.qk_norm!r} (supported: None, 'rms_norm')")
        if self.pos_embed_max_size is None:
            raise ValueError(
                "unsupported: pos_embed_max_size=None (every SD3/SD3.5 checkpoint stores its cropped "
                "position table; interpolated tables are not implemented)"
            )
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads*attention_head_dim={self.inner_dim}: text and image tokens share "
                "one attention width"
            )
        for name in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels_out(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @classmethod
    def sd3_medium(cls) -> SD3Config:
        return cls(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)

    @classmethod
    def sd35_medium(cls) -> SD3Config:
        return cls(
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )

    @classmethod
    def sd35_large(cls) -> SD3Config:
        return cls(
            num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"
        )


# ---------------------------------------------------------------------------------------------
# Leaf modules
# ---------------------------------------------------------------------------------------------


class Buffer(nnx.Variable):
    """A non-trained array stored in the checkpoint (diffusers' persistent buffers)."""


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=True, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):  # [..., K] -> [..., K]
        return ops.rms_norm(x, self.weight[...], self.eps)


class PatchEmbed(nnx.Module):
    """Strided-conv patchify plus a centre crop of the stored 2-D sin-cos position table."""

    def __init__(self, cfg: SD3Config, rngs: nnx.Rngs):
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = Conv2d(cfg.in_channels, cfg.inner_dim, p, stride=p)
        self.pos_embed = Buffer(jnp.zeros((1, m * m, cfg.inner_dim), jnp.float32))
        self.patch_size, self.max_size = p, m

    def __call__(self, x):  # [B, H, W, C] -> [B, L, D]
        b, height, width, _ = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        if isinstance(h, int) and isinstance(w, int) and (h > self.max_size or w > self.max_size):
            raise ValueError(
                f"latent {height}x{width} is larger than the position table allows "
                f"({self.max_size * self.patch_size}x{self.max_size * self.patch_size})"
            )
        tokens = self.proj(x)
        d = tokens.shape[-1]
        tokens = tokens.reshape(b, h * w, d)
        # centre crop, written as gathers so it also exports with symbolic h, w (ONNX)
        table = self.pos_embed[...].reshape(self.max_size, self.max_size, d)
        rows = jnp.arange(h) + (self.max_size - h) // 2
        cols = jnp.arange(w) + (self.max_size - w) // 2
        table = jnp.take(jnp.take(table, rows, axis=0), cols, axis=1)
        return tokens + table.reshape(1, h * w, d).astype(tokens.dtype)


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (also diffusers' ``PixArtAlphaTextProjection`` with SiLU)."""

    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.linear_1 = _linear(din, dout, rngs)
        self.linear_2 = _linear(dout, dout, rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    def __init__(self, dim: int, pooled_dim: int, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, dim, rngs)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim, rngs)

    def __call__(self, timestep, pooled):  # [B], [B, Pd] -> [B, D]
        t_emb = ops.timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.timestep_embedder(t_emb.astype(pooled.dtype)) + self.text_embedder(pooled)


class AdaLayerNormZero(nnx.Module):
    """Conditioning -> ``n`` modulation vectors; the first shift/scale modulate the input now.

    n=6 is diffusers' ``AdaLayerNormZero``; n=9 is ``SD35AdaLayerNormZeroX``, whose last three
    vectors modulate a second copy of the normed input for the block's extra self-attention.
    """

    def __init__(self, dim: int, n: int, rngs: nnx.Rngs):
        self.linear = _linear(dim, n * dim, rngs)
        self.n = n

    def __call__(self, x, emb):  # [B, L, D], [B, D]
        chunks = jnp.split(self.linear(jax.nn.silu(emb)), self.n, axis=-1)
        normed = ops.layer_norm(x)
        shift, scale = chunks[0], chunks[1]
        out = normed * (1 + scale[:, None]) + shift[:, None]
        if self.n == 6:
            return out, chunks[2:]  # gate_msa, shift_mlp, scale_mlp, gate_mlp
        shift2, scale2, gate2 = chunks[6:]
        out2 = normed * (1 + scale2[:, None]) + shift2[:, None]
        return out, chunks[2:6] + [out2, gate2]


class AdaLayerNormContinuous(nnx.Module):
    """Final modulation: note the (scale, shift) chunk order, unlike AdaLayerNormZero."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.linear = _linear(dim, 2 * dim, rngs)

    def __call__(self, x, emb):  # [B, L, D], [B, D] -> [B, L, D]
        scale, shift = jnp.split(self.linear(jax.nn.silu(emb)), 2, axis=-1)
        return ops.layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class GELU(nnx.Module):
    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.proj = _linear(din, dout, rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.net = nnx.List([GELU(dim, 4 * dim, rngs), Placeholder(), _linear(4 * dim, dim, rngs)])

    def __call__(self, x):  # [B, L, D] -> [B, L, D]
        return self.net[2](self.net[0](x))


class Attention(nnx.Module):
    """Self-attention over image tokens, joined with text tokens when ``joint`` (MMDiT)."""

    def __init__(self, cfg: SD3Config, *, joint: bool, context_pre_only: bool, rngs: nnx.Rngs):
        d, k = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = (_linear(d, d, rngs) for _ in range(3))
        self.to_out = nnx.List([_linear(d, d, rngs), Placeholder()])
        qk_norm = cfg.qk_norm == "rms_norm"
        self.norm_q = RMSNorm(k) if qk_norm else None
        self.norm_k = RMSNorm(k) if qk_norm else None
        self.joint = joint
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (_linear(d, d, rngs) for _ in range(3))
            self.norm_added_q = RMSNorm(k) if qk_norm else None
            self.norm_added_k = RMSNorm(k) if qk_norm else None
            self.to_add_out = None if context_pre_only else _linear(d, d, rngs)

    def _heads(self, x, norm):  # [B, L, D] -> [B, L, N, K]
        b, l, d = x.shape
        x = x.reshape(b, l, self.heads, d // self.heads)
        return norm(x) if norm is not None else x

    def __call__(self, x, context=None):  # [B, L, D], [B, S, D] | None
        q = self._heads(self.to_q(x), self.norm_q)
        k = self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x), None)
        if context is not None:
            # Text tokens first (diffusers puts them last; attention does not care about order),
            # so that both splits below start at the static text length, and lax.concatenate
            # because jax2onnx 0.17 mis-sizes jnp.concatenate of a symbolic and a static axis:
            # together they keep the graph exportable with a symbolic image-token count.
            join = lambda c, x: jax.lax.concatenate([c, x], 1)  # noqa: E731
            q = join(self._heads(self.add_q_proj(context), self.norm_added_q), q)
            k = join(self._heads(self.add_k_proj(context), self.norm_added_k), k)
            v = join(self._heads(self.add_v_proj(context), None), v)
        out = ops.attention(q, k, v)  # [B, S+L, N, K]
        out = out.reshape(out.shape[0], out.shape[1], -1)
        if context is None:
            return self.to_out[0](out), None
        n = context.shape[1]
        img, txt = out[:, n:], out[:, :n]
        return self.to_out[0](img), (self.to_add_out(txt) if self.to_add_out is not None else None)


class JointTransformerBlock(nnx.Module):
    def __init__(self, cfg: SD3Config, *, context_pre_only: bool, use_dual_attention: bool, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = AdaLayerNormZero(d, 9 if use_dual_attention else 6, rngs)
        self.norm1_context = AdaLayerNormContinuous(d, rngs) if context_pre_only else AdaLayerNormZero(d, 6, rngs)
        self.attn = Attention(cfg, joint=True, context_pre_only=context_pre_only, rngs=rngs)
        self.attn2 = Attention(cfg, joint=False, context_pre_only=False, rngs=rngs) if use_dual_attention else None
        self.ff = FeedForward(d, rngs)
        self.ff_context = None if context_pre_only else FeedForward(d, rngs)

    def __call__(self, x, context, temb):  # [B, L, D], [B, S, D], [B, D]
        norm_x, mods = self.norm1(x, temb)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:4]
        if self.context_pre_only:
            norm_c = self.norm1_context(context, temb)
        else:
            norm_c, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)

        attn_x, attn_c = self.attn(norm_x, norm_c)
        x = x + gate_msa[:, None] * attn_x
        if self.use_dual_attention:
            norm_x2, gate_msa2 = mods[4:]
            x = x + gate_msa2[:, None] * self.attn2(norm_x2)[0]
        h = ops.layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)

        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * attn_c
        h = ops.layer_norm(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return x, context + c_gate_mlp[:, None] * self.ff_context(h)


# ---------------------------------------------------------------------------------------------
# Root
# ---------------------------------------------------------------------------------------------


class SD3Transformer2DModel(nnx.Module):
    """MMDiT velocity network. ``__call__`` mirrors diffusers' forward in NHWC."""

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs):
        d = config.inner_dim
        self.config = config
        self.pos_embed = PatchEmbed(config, rngs)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(d, config.pooled_projection_dim, rngs)
        self.context_embedder = _linear(config.joint_attention_dim, config.caption_projection_dim, rngs)
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    config,
                    context_pre_only=i == config.num_layers - 1,
                    use_dual_attention=i in config.dual_attention_layers,
                    rngs=rngs,
                )
                for i in range(config.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(d, rngs)
        p = config.patch_size
        self.proj_out = _linear(d, p * p * config.latent_channels_out, rngs)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """Args: ``[B, H, W, C]`` latent, ``[B, S, J]`` text tokens, ``[B, Pd]`` pooled text,
        ``[B]`` native timestep (``sigma * 1000``). Returns the ``[B, H, W, C_out]`` prediction."""
        dtype = self.proj_out.kernel.dtype
        _, height, width, _ = hidden_states.shape
        p = self.config.patch_size
        if isinstance(height, int) and isinstance(width, int) and (height % p or width % p):
            raise ValueError(f"latent {height}x{width} is not divisible by patch_size={p}")
        x = self.pos_embed(hidden_states.astype(dtype))
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype))
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        for block in self.transformer_blocks:
            x, context = block(x, context, temb)
        x = self.proj_out(self.norm_out(x, temb))
        return ops.unpatchify(x, height, width, p)

    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """The RF velocity at sigma ``t`` (``[B]``) for latents ``x`` (``[B, H, W, C]``).

        ``cond`` holds ``encoder_hidden_states`` ``[B, S, J]`` and ``pooled_projections``
        ``[B, Pd]``. SD3 is trained on ``timestep = sigma * 1000`` and predicts the velocity
        (noise minus data) directly.
        """
        v = self(x, cond["encoder_hidden_states"], cond["pooled_projections"], t * 1000.0)
        return v.astype(x.dtype)
