"""UNet2DConditionModel (SD 1.x / 2.x) against diffusers on tiny random configs."""

from __future__ import annotations

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import UNETS, randomize

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
