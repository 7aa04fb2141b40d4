"""Flux.1 (FluxTransformer2DModel) against diffusers: velocity on unpacked NHWC latents, both
guidance variants, non-square latents; Black Forest Labs' single-file layout; bad input."""

from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import jaxpr_eqns, randomize
from diffusers import FluxPipeline
from safetensors.torch import save_file

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.models import flux_bfl

# head dim 16 = rope axes 4 + 6 + 6; D = 32; text width 12, pooled 10 (odd sizes on purpose)
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6))


def make_flux(path, guidance: bool, seed: int = 0):
    model = randomize(diffusers.FluxTransformer2DModel(**FLUX_TINY, guidance_embeds=guidance), seed, std=0.2).eval()
    model.save_pretrained(path)
    return model


def flux_inputs(batch, height, width, text_len=5, guidance=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, FLUX_TINY["in_channels"] // 4), dtype=np.float32)
    cond = {"encoder_hidden_states": rng.standard_normal((batch, text_len, 12), dtype=np.float32),
            "pooled_projections": rng.standard_normal((batch, 10), dtype=np.float32)}
    if guidance:
        cond["guidance"] = np.linspace(1.5, 5.0, batch).astype(np.float32)  # one scale per element
    t = np.linspace(0.95, 0.15, batch).astype(np.float32)
    return x, t, cond


def reference_velocity(model, x, t, cond):
    """diffusers' transformer called as FluxPipeline calls it: packed latents, ids, sigma."""
    b, h, w, c = x.shape
    lat = torch.from_numpy(x).permute(0, 3, 1, 2)
    packed = FluxPipeline._pack_latents(lat, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
    with torch.no_grad():
        out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
                    pooled_projections=torch.from_numpy(cond["pooled_projections"]), timestep=torch.from_numpy(t),
                    img_ids=img_ids, txt_ids=txt_ids,
                    guidance=torch.from_numpy(cond["guidance"]) if "guidance" in cond else None,
                    return_dict=False)[0]
    out = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # vae_scale_factor 8: pixel size = 8x latent
    return out.permute(0, 2, 3, 1).numpy()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@jax.jit
def _velocity(model, x, t, cond):
    return model.velocity(x, t, cond)


@pytest.mark.parametrize("guidance,height,width", [(True, 8, 8), (False, 8, 8), (True, 6, 10), (False, 12, 4)])
def test_velocity_matches_diffusers(tmp_path, guidance, height, width):
    ref = make_flux(tmp_path / "src", guidance, seed=1)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 0
    model = sf.load(tmp_path / "dst")
    x, t, cond = flux_inputs(3, height, width, guidance=guidance)
    want = reference_velocity(ref, x, t, cond)
    got = np.asarray(_velocity(model, x, t, cond))
    assert got.shape == want.shape == x.shape
    assert _rel(got, want) <= 1e-4  # measured ~2e-6 (diffusers' float32 rope/sinusoid tables)
    # each element used its own t and guidance: element 1 alone gives the same
    one = {k: v[1:2] for k, v in cond.items()}
    np.testing.assert_allclose(np.asarray(_velocity(model, x[1:2], t[1:2], one)), got[1:2], rtol=1e-5, atol=1e-5)


def _velocity_eqns(model, x, t, cond):
    """The equations of the traced velocity, nested ones included."""
    return jaxpr_eqns(jax.make_jaxpr(lambda x: model.velocity(x, t, cond))(x).jaxpr)


def _concat_widths(model, x, t, cond) -> list[int]:
    """The last-axis widths of the concatenations in the traced velocity."""
    return [e.outvars[0].aval.shape[-1] for e in _velocity_eqns(model, x, t, cond)
            if e.primitive.name == "concatenate" and e.params["dimension"] == e.outvars[0].aval.ndim - 1]


def test_split_concat_product_matches_diffusers(tmp_path, monkeypatch):
    """``$STREAMFLOW_JAX_CONCAT_PRODUCT=split``: the single blocks' ``proj_out`` as one product
    per part (attention, MLP), with no concatenated copy; the velocity still diffusers'."""
    ref = make_flux(tmp_path / "src", True, seed=3)
    model = sf.load(tmp_path / "src")
    x, t, cond = flux_inputs(2, 6, 10, seed=3)
    want = reference_velocity(ref, x, t, cond)
    d = FLUX_TINY["num_attention_heads"] * FLUX_TINY["attention_head_dim"]
    assert _concat_widths(model, x, t, cond).count(5 * d) == FLUX_TINY["num_single_layers"]
    concat = np.asarray(_velocity(model, x, t, cond))
    monkeypatch.setenv("STREAMFLOW_JAX_CONCAT_PRODUCT", "split")
    assert 5 * d not in _concat_widths(model, x, t, cond)
    split = np.asarray(_velocity(model, x, t, cond))  # traced again: the switch is part of the jit's key
    assert _rel(split, want) <= 1e-4
    assert _rel(split, concat) <= 1e-5
    monkeypatch.setenv("STREAMFLOW_JAX_CONCAT_PRODUCT", "sideways")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_CONCAT_PRODUCT='sideways': expected auto, concat or split"):
        model.velocity(x, t, cond)


def _barriers(model, x, t, cond) -> int:
    """Optimization barriers in the traced velocity."""
    return sum(e.primitive.name == "optimization_barrier" for e in _velocity_eqns(model, x, t, cond))


def test_modulation_apart_matches_diffusers(tmp_path, monkeypatch):
    """``$STREAMFLOW_JAX_MODULATION=apart``: each block's modulation input goes through a barrier
    of its own (two a double block, one a single block, one for ``norm_out``), none by default
    or for layers with static FP8 scales (``norm_out`` stays float: its barrier stays); the
    velocity is still diffusers', dynamic FP8's unchanged."""
    from streamflow_jax.quantization import quantize

    ref = make_flux(tmp_path / "src", True, seed=5)
    model = sf.load(tmp_path / "src")
    x, t, cond = flux_inputs(2, 6, 10, seed=5)
    want = reference_velocity(ref, x, t, cond)
    merged = np.asarray(_velocity(model, x, t, cond))
    assert _barriers(model, x, t, cond) == 0
    monkeypatch.setenv("STREAMFLOW_JAX_MODULATION", "apart")
    layers = 2 * FLUX_TINY["num_layers"] + FLUX_TINY["num_single_layers"] + 1
    assert _barriers(model, x, t, cond) == layers
    apart = np.asarray(_velocity(model, x, t, cond))  # traced again: the switch is part of the jit's key
    assert _rel(apart, want) <= 1e-4 and _rel(apart, merged) <= 1e-5
    q = quantize(model, "fp8")
    assert _barriers(q, x, t, cond) == layers
    dynamic = np.asarray(q.velocity(x, t, cond))
    static = sf.calibrate(q, lambda m: m.velocity(x, t, cond))
    assert _barriers(static, x, t, cond) == 1  # norm_out's
    monkeypatch.setenv("STREAMFLOW_JAX_MODULATION", "merged")
    assert _rel(dynamic, np.asarray(q.velocity(x, t, cond))) <= 1e-5
    monkeypatch.setenv("STREAMFLOW_JAX_MODULATION", "together")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_MODULATION='together': expected auto, merged or apart"):
        model.velocity(x, t, cond)


def test_guidance_errors(tmp_path):
    make_flux(tmp_path / "dev", True)
    make_flux(tmp_path / "schnell", False)
    dev, schnell = sf.load(tmp_path / "dev"), sf.load(tmp_path / "schnell")
    x, t, cond = flux_inputs(1, 8, 8, guidance=True)
    with pytest.raises(ValueError, match="cond lacks 'guidance' \\(FluxTransformer2DModel takes "):
        dev.velocity(x, t, {k: v for k, v in cond.items() if k != "guidance"})
    with pytest.raises(ValueError, match="cond has 'guidance', not an input of this model"):
        schnell.velocity(x, t, cond)
    with pytest.raises(ValueError, match="height and width must be even"):
        dev.velocity(np.zeros((1, 7, 8, 4), np.float32), t, cond)
    assert dev.cond_shapes(7) == {"encoder_hidden_states": (7, 12), "pooled_projections": (10,), "guidance": ()}
    assert "guidance" not in schnell.cond_shapes(7)
    assert dev.latent_shape() == (128, 128, 4)
    # the text length a graph takes by default is the one FluxPipeline feeds: dev 512, schnell 256 (an
    # export of schnell made for 512 was refused by every generate --export)
    assert dev.cond_shapes()["encoder_hidden_states"][0] == 512
    assert schnell.cond_shapes()["encoder_hidden_states"][0] == 256


def test_unsupported_config(tmp_path, capsys):
    import json

    make_flux(tmp_path / "src", True)
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    for field, value, needle in [("axes_dims_rope", [4, 6, 8], "axes_dims_rope"), ("patch_size", 2, "patch_size=2"),
                                 ("use_rope_v2", True, "unknown config field 'use_rope_v2'")]:
        (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, field: value}))
        assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------------------------------------
