"""UNet2DConditionModel (SD 1.x / 2.x, SDXL) against diffusers on tiny random configs."""

from __future__ import annotations

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import SDXL_UNETS, UNETS, randomize, sdxl_added_inputs

import streamflow_jax as sf
from streamflow_jax.cli import main as cli


@jax.jit
def unet_eps(model, x, t, ehs):  # jitted: an un-jitted NNX UNet call costs ~3x a compile
    return model.module(x, t, ehs)


def make_unet(path, variant, seed=0):
    model = randomize(diffusers.UNet2DConditionModel(**UNETS[variant]), seed, std=0.1).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("variant,height,width", [("sd15", 16, 16), ("sd2", 16, 16), ("sd2", 18, 10)])
def test_unet_matches_diffusers_per_element_timesteps(tmp_path, variant, height, width):
    """18x10 with three levels: odd sizes on the way down, upsampled back to each skip's size.
    One timestep per element, each compared with diffusers'. Measured rel. error <= 1.45e-6."""
    ref = make_unet(tmp_path / "src", variant)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 0
    model = sf.load(tmp_path / "dst")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, height, width, 4), dtype=np.float32)
    t = np.array([999, 500, 1], np.float32)  # one timestep per element
    ehs = rng.standard_normal((3, 5, UNETS[variant]["cross_attention_dim"]), dtype=np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ehs)).sample
    want = want.permute(0, 2, 3, 1).numpy()
    got = np.asarray(unet_eps(model, x, t, ehs))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("field,value", [("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
                                         ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")])
def test_unsupported_unet_config(tmp_path, capsys, field, value):
    make_unet(tmp_path / "src", "sd15")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, field: value}))
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
    assert f"unsupported: {field}={value!r}" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_unet_missing_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    make_unet(tmp_path / "src", "sd15")
    weights = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors.pop("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    save_file(tensors, weights)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# SDXL: the added "text_time" conditions, transformer layers per block and per layer
# ---------------------------------------------------------------------------------------------


@jax.jit
def sdxl_eps(model, x, t, ehs, text_embeds, time_ids):
    return model.module(x, t, ehs, text_embeds=text_embeds, time_ids=time_ids)


def torch_sdxl_eps(ref, x, t, ehs, text_embeds, time_ids):
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ehs),
                  added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                     "time_ids": torch.from_numpy(time_ids)}).sample
    return out.permute(0, 2, 3, 1).numpy()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("variant,height,width", [("sdxl", 16, 16), ("sdxl", 18, 10), ("sdxl_per_layer", 12, 20)])
def test_sdxl_unet_matches_diffusers_added_conditions(tmp_path, variant, height, width):
    """diffusers' UNet with ``added_cond_kwargs`` (pooled text, time ids), one timestep per
    element, non-square and odd sizes. Measured rel. error 9.6e-7, 1.0e-6, 1.4e-6; the test sees
    each input: the time ids of another element, or the pooled text shuffled, move diffusers'
    output by 3.2e-2 .. 1.3e-1."""
    ref = randomize(diffusers.UNet2DConditionModel(**SDXL_UNETS[variant]), 4, std=0.1).eval()
    ref.save_pretrained(tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 0
    model = sf.load(tmp_path / "dst")
    assert model.cond_shapes(77) == {"encoder_hidden_states": (77, 80), "text_embeds": (24,), "time_ids": (6,)}
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, height, width, 4), dtype=np.float32)
    t = np.array([999, 500, 1], np.float32)
    ehs = rng.standard_normal((3, 5, 80), dtype=np.float32)
    text_embeds, time_ids = sdxl_added_inputs(3)
    want = torch_sdxl_eps(ref, x, t, ehs, text_embeds, time_ids)
    got = np.asarray(sdxl_eps(model, x, t, ehs, text_embeds, time_ids))
    assert got.shape == want.shape == (3, height, width, 4)
    assert _rel(got, want) <= 1e-5
    assert _rel(torch_sdxl_eps(ref, x, t, ehs, text_embeds, time_ids[::-1].copy()), want) > 1e-3
    assert _rel(torch_sdxl_eps(ref, x, t, ehs, text_embeds[::-1].copy(), time_ids), want) > 1e-3


