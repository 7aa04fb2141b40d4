"""Text encoding for prompt pipelines: the encoders' jitted calls and T5's tokenizer per length.

The encoder functions are jitted once per process with the weights as arguments (an encoder
``FlowModel`` is a pytree), so every pipeline and every length shares their compiled code.
"""

from __future__ import annotations

from pathlib import Path

import jax

from streamflow_jax.tokenizer import T5Tokenizer


@jax.jit
def clip_last_hidden_state(encoder, ids):  # [B, 77] -> [B, 77, D], after the final LayerNorm
    return encoder.module(ids)["last_hidden_state"]


@jax.jit
def clip_pooled(encoder, ids):  # [B, 77] -> [B, D], the EOS position's final state
    return encoder.module(ids)["pooler_output"]


@jax.jit
def clip_penultimate(encoder, ids):  # [B, 77] -> [B, 77, D], the last layer's input (no final LayerNorm)
    return encoder.module(ids)["hidden_states"][-2]


@jax.jit
def clip_penultimate_and_projection(encoder, ids):  # [B, 77] -> [B, 77, D], [B, E] (SD3)
    out = encoder.module(ids)
    return out["hidden_states"][-2], out["text_embeds"]


@jax.jit
def t5_last_hidden_state(encoder, ids):  # [B, L] -> [B, L, D]
    return encoder.module(ids)["last_hidden_state"]


class T5Tokenizers:
    """A T5 tokenizer directory's tokenizers, one per ``max_length``, each made once."""

    def __init__(self, path):
        self.path = Path(path)
        self._by_length: dict[int, T5Tokenizer] = {}

    def __call__(self, max_length: int) -> T5Tokenizer:
        if max_length not in self._by_length:
            self._by_length[max_length] = T5Tokenizer.from_dir(self.path, max_length=max_length)
        return self._by_length[max_length]