# Black Forest Labs' single-file layout
# ---------------------------------------------------------------------------------------------

# The published BFL key names (a two-block file), written from the layout, not from our map.
BFL_TOP = ["time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
           "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "img_in", "final_layer.linear",
           "final_layer.adaLN_modulation.1"]
BFL_DOUBLE = ["img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
              "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"]
BFL_DOUBLE_NORMS = ["img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                    "txt_attn.norm.key_norm"]
BFL_SINGLE = ["linear1", "linear2", "modulation.lin"]
BFL_SINGLE_NORMS = ["norm.query_norm", "norm.key_norm"]


def _fake_bfl(rows_of, cols=2, seed=0):
    """A BFL-layout state dict of random tensors: ``rows_of(name)`` rows, ``cols`` columns."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    names = [(n, True) for n in BFL_TOP]
    names += [(f"double_blocks.0.{n}", True) for n in BFL_DOUBLE]
    names += [(f"single_blocks.0.{n}", True) for n in BFL_SINGLE]
    for name, linear in names:
        r = rows_of(name)
        sd[f"{name}.weight"] = torch.randn(r, cols, generator=gen)
        sd[f"{name}.bias"] = torch.randn(r, generator=gen)
    for name in [f"double_blocks.0.{n}" for n in BFL_DOUBLE_NORMS] + [f"single_blocks.0.{n}" for n in BFL_SINGLE_NORMS]:
        sd[f"{name}.scale"] = torch.randn(rows_of(name), generator=gen)
    return sd


def test_bfl_key_map_equals_diffusers_converter():
    """Our BFL map, tensor by tensor, against diffusers' own single-file converter (which fixes
    the hidden size at 3072, so the split rows are real-sized and the columns tiny)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    d = 3072
    rows = {"img_attn.qkv": 3 * d, "txt_attn.qkv": 3 * d, "linear1": 7 * d, "adaLN_modulation.1": 2 * d}
    sd = _fake_bfl(lambda name: next((r for k, r in rows.items() if name.endswith(k)), 6))
    want = convert_flux_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in sd.items()})
    ours = {}
    for key, tensor in sd.items():
        for dkey, part in flux_bfl.parts(key, tuple(tensor.shape)):
            ours[dkey] = tensor.numpy() if part is None else tensor.numpy()[part]
    assert sorted(ours) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(ours[key], want[key].numpy(), err_msg=key)


