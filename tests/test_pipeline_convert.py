"""A whole SD1.5-style pipeline directory: every supported component converts, the rest is
copied or skipped with a reason, and one bad component leaves nothing behind."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from conftest import CLIP, TAESD, UNETS, VAES, write_tiny_clip_vocab

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.tokenizer import CLIPTokenizer


def make_sd15_pipeline(root):
    torch.manual_seed(0)
    unet_cfg = dict(UNETS["sd15"], cross_attention_dim=CLIP["hidden_size"])
    diffusers.UNet2DConditionModel(**unet_cfg).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(**VAES["sd"]).save_pretrained(root / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)).save_pretrained(root / "text_encoder")
    t5 = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                               feed_forward_proj="gated-gelu")
    transformers.T5EncoderModel(t5).save_pretrained(root / "text_encoder_2")
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
    }))


def test_pipeline_converts_every_supported_component(tmp_path, capsys):
    make_sd15_pipeline(tmp_path / "pipe")
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "out"), "-q"]) == 0
    out = capsys.readouterr().out
    for line in ("converted unet (UNet2DConditionModel)", "converted vae (AutoencoderKL)",
                 "converted text_encoder (CLIPTextModel)", "copied    scheduler", "copied    tokenizer",
                 "converted text_encoder_2 (T5EncoderModel)", "skipped   image_encoder: unsupported class BertModel",
                 "skipped   safety_checker: not present"):
        assert line in out, out
    assert sf.load(tmp_path / "out").class_name == "UNet2DConditionModel"  # the velocity network by default
    vae = sf.load(tmp_path / "out", component="vae")
    ref_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae")
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref_vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(vae.module.decode(z)), want, atol=1e-4 * np.abs(want).max())
    text = sf.load(tmp_path / "out", component="text_encoder")
    ids = CLIPTokenizer.from_dir(tmp_path / "out" / "tokenizer")(["a photo of the cat"])
    assert text.module(ids)["last_hidden_state"].shape == (1, 77, CLIP["hidden_size"])


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


def test_taesd_directory_converts(tmp_path):
    diffusers.AutoencoderTiny(**TAESD).save_pretrained(tmp_path / "taesd")
    sf.convert(tmp_path / "taesd", tmp_path / "out", progress=False)
    assert sf.load(tmp_path / "out").class_name == "AutoencoderTiny"
