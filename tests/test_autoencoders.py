"""AutoencoderKL (4- and 16-channel latents) and AutoencoderTiny (TAESD) against diffusers."""

from __future__ import annotations

import functools
import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import TAESD, VAES, randomize

import streamflow_jax as sf
from streamflow_jax.cli import main as cli


@functools.partial(jax.jit, static_argnums=1)
def run(model, method, *args):
    """``model.module.METHOD(*args)``, jitted (an eager NNX VAE call dispatches op by op)."""
    return getattr(model.module, method)(*args)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _nchw(a):
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("variant", sorted(VAES))
def test_vae_encode_decode_match_diffusers(tmp_path, variant):
    ref = randomize(diffusers.AutoencoderKL(**VAES[variant]), 0, std=0.1).eval()
    ref.save_pretrained(tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 0
    vae = sf.load(tmp_path / "dst")
    rng = np.random.default_rng(0)
    f = 2 ** (len(VAES[variant]["block_out_channels"]) - 1)
    images = rng.uniform(-1, 1, (2, 8 * f, 6 * f, 3)).astype(np.float32)  # non-square
    c = VAES[variant]["latent_channels"]
    z = rng.standard_normal((2, 8, 6, c)).astype(np.float32)
    with torch.no_grad():
        want_mean = _nhwc(ref.encode(_nchw(images)).latent_dist.mean)
        want_img = _nhwc(ref.decode(_nchw(z)).sample)
    assert _rel(run(vae, "encode", images), want_mean) <= 5e-6  # measured <= 6e-7 (all three)
    assert _rel(run(vae, "decode", z), want_img) <= 5e-6
    # pipeline scaling: decode_latents(l) == decode(l / scale + shift)
    cfg = ref.config
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z) / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample)
    assert _rel(run(vae, "decode_latents", z), want) <= 5e-6


@pytest.mark.parametrize("force_upcast", [True, False])
def test_float16_vae_with_force_upcast_computes_in_float32(tmp_path, force_upcast):
    """SDXL's VAE overflows float16; its config says ``force_upcast`` and diffusers' pipelines
    decode in float32. Here a VAE whose first convs give activations past 65504 (8.1e4): loaded
    as float16 with ``force_upcast``, it matches diffusers in float32 (on the same float16-held
    weights) and gives float32 images; without the flag it runs in float16 and overflows."""
    ref = randomize(diffusers.AutoencoderKL(**VAES["sd"], force_upcast=force_upcast), 0, std=0.1).eval()
    with torch.no_grad():
        ref.decoder.conv_in.weight.mul_(1e5)
        ref.encoder.conv_in.weight.mul_(1e5)
    ref = ref.half().float()  # the weights as float16 holds them
    ref.save_pretrained(tmp_path / "src")
    vae = sf.load(tmp_path / "src", dtype="float16")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
    with torch.no_grad():
        assert float(ref.decoder.conv_in(ref.post_quant_conv(_nchw(z))).abs().max()) > 65504
        want_mean = _nhwc(ref.encode(_nchw(images)).latent_dist.mean)
        want_img = _nhwc(ref.decode(_nchw(z)).sample)
    got_mean, got_img = run(vae, "encode", images), run(vae, "decode", z)
    if force_upcast:
        assert got_mean.dtype == got_img.dtype == np.float32
        assert _rel(got_mean, want_mean) <= 5e-6 and _rel(got_img, want_img) <= 5e-6  # measured 4.7e-7
    else:
        assert got_img.dtype == np.float16
        assert not np.isfinite(np.asarray(got_img, np.float32)).all()


def test_taesd_encode_decode_match_diffusers(tmp_path):
    ref = randomize(diffusers.AutoencoderTiny(**TAESD), 0, std=0.1).eval()
    ref.save_pretrained(tmp_path / "src")
    taesd = sf.load(tmp_path / "src")  # converted in memory
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
    z = rng.standard_normal((3, 4, 5, 4)).astype(np.float32)
    with torch.no_grad():
        want_lat = _nhwc(ref.encode(_nchw(images)).latents)
        want_img = _nhwc(ref.decode(_nchw(z)).sample)
    assert _rel(run(taesd, "encode", images), want_lat) <= 3e-6  # measured 2.6e-7
    assert _rel(run(taesd, "decode", z), want_img) <= 3e-6  # measured 2.4e-7


def test_taesd_scaled_latents_with_a_shift_match_the_sd3_pipelines_formula(tmp_path):
    """A TAESD3-style config with a scale and a shift: the latents the model sees are
    ``(encode(x) - shift) * scale`` and decode ``z / scale + shift`` (diffusers' SD3 pipelines, on
    diffusers' module); a decoder ignoring either would miss."""
    ref = randomize(diffusers.AutoencoderTiny(**TAESD, scaling_factor=1.5, shift_factor=0.3), 0, std=0.1).eval()
    ref.save_pretrained(tmp_path / "src")
    taesd = sf.load(tmp_path / "src")
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
    z = rng.standard_normal((2, 4, 3, 4)).astype(np.float32)
    with torch.no_grad():
        want_lat = (_nhwc(ref.encode(_nchw(images)).latents) - 0.3) * 1.5
        want_img = _nhwc(ref.decode(_nchw(z) / 1.5 + 0.3).sample)
        unshifted = _nhwc(ref.decode(_nchw(z) / 1.5).sample)
    assert _rel(run(taesd, "encode_latents", images), want_lat) <= 3e-6
    assert _rel(run(taesd, "decode_latents", z), want_img) <= 3e-6
    assert _rel(run(taesd, "decode_latents", z), unshifted) > 1e-3  # the shift counts


@pytest.mark.parametrize("cls,cfg,field,value", [
    ("AutoencoderKL", VAES["sd"], "act_fn", "gelu"),
    ("AutoencoderKL", VAES["sd"], "latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("AutoencoderTiny", TAESD, "upsample_fn", "bilinear"),
])
def test_unsupported_autoencoder_config(tmp_path, capsys, cls, cfg, field, value):
    getattr(diffusers, cls)(**cfg).save_pretrained(tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, field: value}))
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "unsupported" in err and field in err and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("cls,cfg,key", [("AutoencoderKL", VAES["sd"], "decoder.mid_block.attentions.0.to_q.weight"),
                                         ("AutoencoderTiny", TAESD, "decoder.layers.2.conv.2.weight")])
def test_autoencoder_wrong_shape(tmp_path, capsys, cls, cfg, key):
    from safetensors.torch import load_file, save_file

    getattr(diffusers, cls)(**cfg).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, path)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
    assert repr(key) in capsys.readouterr().err
