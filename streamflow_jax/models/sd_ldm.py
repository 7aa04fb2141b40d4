"""The original LDM (CompVis/Stability) single-file layout of Stable Diffusion 1.x/2.x -> diffusers keys.

Written from the published layout (``ldm/modules/diffusionmodules/openaimodel.py``,
``ldm/modules/diffusionmodules/model.py``, ``ldm/modules/encoders/modules.py``). One file holds
the whole pipeline under three prefixes:

- ``model.diffusion_model.``: the UNet. Its blocks are numbered flat: ``input_blocks.0`` is the
  input conv, then for each level ``layers_per_block`` blocks (``.0`` a ResBlock, ``.1`` a
  SpatialTransformer on levels with attention) and, except on the last level, one block
  ``.0.op`` that downsamples; ``middle_block.{0,1,2}`` (res, attention, res);
  ``output_blocks`` have ``layers_per_block + 1`` blocks per level, the last of a level (but the
  top one) ending with an upsampler ``.conv`` after its ResBlock and attention (index 1 or 2).
  The ResBlock's ``in_layers``/``emb_layers``/``out_layers`` are Sequentials (norm, SiLU, conv...);
  the SpatialTransformer already uses diffusers' names (``proj_in``, ``transformer_blocks``...).
- ``first_stage_model.``: the VAE. ``encoder.down.N.block.M``, ``down.N.downsample``,
  ``mid.block_1/attn_1/block_2``, ``norm_out``; the decoder's ``up.N`` counts from the
  *lowest* resolution's output side, i.e. reversed against diffusers' ``up_blocks``. The mid
  attention's q/k/v/proj_out are 1x1 convs (``[C, C, 1, 1]``) where diffusers has linears.
- ``cond_stage_model.transformer.``: SD 1.x's CLIP text encoder, a transformers
  ``CLIPTextModel`` saved with its own keys (``text_model.*``). SD 2.x's OpenCLIP encoder
  (``cond_stage_model.model.*``) is a different layout, not mapped here.

The maps are pure functions of the key and of the diffusers config; a key they do not know
maps to ``None`` (the reader keeps it under its own name, and the planner reports it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip's layout (unsupported)
EMA_PREFIX = "model_ema."  # EMA copies of the UNet with flattened names (``model_ema.input_blocks00weight``)

# Buffers of LDM's top-level ``DDPM``/``LatentDiffusion`` (registered from the training noise
# schedule, or training-only): not weights of any component. The schedule comes from the
# pipeline directory's scheduler config instead. ``scale_factor`` is the VAE's latent scale,
# a buffer only when trained with ``scale_by_std``; the reader checks it against the VAE config.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",  # per-timestep loss weights (a parameter only with learn_logvar)
    "scale_factor",
})
# transformers < 4.31 saved CLIP's ``position_ids`` (an arange buffer) with the weights
CLIP_BUFFERS = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})


def is_non_weight(key: str) -> bool:
    """Whether a file key is a known LDM buffer that no component reads (full file key)."""
    return (key in SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX)
            or key.startswith(VAE_PREFIX + "loss.")  # LDM's autoencoder training loss (LPIPS, discriminator)
            or (key.startswith(CLIP_PREFIX) and key[len(CLIP_PREFIX):] in CLIP_BUFFERS))


# ---------------------------------------------------------------------------------------------
# Module tables: LDM module path -> (diffusers module path, renames below it)
# ---------------------------------------------------------------------------------------------

# The renames below a module: {LDM sub-module: diffusers sub-module}, each followed by
# ``.weight``/``.bias``; ``LEAF`` is a module holding the weight itself; ``SAME`` (None) keeps
# every name below (the SpatialTransformer, written with diffusers' names).
Inner = dict[str, str] | None
LEAF: Inner = {"": ""}
SAME: Inner = None
# openaimodel's ResBlock: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU, linear),
# out_layers = (GroupNorm, SiLU, Dropout, conv); skip_connection a 1x1 conv when widths differ
UNET_RESNET: Inner = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                      "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# model.py's ResnetBlock: diffusers kept the names but for the shortcut ("network in network")
VAE_RESNET: Inner = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "nin_shortcut": "conv_shortcut"}
# model.py's AttnBlock: GroupNorm and four 1x1 convs
VAE_ATTENTION: Inner = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

Table = dict[str, tuple[str, Inner]]


def _attention_levels(types) -> list[bool]:
    return [t.startswith("CrossAttn") for t in types]


def unet_table(config: dict) -> Table:
    """The UNet's modules for a diffusers ``UNet2DConditionModel`` config (``layers_per_block``,
    ``block_out_channels``, ``down_block_types``, ``up_block_types``)."""
    n = config.get("layers_per_block", 2)
    levels = len(config["block_out_channels"])
    down_attn = _attention_levels(config["down_block_types"])
    up_attn = _attention_levels(config["up_block_types"])
    table: Table = {
        "time_embed.0": ("time_embedding.linear_1", LEAF),  # time_embed = (linear, SiLU, linear)
        "time_embed.2": ("time_embedding.linear_2", LEAF),
        "input_blocks.0.0": ("conv_in", LEAF),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", SAME),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
        "out.0": ("conv_norm_out", LEAF),  # out = (GroupNorm, SiLU, conv)
        "out.2": ("conv_out", LEAF),
    }
    block = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(n):
            table[f"input_blocks.{block}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESNET)
            if down_attn[level]:
                table[f"input_blocks.{block}.1"] = (f"down_blocks.{level}.attentions.{j}", SAME)
            block += 1
        if level < levels - 1:  # a block of its own: Downsample, whose conv is called ``op``
            table[f"input_blocks.{block}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", LEAF)
            block += 1
    block = 0
    for level in range(levels):  # output_blocks run in diffusers' up_blocks order (deepest first)
        for j in range(n + 1):
            table[f"output_blocks.{block}.0"] = (f"up_blocks.{level}.resnets.{j}", UNET_RESNET)
            after = 1
            if up_attn[level]:
                table[f"output_blocks.{block}.1"] = (f"up_blocks.{level}.attentions.{j}", SAME)
                after = 2
            if j == n and level < levels - 1:  # Upsample follows the level's last res (+ attention)
                table[f"output_blocks.{block}.{after}.conv"] = (f"up_blocks.{level}.upsamplers.0.conv", LEAF)
            block += 1
    return table


def vae_table(config: dict) -> Table:
    """The VAE's modules for a diffusers ``AutoencoderKL`` config (``layers_per_block``,
    ``block_out_channels``)."""
    n = config.get("layers_per_block", 2)
    levels = len(config["block_out_channels"])
    table: Table = {"quant_conv": ("quant_conv", LEAF), "post_quant_conv": ("post_quant_conv", LEAF)}
    for side in ("encoder", "decoder"):
        table.update({
            f"{side}.conv_in": (f"{side}.conv_in", LEAF),
            f"{side}.mid.block_1": (f"{side}.mid_block.resnets.0", VAE_RESNET),
            f"{side}.mid.attn_1": (f"{side}.mid_block.attentions.0", VAE_ATTENTION),
            f"{side}.mid.block_2": (f"{side}.mid_block.resnets.1", VAE_RESNET),
            f"{side}.norm_out": (f"{side}.conv_norm_out", LEAF),
            f"{side}.conv_out": (f"{side}.conv_out", LEAF),
        })
    for i in range(levels):
        for j in range(n):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", LEAF)
    for k in range(levels):  # diffusers' up_blocks.k is LDM's up.(levels-1-k): LDM numbers by resolution
        i = levels - 1 - k
        for j in range(n + 1):
            table[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{k}.resnets.{j}", VAE_RESNET)
        if i > 0:  # every level but the highest resolution upsamples
            table[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{k}.upsamplers.0.conv", LEAF)
    return table


def rename(key: str, table: Table) -> str | None:
    """An LDM key (component prefix stripped) -> its diffusers key, or None if unknown.

    The longest module path of ``key`` found in ``table`` decides; below it, the table's
    renames (or none, for ``SAME``)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head not in table:
            continue
        target, inner = table[head]
        rest = ".".join(parts[cut:])
        if inner is SAME:
            return f"{target}.{rest}"
        module, _, leaf = rest.rpartition(".")
        if leaf not in ("weight", "bias") or module not in inner:
            return None
        return ".".join(p for p in (target, inner[module], leaf) if p)
    return None