def test_sdxl_unet_config_forms(tmp_path):
    """What the Family record says of an SDXL config (and of SD1.5's: no added conditions); the
    per-layer form without the up blocks' counts is refused, as diffusers refuses it; another
    addition_embed_type is unsupported by name."""
    from streamflow_jax.models.unet import UNetConfig

    sdxl = UNetConfig.sdxl()
    assert sf.models.FAMILIES["UNet2DConditionModel"].conditioning(sdxl, 77) == {
        "encoder_hidden_states": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)}
    assert sdxl.down_layers == ((1, 1), (2, 2), (10, 10)) and sdxl.mid_layers == 10
    assert sdxl.up_layers == ((10, 10, 10), (2, 2, 2), (1, 1, 1))
    assert sf.models.FAMILIES["UNet2DConditionModel"].conditioning(UNetConfig.sd15(), 77) == {
        "encoder_hidden_states": (77, 768)}
    with pytest.raises(ValueError, match="needs reverse_transformer_layers_per_block"):
        UNetConfig(**{**SDXL_UNETS["sdxl_per_layer"], "reverse_transformer_layers_per_block": None})
    with pytest.raises(ValueError, match=r"reverse_transformer_layers_per_block\[0\] has 2 entries, expected 3"):
        UNetConfig(**{**SDXL_UNETS["sdxl_per_layer"], "reverse_transformer_layers_per_block": ((1, 2), 1, 1)})
    randomize(diffusers.UNet2DConditionModel(**SDXL_UNETS["sdxl"]), 0, std=0.1).save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    assert cfg["upcast_attention"] is None and cfg["addition_embed_type_num_heads"] == 64  # as SDXL's config.json
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "image"}))
    with pytest.raises(sf.ConversionError, match="unsupported: addition_embed_type='image'"):
        sf.load(tmp_path / "src")


def test_sdxl_unet_needs_its_added_conditions(tmp_path):
    randomize(diffusers.UNet2DConditionModel(**SDXL_UNETS["sdxl"]), 0, std=0.1).save_pretrained(tmp_path / "sdxl")
    model = sf.load(tmp_path / "sdxl")
    x, t, ehs = np.zeros((1, 8, 8, 4), np.float32), np.ones(1, np.float32), np.zeros((1, 5, 80), np.float32)
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        model.module(x, t, ehs)
    make_unet(tmp_path / "sd15", "sd15")
    with pytest.raises(ValueError, match="without added conditions"):
        sf.load(tmp_path / "sd15").module(x, t, np.zeros((1, 5, 768), np.float32), text_embeds=np.zeros((1, 24)),
                                          time_ids=np.zeros((1, 6)))


def test_sdxl_unet_logical_axes():
    """Sharding roles of the SDXL UNet's weights (tensor parallelism splits heads and MLPs; the
    added embedding, like the time embedding, by its output features), and every 2-D+ weight
    gets a role that splits it (none left replicated whole)."""
    from flax import nnx

    from streamflow_jax.models import FAMILIES, abstract_module, flat_params
    from streamflow_jax.models.unet import UNetConfig

    family = FAMILIES["UNet2DConditionModel"]
    params = flat_params(nnx.to_pure_dict(nnx.split(abstract_module(family, UNetConfig.sdxl()))[1]))[0]
    axes = {k: family.logical_axes(k, tuple(v.shape)) for k, v in params.items()}
    assert axes["add_embedding.linear_1.kernel"] == (None, "out")  # [2816, 1280]
    assert axes["add_embedding.linear_2.kernel"] == (None, "out")
    block = "down_blocks.2.attentions.1.transformer_blocks.9."
    assert axes[block + "attn2.to_k.kernel"] == ("embed", "heads")  # [2048, 1280]
    assert axes[block + "attn1.to_out.0.kernel"] == ("heads", "embed")
    assert axes[block + "ff.net.0.proj.kernel"] == ("embed", "mlp")
    assert axes[block + "ff.net.2.kernel"] == ("mlp", "embed")
    assert axes["down_blocks.2.attentions.1.proj_in.kernel"] == (None, "out")  # linear projections
    unsplit = [k for k, a in axes.items() if len(params[k].shape) >= 2 and all(n is None for n in a)]
    assert unsplit == []
    assert sum(v.size for v in params.values()) == 2_567_463_684  # SDXL-base's UNet
