"""A whole SD1.5-style pipeline directory: every supported component converts, the rest is
copied or skipped with a reason, and one bad component leaves nothing behind."""

from __future__ import annotations

import functools
import json

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP, TAESD, UNETS, VAES, randomize, write_tiny_clip_vocab
from safetensors.torch import load_file, save_file

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.tokenizer import CLIPTokenizer


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@functools.partial(jax.jit, static_argnums=1)
def run(model, method, *args):
    """``model.module.METHOD(*args)`` (``__call__`` for the forward), jitted: an un-jitted NNX
    call of a UNet or VAE costs several compiles' time."""
    return getattr(model.module, method)(*args)


def make_sd15_pipeline(root):
    """Random weights everywhere (diffusers' init has ones and zeros that would hide a wrong mapping)."""
    unet_cfg = dict(UNETS["sd15"], cross_attention_dim=CLIP["hidden_size"])
    randomize(diffusers.UNet2DConditionModel(**unet_cfg), 1, std=0.1).save_pretrained(root / "unet")
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 2, std=0.1).save_pretrained(root / "vae")
    randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3, std=0.2).save_pretrained(
        root / "text_encoder")
    t5 = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                               feed_forward_proj="gated-gelu")
    randomize(transformers.T5EncoderModel(t5), 4, std=0.3).save_pretrained(root / "text_encoder_2")
    transformers.BertModel(transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=16)).save_pretrained(
        root / "image_encoder")  # no family: skipped
    write_tiny_clip_vocab(root / "tokenizer")
    diffusers.DDIMScheduler().save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "image_encoder": ["transformers", "BertModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "requires_safety_checker": False, "force_zeros_for_empty_prompt": True,  # settings, not components
    }))


def test_pipeline_converts_every_supported_component(tmp_path, capsys):
    make_sd15_pipeline(tmp_path / "pipe")
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "out"), "-q"]) == 0
    out = capsys.readouterr().out
    for line in ("converted unet (UNet2DConditionModel)", "converted vae (AutoencoderKL)",
                 "converted text_encoder (CLIPTextModel)", "copied    scheduler", "copied    tokenizer",
                 "converted text_encoder_2 (T5EncoderModel)", "skipped   image_encoder: unsupported class BertModel",
                 "skipped   safety_checker: none in this pipeline ([null, null] in model_index.json)"):
        assert line in out, out
    assert "requires_safety_checker" not in out and "force_zeros_for_empty_prompt" not in out
    # every converted component computes what its diffusers/transformers original does
    # (measured rel. errors: UNet 7.3e-7, VAE 3.5e-7, CLIP 3.3e-7, T5 6e-8)
    pipe = tmp_path / "pipe"
    unet = sf.load(tmp_path / "out")  # the velocity network by default
    assert unet.class_name == "UNet2DConditionModel"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999, 250], np.float32)
    ehs = rng.standard_normal((2, 5, CLIP["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        want = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet")(
            torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ehs)).sample
    assert rel(run(unet, "__call__", x, t, ehs), want.permute(0, 2, 3, 1).numpy()) <= 1e-5

    vae = sf.load(tmp_path / "out", component="vae")
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = diffusers.AutoencoderKL.from_pretrained(pipe / "vae").decode(
            torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    assert rel(run(vae, "decode", z), want) <= 3e-6

    ids = CLIPTokenizer.from_dir(tmp_path / "out" / "tokenizer")(["a photo of the cat", "string"])
    with torch.no_grad():
        want = transformers.CLIPTextModel.from_pretrained(pipe / "text_encoder")(torch.from_numpy(ids)).last_hidden_state
    text = sf.load(tmp_path / "out", component="text_encoder")
    assert rel(run(text, "__call__", ids)["last_hidden_state"], want) <= 3e-6

    t5_ids = np.array([[5, 9, 17, 3, 1, 0, 0], [8, 30, 2, 11, 6, 21, 1]])
    with torch.no_grad():
        want = transformers.T5EncoderModel.from_pretrained(pipe / "text_encoder_2")(
            torch.from_numpy(t5_ids)).last_hidden_state
    t5 = sf.load(tmp_path / "out", component="text_encoder_2")
    assert rel(run(t5, "__call__", t5_ids)["last_hidden_state"], want) <= 1e-6


def test_bad_component_fails_the_whole_pipeline(tmp_path, capsys):
    make_sd15_pipeline(tmp_path / "pipe")
    weights = tmp_path / "pipe" / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if "final_layer_norm.weight" in k))
    save_file(tensors, weights)
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "missing tensor" in err and "final_layer_norm.weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    # config= names one model's fields: on a pipeline it was ignored
    with pytest.raises(sf.ConversionError, match="config= overrides one model's fields; this is a pipeline"):
        sf.convert(tmp_path / "pipe", tmp_path / "out", config={"num_layers": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_converting_a_converted_directory_says_so(tmp_path, capsys):
    """A converted pipeline or model given to convert again: 'no supported component' (listing
    the pipeline's absent extras) or 'no diffusion_pytorch_model.safetensors' before."""
    make_sd15_pipeline(tmp_path / "pipe")
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "conv"), "-q"]) == 0
    for src in (tmp_path / "conv", tmp_path / "conv" / "unet"):
        capsys.readouterr()
        assert cli(["convert", str(src), str(tmp_path / "again"), "-q"]) == 1
        err = capsys.readouterr().err
        assert f"{src}: already converted by streamflow-jax; sf.load, generate, bench, export and serve take it" in err
        assert not (tmp_path / "again").exists()


def test_taesd_directory_converts(tmp_path):
    """A TAESD directory converts, and decodes and encodes as diffusers' AutoencoderTiny
    (measured rel. errors 2.0e-7, 2.6e-7)."""
    ref = randomize(diffusers.AutoencoderTiny(**TAESD), 5, std=0.1).eval()
    ref.save_pretrained(tmp_path / "taesd")
    sf.convert(tmp_path / "taesd", tmp_path / "out", progress=False)
    taesd = sf.load(tmp_path / "out")
    assert taesd.class_name == "AutoencoderTiny"
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1, 4, 6, 4)).astype(np.float32)
    images = rng.uniform(-1, 1, (1, 32, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want_img = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
        want_lat = ref.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latents.permute(0, 2, 3, 1).numpy()
    assert rel(run(taesd, "decode", z), want_img) <= 3e-6
    assert rel(run(taesd, "encode", images), want_lat) <= 3e-6
