"""CLIP text encoders (transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) in Flax NNX.

Attribute names mirror the transformers keys (``text_model.encoder.layers.0.self_attn.q_proj``).
The call returns every hidden state, so pipelines can take the last one (after the final
LayerNorm), the penultimate one (SD2, SD3, ``clip_skip``), the pooled EOS state, or the
projected ``text_embeds``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from streamflow_jax import ops
from streamflow_jax.models.family import GENERIC_TRANSFORMERS_FIELDS, TRANSFORMERS_WEIGHTS, Family, KeyMap
from streamflow_jax.models.layers import Embedding, LayerNorm, Linear

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True, slots=True)
class CLIPTextConfig:
    """``CLIPTextConfig`` fields that shape the forward pass; names as in ``config.json``."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    with_projection: bool = False  # from "architectures": CLIPTextModelWithProjection

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported: hidden_act={self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} not divisible by num_attention_heads")


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, ids):  # [B, L] -> [B, L, D]
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def __call__(self, x):  # [B, L, D]
        b, n, d = x.shape
        split = lambda a: a.reshape(b, n, self.heads, d // self.heads)  # noqa: E731
        out = ops.attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), causal=True)
        return self.out_proj(out.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig):
        self.layers = nnx.List([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig):
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class CLIPTextModel(nnx.Module):
    """Both transformers classes; ``text_projection`` exists when ``config.with_projection``."""

    def __init__(self, config: CLIPTextConfig):
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (Linear(config.hidden_size, config.projection_dim, bias=False)
                                if config.with_projection else None)

    def __call__(self, input_ids) -> dict[str, jax.Array]:
        """Args: ``[B, L]`` token ids. Returns ``last_hidden_state`` ``[B, L, D]`` (final
        LayerNorm applied), ``hidden_states`` (embeddings then each layer's output, no final
        LayerNorm; ``[-2]`` is the penultimate), ``pooler_output`` ``[B, D]`` (the EOS
        position's state) and, with a projection, ``text_embeds`` ``[B, P]``."""
        tm = self.text_model
        ids = jnp.asarray(input_ids, jnp.int32)
        x = tm.embeddings(ids)
        states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        last = tm.final_layer_norm(x)
        if self.config.eos_token_id == 2:  # legacy configs: EOS is the highest id in each row
            eos = jnp.argmax(ids, axis=-1)
        else:  # first occurrence of the EOS id
            eos = jnp.argmax(ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        out = {"last_hidden_state": last, "hidden_states": tuple(states), "pooler_output": pooled}
        if self.text_projection is not None:
            out["text_embeds"] = self.text_projection(pooled)
        return out


# ---------------------------------------------------------------------------------------------
# Family record
# ---------------------------------------------------------------------------------------------

# CLIP's own training-only fields, beside transformers' generic ones (``eos_token_id`` is a
# config field here: it picks the pooling rule)
ANY_VALUE = GENERIC_TRANSFORMERS_FIELDS | {"attention_dropout", "dropout", "initializer_range", "initializer_factor",
                                           "is_decoder"}


def _prepare_config(raw: dict) -> dict:
    """transformers -> our config: the projection is decided by the architecture."""
    arch = (raw.get("architectures") or ["CLIPTextModel"])[0]
    return {**raw, "with_projection": arch == "CLIPTextModelWithProjection"}


def _rename(key: str) -> str:
    """transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; older ones with it."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key


FAMILY = Family(
    name="clip",
    kind="text_encoder",
    class_names=("CLIPTextModel", "CLIPTextModelWithProjection"),
    config_cls=CLIPTextConfig,
    module_cls=CLIPTextModel,
    component="text_encoder",
    keys=KeyMap(rename=_rename, any_value=ANY_VALUE, weights=TRANSFORMERS_WEIGHTS,
                prepare_config=_prepare_config),
    text_len=lambda c: c.max_position_embeddings,
    blocks=lambda c: {"text_model.encoder.layers": c.num_hidden_layers},
)
