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
from streamflow_jax.models import layers
from streamflow_jax.models.family import Family

CLIP_TOKENS = 77  # StableDiffusion3Pipeline's text: CLIP-L and CLIP-G's 77 tokens side by side...
T5_TOKENS = 256  # ...then T5's max_sequence_length tokens (default 256)


def timestep(t):
    """SD3 is trained on ``timestep = sigma * 1000`` (``[B]``)."""
    return t * 1000.0


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
        if self.latent_channels_out != self.in_channels:
            raise ValueError(f"out_channels={self.out_channels} differs from in_channels={self.in_channels}: "
                             "the output must be a velocity of the input latent")
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
# Blocks
# ---------------------------------------------------------------------------------------------


class Buffer(nnx.Variable):
    """A non-trained array stored in the checkpoint (diffusers' persistent buffers)."""


class PatchEmbed(nnx.Module):
    """Strided-conv patchify plus a centre crop of the stored 2-D sin-cos position table."""

    def __init__(self, cfg: SD3Config):
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = layers.Conv2d(cfg.in_channels, cfg.inner_dim, p, stride=p)
        self.pos_embed = Buffer(jnp.zeros((1, m * m, cfg.inner_dim), jnp.float32))
        self.patch_size, self.max_size = p, m

    def __call__(self, x):  # [B, H, W, C] -> [B, M, D]
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


# ---------------------------------------------------------------------------------------------
# Root
# ---------------------------------------------------------------------------------------------


class SD3Transformer2DModel(nnx.Module):
    """MMDiT velocity network. ``__call__`` mirrors diffusers' forward in NHWC."""

    def __init__(self, config: SD3Config):
        d = config.inner_dim
        self.config = config
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = layers.TimeTextEmbedding(d, config.pooled_projection_dim)
        self.context_embedder = layers.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nnx.List([
            layers.JointTransformerBlock(d, config.num_attention_heads, qk_norm=config.qk_norm,
                                         context_pre_only=i == config.num_layers - 1,
                                         dual_attention=i in config.dual_attention_layers)
            for i in range(config.num_layers)
        ])
        self.norm_out = layers.AdaLayerNormContinuous(d)
        p = config.patch_size
        self.proj_out = layers.Linear(d, p * p * config.latent_channels_out)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """Args: ``[B, H, W, C]`` latent, ``[B, L, J]`` text tokens, ``[B, E]`` pooled text,
        ``[B]`` native timestep (``sigma * 1000``). Returns the ``[B, H, W, C_out]`` prediction."""
        dtype = self.proj_out.kernel.dtype
        _, height, width, _ = hidden_states.shape
        p = self.config.patch_size
        if isinstance(height, int) and isinstance(width, int) and (height % p or width % p):
            raise ValueError(f"latent {height}x{width} is not divisible by patch_size={p}")
        x = self.pos_embed(hidden_states.astype(dtype))
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype))
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        x, context = layers.run_blocks(self.transformer_blocks, (x, context), temb)
        x = self.proj_out(self.norm_out(x, temb))
        return ops.unpatchify(x, height, width, p)

    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """The RF velocity at sigma ``t`` (``[B]``) for latents ``x`` (``[B, H, W, C]``).

        ``cond`` holds ``encoder_hidden_states`` ``[B, L, J]`` and ``pooled_projections``
        ``[B, E]``. SD3 is trained on ``timestep = sigma * 1000`` and predicts the velocity
        (noise minus data) directly.
        """
        v = self(x, cond["encoder_hidden_states"], cond["pooled_projections"], timestep(t))
        return v.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------

FAMILY = Family(
    name="sd3",
    kind="velocity",
    class_names=("SD3Transformer2DModel",),
    config_cls=SD3Config,
    module_cls=SD3Transformer2DModel,
    component="transformer",
    lora_prefixes=("lora_unet_", "lora_transformer_"),
    timestep=timestep,
    latent_channels=lambda c: c.in_channels,
    latent_scale=8,
    latent_multiple=lambda c: c.patch_size,
    default_latent=lambda c: c.sample_size,
    max_latent=lambda c: c.pos_embed_max_size * c.patch_size,
    conditioning=lambda c, text_len: {"encoder_hidden_states": (text_len, c.joint_attention_dim),
                                      "pooled_projections": (c.pooled_projection_dim,)},
    text_len=lambda c: CLIP_TOKENS + T5_TOKENS,
    text_prefix=CLIP_TOKENS,
    max_text_len=CLIP_TOKENS + 512,  # diffusers' max_sequence_length limit for T5
    fp8_linears=r"^transformer_blocks\.",  # every linear of the blocks: nearly all FLOPs and bytes
    float_linears=("proj_out",),  # __call__ takes its compute dtype from proj_out's kernel
    blocks=lambda c: {"transformer_blocks": c.num_layers},
    scan_blocks=r"^transformer_blocks$",  # all but the last (context_pre_only); SD3.5-medium: 13 dual + 10
)
