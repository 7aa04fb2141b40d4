"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX, NHWC: SD 1.x/2.x
and SDXL (``addition_embed_type="text_time"``: the pooled text embedding and the
micro-conditioning time ids added to the timestep embedding).

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
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
ADDITION_EMBED_TYPES = (None, "text_time")
# SDXL's micro-conditioning: original size (h, w), crop top-left (y, x), target size (h, w).
# The UNet config gives only their sum with the pooled text width
# (projection_class_embeddings_input_dim = text + TIME_IDS * addition_time_embed_dim), so the
# split is SDXL's text-to-image one (the refiner's 5 ids with an aesthetic score are not read).
TIME_IDS = 6


def timestep(t):
    """The UNet's integer training timestep ``int(t * 1000)`` of the sampler's time (``[B]``)."""
    return jnp.floor(t.astype(jnp.float32) * 1000)


def _ints(value, what: str):
    """An int, or a (nested) list/tuple of ints as a tuple (hashable: the config is static data)."""
    if isinstance(value, (list, tuple)):
        return tuple(_ints(v, what) for v in value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: {value!r} is not an integer")
    return value


def _per(value, n: int, what: str) -> tuple:
    """An int for every entry, or one entry each: ``n`` entries."""
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries, expected {n} (one per block)")
    return tuple(value)


@dataclasses.dataclass(frozen=True, slots=True)
class UNetConfig:
    """``UNet2DConditionModel`` fields this implementation covers; names as in ``config.json``.

    ``layers_per_block`` and ``transformer_layers_per_block`` take diffusers' forms: an int, one
    per block, and (transformer layers) one per resnet layer, the up blocks' then given by
    ``reverse_transformer_layers_per_block`` (as diffusers requires).
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # inference ignores it
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # attention logits already run in fp32 (ops.attention)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("attention_head_dim", "num_attention_heads", "layers_per_block", "transformer_layers_per_block",
                     "reverse_transformer_layers_per_block"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _ints(v, name))
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
        if self.mid_block_scale_factor != 1:
            raise ValueError(f"unsupported: mid_block_scale_factor={self.mid_block_scale_factor}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"unsupported: addition_embed_type={self.addition_embed_type!r} (supported: None, "
                             "'text_time')")
        if self.addition_embed_type == "text_time":
            if not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim:
                raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
            if self.text_embeds_dim < 1:
                raise ValueError(f"projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} "
                                 f"leaves no room for a pooled text embedding beside {TIME_IDS} time ids x "
                                 f"{self.addition_time_embed_dim}")
        self.down_layers, self.up_layers, self.mid_layers  # noqa: B018 (checks the layer counts)

    # -- per-block facts, in diffusers' forms ----------------------------------------------------

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers reads ``attention_head_dim`` as the head
        count when ``num_attention_heads`` is unset, a naming quirk kept for compatibility)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per(h, len(self.block_out_channels), "attention heads")

    @property
    def resnets_per_block(self) -> tuple[int, ...]:
        """Resnet layers of each down block (each up block has one more)."""
        return _per(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

    def _transformer_layers(self) -> tuple:
        return _per(self.transformer_layers_per_block, len(self.block_out_channels), "transformer_layers_per_block")

    @property
    def down_layers(self) -> tuple[tuple[int, ...], ...]:
        """Transformer layers of each attention of each down block."""
        out = []
        for i, (entry, n) in enumerate(zip(self._transformer_layers(), self.resnets_per_block)):
            if isinstance(entry, tuple) and self.reverse_transformer_layers_per_block is None:
                raise ValueError("transformer_layers_per_block per layer needs reverse_transformer_layers_per_block "
                                 "(as diffusers requires)")
            out.append(_per(entry, n, f"transformer_layers_per_block[{i}]"))
        return tuple(out)

    @property
    def up_layers(self) -> tuple[tuple[int, ...], ...]:
        """Transformer layers of each attention of each up block (deepest first): the down
        blocks' in reverse, or ``reverse_transformer_layers_per_block``."""
        n_up = [n + 1 for n in self.resnets_per_block[::-1]]
        given = self.reverse_transformer_layers_per_block
        per_block = self._transformer_layers()[::-1] if given is None else _per(
            given, len(n_up), "reverse_transformer_layers_per_block")
        return tuple(_per(entry, n, f"reverse_transformer_layers_per_block[{i}]")
                     for i, (entry, n) in enumerate(zip(per_block, n_up)))

    @property
    def mid_layers(self) -> int:
        """Transformer layers of the mid block's one attention: the last block's (its first
        layer's, given per layer), as diffusers builds it."""
        last = self._transformer_layers()[-1]
        return last if isinstance(last, int) else last[0]

    def block_counts(self) -> dict[str, int]:
        """The numbered module lists of diffusers' layout and how many entries the config asks
        for each (``Family.blocks``): levels, resnets and attentions per level, transformer
        blocks per attention."""
        counts = {"down_blocks": len(self.down_block_types), "up_blocks": len(self.up_block_types)}
        levels = (("down_blocks", self.down_block_types, self.resnets_per_block, self.down_layers),
                  ("up_blocks", self.up_block_types, [n + 1 for n in self.resnets_per_block[::-1]], self.up_layers))
        for name, types, resnets, depths in levels:
            for i, (kind, n, per_attention) in enumerate(zip(types, resnets, depths)):
                counts[f"{name}.{i}.resnets"] = n
                if kind.startswith("CrossAttn"):
                    counts[f"{name}.{i}.attentions"] = n
                    for j, depth in enumerate(per_attention):
                        counts[f"{name}.{i}.attentions.{j}.transformer_blocks"] = depth
        counts["mid_block.attentions.0.transformer_blocks"] = self.mid_layers
        return counts

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def text_embeds_dim(self) -> int | None:
        """SDXL: the width of the pooled ``text_embeds`` (CLIP-G's projection, 1280); else None."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim

    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        return cls(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                   sample_size=96)

    @classmethod
    def sdxl(cls) -> UNetConfig:
        return cls(sample_size=128, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), block_out_channels=(320, 640, 1280),
                   cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                   use_linear_projection=True, upcast_attention=None, addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


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
    """GroupNorm -> proj_in (1x1 conv or linear) -> ``depth`` transformer blocks -> proj_out,
    plus the residual."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int, depth: int):
        self.norm = layers.GroupNorm(cfg.norm_num_groups, channels, 1e-6)
        self.linear_proj = cfg.use_linear_projection
        if self.linear_proj:
            make = lambda: layers.Linear(channels, channels)  # noqa: E731
        else:
            make = lambda: layers.Conv2d(channels, channels, 1)  # noqa: E731
        self.proj_in = make()
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(channels, heads, cfg.cross_attention_dim) for _ in range(depth)])
        self.proj_out = make()

    def __call__(self, x, context):  # [B, H, W, C], [B, L, J]
        b, h, w, c = x.shape
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = y.reshape(b, h * w, c)
        if self.linear_proj:
            y = self.proj_in(y)
        y = layers.run_blocks(self.transformer_blocks, y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, c)
        if not self.linear_proj:
            y = self.proj_out(y)
        return y + x


