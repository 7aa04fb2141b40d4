"""The checkpoints people have: PeRFlow directories with their base model's scheduler
(overrides), delta weights, half-precision variant files."""

from __future__ import annotations

import json
import re
import shutil

import diffusers
import jax
from flax import nnx
import numpy as np
import pytest
import torch
from conftest import UNETS, make_perflow_pipeline, perflow_reference_velocity, randomize
from safetensors.torch import save_file

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.models import flat_params
from streamflow_jax.models.perflow import PeRFlowAdapter
from streamflow_jax.schedules import alphas_cumprod

DDIM_CONFIG = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
               "timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False}


def _leaves(model):
    """``{"conv_in.bias": array}``: the model's parameters under their dotted names."""
    flat, _, _ = flat_params(nnx.to_pure_dict(model.state))
    return {k: np.asarray(v) for k, v in flat.items()}


# ---------------------------------------------------------------------------------------------
# Scheduler override
# ---------------------------------------------------------------------------------------------


def test_scheduler_override_on_the_base_models_config(tmp_path, capsys):
    """A PeRFlow UNet shipped with its base model's DDIM scheduler: refused with a hint; with
    the override, exactly the images of a directory whose scheduler says PeRFlow."""
    base = make_perflow_pipeline(tmp_path / "base", scheduler=DDIM_CONFIG)
    shutil.copytree(base, tmp_path / "perflow")
    (tmp_path / "perflow" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PeRFlowScheduler", "prediction_type": "diff_eps", "num_time_windows": 4,
         "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}))
    with pytest.raises(sf.ConfigError, match=r"prediction_type='epsilon'.*prediction_type='diff_eps'"):
        sf.Pipeline.from_diffusers(base)
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    over = sf.Pipeline.from_diffusers(base, prediction_type="diff_eps", num_time_windows=4)
    want = sf.Pipeline.from_diffusers(tmp_path / "perflow")
    np.testing.assert_array_equal(over("a cat", noise=noise, output_type="latent"),
                                  want("a cat", noise=noise, output_type="latent"))
    assert cli(["generate", "--model", str(base), "--prompt", "a cat", "--prediction-type", "diff_eps",
                "--windows", "4", "--out", str(tmp_path / "o.png")]) == 0
    assert cli(["generate", "--model", str(base), "--prompt", "a cat", "--out", str(tmp_path / "o2.png")]) == 1
    assert "--prediction-type diff_eps" in capsys.readouterr().err


def test_betas_come_from_the_scheduler_config():
    """A linear beta schedule gives other alphas, and the adapter's velocity follows them."""
    linear = alphas_cumprod(0.0001, 0.02, "linear")
    np.testing.assert_allclose(linear, np.cumprod(1 - np.linspace(0.0001, 0.02, 1000)), rtol=1e-6)
    assert not np.allclose(linear, alphas_cumprod())
    with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
        PeRFlowAdapter("diff_eps", 4, beta_schedule="squaredcos_cap_v2")
    adapter = PeRFlowAdapter("ddim_eps", 4, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    t = np.array([0.9, 0.3], np.float32)
    lam, eta, t_e = (np.asarray(a) for a in jax.vmap(adapter.coefficients)(t))
    got = ((lam[:, None] * x + eta[:, None] * eps) - x) / (t_e - t)[:, None]
    want = [_linear_reference(eps[i], x[i], float(t[i])) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _linear_reference(eps, x, t):
    """perflow_reference_velocity's ddim_eps with linear betas (written out here)."""
    k = 4
    w = next(i for i in range(k) if np.float32(1 - (i + 1) / k) < np.float32(t) - np.float32(1e-4))
    t_s, t_e = 1 - w / k, 1 - (w + 1) / k
    ac = np.cumprod(1 - np.linspace(0.0001, 0.02, 1000))
    a_s, a_e = ac[int(t_s * 1000) - 1], ac[max(int(t_e * 1000) - 1, 0)]
    lam_s, eta_s = np.sqrt(a_e / a_s), np.sqrt(1 - a_e) - np.sqrt(a_e / a_s * (1 - a_s))
    denom = lam_s * (t - t_s) + (t_e - t)
    return ((lam_s * (t_e - t_s) / denom) * x + eta_s * (t_e - t) / denom * eps - x) / (t_e - t)


# ---------------------------------------------------------------------------------------------
# Delta weights
# ---------------------------------------------------------------------------------------------


def _delta_dir(base: torch.nn.Module, path, name="diffusion_pytorch_model.v0-1.safetensors", seed=1, drop=None):
    gen = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in base.state_dict().items()}
    if drop:
        deltas.pop(drop)
    path.mkdir(parents=True, exist_ok=True)
    base.save_config(path)
    save_file(deltas, path / name)
    return deltas


def test_delta_weights_add_to_a_unet_and_to_a_pipeline(tmp_path):
    unet = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0, std=0.1).eval()
    unet.save_pretrained(tmp_path / "unet")
    deltas = _delta_dir(unet, tmp_path / "delta")
    merged = diffusers.UNet2DConditionModel(**UNETS["sd15"]).eval()
    merged.load_state_dict({k: v + deltas[k] for k, v in unet.state_dict().items()})
    merged.save_pretrained(tmp_path / "merged")
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "--delta", str(tmp_path / "delta"),
                "-q"]) == 0
    got, want = _leaves(sf.load(tmp_path / "out")), _leaves(sf.load(tmp_path / "merged"))
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # bf16 target: added in float32, then cast
    half = sf.load(tmp_path / "unet", delta=tmp_path / "delta").astype(jax.numpy.bfloat16)
    sf.convert(tmp_path / "unet", tmp_path / "out_bf16", dtype="bfloat16", delta=tmp_path / "delta", progress=False)
    want = _leaves(half)
    for k, v in _leaves(sf.load(tmp_path / "out_bf16")).items():
        np.testing.assert_array_equal(v, want[k])
    # a whole pipeline: its unet gets the delta
    pipe = make_perflow_pipeline(tmp_path / "pipe")
    pipe_unet = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet")
    _delta_dir(pipe_unet, tmp_path / "pdelta", seed=2)
    sf.convert(pipe, tmp_path / "pout", delta=tmp_path / "pdelta", progress=False)
    base = _leaves(sf.load(pipe))
    assert any(not np.array_equal(v, base[k]) for k, v in _leaves(sf.load(tmp_path / "pout")).items())


