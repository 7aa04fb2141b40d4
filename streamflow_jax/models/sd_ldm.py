"""The original LDM (CompVis/Stability) and SGM single-file layouts of Stable Diffusion 1.x/2.x
and SDXL -> diffusers keys.

Written from the published layouts (``ldm/modules/diffusionmodules/openaimodel.py``,
``ldm/modules/diffusionmodules/model.py``, ``ldm/modules/encoders/modules.py``, and SGM's
``sgm/modules/encoders/modules.py`` for SDXL). One file holds the whole pipeline, each
component under its prefix (its ``Slot``):

- ``model.diffusion_model.``: the UNet. Its blocks are numbered flat: ``input_blocks.0`` is the
  input conv, then for each level ``layers_per_block`` blocks (``.0`` a ResBlock, ``.1`` a
  SpatialTransformer on levels with attention) and, except on the last level, one block
  ``.0.op`` that downsamples; ``middle_block.{0,1,2}`` (res, attention, res);
  ``output_blocks`` have ``layers_per_block + 1`` blocks per level, the last of a level (but the
  top one) ending with an upsampler ``.conv`` after its ResBlock and attention (index 1 or 2).
  The ResBlock's ``in_layers``/``emb_layers``/``out_layers`` are Sequentials (norm, SiLU, conv...);
  the SpatialTransformer already uses diffusers' names (``proj_in``, ``transformer_blocks``...,
  as many blocks as SDXL's ``transformer_layers_per_block`` says). SDXL's added embedding of the
  pooled text and the size/crop ids (diffusers' ``add_embedding``, ``text_time``) is
  ``label_emb.0`` = (linear, SiLU, linear).
- ``first_stage_model.``: the VAE. ``encoder.down.N.block.M``, ``down.N.downsample``,
  ``mid.block_1/attn_1/block_2``, ``norm_out``; the decoder's ``up.N`` counts from the
  *lowest* resolution's output side, i.e. reversed against diffusers' ``up_blocks``. The mid
  attention's q/k/v/proj_out are 1x1 convs (``[C, C, 1, 1]``) where diffusers has linears.
- the text encoders: SD 1.x's CLIP-L, a transformers ``CLIPTextModel`` saved with its own keys
  (``cond_stage_model.transformer.text_model.*``); SD 2.x's OpenCLIP-H in open_clip's layout
  (``cond_stage_model.model.*``, see ``models/open_clip.py``); SDXL's two, CLIP-L
  (``conditioner.embedders.0.transformer.*``, transformers' keys) and OpenCLIP bigG
  (``conditioner.embedders.1.model.*``, open_clip's), and the SDXL refiner's bigG alone
  (``conditioner.embedders.0.model.*``).

The maps are pure functions of the key, its shape and the diffusers config: each file tensor
becomes a list of ``(diffusers key, how)`` parts; a known tensor that no component reads maps
to ``[]``, and a key they do not know to ``None`` (the reader keeps it under its own name, and
the planner reports it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from streamflow_jax.models import open_clip
from streamflow_jax.models.open_clip import TRANSPOSED, Part

CONV_AS_LINEAR = "conv as linear"  # a 1x1 conv [C, C, 1, 1] that diffusers stores as a linear [C, C]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one pipeline component sits in a single file.

    Attributes:
        prefix: its keys' prefix.
        component: the diffusers pipeline component it becomes (its config comes from there).
        layout: ``"unet"``, ``"vae"``, ``"clip"`` (transformers' own keys) or ``"open_clip"``.
        classes: the diffusers/transformers classes the component may be.
    """

    prefix: str
    component: str
    layout: str
    classes: tuple[str, ...]


_CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
UNET = Slot("model.diffusion_model.", "unet", "unet", ("UNet2DConditionModel",))
SLOTS = (
    UNET,
    Slot("first_stage_model.", "vae", "vae", ("AutoencoderKL",)),
    Slot("cond_stage_model.transformer.", "text_encoder", "clip", _CLIP_CLASSES),  # SD 1.x: CLIP-L
    Slot("cond_stage_model.model.", "text_encoder", "open_clip", _CLIP_CLASSES),  # SD 2.x: OpenCLIP-H
    Slot("conditioner.embedders.0.transformer.", "text_encoder", "clip", _CLIP_CLASSES),  # SDXL: CLIP-L
    Slot("conditioner.embedders.1.model.", "text_encoder_2", "open_clip", _CLIP_CLASSES),  # SDXL: bigG
    Slot("conditioner.embedders.0.model.", "text_encoder_2", "open_clip", _CLIP_CLASSES),  # SDXL refiner: bigG
)
EMA_PREFIX = "model_ema."  # EMA copies of the UNet with flattened names (``model_ema.input_blocks00weight``)

# Buffers of LDM's top-level ``DDPM``/``LatentDiffusion`` and SGM's ``DiffusionEngine``
# (registered from the training noise schedule, or training-only): not weights of any
# component. The schedule comes from the pipeline directory's scheduler config instead.
# ``scale_factor`` is the VAE's latent scale, a buffer only when trained with ``scale_by_std``;
# the reader checks it against the VAE config.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",  # per-timestep loss weights (a parameter only with learn_logvar)
    "scale_factor",
    "denoiser.sigmas",  # SGM's DiscreteDenoiser: the training sigmas
})
# transformers < 4.31 saved CLIP's ``position_ids`` (an arange buffer) with the weights
CLIP_BUFFERS = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})
VAE_LOSS = "loss."  # LDM's autoencoder training loss (LPIPS, discriminator) below first_stage_model.


def is_non_weight(key: str) -> bool:
    """Whether a file key outside every slot is a known buffer that no component reads."""
    return key in SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX)



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
    if config.get("addition_embed_type") == "text_time":  # SDXL: label_emb.0 = (linear, SiLU, linear)
        table["label_emb.0.0"] = ("add_embedding.linear_1", LEAF)
        table["label_emb.0.2"] = ("add_embedding.linear_2", LEAF)
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


_VAE_CONV_AS_LINEAR = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
Parts = Callable[[str, tuple[int, ...]], "list[Part] | None"]


def _table_parts(table: Table, conv_as_linear=None) -> Parts:
    def parts(key: str, shape: tuple[int, ...]) -> list[Part] | None:
        new = rename(key, table)
        if new is None:
            return None
        return [(new, CONV_AS_LINEAR if conv_as_linear and conv_as_linear.match(new) else None)]
    return parts


def _vae_parts(config: dict) -> Parts:
    renamed = _table_parts(vae_table(config), _VAE_CONV_AS_LINEAR)
    return lambda key, shape: [] if key.startswith(VAE_LOSS) else renamed(key, shape)


def _clip_parts(key: str, shape: tuple[int, ...]) -> list[Part] | None:
    """transformers' own names already (``text_model.encoder.layers.0.self_attn.q_proj.weight``;
    the CLIP family adds a missing ``text_model.``); the ``position_ids`` buffer is not read."""
    return [] if key in CLIP_BUFFERS else [(key, None)]


def _open_clip_parts(config: dict) -> Parts:
    layers = config.get("num_hidden_layers", 12)
    projection = (config.get("architectures") or ["CLIPTextModel"])[0] == "CLIPTextModelWithProjection"
    return lambda key, shape: open_clip.parts(key, shape, num_hidden_layers=layers, with_projection=projection)


def slot_parts(slot: Slot, config: dict) -> Parts:
    """``(key below the slot's prefix, shape) -> [(diffusers key, how)]`` (``[]``: not read,
    ``None``: unknown) for a component whose raw diffusers/transformers config is ``config``.
    ``how``: None (as is), rows (a slice), ``TRANSPOSED`` or ``CONV_AS_LINEAR``."""
    if slot.layout == "unet":
        return _table_parts(unet_table(config))
    if slot.layout == "vae":
        return _vae_parts(config)
    if slot.layout == "clip":
        return _clip_parts
    return _open_clip_parts(config)

