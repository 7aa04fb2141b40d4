"""Flux.1 (diffusers' ``FluxTransformer2DModel``) in Flax NNX, taking unpacked NHWC latents.

Double-stream blocks (image and text tokens with their own weights, one joint attention)
followed by single-stream blocks (one sequence, attention and MLP in parallel), rotary position
embeddings over (text, row, column) ids, and a guidance embedding for guidance-distilled models
(dev; none for schnell). Attribute names mirror the diffusers checkpoint keys; Black Forest
Labs' single-file layout is mapped in ``flux_bfl.py``.

Like every family, ``velocity`` takes ``[B, H, W, C]`` latents: the 2x2 packing into tokens and
the position ids are made here from the shapes (text tokens first, as in diffusers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamflow_jax import ops
from streamflow_jax.models import flux_bfl, layers
from streamflow_jax.models.family import Family, KeyMap

ROPE_THETA = 10000.0


def timestep(t):
    """Flux takes the sigma itself (``[B]``); it scales by 1000 inside, as diffusers' forward."""
    return t

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FluxConfig:
    """Hyperparameters of ``FluxTransformer2DModel``; field names as in its ``config.json``."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if self.patch_size != 1:
            raise ValueError(f"unsupported: patch_size={self.patch_size} (Flux packs 2x2 latents outside the "
                             "transformer; every published checkpoint has 1)")
        if self.in_channels % 4:
            raise ValueError(f"in_channels={self.in_channels} is not 4 x latent channels (2x2 packing)")
        if self.out_channels not in (None, self.in_channels):
            raise ValueError(f"out_channels={self.out_channels} differs from in_channels={self.in_channels}: "
                             "the output must be a velocity of the input latent")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be even and sum to "
                             f"attention_head_dim={self.attention_head_dim}")
        for name in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads"):
            if getattr(self, name) < (0 if "layers" in name else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @classmethod
    def dev(cls) -> FluxConfig:
        return cls(guidance_embeds=True)

    @classmethod
    def schnell(cls) -> FluxConfig:
        return cls()


# ---------------------------------------------------------------------------------------------
# Helpers: packing and positions
# ---------------------------------------------------------------------------------------------


def pack(x):
    """``[B, H, W, C]`` -> ``[B, (H/2)*(W/2), 4C]`` tokens, each token's features ordered (c, dy, dx)
    as diffusers' ``FluxPipeline._pack_latents``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)  # [B, h, w, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens, height, width):
    """``[B, (H/2)*(W/2), 4C]`` -> ``[B, H, W, C]``, the inverse of ``pack``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)  # [B, h, 2, w, 2, C]
    return x.reshape(b, height, width, c)


def rope_tables(text_len: int, rows: int, cols: int, axes_dims: tuple[int, ...]):
    """Rotary ``(cos, sin)``, each ``[L + M, K/2]``, for ``L`` text tokens (ids all zero) then
    the ``rows x cols`` image tokens (ids ``(0, row, col)``), as diffusers' ``FluxPosEmbed``;
    computed on the host in float64 (as diffusers does), so they enter the program as constants."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    text = np.zeros(text_len)
    positions = [np.zeros(text_len + rows * cols), np.concatenate([text, r.reshape(-1)]),
                 np.concatenate([text, c.reshape(-1)])]
    return ops.rope_angles(positions, axes_dims, ROPE_THETA)


