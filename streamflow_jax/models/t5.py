"""The T5 v1.1 text encoder (transformers' ``T5EncoderModel``, as Flux and SD3 use it) in Flax NNX.

Attribute names mirror the transformers keys (``encoder.block.0.layer.0.SelfAttention.q``,
``encoder.block.3.layer.1.DenseReluDense.wi_0``), so conversion is renaming plus kernel
transposes. Only the gated-GELU feed-forward of T5 v1.1 (``feed_forward_proj="gated-gelu"``)
is implemented.

The forward pass, as transformers computes it in evaluation: token embeddings (not scaled),
then per block a pre-norm self-attention and a pre-norm gated feed-forward, each added to the
residual stream, then a final RMS norm. Attention has no biases and no ``1/sqrt(K)`` scaling;
instead an additive relative-position bias, computed once from block 0's table and shared by
every block. No attention mask: Flux and SD3 call the encoder on padded ids without one, so
pad tokens take part in attention, and so do they here.

Precision: the RMS norms and the softmax run in float32 whatever the weights' dtype. bfloat16
and float32 weights compute in their own dtype, as transformers does. **float16 weights**: T5's
residual stream overflows float16 (activations beyond 65504 in the feed-forward output), which
transformers avoids by keeping every ``DenseReluDense.wo`` in float32, so that its output and
with it the residual stream become float32. Here, likewise, with float16 weights the residual
stream and the ``wo`` projections run in float32 (``wo``'s float16 weights upcast), every other
matmul in float16, and the output is cast back to float16. The result is finite where a pure
float16 stream would give inf/NaN. transformers keeps the stream in float16 up to the first
feed-forward output (with a clamp); starting it in float32 differs only by that rounding.

Axis letters beyond ``ops``'s: ``F`` the feed-forward width (``d_ff``), ``V`` the vocabulary,
``R`` the relative-position buckets. The attention width is ``N*K`` (``num_heads*d_kv``),
which need not equal ``D``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamflow_jax import ops
from streamflow_jax.models.family import GENERIC_TRANSFORMERS_FIELDS, TRANSFORMERS_WEIGHTS, Family, KeyMap
from streamflow_jax.models.layers import Embedding, Linear, RMSNorm, run_blocks

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class T5Config:
    """``T5Config`` fields that shape the encoder's forward pass; names as in ``config.json``.

    Sizes default to transformers' class defaults (t5-small's); the feed-forward fields default
    to T5 v1.1's, the only kind implemented. ``dense_act_fn`` and ``is_gated_act`` are what
    transformers derives from ``feed_forward_proj`` (the converter fills them in when a
    ``config.json`` lacks them); an explicit value in the file wins, as in transformers.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"unsupported: feed_forward_proj={self.feed_forward_proj!r} "
                             "(only 'gated-gelu', T5 v1.1 as Flux and SD3 use it, is implemented)")
        if self.dense_act_fn != "gelu_new" or self.is_gated_act is not True:
            raise ValueError(f"unsupported: dense_act_fn={self.dense_act_fn!r}, is_gated_act={self.is_gated_act!r} "
                             "(only 'gelu_new' gated, what 'gated-gelu' means, is implemented)")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # the bucket function divides by log(max_distance / max_exact) and by max_exact,
        # where max_exact = num_buckets // 4 (half the buckets per direction, half of those exact)
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} "
                             "must be at least 4")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
                             f"relative_attention_num_buckets // 4 = {self.relative_attention_num_buckets // 4}")