def _to_bfl(state: dict) -> dict:
    """A diffusers Flux state dict in BFL's layout (the inverse of the published map, fused
    projections concatenated back), written here independently of ``flux_bfl``."""
    out = {}
    inv_top = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    for k, v in inv_top.items():
        for s in ("weight", "bias"):
            if f"{k}.{s}" in state:
                out[f"{v}.{s}"] = state[f"{k}.{s}"]
    for s in ("weight", "bias"):
        scale, shift = state[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    for i in range(FLUX_TINY["num_layers"]):
        p = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            for k, v in double.items():
                out[f"double_blocks.{i}.{v}.{s}"] = state[f"{p}{k}.{s}"]
            out[f"double_blocks.{i}.img_attn.qkv.{s}"] = torch.cat([state[f"{p}attn.to_{c}.{s}"] for c in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{s}"] = torch.cat([state[f"{p}attn.add_{c}_proj.{s}"] for c in "qkv"])
        for k, v in norms.items():
            out[f"double_blocks.{i}.{v}.scale"] = state[f"{p}{k}.weight"]
    for i in range(FLUX_TINY["num_single_layers"]):
        p = f"single_transformer_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{s}"] = torch.cat(
                [state[f"{p}attn.to_{c}.{s}"] for c in "qkv"] + [state[f"{p}proj_mlp.{s}"]])
            out[f"single_blocks.{i}.linear2.{s}"] = state[f"{p}proj_out.{s}"]
            out[f"single_blocks.{i}.modulation.lin.{s}"] = state[f"{p}norm.linear.{s}"]
        out[f"single_blocks.{i}.norm.query_norm.scale"] = state[f"{p}attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = state[f"{p}attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("guidance,prefix", [(True, "model.diffusion_model."), (False, "")])
def test_bfl_single_file_converts_to_the_same_velocity(tmp_path, guidance, prefix):
    ref = make_flux(tmp_path / "src", guidance, seed=3)
    bfl = _to_bfl(ref.state_dict())
    save_file({prefix + k: v for k, v in bfl.items()}, tmp_path / "flux1.safetensors")
    sf.convert(tmp_path / "flux1.safetensors", tmp_path / "dst", config={"axes_dims_rope": [4, 6, 6]},
               progress=False)
    model = sf.load(tmp_path / "dst")
    assert model.config.guidance_embeds is guidance and model.config.num_single_layers == 2
    x, t, cond = flux_inputs(2, 6, 8, guidance=guidance, seed=4)
    assert _rel(_velocity(model, x, t, cond), reference_velocity(ref, x, t, cond)) <= 1e-4
    # a bf16 file stays bf16 through conversion
    save_file({k: v.to(torch.bfloat16) for k, v in bfl.items()}, tmp_path / "bf16.safetensors")
    half = sf.load(tmp_path / "bf16.safetensors", config={"axes_dims_rope": [4, 6, 6]})
    assert half.dtype == jax.numpy.bfloat16


def test_bfl_bad_files(tmp_path, capsys):
    ref = make_flux(tmp_path / "src", True, seed=5)
    bfl = _to_bfl(ref.state_dict())
    save_file(bfl, tmp_path / "tiny.safetensors")
    assert cli(["convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "out"), "-q"]) == 1
    assert "axes_dims_rope=(16, 56, 56) must be even and sum to attention_head_dim=16" in capsys.readouterr().err
    axes = tmp_path / "axes.json"
    axes.write_text('{"axes_dims_rope": [4, 6, 6]}')
    missing = dict(bfl)
    missing.pop("double_blocks.1.txt_mlp.2.bias")
    save_file(missing, tmp_path / "missing.safetensors")
    assert cli(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "out"), "--config-from", str(axes),
                "-q"]) == 1
    assert "missing tensor(s) 'transformer_blocks.1.ff_context.net.2.bias'" in capsys.readouterr().err
    extra = dict(bfl, **{"double_blocks.0.img_attn.lora.weight": torch.zeros(2, 2)})
    save_file(extra, tmp_path / "extra.safetensors")
    assert cli(["convert", str(tmp_path / "extra.safetensors"), str(tmp_path / "out"), "--config-from", str(axes),
                "-q"]) == 1
    assert "unexpected tensor(s) 'double_blocks.0.img_attn.lora.weight'" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "out"), "--config-from", str(axes),
                "-q"]) == 0
    save_file({"some.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    assert cli(["convert", str(tmp_path / "other.safetensors"), str(tmp_path / "out"), "-q"]) == 1
    assert "no known layout" in capsys.readouterr().err
    assert sf.load(tmp_path / "out").config.num_layers == 2
