"""The Stable Diffusion 1.x/2.x UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX, NHWC.

Attribute names mirror the diffusers checkpoint keys (``down_blocks.0.attentions.0.
transformer_blocks.0.attn2.to_k``), so conversion is renaming plus kernel transposes. The
timestep is a ``[B]`` vector: one per element.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax import ops
from streamflow_jax.models import layers
from streamflow_jax.models.family import Family, KeyMap

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")


def timestep(t):
    """The UNet's integer training timestep ``int(t * 1000)`` of the sampler's time (``[B]``)."""
    return jnp.floor(t.astype(jnp.float32) * 1000)


UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True, slots=True)
class UNetConfig:
    """``UNet2DConditionModel`` fields this implementation covers; names as in ``config.json``."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # inference ignores it
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False  # attention logits already run in fp32 (ops.attention)

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("attention_head_dim", "num_attention_heads"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, name, tuple(int(i) for i in v))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types/up_block_types must have {n} entries like block_out_channels")
        for t in self.down_block_types:
            if t not in DOWN_BLOCKS:
                raise ValueError(f"unsupported: down_block_types entry {t!r} (supported: {', '.join(DOWN_BLOCKS)})")
        for t in self.up_block_types:
            if t not in UP_BLOCKS:
                raise ValueError(f"unsupported: up_block_types entry {t!r} (supported: {', '.join(UP_BLOCKS)})")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unsupported: mid_block_type={self.mid_block_type!r}")
        if self.act_fn != "silu":
            raise ValueError(f"unsupported: act_fn={self.act_fn!r}")
        if not isinstance(self.transformer_layers_per_block, int):
            raise ValueError("unsupported: per-block transformer_layers_per_block")
        if self.mid_block_scale_factor != 1:
            raise ValueError(f"unsupported: mid_block_scale_factor={self.mid_block_scale_factor}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers reads ``attention_head_dim`` as the head
        count when ``num_attention_heads`` is unset, a naming quirk kept for compatibility)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        return cls(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                   sample_size=96)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        self.norm1, self.norm2, self.norm3 = layers.LayerNorm(dim), layers.LayerNorm(dim), layers.LayerNorm(dim)
        self.attn1 = layers.Attention(dim, heads)
        self.attn2 = layers.Attention(dim, heads, context_dim=context_dim)
        self.ff = layers.FeedForward(dim, activation="geglu")

    def __call__(self, x, context):  # [B, M, D], [B, L, J]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out, plus residual."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int):
        self.norm = layers.GroupNorm(cfg.norm_num_groups, channels, 1e-6)
        self.linear_proj = cfg.use_linear_projection
        if self.linear_proj:
            make = lambda: layers.Linear(channels, channels)  # noqa: E731
        else:
            make = lambda: layers.Conv2d(channels, channels, 1)  # noqa: E731
        self.proj_in = make()
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(channels, heads, cfg.cross_attention_dim) for _ in range(cfg.transformer_layers_per_block)]
        )
        self.proj_out = make()

    def __call__(self, x, context):  # [B, H, W, C], [B, L, J]
        b, h, w, c = x.shape
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = y.reshape(b, h * w, c)
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c)
        if not self.linear_proj:
            y = self.proj_out(y)
        return y + x


