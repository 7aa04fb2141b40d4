"""Black Forest Labs' single-file Flux layout (``flux1-dev.safetensors``) -> diffusers keys.

Written from the published layout: BFL fuses the image and text q/k/v projections of the
double blocks (``img_attn.qkv``: rows q, k, v) and, in the single blocks, q, k, v and the MLP's
first projection (``linear1``: rows q, k, v, mlp); its final modulation is ordered (shift,
scale) where diffusers' ``norm_out`` is (scale, shift). Everything else is a rename. The
config is read off the shapes (``axes_dims_rope`` only for the published head dim 128).
"""

from __future__ import annotations

import re

from streamflow_jax.models.family import CheckpointLayout

PUBLISHED_AXES = {128: (16, 56, 56)}  # head dim -> axes_dims_rope of the released models

_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_SINGLE = {
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "modulation.lin": "norm.linear",
}
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$")


def detect(keys: set[str]) -> bool:
    return "double_blocks.0.img_attn.norm.key_norm.scale" in keys


def _leaf(suffix: str) -> str:
    return "weight" if suffix == "scale" else suffix  # BFL's RMSNorm scale is diffusers' weight


def parts(key: str, shape: tuple[int, ...]) -> list[tuple[str, object]]:
    """The diffusers tensor(s) one BFL tensor becomes, with the rows each takes."""
    m = _BLOCK.match(key)
    if m:
        kind, n, name, suffix = m.groups()
        leaf = _leaf(suffix)
        if kind == "double_blocks":
            prefix = f"transformer_blocks.{n}."
            if name in _QKV:
                d = shape[0] // 3
                return [(f"{prefix}{t}.{leaf}", slice(i * d, (i + 1) * d)) for i, t in enumerate(_QKV[name])]
            if name in _DOUBLE:
                return [(f"{prefix}{_DOUBLE[name]}.{leaf}", None)]
        else:
            prefix = f"single_transformer_blocks.{n}."
            if name == "linear1":  # rows: q, k, v (D each), then the MLP's 4D
                d = shape[0] // 7
                bounds = [0, d, 2 * d, 3 * d, shape[0]]
                names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                return [(f"{prefix}{t}.{leaf}", slice(bounds[i], bounds[i + 1])) for i, t in enumerate(names)]
            if name in _SINGLE:
                return [(f"{prefix}{_SINGLE[name]}.{leaf}", None)]
        return [(key, None)]  # not a BFL key: reported as unexpected under its own name
    base, _, suffix = key.rpartition(".")
    if base == "final_layer.adaLN_modulation.1":  # (shift, scale) -> diffusers' (scale, shift)
        d = shape[0] // 2
        return [(f"norm_out.linear.{suffix}", list(range(d, 2 * d)) + list(range(d)))]
    if base in _RENAMES:
        return [(f"{_RENAMES[base]}.{suffix}", None)]
    return [(key, None)]


def _count(shapes: dict, kind: str) -> int:
    found = {int(m.group(2)) for k in shapes if (m := _BLOCK.match(k)) and m.group(1) == kind}
    return max(found) + 1 if found else 0


def config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The diffusers ``FluxTransformer2DModel`` config implied by a BFL file's shapes."""
    d, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    raw = {
        "_class_name": "FluxTransformer2DModel",
        "in_channels": in_channels,
        "num_layers": _count(shapes, "double_blocks"),
        "num_single_layers": _count(shapes, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": d // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }
    if head_dim in PUBLISHED_AXES:
        raw["axes_dims_rope"] = list(PUBLISHED_AXES[head_dim])
    return raw


def modules(cfg) -> list[str]:
    """The BFL names of a Flux config's linear layers (what kohya-format LoRAs name)."""
    top = [k for k in _RENAMES if cfg.guidance_embeds or not k.startswith("guidance_in")]
    top.append("final_layer.adaLN_modulation.1")
    double = [n for n in (*_DOUBLE, *_QKV) if "norm" not in n]
    single = ["linear1", *(n for n in _SINGLE if "norm" not in n)]
    return (top + [f"double_blocks.{i}.{n}" for i in range(cfg.num_layers) for n in double]
            + [f"single_blocks.{i}.{n}" for i in range(cfg.num_single_layers) for n in single])


LAYOUT = CheckpointLayout(name="bfl", detect=detect, config=config, parts=parts,
                          prefixes=("model.diffusion_model.",), modules=modules)