def traced_rope_tables(x, text, axes_dims: tuple[int, ...]):
    """The same tables, ``[B, L + M, K/2]``, computed in the graph from the shapes of ``x``
    ``[B, H, W, C]`` and ``text`` ``[B, L, J]``, for an export with symbolic ``H`` and ``W``:
    row and column numbers are counted (cumulative sums of ones, packed like the latents)
    because jax2onnx 0.17 cannot broadcast an ``arange`` to a symbolic shape."""
    ones = jnp.ones_like(x[..., :1], dtype=jnp.float32)  # [B, H, W, 1]
    rows = pack(jnp.cumsum(ones, axis=1) - 1)[..., 0] / 2  # [B, M]: the token's patch row
    cols = pack(jnp.cumsum(ones, axis=2) - 1)[..., 0] / 2
    zeros = jnp.zeros_like(text[..., 0], dtype=jnp.float32)  # [B, L]
    rows, cols = jax.lax.concatenate([zeros, rows], 1), jax.lax.concatenate([zeros, cols], 1)
    return ops.rope_angles([jnp.zeros_like(rows), rows, cols], axes_dims, ROPE_THETA)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over ``[text; image]`` tokens: attention and MLP side by side."""

    def __init__(self, cfg: FluxConfig):
        d = cfg.inner_dim
        self.norm = layers.AdaLayerNormZero(d, 3)
        self.proj_mlp = layers.Linear(d, 4 * d)
        self.attn = layers.Attention(d, cfg.num_attention_heads, qkv_bias=True, qk_norm="rms_norm", pre_only=True)
        self.proj_out = layers.Linear(5 * d, d)

    def __call__(self, h, temb, rope):  # [B, L+M, D], [B, D] -> [B, L+M, D]
        normed, (gate,) = self.norm(h, temb)
        # one projection call for the MLP's input and the attention's q/k/v: static FP8 scales
        # quantize ``normed`` once for the four (layers.project), as bf16 reads it once. The MLP
        # first, as before: XLA's DotMerger merges products greedily in program order (the
        # other order compiles dynamic FP8 Flux-dev to 38 more GEMMs)
        attn = self.attn
        mlp, q, k, v = layers.project(normed, self.proj_mlp, attn.to_q, attn.to_k, attn.to_v)
        mlp = jax.nn.gelu(mlp, approximate=True)
        out = layers.linear_of_concat(self.proj_out, [attn(normed, rope=rope, qkv=(q, k, v)), mlp])
        return layers.clip_f16(h + gate[:, None] * out)


# ---------------------------------------------------------------------------------------------
# Root
# ---------------------------------------------------------------------------------------------


class FluxTransformer2DModel(nnx.Module):
    """Flux velocity network. ``__call__`` mirrors diffusers' forward on packed tokens."""

    def __init__(self, config: FluxConfig):
        d = config.inner_dim
        self.config = config
        self.x_embedder = layers.Linear(config.in_channels, d)
        self.time_text_embed = layers.TimeTextEmbedding(d, config.pooled_projection_dim,
                                                        guidance=config.guidance_embeds)
        self.context_embedder = layers.Linear(config.joint_attention_dim, d)
        # the double-stream blocks: the joint block SD3 has too, with qk RMSNorm and rotary positions
        self.transformer_blocks = nnx.List([
            layers.JointTransformerBlock(d, config.num_attention_heads, qk_norm="rms_norm", clip_context_f16=True)
            for _ in range(config.num_layers)])
        self.single_transformer_blocks = nnx.List(
            [FluxSingleTransformerBlock(config) for _ in range(config.num_single_layers)])
        self.norm_out = layers.AdaLayerNormContinuous(d)
        self.proj_out = layers.Linear(d, config.in_channels)

    def __call__(self, tokens, encoder_hidden_states, pooled_projections, timestep, rope, guidance=None):
        """Args: ``[B, M, 4C]`` packed latents, ``[B, L, J]`` text tokens, ``[B, E]`` pooled text,
        ``[B]`` sigma, rotary ``(cos, sin)`` ``[L+M, K/2]``, ``[B]`` guidance scale or None.
        Returns the ``[B, M, 4C]`` velocity tokens."""
        dtype = self.proj_out.kernel.dtype
        x = self.x_embedder(tokens.astype(dtype))
        # diffusers casts to the model dtype before scaling by 1000 (bf16 rounds both)
        native = lambda v: (v.astype(dtype) * jnp.asarray(1000, dtype)).astype(jnp.float32)  # noqa: E731
        temb = self.time_text_embed(native(timestep), pooled_projections.astype(dtype),
                                    None if guidance is None else native(guidance))
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        x, context = layers.run_blocks(self.transformer_blocks, (x, context), temb, rope)
        n = context.shape[1]
        h = jax.lax.concatenate([context, x], 1)  # text first
        h = layers.run_blocks(self.single_transformer_blocks, h, temb, rope)
        return self.proj_out(self.norm_out(h[:, n:], temb))

    def velocity(self, x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        """The RF velocity at sigma ``t`` (``[B]``) for unpacked latents ``x`` (``[B, H, W, C]``).

        ``cond`` holds ``encoder_hidden_states`` ``[B, L, J]``, ``pooled_projections`` ``[B, E]``
        and, for guidance-distilled models (dev) only, ``guidance`` ``[B]`` (the guidance scale
        as diffusers' ``FluxPipeline`` passes it, e.g. 3.5).
        """
        cfg = self.config
        if cfg.guidance_embeds and "guidance" not in cond:
            raise ValueError("this Flux model is guidance-distilled (guidance_embeds=True): cond needs 'guidance' "
                             "[B], the guidance scale")
        if not cfg.guidance_embeds and "guidance" in cond:
            raise ValueError("this Flux model has no guidance embedding (guidance_embeds=False, e.g. schnell): "
                             "drop 'guidance' from cond")
        b, height, width, c = x.shape
        if isinstance(height, int) and isinstance(width, int) and (height % 2 or width % 2):
            raise ValueError(f"latent {height}x{width}: Flux packs 2x2 latents, height and width must be even")
        if c != cfg.latent_channels:
            raise ValueError(f"latent has {c} channels, the model takes {cfg.latent_channels}")
        text = cond["encoder_hidden_states"]
        if isinstance(height, int) and isinstance(width, int):
            rope = rope_tables(text.shape[1], height // 2, width // 2, cfg.axes_dims_rope)
        else:
            rope = traced_rope_tables(x, text, cfg.axes_dims_rope)
        v = self(pack(x), text, cond["pooled_projections"], timestep(t), rope, cond.get("guidance"))
        return unpack(v, height, width).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------


def _conditioning(c: FluxConfig, text_len: int) -> dict[str, tuple[int, ...]]:
    shapes = {"encoder_hidden_states": (text_len, c.joint_attention_dim),
              "pooled_projections": (c.pooled_projection_dim,)}
    if c.guidance_embeds:
        shapes["guidance"] = ()
    return shapes


FAMILY = Family(
    name="flux",
    kind="velocity",
    class_names=("FluxTransformer2DModel",),
    config_cls=FluxConfig,
    module_cls=FluxTransformer2DModel,
    component="transformer",
    keys=KeyMap(layouts=(flux_bfl.LAYOUT,)),
    lora_prefixes=("lora_unet_", "lora_transformer_"),
    timestep=timestep,
    latent_channels=lambda c: c.latent_channels,
    latent_multiple=lambda c: 2,
    latent_scale=8,
    default_latent=lambda c: 128,  # 1024^2 images
    profile_latent=lambda c: 256,  # 2048^2 images: an export profile's bound (rotary ids have no limit)
    conditioning=_conditioning,
    text_len=lambda c: 512 if c.guidance_embeds else 256,  # FluxPipeline's max_sequence_length: dev's, schnell's
    max_text_len=512,  # diffusers' max_sequence_length limit
    fp8_linears=r"^(single_)?transformer_blocks\.",  # every linear of both kinds of block
    float_linears=("proj_out",),  # __call__ takes its compute dtype from proj_out's kernel
    blocks=lambda c: {"transformer_blocks": c.num_layers, "single_transformer_blocks": c.num_single_layers},
    scan_blocks=r"^(single_)?transformer_blocks$",
)
