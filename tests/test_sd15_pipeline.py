"""Prompt to image for a PeRFlow-style SD1.5 pipeline: our Pipeline vs a plain loop over the
diffusers/transformers components with the same noise, prompts and PeRFlow formulas."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP, TAESD, UNETS, VAES, perflow_reference_velocity, randomize, write_tiny_clip_vocab

import streamflow_jax as sf
from streamflow_jax.cli import main as cli

PROMPTS = ["a photo of the cat", "string theory!"]


@pytest.fixture
def perflow_pipe(tmp_path):
    root = tmp_path / "perflow"
    randomize(diffusers.UNet2DConditionModel(**dict(UNETS["sd15"], cross_attention_dim=CLIP["hidden_size"])),
              1, std=0.1).save_pretrained(root / "unet")
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 2, std=0.1).save_pretrained(root / "vae")
    randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3, std=0.2).save_pretrained(
        root / "text_encoder")
    write_tiny_clip_vocab(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PeRFlowScheduler", "prediction_type": "diff_eps", "num_time_windows": 4}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["perflow", "PeRFlowScheduler"]}))
    return root


def reference_images(root, prompts, noise, steps, guidance):
    """Plain loop: transformers CLIP + diffusers UNet + the note's PeRFlow formulas + diffusers VAE."""
    tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    text = transformers.CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()

    def embed(p):
        ids = tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return text(ids).last_hidden_state

    cond, uncond = embed(prompts), embed([""] * len(prompts))
    x = noise.astype(np.float64)
    grid = sf.schedules.perflow(steps, 4)
    for t, t_next in zip(grid[:-1], grid[1:]):
        def velocity(emb):
            with torch.no_grad():
                eps = unet(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2), int(t * 1000), emb).sample
            eps = eps.permute(0, 2, 3, 1).numpy().astype(np.float64)
            return np.stack([perflow_reference_velocity("diff_eps", eps[i], x[i], float(t)) for i in range(len(x))])
        v = velocity(cond)
        if guidance is not None:
            v_u = velocity(uncond)
            v = v_u + guidance * (v - v_u)
        x = x + (float(t_next) - float(t)) * v
    with torch.no_grad():
        images = vae.decode(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2) / vae.config.scaling_factor).sample
    images = images.permute(0, 2, 3, 1).numpy()
    return (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("guidance,steps", [(None, 4), (3.0, 5)])
def test_pipeline_matches_plain_diffusers_loop(perflow_pipe, guidance, steps):
    pipe = sf.Pipeline.from_diffusers(perflow_pipe)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = np.stack([np.asarray(im) for im in pipe(PROMPTS, steps=steps, guidance_scale=guidance, noise=noise)])
    want = reference_images(perflow_pipe, PROMPTS, noise, steps, guidance)
    assert ours.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= 2  # uint8 levels
    assert ours.std() > 5  # not a blank image


def test_pipeline_converted_dir_and_taesd(perflow_pipe, tmp_path):
    """The converted pipeline gives the same images; a TAESD directory can replace the VAE."""
    noise = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    direct = np.asarray(sf.Pipeline.from_diffusers(perflow_pipe)("a cat", noise=noise)[0])
    sf.convert(perflow_pipe, tmp_path / "conv", progress=False)
    converted = np.asarray(sf.Pipeline.from_diffusers(tmp_path / "conv")("a cat", noise=noise)[0])
    np.testing.assert_array_equal(direct, converted)
    randomize(diffusers.AutoencoderTiny(**TAESD), 5, std=0.1).save_pretrained(tmp_path / "taesd")
    tiny = sf.Pipeline.from_diffusers(perflow_pipe, taesd=tmp_path / "taesd")
    assert tiny.vae_scale == 8 and tiny.latent_shape(64, 64) == (8, 8, 4)
    assert np.asarray(tiny("a cat", noise=noise, height=64, width=64)[0]).shape == (64, 64, 3)


def test_generate_cli_prompt(perflow_pipe, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli(["generate", "--model", str(perflow_pipe), "--prompt", "a cat", "--prompt", "a dog", "--steps", "4",
                "--guidance", "2", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (2 * 16, 16)


def test_pipeline_bad_input(perflow_pipe, tmp_path):
    pipe = sf.Pipeline.from_diffusers(perflow_pipe)
    with pytest.raises(ValueError, match="non-empty list"):
        pipe([])
    with pytest.raises(ValueError, match="noise has shape"):
        pipe("a cat", noise=np.zeros((1, 8, 8, 3), np.float32))  # the size may vary, the channels may not
    with pytest.raises(ValueError, match="not a multiple of 2"):
        pipe("a cat", height=15)
    (perflow_pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "prediction_type": "epsilon"}))
    with pytest.raises(sf.ConversionError, match="not a rectified flow"):
        sf.Pipeline.from_diffusers(perflow_pipe)


def test_prompt_stream_equals_pipeline(perflow_pipe):
    """Through the stream engine (mixed steps, guidance on) each image equals the pipeline's."""
    from streamflow_jax.pipelines import PromptStream
    from streamflow_jax.stream import RequestError

    pipe = sf.Pipeline.from_diffusers(perflow_pipe)
    noise = np.random.default_rng(2).standard_normal((3, 8, 8, 4)).astype(np.float32)
    stream = PromptStream(pipe, slots_per_stream=2, streams=1, guidance=True)
    steps = [4, 6, 5]
    ids = [stream.submit(PROMPTS[i % 2], steps=steps[i], noise=noise[i], guidance_scale=2.0) for i in range(3)]
    bad = [stream.submit(["not", "a", "string"], guidance_scale=2.0), stream.submit([], guidance_scale=2.0),
           stream.submit("ok", steps=0, guidance_scale=2.0), stream.submit("no guidance scale")]
    results = stream.run()
    assert len(results) == 7
    for i, rid in enumerate(ids):
        want = pipe(PROMPTS[i % 2], steps=steps[i], guidance_scale=2.0, noise=noise[i : i + 1])[0]
        assert np.abs(np.asarray(results[rid]).astype(int) - np.asarray(want).astype(int)).max() <= 1
    for rid in bad:
        assert isinstance(results[rid], RequestError)