# ---------------------------------------------------------------------------------------------
# Helpers: relative positions and activation
# ---------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of each relative position ``key - query`` (int array -> int32).

    Half the buckets take keys before the query, half keys after it (a positive distance).
    In each half, distances below ``max_exact = num_buckets // 4`` have a bucket each; longer
    ones share logarithmically wider buckets up to ``max_distance``; anything farther falls in
    the half's last bucket.
    """
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    n = np.abs(rel)
    per_distance = np.array([_distance_bucket(d, half, max_distance) for d in range(int(n.max(initial=0)) + 1)])
    return (np.where(rel > 0, half, 0) + per_distance[n]).astype(np.int32)


def _distance_bucket(d: int, half: int, max_distance: int) -> int:
    """The bucket of distance ``d`` within one direction's ``half`` buckets.

    transformers writes the logarithmic part as ``min(e + trunc(log(d/e) / log(m/e) * r), half - 1)``
    with ``e = half // 2`` exact buckets, ``r = half - e`` and ``m = max_distance``, in float32.
    Here the same floor is found with exact integer comparisons (``k <= r log(d/e) / log(m/e)``
    iff ``m^k e^r <= d^r e^k``), so a bucket boundary cannot move with a ``log``'s rounding on
    one machine or another.
    """
    e = half // 2
    if d < e:
        return d
    r = half - e
    k = 0  # the condition is monotone in k; stop at the cap (bucket half - 1)
    while k + 1 < r and max_distance ** (k + 1) * e ** r <= d ** r * e ** (k + 1):
        k += 1
    return e + k


@functools.lru_cache(maxsize=32)
def _bucket_lut(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Buckets of every relative position ``-(length-1) .. length-1``, ``[2 * length - 1]``.

    Computed once per sequence length on the host; a constant of the compiled program.
    """
    lut = relative_position_bucket(np.arange(-(length - 1), length), num_buckets, max_distance)
    lut.flags.writeable = False  # shared by every caller through the cache
    return lut


def gelu_new(x):
    """GELU's tanh approximation (transformers' ``gelu_new``), in ``x``'s dtype."""
    return jax.nn.gelu(x, approximate=True)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class T5Attention(nnx.Module):
    """Self-attention without biases or ``1/sqrt(K)`` scaling; the position bias is added to
    the logits. Only block 0 owns the ``relative_attention_bias`` table ``[R, N]``."""

    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool):
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.head_dim = cfg.num_heads, cfg.d_kv
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.q, self.k, self.v = (Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = (Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
                                        if has_relative_attention_bias else None)

    def compute_bias(self, length: int) -> jax.Array:
        """The position bias of a sequence of ``length`` tokens, ``[1, N, L, L]`` (table dtype).

        Entry ``[0, h, i, j]`` is head ``h``'s table value at the bucket of ``j - i``.
        """
        lut = jnp.asarray(_bucket_lut(length, self.num_buckets, self.max_distance))  # [2L-1]
        pos = jnp.arange(length)
        buckets = lut[pos[None, :] - pos[:, None] + length - 1]  # [L, L]: key j minus query i
        values = self.relative_attention_bias(buckets)  # [L, L, N]
        return values.transpose(2, 0, 1)[None]

    def __call__(self, x, position_bias):  # [B, L, D], [1, N, L, L] -> [B, L, D]
        b, n, _ = x.shape
        split = lambda a: a.reshape(b, n, self.heads, self.head_dim)  # noqa: E731
        out = ops.attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), bias=position_bias, scale=1.0)
        return self.o(out.reshape(b, n, self.heads * self.head_dim))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool):
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x, position_bias, dtype):
        """``x`` ``[B, L, D]`` residual stream; ``dtype`` the weights' (compute) dtype.
        Returns the update ``[B, L, D]`` in ``dtype``."""
        return self.SelfAttention(self.layer_norm(x).astype(dtype), position_bias)


class T5DenseGatedActDense(nnx.Module):
    """``wo(gelu_new(wi_0 h) * wi_1 h)``; ``wo`` runs in the dtype of its input (see below)."""

    def __init__(self, cfg: T5Config):
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, h, out_dtype):  # [B, L, D] -> [B, L, D] in out_dtype
        gated = gelu_new(self.wi_0(h)) * self.wi_1(h)  # [B, L, F]
        # Linear computes in its input's dtype: a float32 input runs wo in float32 (float16
        # weights: transformers' _keep_in_fp32_modules = ["wo"]).
        return self.wo(gated.astype(out_dtype))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config):
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x, dtype):  # [B, L, D] residual -> update [B, L, D] in x's dtype
        return self.DenseReluDense(self.layer_norm(x).astype(dtype), x.dtype)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_relative_attention_bias=has_relative_attention_bias),
                               T5LayerFF(cfg)])

    def __call__(self, x, position_bias, dtype):  # [B, L, D] residual stream -> [B, L, D]
        x = x + self.layer[0](x, position_bias, dtype).astype(x.dtype)
        return x + self.layer[1](x, dtype)


