"""open_clip's text tower (OpenCLIP-H in SD 2.x, OpenCLIP bigG in SDXL) -> transformers' CLIP keys.

Written from the published layout (open_clip's ``model.py`` and ``transformer.py``, as SD 2.x's
``FrozenOpenCLIPEmbedder`` and SDXL's ``FrozenOpenCLIPEmbedder2`` save it, visual tower removed):

- ``token_embedding.weight``, ``positional_embedding`` (a bare ``[L, D]`` parameter),
  ``ln_final``: the embeddings and the final LayerNorm;
- ``transformer.resblocks.N``: ``ln_1``, ``attn`` (a ``torch.nn.MultiheadAttention``: one fused
  ``in_proj_weight`` ``[3D, D]`` / ``in_proj_bias`` ``[3D]`` with rows q, k, v, and
  ``out_proj``), ``ln_2``, ``mlp.c_fc`` / ``mlp.c_proj``;
- ``text_projection``: a bare ``[D, P]`` parameter applied as ``x @ P``, i.e. the transpose of
  transformers' ``text_projection.weight`` ``[P, D]``;
- ``logit_scale``: CLIP's contrastive temperature, which no text encoder reads.

The architecture is transformers' ``CLIPTextModel(WithProjection)`` (pre-LayerNorm blocks, a
causal mask, GELU for these models), so the CLIP family runs it; only the names differ. SD 2.x
encodes a prompt with the *penultimate* block's output followed by ``ln_final``, and diffusers
writes its encoder as a ``CLIPTextModel`` with one block fewer than the file and no projection:
for such a config the file's last block and its ``text_projection`` are not read.
"""

from __future__ import annotations

import re

from streamflow_jax.models.family import Rows

# What one tensor becomes: [(transformers key, how)]: how is None (as is), a slice of rows (one
# of the fused q/k/v), or TRANSPOSED (``text_projection``, stored [in, out]).
TRANSPOSED = "transposed"
Part = tuple[str, Rows | str]

NOT_READ = frozenset({"logit_scale"})  # CLIP's contrastive temperature

_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def parts(key: str, shape: tuple[int, ...], *, num_hidden_layers: int, with_projection: bool
          ) -> list[Part] | None:
    """The transformers tensor(s) one open_clip text tensor becomes (``[]``: not read; ``None``:
    not an open_clip name).

    Args:
        key: the file key below the encoder's prefix (``transformer.resblocks.0.attn.in_proj_weight``).
        shape: its shape (the fused projection is split in three equal row blocks).
        num_hidden_layers, with_projection: of the transformers config it is read into. Without
            a projection (SD 2.x), block ``num_hidden_layers`` (the one past the config's last)
            and ``text_projection`` are not read; with one, every block is. A block past those
            is not a name of this config (``None``).
    """
    if key in _TOP:
        return [(_TOP[key], None)]
    if key in NOT_READ:
        return []
    if key == "text_projection":
        return [("text_projection.weight", TRANSPOSED)] if with_projection else []
    # nn.MultiheadAttention names its fused projection ``in_proj_weight``/``in_proj_bias``
    key = re.sub(r"\.attn\.in_proj_(weight|bias)$", r".attn.in_proj.\1", key)
    m = _RESBLOCK.match(key)
    if not m:
        return None
    n, module, leaf = int(m[1]), m[2], m[3]
    if n == num_hidden_layers and not with_projection:
        return []  # SD 2.x's last block: its encoder stops at the penultimate one
    if n >= num_hidden_layers:
        return None  # a block the config does not have: reported under the file's name
    layer = f"text_model.encoder.layers.{n}"
    if module == "attn.in_proj":
        if not shape or shape[0] % 3:
            return None
        d = shape[0] // 3
        return [(f"{layer}.self_attn.{name}.{leaf}", slice(i * d, (i + 1) * d)) for i, name in enumerate(_QKV)]
    if module in _BLOCK:
        return [(f"{layer}.{_BLOCK[module]}.{leaf}", None)]
    return None