def test_bad_deltas(tmp_path, capsys):
    unet = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0, std=0.1).eval()
    unet.save_pretrained(tmp_path / "unet")
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    _delta_dir(unet, tmp_path / "missing", drop=key)
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "--delta", str(tmp_path / "missing"),
                "-q"]) == 1
    assert f"{key!r} has no delta" in capsys.readouterr().err
    other = diffusers.UNet2DConditionModel(**dict(UNETS["sd15"], cross_attention_dim=32)).eval()
    _delta_dir(other, tmp_path / "other")
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "--delta", str(tmp_path / "other"),
                "-q"]) == 1
    assert "has shape" in capsys.readouterr().err
    _delta_dir(unet, tmp_path / "two", name="diffusion_pytorch_model.a.safetensors")
    _delta_dir(unet, tmp_path / "two", name="diffusion_pytorch_model.b.safetensors")
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "--delta", str(tmp_path / "two"),
                "-q"]) == 1
    assert "several weights files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "--delta", str(tmp_path / "two"),
                "--delta-variant", "b", "-q"]) == 0


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_fp16_variant_files(tmp_path, capsys, sharded):
    unet = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0, std=0.1).eval()
    unet.to(torch.float16).save_pretrained(tmp_path / "unet", variant="fp16",
                                           **({"max_shard_size": "200KB"} if sharded else {}))
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err  # the error lists what is there, and says how to read it
    assert "these are the fp16 variant's weights: give --variant fp16" in err, err
    assert cli(["convert", str(tmp_path / "unet"), str(tmp_path / "out"), "--variant", "fp16", "-q"]) == 0
    model = sf.load(tmp_path / "out")
    assert model.dtype == jax.numpy.float16
    sd = {k: v.numpy() for k, v in unet.state_dict().items()}
    np.testing.assert_array_equal(_leaves(model)["conv_in.bias"], sd["conv_in.bias"])