class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``, ``depths[i]`` transformer layers each) or
    ``DownBlock2D`` (without)."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, heads: int, depths: tuple[int, ...], *, attn: bool,
                 downsample: bool):
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([layers.ResnetBlock2D(cin if i == 0 else cout, cout, cfg.time_embed_dim, g, eps)
                                 for i in range(len(depths))])
        self.attentions = nnx.List([Transformer2DModel(cfg, cout, heads, d) for d in depths]) if attn else None
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

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, prev: int, heads: int, depths: tuple[int, ...], *,
                 attn: bool, upsample: bool):
        n, g, eps = len(depths), cfg.norm_num_groups, cfg.norm_eps
        ins = [(prev if i == 0 else cout) + (cin if i == n - 1 else cout) for i in range(n)]
        self.resnets = nnx.List([layers.ResnetBlock2D(c, cout, cfg.time_embed_dim, g, eps) for c in ins])
        self.attentions = nnx.List([Transformer2DModel(cfg, cout, heads, d) for d in depths]) if attn else None
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
    def __init__(self, cfg: UNetConfig, channels: int, heads: int, depth: int):
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([layers.ResnetBlock2D(channels, channels, cfg.time_embed_dim, g, eps)
                                 for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(cfg, channels, heads, depth)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def time_ids_embedding(cfg: UNetConfig, time_ids):  # [B, N] -> [B, N * A] float32
    """SDXL's ``add_time_proj``: each micro-conditioning id's sinusoidal embedding, side by side
    (diffusers flattens the ids, embeds them and reshapes back to ``[B, N * A]``)."""
    embed = lambda ids: ops.timestep_embedding(  # noqa: E731  [N] -> [N * A]
        ids, cfg.addition_time_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
        downscale_freq_shift=cfg.freq_shift).reshape(-1)
    return jax.vmap(embed)(time_ids.astype(jnp.float32))


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
        # SDXL: the pooled text and the time ids' embeddings (add_time_proj, no weights) -> linear,
        # SiLU, linear, added to the timestep embedding
        self.add_embedding = (layers.TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
                              if cfg.addition_embed_type == "text_time" else None)
        down, cout = [], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            down.append(DownBlock(cfg, cin, cout, heads[i], cfg.down_layers[i], attn=kind == "CrossAttnDownBlock2D",
                                  downsample=i < len(ch) - 1))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, ch[-1], heads[-1], cfg.mid_layers)
        up, rch, rheads = [], ch[::-1], heads[::-1]
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout = cout, rch[i]
            cin = rch[min(i + 1, len(ch) - 1)]
            up.append(UpBlock(cfg, cin, cout, prev, rheads[i], cfg.up_layers[i], attn=kind == "CrossAttnUpBlock2D",
                              upsample=i < len(ch) - 1))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = layers.GroupNorm(cfg.norm_num_groups, ch[0], cfg.norm_eps)
        self.conv_out = layers.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def __call__(self, sample, timestep, encoder_hidden_states, *, text_embeds=None, time_ids=None):
        """Args: ``[B, H, W, C]`` latent, ``[B]`` timesteps (0..999, may be fractional),
        ``[B, L, J]`` text states; SDXL (``text_time``) also ``text_embeds`` ``[B, E]`` (the
        pooled text) and ``time_ids`` ``[B, 6]``. Returns the ``[B, H, W, C_out]`` prediction."""
        dtype = self.conv_in.kernel.dtype
        cfg = self.config
        t_emb = ops.timestep_embedding(timestep, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                       downscale_freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
            # lax.concatenate: jax2onnx 0.17 mis-checks jnp.concatenate on symbolic shapes
            added = jax.lax.concatenate([text_embeds.astype(dtype), time_ids_embedding(cfg, time_ids).astype(dtype)], 1)
            temb = temb + self.add_embedding(added)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given to a UNet without added conditions (not SDXL)")
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


def conditioning(c: UNetConfig, text_len: int) -> dict[str, tuple[int, ...]]:
    """The text states; SDXL's pooled text embedding and micro-conditioning time ids besides."""
    cond = {"encoder_hidden_states": (text_len, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":
        cond.update(text_embeds=(c.text_embeds_dim,), time_ids=(TIME_IDS,))
    return cond


def ldm_lora_names(c: UNetConfig) -> dict[str, str]:
    """The UNet's modules in the original LDM/SGM layout (``input_blocks.4.1``, ``middle_block``,
    ``output_blocks``, ``label_emb.0.0``), which kohya's SDXL LoRAs name (kohya trains SDXL on
    that UNet) -> their diffusers names; entries ending in ``.`` stand for everything below."""
    from streamflow_jax.models import sd_ldm  # the layout's tables (a models file that may read this one)

    if not isinstance(c.layers_per_block, int):
        return {}  # the published layout numbers blocks with one count for every level
    table = sd_ldm.unet_table({"layers_per_block": c.layers_per_block, "block_out_channels": c.block_out_channels,
                               "down_block_types": c.down_block_types, "up_block_types": c.up_block_types})
    if c.addition_embed_type == "text_time":  # label_emb.0 = (linear, SiLU, linear)
        table.setdefault("label_emb.0.0", ("add_embedding.linear_1", sd_ldm.LEAF))
        table.setdefault("label_emb.0.2", ("add_embedding.linear_2", sd_ldm.LEAF))
    names = {}
    for ldm, (ours, inner) in table.items():
        if inner is sd_ldm.SAME:
            names[f"{ldm}."] = f"{ours}."
        else:
            names.update({".".join(p for p in (ldm, a) if p): ".".join(p for p in (ours, b) if p)
                          for a, b in inner.items()})
    return names


# Every other field diffusers writes, with the only value implemented (its default): the
# Kandinsky/ControlNet/UniDiffuser-era options that SD 1.x/2.x and SDXL checkpoints leave unset.
IGNORABLE = {
    "center_input_sample": False, "only_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}

FAMILY = Family(
    name="unet",
    kind="velocity",  # with an adapter (models.perflow) built from the pipeline's scheduler
    class_names=("UNet2DConditionModel",),
    config_cls=UNetConfig,
    module_cls=UNet2DConditionModel,
    component="unet",
    # addition_embed_type_num_heads: only addition_embed_type="text" reads it (refused)
    keys=KeyMap(ignorable=IGNORABLE, any_value=frozenset({"addition_embed_type_num_heads"})),
    lora_prefixes=("lora_unet_",),
    lora_names=ldm_lora_names,
    predicts="noise",
    timestep=timestep,
    latent_channels=lambda c: c.in_channels,
    latent_scale=8,
    # any latent size: each level upsamples back to its skip's size, odd sizes included
    default_latent=lambda c: c.sample_size,
    # no limit (convolutions and attention take any size, as diffusers' UNet does); an export's
    # dynamic profile goes to twice its training size (SD1.5: 1024^2 images, SDXL: 2048^2)
    profile_latent=lambda c: 2 * c.sample_size,
    conditioning=conditioning,
    text_len=lambda c: 77,
    # jax2onnx 0.17 cannot trace strided (downsampling) convolutions over symbolic sizes:
    # exported UNet graphs take one latent size each
    dynamic_spatial=False,
    fp8_linears=r"\.transformer_blocks\.",  # the transformer blocks' linears (attention, GEGLU), not the convolutions
    scan_blocks=r"\.transformer_blocks$",  # SDXL's depth-10 transformers (SD1.5's have one block)
    blocks=lambda c: c.block_counts(),
)