class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D`` (without)."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, heads: int, *, attn: bool, downsample: bool):
        n, g, eps = cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([layers.ResnetBlock2D(cin if i == 0 else cout, cout, cfg.time_embed_dim, g, eps) for i in range(n)])
        self.attentions = nnx.List([Transformer2DModel(cfg, cout, heads) for _ in range(n)]) if attn else None
        self.downsamplers = nnx.List([layers.Downsample2D(cout, cfg.downsample_padding)]) if downsample else None

    def __call__(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock2D`` or ``UpBlock2D``: each resnet eats one skip connection."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, prev: int, heads: int, *, attn: bool, upsample: bool):
        n, g, eps = cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([
            layers.ResnetBlock2D((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, cfg.time_embed_dim, g, eps)
            for i in range(n)
        ])
        self.attentions = nnx.List([Transformer2DModel(cfg, cout, heads) for _ in range(n)]) if attn else None
        self.upsamplers = nnx.List([layers.Upsample2D(cout)]) if upsample else None

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            # lax.concatenate: jax2onnx 0.17 mis-checks jnp.concatenate on symbolic shapes
            x = resnet(jax.lax.concatenate([x, skips.pop()], 3), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, cfg: UNetConfig, channels: int, heads: int):
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([layers.ResnetBlock2D(channels, channels, cfg.time_embed_dim, g, eps) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(cfg, channels, heads)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


# ---------------------------------------------------------------------------------------------
# Root
# ---------------------------------------------------------------------------------------------


class UNet2DConditionModel(nnx.Module):
    """Noise-prediction UNet. ``__call__`` mirrors diffusers' forward in NHWC."""

    def __init__(self, config: UNetConfig):
        cfg = config
        self.config = cfg
        ch, heads = cfg.block_out_channels, cfg.heads
        self.conv_in = layers.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = layers.TimestepEmbedding(ch[0], cfg.time_embed_dim)
        down, cout = [], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            down.append(DownBlock(cfg, cin, cout, heads[i], attn=kind == "CrossAttnDownBlock2D",
                                  downsample=i < len(ch) - 1))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, ch[-1], heads[-1])
        up, rch, rheads = [], ch[::-1], heads[::-1]
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout = cout, rch[i]
            cin = rch[min(i + 1, len(ch) - 1)]
            up.append(UpBlock(cfg, cin, cout, prev, rheads[i], attn=kind == "CrossAttnUpBlock2D",
                              upsample=i < len(ch) - 1))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = layers.GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = layers.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def __call__(self, sample, timestep, encoder_hidden_states):
        """Args: ``[B, H, W, C]`` latent, ``[B]`` timesteps (0..999, may be fractional),
        ``[B, L, J]`` text states. Returns the ``[B, H, W, C_out]`` prediction."""
        dtype = self.conv_in.kernel.dtype
        cfg = self.config
        t_emb = ops.timestep_embedding(timestep, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                       downscale_freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(dtype))
        context = encoder_hidden_states.astype(dtype)
        x = self.conv_in(sample.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context)
            skips.extend(s)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            # upsample straight to the next skip's size (as diffusers' forward_upsample_size):
            # odd sizes work, and an exported graph keeps symbolic sizes equal
            size = skips[-n - 1].shape[1:3] if len(skips) > n else None
            x = block(x, skips[-n:], temb, context, size)
            skips = skips[:-n]
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------

# Every other field diffusers writes, with the only value implemented (its default): the
# SDXL/Kandinsky/ControlNet-era options that SD 1.x/2.x checkpoints leave unset.
IGNORABLE = {
    "center_input_sample": False, "only_cross_attention": False, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

FAMILY = Family(
    name="unet",
    kind="velocity",  # with an adapter (models.perflow) built from the pipeline's scheduler
    class_names=("UNet2DConditionModel",),
    config_cls=UNetConfig,
    module_cls=UNet2DConditionModel,
    component="unet",
    keys=KeyMap(ignorable=IGNORABLE),
    lora_prefixes=("lora_unet_",),
    predicts="noise",
    timestep=timestep,
    latent_channels=lambda c: c.in_channels,
    latent_scale=8,
    # any latent size: each level upsamples back to its skip's size, odd sizes included
    default_latent=lambda c: c.sample_size,
    max_latent=lambda c: 2 * c.sample_size,  # twice its training size (SD1.5: 1024^2 images)
    conditioning=lambda c, text_len: {"encoder_hidden_states": (text_len, c.cross_attention_dim)},
    text_len=lambda c: 77,
    # jax2onnx 0.17 cannot trace strided (downsampling) convolutions over symbolic sizes:
    # exported UNet graphs take one latent size each
    dynamic_spatial=False,
)