def test_pipeline_of_variant_weights(tmp_path, capsys):
    """A pipeline download holding only fp16 variant files (``from_pretrained(variant="fp16")``'s
    layout, saved by diffusers and transformers) loads with ``variant=``, every component of it,
    without converting first; ``generate`` and ``serve`` take ``--variant``."""
    import transformers

    root = make_perflow_pipeline(tmp_path / "p")
    hub = tmp_path / "hub"
    shutil.copytree(root, hub, ignore=shutil.ignore_patterns("*.safetensors"))  # configs, tokenizer, scheduler
    for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                      ("text_encoder", transformers.CLIPTextModel)):
        cls.from_pretrained(root / name).to(torch.float16).save_pretrained(hub / name, variant="fp16")
    with pytest.raises(sf.ConversionError, match=re.escape("these are the fp16 variant's weights: give --variant "
                                                           "fp16")):
        sf.Pipeline.from_diffusers(hub)
    pipe = sf.Pipeline.from_diffusers(hub, variant="fp16")
    assert {pipe.model.dtype, pipe.text_encoder.dtype, pipe.decoder.dtype} == {np.dtype(np.float16)}
    reference = diffusers.AutoencoderKL.from_pretrained(hub / "vae", variant="fp16", torch_dtype=torch.float16)
    np.testing.assert_array_equal(_leaves(pipe.decoder)["decoder.conv_out.bias"],
                                  reference.state_dict()["decoder.conv_out.bias"].numpy())
    # diffusers' rule: a component without the variant's files (a VAE swapped in) reads its default weights;
    # a pipeline where no component has them is refused
    shutil.copytree(hub, tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "vae")
    shutil.copytree(root / "vae", tmp_path / "mixed" / "vae")
    mixed = sf.Pipeline.from_diffusers(tmp_path / "mixed", variant="fp16")
    assert mixed.model.dtype == np.float16 and mixed.decoder.dtype == np.float32
    with pytest.raises(sf.ConversionError, match=re.escape("variant='fp16', and no component has such weights")):
        sf.Pipeline.from_diffusers(root, variant="fp16")
    assert cli(["convert", str(tmp_path / "mixed"), str(tmp_path / "mixed-conv"), "--variant", "fp16", "-q"]) == 0
    out = tmp_path / "cat.png"
    assert cli(["generate", "--model", str(hub), "--variant", "fp16", "--dtype", "float32", "--prompt", "a cat",
                "--out", str(out), "-q"]) == 0
    assert out.is_file()
    assert cli(["generate", "--variant", "fp16", "--out", str(tmp_path / "d.png"), "-q"]) == 1  # digits: no variants
    assert "--variant is for prompt pipelines" in capsys.readouterr().err
    from streamflow_jax.serve.models import load_served

    served = load_served(str(hub), variant="fp16", slots_per_stream=1, streams=1)  # serve --variant
    assert served.stream.pipe.model.dtype == np.float16
    with pytest.raises(ValueError, match="--variant is for prompt pipelines"):
        load_served(None, variant="fp16")
    with pytest.raises(sf.ConversionError, match="already converted; variant"):  # a converted pipeline has none
        sf.Pipeline.from_diffusers(sf.convert(hub, tmp_path / "conv", variant="fp16", progress=False),
                                   variant="fp16")


# ---------------------------------------------------------------------------------------------
# Image to image
# ---------------------------------------------------------------------------------------------


