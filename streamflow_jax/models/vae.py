"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) in Flax NNX, NHWC.

4-channel (SD 1.x/2.x) and 16-channel (SD3, Flux) latents. ``encode`` returns the latent
distribution's mean, ``decode`` the image; ``encode_latents`` / ``decode_latents`` apply the
config's ``scaling_factor`` and ``shift_factor`` as the diffusers pipelines do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax.models import layers
from streamflow_jax.models.family import Family

EPS = 1e-6  # the VAE's norms (diffusers hard-codes it)


@dataclasses.dataclass(frozen=True, slots=True)
class VAEConfig:
    """``AutoencoderKL`` fields this implementation covers; names as in ``config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True  # float16 weights compute in float32 (see AutoencoderKL.compute_dtype)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"unsupported: down_block_types={self.down_block_types!r}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(f"unsupported: up_block_types={self.up_block_types!r}")
        if self.act_fn != "silu":
            raise ValueError(f"unsupported: act_fn={self.act_fn!r}")
        if self.latents_mean is not None or self.latents_std is not None:
            raise ValueError("unsupported: latents_mean/latents_std (per-channel latent statistics)")


class SpatialAttention(layers.Attention):
    """The VAE mid-block's single-head self-attention over pixels, with its own GroupNorm."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, 1, qkv_bias=True)
        self.group_norm = layers.GroupNorm(groups, channels, EPS)

    def __call__(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        return super().__call__(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c) + x


class MidBlock(nnx.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        g = cfg.norm_num_groups
        self.resnets = nnx.List([layers.ResnetBlock2D(channels, channels, None, g, EPS) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(channels, g)]) if cfg.mid_block_add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: VAEConfig, cin: int, cout: int, downsample: bool):
        g = cfg.norm_num_groups
        self.resnets = nnx.List([layers.ResnetBlock2D(cin if i == 0 else cout, cout, None, g, EPS)
                                 for i in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([layers.Downsample2D(cout, padding=0)]) if downsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: VAEConfig, cin: int, cout: int, upsample: bool):
        g = cfg.norm_num_groups
        self.resnets = nnx.List([layers.ResnetBlock2D(cin if i == 0 else cout, cout, None, g, EPS)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([layers.Upsample2D(cout)]) if upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig):
        ch = cfg.block_out_channels
        self.conv_in = layers.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nnx.List([EncoderBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1)
                                     for i in range(len(ch))])
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = layers.GroupNorm(cfg.norm_num_groups, ch[-1], EPS)
        self.conv_out = layers.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig):
        rch = cfg.block_out_channels[::-1]
        self.conv_in = layers.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, rch[0])
        self.up_blocks = nnx.List([DecoderBlock(cfg, rch[max(i - 1, 0)], rch[i], i < len(rch) - 1)
                                   for i in range(len(rch))])
        self.conv_norm_out = layers.GroupNorm(cfg.norm_num_groups, rch[-1], EPS)
        self.conv_out = layers.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, config: VAEConfig):
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = layers.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = layers.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def compute_dtype(self, weights_dtype):
        """The dtype the VAE computes in, given its weights': their own, but float32 for float16
        weights when the config says ``force_upcast`` (as diffusers' SDXL pipelines upcast the
        VAE). SDXL's VAE overflows float16 (activations past 65504 in the decoder give inf, then
        NaN after the next norm); the layers cast their weights to the activations' dtype, so
        float16 weights computing in float32 are exact and keep their memory. A VAE tuned to
        stay in range (``madebyollin/sdxl-vae-fp16-fix``: ``force_upcast: false``) runs in
        float16."""
        return jnp.float32 if weights_dtype == jnp.float16 and self.config.force_upcast else weights_dtype

    def encode(self, images):
        """``[B, H, W, 3]`` images in [-1, 1] -> ``[B, H/f, W/f, C]`` mean of the latent posterior."""
        dtype = self.compute_dtype(self.encoder.conv_in.kernel.dtype)
        moments = self.encoder(images.astype(dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[..., : self.config.latent_channels]

    def decode(self, z):
        """``[B, h, w, C]`` latents (unscaled) -> ``[B, h*f, w*f, 3]`` images, about [-1, 1]."""
        z = z.astype(self.compute_dtype(self.decoder.conv_in.kernel.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_latents(self, images):
        """Images -> latents as the diffusion model sees them: ``(mean - shift) * scale``."""
        shift = self.config.shift_factor or 0.0
        return (self.encode(images) - shift) * self.config.scaling_factor

    def decode_latents(self, latents):
        """Diffusion latents -> images: ``decode(latents / scale + shift)``."""
        return self.decode(latents / self.config.scaling_factor + (self.config.shift_factor or 0.0))


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------


def scale_factor(c: VAEConfig) -> int:
    """Image pixels per latent pixel: every block but the last halves the size."""
    return 2 ** (len(c.block_out_channels) - 1)


FAMILY = Family(
    name="vae",
    kind="autoencoder",
    class_names=("AutoencoderKL",),
    config_cls=VAEConfig,
    module_cls=AutoencoderKL,
    component="vae",
    latent_channels=lambda c: c.latent_channels,
    default_latent=lambda c: c.sample_size // scale_factor(c),
    scale_factor=scale_factor,
    image_channels=lambda c: c.out_channels,
)