def clip_key(key: str) -> str | None:
    """A CLIP key below ``cond_stage_model.transformer.``: transformers' own names already
    (``text_model.encoder.layers.0.self_attn.q_proj.weight``; the CLIP family adds a missing
    ``text_model.``). Its ``position_ids`` buffer is dropped before (``is_non_weight``)."""
    return key


_VAE_CONV_AS_LINEAR = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def linear_from_conv(diffusers_key: str) -> bool:
    """Whether the LDM tensor behind this VAE key is a 1x1 conv ``[C, C, 1, 1]`` that diffusers
    stores as a linear ``[C, C]`` (the mid attention's projections)."""
    return bool(_VAE_CONV_AS_LINEAR.match(diffusers_key))


def component_maps(configs: dict[str, dict]) -> dict[str, tuple[str, Callable[[str], str | None]]]:
    """``{component: (file prefix, LDM key below it -> diffusers key or None)}`` for the
    components whose diffusers configs are given (``unet``, ``vae``, ``text_encoder``)."""
    maps = {}
    if "unet" in configs:
        table = unet_table(configs["unet"])
        maps["unet"] = (UNET_PREFIX, lambda k, t=table: rename(k, t))
    if "vae" in configs:
        table = vae_table(configs["vae"])
        maps["vae"] = (VAE_PREFIX, lambda k, t=table: rename(k, t))
    if "text_encoder" in configs:
        maps["text_encoder"] = (CLIP_PREFIX, clip_key)
    return maps
