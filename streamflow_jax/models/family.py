"""The ``Family`` record: everything the outer layers know about an architecture, in one place.

Each model file declares one ``FAMILY = Family(...)`` next to its modules; ``models/__init__.py``
collects them. Converters, export specs, runners, pipelines and the CLI read only the record
(and the ``FlowModel`` helpers built on it), never a raw diffusers config field.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

KINDS = ("velocity", "autoencoder", "text_encoder")
PREDICTS = ("velocity", "noise")

# transformers' generic PretrainedConfig fields (file metadata, output switches, training and
# generation settings; older versions wrote them all): none changes an encoder's forward pass,
# so text-encoder families accept them with any value (``KeyMap.any_value``).
GENERIC_TRANSFORMERS_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "gradient_checkpointing", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "tie_word_embeddings", "is_encoder_decoder",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})


def identity(key: str) -> str:
    return key


Rows = slice | Sequence[int] | None  # which rows (axis 0) of a source tensor a part takes; None: all


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: one record per layout
class CheckpointLayout:
    """A published checkpoint layout other than diffusers' (a single file), mapped onto the
    diffusers keys, which the family's ``KeyMap`` then reads as usual.

    Attributes:
        name: short name for messages (``"bfl"``).
        detect: ``(keys) -> bool``: whether a file's keys (prefixes stripped) are this layout.
        config: ``(shapes) -> dict``: the diffusers ``config.json`` it implies, from the tensors'
            shapes (``_class_name`` included); fields it cannot infer are left out.
        parts: ``(key, shape) -> [(diffusers_key, rows), ...]``: the diffusers tensors one source
            tensor becomes (fused projections split by rows; ``rows`` may also reorder them).
        prefixes: key prefixes stripped before anything else.
        modules: ``(config) -> names`` of the layout's weight-bearing modules (no ``.weight``),
            so that files naming modules this way (kohya LoRAs for Flux) can be matched.
    """

    name: str
    detect: Callable[[set[str]], bool]
    config: Callable[[dict[str, tuple[int, ...]]], dict]
    parts: Callable[[str, tuple[int, ...]], list[tuple[str, Rows]]]
    prefixes: tuple[str, ...] = ()
    modules: Callable[[object], list[str]] = lambda config: []


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: one record per family
class KeyMap:
    """How a checkpoint directory's config and tensors become the module's.

    Tensor layout changes are generic: a checkpoint ``weight`` filling a module ``kernel`` is
    transposed (Linear ``[out, in] -> [in, out]``, Conv ``[O, I, kh, kw] -> [kh, kw, I, O]``);
    everything else keeps its layout.

    Attributes:
        rename: checkpoint key -> module parameter path (``weight`` may stand for ``kernel``).
        ignorable: config fields the module does not implement, each with the only value
            accepted (anything else stops conversion with ``unsupported: FIELD=VALUE``).
        any_value: config fields that never change the forward pass (training or generation
            settings), accepted with any value.
        weights: the (single file, shard index) names to read in a model directory.
        prepare_config: rewrites the raw config before it is parsed (derived fields).
        layouts: other published layouts (single files) that convert through this map.
    """

    rename: Callable[[str], str] = identity
    ignorable: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    any_value: frozenset[str] = frozenset()
    weights: tuple[str, str] = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    prepare_config: Callable[[dict], dict] | None = None
    layouts: tuple[CheckpointLayout, ...] = ()


# Logical axes of weights (for sharding): module names (the last part of a weight's path, before kernel/bias) by role
_QKV = re.compile(r"(^|\.)(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|q_proj|k_proj|v_proj|q|k|v)$")
_ATTN_OUT = re.compile(r"(^|\.)(to_out\.0|to_add_out|out_proj|o)$")
_MLP_IN = re.compile(r"(^|\.)(net\.0\.proj|fc1|wi_0|wi_1|proj_mlp)$")
_MLP_OUT = re.compile(r"(^|\.)(net\.2|fc2|wo)$|single_transformer_blocks\.\d+\.proj_out$")


def standard_logical_axes(path: str, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """The logical axes of a weight, from its module's role in diffusers/transformers naming.

    Linear kernels are ``[in, out]``, conv kernels ``[kh, kw, in, out]``, embeddings
    ``[vocab, D]``; vectors (biases, norm scales) get no name (replicated).
    """
    module, _, leaf = path.rpartition(".")
    if len(shape) <= 1:
        return (None,) * len(shape)
    if leaf == "kernel" and len(shape) == 2:
        if _QKV.search(module):
            return ("embed", "heads")
        if _ATTN_OUT.search(module):
            return ("heads", "embed")
        if _MLP_IN.search(module):
            return ("embed", "mlp")
        if _MLP_OUT.search(module):
            return ("mlp", "embed")
        return (None, "out")
    if leaf == "kernel" and len(shape) == 4:
        return (None, None, None, "out")
    if len(shape) == 2:  # embedding tables [vocab, D], relative-position tables [buckets, heads]
        return ("vocab", "out")
    return (None,) * (len(shape) - 1) + ("out",)




def _none(config) -> None:
    return None


def _identity_time(t):
    return t


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static data under jit
class Family:
    """One architecture as the outer layers see it.

    Functions of the config (``fn(config)``) cover everything that depends on it.

    Attributes:
        name: short name used in messages, cache names and graph names (``"sd3"``).
        kind: ``"velocity"`` (a velocity field, or one with an adapter, see ``predicts``),
            ``"autoencoder"`` (``encode_latents`` / ``decode_latents``) or ``"text_encoder"``.
        class_names: the diffusers/transformers class names it converts from.
        config_cls: its config dataclass (field names as in ``config.json``).
        module_cls: its root NNX module, ``module_cls(config)``.
        keys: its checkpoint ``KeyMap``.
        component: the pipeline component it is (``"transformer"``, ``"unet"``, ``"vae"``,
            ``"text_encoder"``): what ``sf.load`` takes from a pipeline directory by default
            (velocity families) and which keys of a LoRA file are its.
        lora_prefixes: kohya LoRA key prefixes naming this component (text encoders: by the
            pipeline slot they sit in, see ``converters.lora``).
        lora_names: ``config -> {name: diffusers name}``: module names of another layout that
            LoRA files use besides diffusers' (kohya's SDXL LoRAs name the UNet's LDM modules,
            ``input_blocks.4.1...``); a name ending in ``.`` stands for everything below it.
        predicts: velocity families: ``"velocity"`` (the module's ``velocity`` is the field) or
            ``"noise"`` (a UNet: an adapter from the pipeline's scheduler makes it one).
        timestep: ``t -> native timestep``: how the sampler's time (the RF sigma in [0, 1], ``[B]``)
            becomes the timestep the network was trained on.
        latent_channels: ``C`` of the NHWC latents it takes (velocity, autoencoder).
        latent_multiple: latent ``H`` and ``W`` must be multiples of this.
        latent_scale: velocity families: image pixels per latent pixel of the autoencoder they
            come with (8 for SD's VAEs); autoencoders: see ``scale_factor``.
        default_latent: latent side used when a size is not given.
        max_latent: the largest latent side it can take (None: no limit).
        profile_latent: the largest latent side an on-demand export's dynamic profile covers
            when the model has no ``max_latent`` (None: twice the size asked for); the model
            itself takes any.
        conditioning: ``(config, text_len) -> {name: per-element shape}``, the ``cond`` dict
            of ``velocity`` without the batch axis.
        text_len: default text length ``L`` (velocity: the graph's; text encoders: their ids').
        text_prefix: tokens of ``L`` that come before a prompt pipeline's main text encoder's
            sequence (SD3: 77 CLIP tokens before T5's); ``text_len - text_prefix`` is the
            default ``max_sequence_length``.
        max_text_len: the longest ``L`` a prompt pipeline feeds it (SD3: 77 CLIP + 512 T5
            tokens, Flux: 512, diffusers' ``max_sequence_length`` limit); exports refuse longer
            (None: no limit).
        dynamic_spatial: exported graphs can take symbolic ``H`` and ``W``.
        scale_factor: autoencoders: image pixels per latent pixel.
        image_channels: autoencoders: channels of the decoded image.
        logical_axes: ``(param_path, shape) -> logical axis names`` of its weights, for
            sharding (``heads``, ``mlp``, ``out``, ``embed``, ``vocab``, or None).
        fp8_linears: a regular expression over module paths choosing the linear layers
            ``quantize(model, "fp8")`` stores in FP8 (None: no rule; ``include=`` chooses).
        float_linears: the module paths of linear layers ``quantize`` must leave as they are,
            whatever ``include=`` says: the module reads its compute dtype from their kernels.
        blocks: ``config -> {checkpoint key prefix: block count}`` of the numbered block lists
            (``transformer_blocks`` -> ``num_layers``): a config asking for more blocks than the
            file holds is refused before the model is built (a typo's 100000 layers took
            minutes to build, then listed the missing tensors).
        scan_blocks: a regular expression over the dotted paths of the block lists (``nnx.List``)
            that the module runs through ``layers.run_blocks``, so that
            ``FlowModel.with_scanned_blocks`` may scan their runs of identical blocks (None: none).
    """

    name: str
    kind: str
    class_names: tuple[str, ...]
    config_cls: type
    module_cls: type
    component: str
    keys: KeyMap = KeyMap()
    lora_prefixes: tuple[str, ...] = ()
    lora_names: Callable[[Any], Mapping[str, str]] = lambda config: {}
    predicts: str = "velocity"
    timestep: Callable[[Any], Any] = _identity_time
    latent_channels: Callable[[Any], int | None] = _none
    latent_multiple: Callable[[Any], int] = lambda config: 1
    latent_scale: int = 1
    default_latent: Callable[[Any], int | None] = _none
    max_latent: Callable[[Any], int | None] = _none
    profile_latent: Callable[[Any], int | None] = _none
    conditioning: Callable[[Any, int], dict[str, tuple[int, ...]]] = lambda config, text_len: {}
    text_len: Callable[[Any], int | None] = _none
    text_prefix: int = 0
    max_text_len: int | None = None
    dynamic_spatial: bool = True
    scale_factor: Callable[[Any], int] = lambda config: 1
    image_channels: Callable[[Any], int | None] = _none
    logical_axes: Callable[[str, tuple[int, ...]], tuple[str | None, ...]] = standard_logical_axes
    fp8_linears: str | None = None
    float_linears: tuple[str, ...] = ()
    blocks: Callable[[Any], Mapping[str, int]] = lambda config: {}
    scan_blocks: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name}: kind {self.kind!r} not in {KINDS}")
        if self.predicts not in PREDICTS:
            raise ValueError(f"family {self.name}: predicts {self.predicts!r} not in {PREDICTS}")