def test_perflow_img2img_follows_its_windows(tmp_path):
    """PeRFlow image-to-image: the image noised to the truncated grid's start by the training
    diffusion's marginal, then each step in the window its own t falls in, against a plain loop
    (diffusers VAE and UNet, the reference formulas, written here)."""
    import transformers
    from conftest import CLIP

    root = make_perflow_pipeline(tmp_path / "p")
    pipe = sf.Pipeline.from_diffusers(root)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    noise = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ours = pipe("a cat", image=image, strength=0.6, steps=6, noise=noise, output_type="latent")

    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    with torch.no_grad():
        x0 = vae.encode(torch.from_numpy(image * 2 - 1).permute(0, 3, 1, 2)).latent_dist.mean
        x0 = (x0 * vae.config.scaling_factor).permute(0, 2, 3, 1).numpy().astype(np.float64)
        emb = text(tok(["a cat"], padding="max_length", max_length=CLIP["max_position_embeddings"],
                       truncation=True, return_tensors="pt").input_ids).last_hidden_state
    # 6 steps over 4 windows: [1, .875, .75, .625, .5, .25, 0]; strength 0.6 keeps the last
    # int(min(3.6, 6)) + ... = grid[int(6 - 3.6):] = grid[2:]: it starts at t = 0.75
    grid = [1.0, 0.875, 0.75, 0.625, 0.5, 0.25, 0.0][2:]
    ac = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    a = ac[int(grid[0] * 1000) - 1]
    x = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        with torch.no_grad():
            eps = unet(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2), int(t * 1000), emb).sample
        eps = eps.permute(0, 2, 3, 1).numpy().astype(np.float64)
        x = x + (t_next - t) * perflow_reference_velocity("diff_eps", eps[0], x[0], t)[None]
    err = float(np.max(np.abs(ours - x)) / np.max(np.abs(x)))
    assert err <= 2e-6, err  # measured 1.7e-7
    plain = pipe("a cat", steps=6, noise=noise, output_type="latent")  # the image matters
    assert float(np.max(np.abs(plain - x)) / np.max(np.abs(x))) > 1e-2


def test_digits_redrawn_as_other_classes(tmp_path):
    """The embedded model redraws a real 3 as each digit at strength 0.6, and leaves it a 3 at 0.3."""
    from streamflow_jax.eval import digit_accuracy, real_digits
    from streamflow_jax.pipelines import DigitsPipeline

    x, y = real_digits()
    three = x[np.where(y == 3)[0][0]]
    pipe = DigitsPipeline.load()
    labels = np.repeat(np.arange(10), 4)
    assert digit_accuracy(pipe(labels, image=three, strength=0.6, seed=0), labels) >= 0.9  # measured 0.99
    assert digit_accuracy(pipe(labels, image=three, strength=0.3, seed=0), np.full(40, 3)) >= 0.9  # measured 0.99
    from PIL import Image

    Image.fromarray((three * 255).astype(np.uint8)).save(tmp_path / "three.png")
    assert cli(["generate", "--image", str(tmp_path / "three.png"), "--strength", "0.6", "--per-digit", "2",
                "--out", str(tmp_path / "grid.png")]) == 0
    with pytest.raises(ValueError, match="image has shape"):
        pipe(labels, image=np.zeros((3, 16, 16)), strength=0.5)
    # through the stream engine: the same images, each request noised on the device (the CLI's
    # --stream --image was refused)
    batch = pipe(labels[:8], image=three, strength=[0.6, 0.3] * 4, seed=0)
    np.testing.assert_allclose(pipe.stream(labels[:8], image=three, strength=[0.6, 0.3] * 4, seed=0), batch,
                               atol=1e-5)
    assert cli(["generate", "--image", str(tmp_path / "three.png"), "--stream", "--per-digit", "1",
                "--out", str(tmp_path / "stream.png")]) == 0
    # a path is read as the image (it failed in NumPy), and a list of paths as a batch
    path = tmp_path / "three.png"
    with Image.open(path) as img:
        want = pipe(labels[:2], image=np.asarray(img), strength=0.6, seed=0)
    np.testing.assert_array_equal(pipe(labels[:2], image=str(path), strength=0.6, seed=0), want)
    np.testing.assert_array_equal(pipe(labels[:2], image=[path, path], strength=0.6, seed=0), want)
    for image, strength, message in [
            ([Image.new("L", (16, 16)), Image.new("L", (16, 8))], 0.6, "the images have different sizes (16x8, 16x16)"),
            ([Image.new("L", (16, 16)), np.zeros((16, 16))], 0.6, "a list must hold only PIL images or paths"),
            (tmp_path / "nothing.png", 0.6, "nothing.png': no such file"),
            (np.array(["a"]), 0.6, "image: expected numbers"),
            (three, [0.5, 0.6, 0.7], "strength has shape (3,); expected one number or one per image (40)"),
            (three, "0.6", "strength must be a number in (0, 1], got '0.6'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            pipe(labels, image=image, strength=strength)
