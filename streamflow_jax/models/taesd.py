"""TAESD, the tiny SD autoencoder (diffusers' ``AutoencoderTiny``), in Flax NNX, NHWC.

diffusers builds it from ``nn.Sequential`` lists, so the checkpoint keys are positional
(``decoder.layers.3.conv.2``); the lists below keep parameter-free entries (activations,
upsampling) at their positions to keep the keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax.models.family import Family
from streamflow_jax.models.layers import Conv2d, upsample_nearest2x


@dataclasses.dataclass(frozen=True, slots=True)
class TinyConfig:
    """``AutoencoderTiny`` fields; names as in ``config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    block_out_channels: tuple[int, ...] | None = None  # diffusers records the decoder's here too

    def __post_init__(self):
        for name in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                     "num_decoder_blocks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.block_out_channels is not None:
            object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
            if self.block_out_channels != self.decoder_block_out_channels:
                raise ValueError(f"block_out_channels={self.block_out_channels} differs from "
                                 f"decoder_block_out_channels={self.decoder_block_out_channels}")
        if self.act_fn != "relu":
            raise ValueError(f"unsupported: act_fn={self.act_fn!r}")
        if self.upsample_fn != "nearest" or self.upsampling_scaling_factor != 2:
            raise ValueError(f"unsupported: upsample_fn={self.upsample_fn!r} x{self.upsampling_scaling_factor}")
        if len(self.encoder_block_out_channels) != len(self.num_encoder_blocks) or \
                len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
            raise ValueError("block_out_channels and num_blocks lengths differ")


class Op(nnx.Module):
    """A parameter-free layer kept at its ``nn.Sequential`` position: relu or 2x nearest upsampling."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, x):
        return jax.nn.relu(x) if self.kind == "relu" else upsample_nearest2x(x)


class TinyBlock(nnx.Module):
    def __init__(self, cin: int, cout: int):
        self.conv = nnx.List([Conv2d(cin, cout, 3, padding=1), Op("relu"), Conv2d(cout, cout, 3, padding=1),
                              Op("relu"), Conv2d(cout, cout, 3, padding=1)])
        self.skip = Conv2d(cin, cout, 1, bias=False) if cin != cout else None

    def __call__(self, x):
        y = x
        for layer in self.conv:
            y = layer(y)
        return jax.nn.relu(y + (self.skip(x) if self.skip is not None else x))


class Sequential(nnx.Module):
    def __init__(self, layers: list):
        self.layers = nnx.List(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _encoder(cfg: TinyConfig) -> Sequential:
    layers, ch = [], cfg.encoder_block_out_channels
    for i, n in enumerate(cfg.num_encoder_blocks):
        layers.append(Conv2d(cfg.in_channels, ch[0], 3, padding=1) if i == 0
                      else Conv2d(ch[i], ch[i], 3, stride=2, padding=1, bias=False))
        layers += [TinyBlock(ch[i], ch[i]) for _ in range(n)]
    layers.append(Conv2d(ch[-1], cfg.latent_channels, 3, padding=1))
    return Sequential(layers)


def _decoder(cfg: TinyConfig) -> Sequential:
    ch = cfg.decoder_block_out_channels
    layers = [Conv2d(cfg.latent_channels, ch[0], 3, padding=1), Op("relu")]
    for i, n in enumerate(cfg.num_decoder_blocks):
        final = i == len(ch) - 1
        layers += [TinyBlock(ch[i], ch[i]) for _ in range(n)]
        if not final:
            layers.append(Op("upsample"))
        layers.append(Conv2d(ch[i], cfg.out_channels if final else ch[i], 3, padding=1, bias=final))
    return Sequential(layers)


class AutoencoderTiny(nnx.Module):
    def __init__(self, config: TinyConfig):
        self.config = config
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)

    def encode(self, images):
        """``[B, H, W, 3]`` images in [-1, 1] -> ``[B, H/8, W/8, C]`` latents (unscaled)."""
        dtype = self.encoder.layers[0].kernel.dtype
        return self.encoder((images.astype(dtype) + 1) / 2)

    def decode(self, z):
        """``[B, h, w, C]`` latents -> ``[B, 8h, 8w, 3]`` images, about [-1, 1]."""
        z = z.astype(self.decoder.layers[0].kernel.dtype)
        return self.decoder(jnp.tanh(z / 3) * 3) * 2 - 1

    def encode_latents(self, images):
        return (self.encode(images) - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents):
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------


def scale_factor(c: TinyConfig) -> int:
    """Image pixels per latent pixel: one 2x upsampling between decoder blocks."""
    return 2 ** (len(c.decoder_block_out_channels) - 1)


FAMILY = Family(
    name="taesd",
    kind="autoencoder",
    class_names=("AutoencoderTiny",),
    config_cls=TinyConfig,
    module_cls=AutoencoderTiny,
    component="vae",
    latent_channels=lambda c: c.latent_channels,
    default_latent=lambda c: 64,  # SD1.5's 512^2 images
    scale_factor=scale_factor,
    image_channels=lambda c: c.out_channels,
)