class T5Stack(nnx.Module):
    """The encoder: blocks and the final norm (transformers' ``encoder.embed_tokens`` is the
    root's ``shared``, see the key map)."""

    def __init__(self, cfg: T5Config):
        self.block = nnx.List([T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


# ---------------------------------------------------------------------------------------------
# Root
# ---------------------------------------------------------------------------------------------


class T5EncoderModel(nnx.Module):
    """transformers' ``T5EncoderModel`` (T5 v1.1). See the module docstring for the precision rules."""

    def __init__(self, config: T5Config):
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def __call__(self, input_ids) -> dict[str, jax.Array]:
        """Encodes token ids, attending to every position (no mask, as Flux and SD3 call it).

        Args:
            input_ids: ``[B, L]`` token ids (``T5Tokenizer`` output, padded with the pad id).

        Returns:
            ``{"last_hidden_state": [B, L, D]}`` after the final RMS norm, in the weights' dtype.
        """
        ids = jnp.asarray(input_ids, jnp.int32)
        dtype = self.shared.weight[...].dtype  # compute dtype: the weights'
        stream = jnp.float32 if dtype == jnp.float16 else dtype  # residual stream (see module docstring)
        x = self.shared(ids).astype(stream)  # [B, L, D]
        blocks = self.encoder.block
        # computed once, from block 0's table, and shared by every block (as T5 does)
        position_bias = blocks[0].layer[0].SelfAttention.compute_bias(ids.shape[1])  # [1, N, L, L]
        x = run_blocks(blocks, x, position_bias, dtype)  # blocks 1.. can be scanned (block 0 holds the table)
        return {"last_hidden_state": self.encoder.final_layer_norm(x).astype(dtype)}


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------

# T5Config's training, decoder and cache settings, beside transformers' generic fields: none
# changes the encoder's forward pass, so any value is accepted. ``is_decoder`` is not among
# them (a decoder stack is another model; see IGNORABLE).
ANY_VALUE_FIELDS = GENERIC_TRANSFORMERS_FIELDS | {
    "dropout_rate", "classifier_dropout", "initializer_factor", "num_decoder_layers", "use_cache",
    "scale_decoder_outputs", "output_past", "n_positions",
}

IGNORABLE = {"is_decoder": False}


def _prepare_config(raw: dict) -> dict:
    """What transformers' ``T5Config`` derives: ``feed_forward_proj`` defaults to ``"relu"``
    (so a file without it is not T5 v1.1), and ``"[gated-]ACT"`` gives ``dense_act_fn`` (with
    ``"gated-gelu"`` meaning ``gelu_new``) and ``is_gated_act``, unless the file sets them."""
    proj = raw.get("feed_forward_proj", "relu")
    parts = str(proj).split("-")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return {"dense_act_fn": act, "is_gated_act": parts[0] == "gated", **raw, "feed_forward_proj": proj}


def _rename(key: str) -> str:
    """``encoder.embed_tokens`` is tied to ``shared`` (one tensor in transformers): transformers
    5 writes only ``shared.weight``, a file with only ``encoder.embed_tokens.weight`` loads too,
    and older or third-party files may hold both copies; every form fills ``shared``."""
    return "shared.weight" if key == "encoder.embed_tokens.weight" else key


FAMILY = Family(
    name="t5",
    kind="text_encoder",
    class_names=("T5EncoderModel",),
    config_cls=T5Config,
    module_cls=T5EncoderModel,
    component="text_encoder",
    keys=KeyMap(rename=_rename, ignorable=IGNORABLE, any_value=ANY_VALUE_FIELDS, weights=TRANSFORMERS_WEIGHTS,
                prepare_config=_prepare_config),
    # relative positions set no hard limit; 512 is T5's pretraining length and FluxPipeline's
    # (dev) max_sequence_length (SD3 and schnell use 256)
    text_len=lambda c: 512,
    scan_blocks=r"^encoder\.block$",  # T5-XXL (SD3, Flux): 23 of its 24 blocks as one run
    blocks=lambda c: {"encoder.block": c.num_layers},
)
