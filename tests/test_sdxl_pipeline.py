"""Prompt to image for PeRFlow-SDXL (a ``StableDiffusionXLPipeline`` directory as the hub ships
it, with SDXL's ``EulerDiscreteScheduler`` and PeRFlow's override): our pipeline (and
PromptStream, img2img, the CLI) vs an independent loop at the latent level, in float:
diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``, diffusers'
UNet with ``added_cond_kwargs``, and PeRFlow's grid and window updates written in the tests
(nothing of ``sf.schedules`` or ``models.perflow``)."""

from __future__ import annotations

import itertools
import json

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP, CLIP_G, SDXL_UNET, TAESD, VAES, randomize, write_tiny_clip_vocab
from PIL import Image
from test_sd15_pipeline import perflow_grid, perflow_velocity, rel, sd_alphas_cumprod

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.pipelines import PromptStream
from streamflow_jax.pipelines.sdxl import PeRFlowSDXLPipeline

PROMPTS = ["a photo of the cat", "string theory!"]
NEGATIVE = ["the photo", "cat string"]
TOL = 3e-5  # relative (max |ours - ref| / max |ref|), latent level, CPU fp32; measured <= 2.7e-6
OVERRIDE = dict(prediction_type="ddim_eps", num_time_windows=4)  # PeRFlow's instructions for its SDXL models
# SDXL base's scheduler_config.json (the PeRFlow-SDXL hub directories ship it), with the fields
# of other schedulers it carries (diffusers' from_config ignores them)
EULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
             use_karras_sigmas=False, trained_betas=None)
EULER_FILE = dict(EULER, _class_name="EulerDiscreteScheduler", _diffusers_version="0.19.0.dev0", clip_sample=False,
                  sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)


# ---------------------------------------------------------------------------------------------
# The tiny pipeline: SDXL's layout, a text path and added conditions that matter
# ---------------------------------------------------------------------------------------------


def make_sdxl_pipeline(root, unet_config=None):
    """A tiny SDXL pipeline saved by diffusers' own ``StableDiffusionXLPipeline.save_pretrained``
    (model_index.json with force_zeros_for_empty_prompt, feature_extractor/image_encoder null):
    CLIP-L + CLIP-G with its projection, tokenizer_2 padding with ``!`` (as SDXL's), the VAE
    with SDXL's scaling factor 0.13025 and ``force_upcast: false`` (as the fp16-fix VAE ships).
    Cross-attention keys/values x10 and outputs x3, ``conv_out`` x10, the added embedding's
    output x3: the UNet's eps is the size of the noise and follows the text, the pooled
    embedding and the time ids (measured in the tests). ``unet_config``: another UNet config
    than ``SDXL_UNET`` (the LoRA test takes SDXL's published layout of two resnets per block)."""
    unet = randomize(diffusers.UNet2DConditionModel(**(unet_config or SDXL_UNET)), 1, std=0.1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name or name.startswith("conv_out."):
                p.mul_(10)
            elif ".attn2.to_out." in name or name.startswith("add_embedding.linear_2"):
                p.mul_(3)
    vae = randomize(diffusers.AutoencoderKL(**VAES["sd"], scaling_factor=0.13025, force_upcast=False), 2, std=0.1)
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3, std=0.5)
    text_2 = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G)), 4, std=0.5)
    write_tiny_clip_vocab(root / "vocab")
    files = (str(root / "vocab" / "vocab.json"), str(root / "vocab" / "merges.txt"))
    tok = transformers.CLIPTokenizer(*files, model_max_length=77)
    tok_2 = transformers.CLIPTokenizer(*files, model_max_length=77, pad_token="!")
    pipe = diffusers.StableDiffusionXLPipeline(vae, text, text_2, tok, tok_2, unet,
                                               diffusers.EulerDiscreteScheduler(**EULER), add_watermarker=False)
    pipe.save_pretrained(root / "sdxl")
    (root / "sdxl" / "scheduler" / "scheduler_config.json").write_text(json.dumps(EULER_FILE))
    return root / "sdxl"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return sf.Pipeline.from_diffusers(sdxl_dir, **OVERRIDE)


class Reference:
    """diffusers' SDXL pipeline for the text (``encode_prompt``) and the time ids
    (``_get_add_time_ids``), its UNet with ``added_cond_kwargs``, PeRFlow's window formulas."""

    def __init__(self, root):
        self.pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(root, add_watermarker=False)
        self.ac = sd_alphas_cumprod()

    def embed(self, prompts, negative=None, cfg=False):
        """``(text, pooled, negative text, negative pooled)`` as the pipeline encodes them
        (``negative=None`` with CFG: zeros, force_zeros_for_empty_prompt)."""
        with torch.no_grad():
            pe, ne, pooled, npooled = self.pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=cfg,
                                                              negative_prompt=negative)
        return pe, pooled, ne, npooled

    def time_ids(self, height, width, original=None, crops=(0, 0), target=None, batch=1):
        ids = self.pipe._get_add_time_ids(original or (height, width), crops, target or (height, width),
                                          dtype=torch.float32,
                                          text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim)
        return ids.repeat(batch, 1)

    def latents(self, prompts, noise, steps, *, guidance=None, negative=None, prediction="ddim_eps", k=4, micro=None,
                pooled=None, grid=None, x=None):
        """The loop of PeRFlow's pipelines (CFG on the UNet output, then the scheduler step),
        NHWC float64 latents out. ``pooled`` replaces the pooled embedding (to show it counts);
        ``grid``/``x``: start from this grid tail and latent (image-to-image)."""
        scale = self.pipe.vae_scale_factor  # the tiny VAE's 2 (SDXL's 8)
        b, h, w = noise.shape[0], noise.shape[1] * scale, noise.shape[2] * scale
        pe, pp, ne, npp = self.embed(prompts, negative, cfg=guidance is not None)
        if pooled is not None:
            pp = torch.from_numpy(pooled)
        ids = self.time_ids(h, w, **(micro or {}), batch=b)
        ehs, text, time_ids = pe, pp, ids
        if guidance is not None:
            ehs, text, time_ids = torch.cat([ne, pe]), torch.cat([npp, pp]), torch.cat([ids, ids])
        x = noise.astype(np.float64) if x is None else x
        for t, t_next in itertools.pairwise(perflow_grid(steps, k) if grid is None else grid):
            xin = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
            if guidance is not None:
                xin = torch.cat([xin, xin])
            with torch.no_grad():
                out = self.pipe.unet(xin, int(t * 1000), ehs, added_cond_kwargs={"text_embeds": text,
                                                                                   "time_ids": time_ids}).sample
            out = out.permute(0, 2, 3, 1).numpy().astype(np.float64)
            if guidance is not None:
                u, c = np.split(out, 2)
                out = u + guidance * (c - u)
            x = x + (t_next - t) * perflow_velocity(prediction, out, x, t, k, self.ac)
        return x


@pytest.fixture(scope="module")
def reference(sdxl_dir):
    return Reference(sdxl_dir)


def _noise(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Latent parity
# ---------------------------------------------------------------------------------------------


def test_pipeline_matches_reference_loop_cfg(pipe, reference):
    """ddim_eps (PeRFlow-SDXL's), 4 steps, CFG 3 against negative prompts, 16x16 images. The test
    sees every input: the prompts swapped, the pooled embedding of the other prompt, and the
    time ids of another size each move the reference by far more than TOL. Measured 2.7e-6;
    the moves 6.0e-1, 1.0e-2, 4.7e-3."""
    noise = _noise((2, 8, 8, 4), 0)
    kw = dict(guidance=3.0, negative=NEGATIVE)
    want = reference.latents(PROMPTS, noise, 4, **kw)
    ours = pipe(PROMPTS, steps=4, guidance_scale=3.0, negative_prompt=NEGATIVE, noise=noise, output_type="latent")
    assert ours.shape == want.shape == (2, 8, 8, 4)
    assert rel(ours, want) <= TOL
    assert rel(reference.latents(PROMPTS[::-1], noise, 4, **kw), want) > 100 * TOL
    other_pooled = reference.embed(PROMPTS[::-1])[1].numpy()
    assert rel(reference.latents(PROMPTS, noise, 4, **kw, pooled=other_pooled), want) > 100 * TOL
    assert rel(reference.latents(PROMPTS, noise, 4, **kw, micro={"original": (32, 32)}), want) > 100 * TOL


def test_pipeline_matches_reference_loop_non_square(sdxl_dir, reference):
    """diff_eps, 6 steps (two windows get two), no guidance, a 16x24 image (8x12 latents with the
    tiny VAE's factor 2: time ids (16, 24, 0, 0, 16, 24)). Measured 7.5e-7 (ddim_eps: 1.8e-1 away)."""
    noise = _noise((2, 8, 12, 4), 1)
    diff = sf.Pipeline.from_diffusers(sdxl_dir, prediction_type="diff_eps")
    want = reference.latents(PROMPTS, noise, 6, prediction="diff_eps")
    ours = diff(PROMPTS, steps=6, noise=noise, output_type="latent")
    assert rel(ours, want) <= TOL
    assert rel(reference.latents(PROMPTS, noise, 6, prediction="ddim_eps"), want) > 100 * TOL


def test_force_zeros_and_micro_conditioning(pipe, reference):
    """The default negative prompt "" is diffusers' no negative prompt: zeros (text and pooled,
    force_zeros_for_empty_prompt); the micro-conditioning given per call is diffusers' time ids
    of the same sizes and crop; an empty positive prompt is encoded (diffusers encodes it).
    Measured 1.5e-6, 1.6e-6 and 6.1e-7; the encoded empty string as the negative is 5.6e-1 away
    (and, with the UNet of two resnets per block, a zeroed empty positive prompt was 8.5e-1 away)."""
    noise = _noise((2, 8, 8, 4), 2)
    want = reference.latents(PROMPTS, noise, 4, guidance=2.5)  # negative_prompt=None
    assert rel(pipe(PROMPTS, steps=4, guidance_scale=2.5, noise=noise, output_type="latent"), want) <= TOL
    encoded_empty = reference.latents(PROMPTS, noise, 4, guidance=2.5, negative=["", ""])
    assert rel(encoded_empty, want) > 100 * TOL  # zeros, not the encoded empty string
    # an empty positive prompt is encoded, as diffusers encodes it (its negative stays zeros)
    want = reference.latents(["", PROMPTS[1]], noise, 4, guidance=2.5)
    assert rel(pipe(["", PROMPTS[1]], steps=4, guidance_scale=2.5, noise=noise, output_type="latent"), want) <= TOL
    micro = dict(original_size=(128, 96), crops_coords_top_left=(16, 8), target_size=(64, 80))
    want = reference.latents(PROMPTS, noise, 4, micro={"original": (128, 96), "crops": (16, 8), "target": (64, 80)})
    assert rel(pipe(PROMPTS, steps=4, noise=noise, output_type="latent", **micro), want) <= TOL
    assert pipe.original_size is None  # a call's settings stay with the call
    with pytest.raises(ValueError, match="original_size must be a pair of integers"):
        pipe(PROMPTS, original_size=(1024,))


def test_micro_conditioning_at_load_applies_to_every_call_and_stream(sdxl_dir, reference):
    """``original_size=``, ``crops_coords_top_left=``, ``target_size=`` given to
    ``Pipeline.from_diffusers`` are diffusers' time ids of those sizes and crop for every call
    (with and without CFG) and for every request of a ``PromptStream`` built on the pipeline; a
    call's own ``target_size`` replaces the loaded one for that call only. Measured 8.6e-7
    (no CFG), 1.7e-6 (CFG), 9.0e-7 (a call's target_size), 8.8e-7 and 1.4e-6 (the stream); the
    image's own time ids are 7.3e-3 away with CFG (3.5e-3 without)."""
    micro = dict(original_size=(128, 96), crops_coords_top_left=(16, 8), target_size=(64, 80))
    loaded = sf.Pipeline.from_diffusers(sdxl_dir, **OVERRIDE, **micro)
    ref_micro = {"original": (128, 96), "crops": (16, 8), "target": (64, 80)}
    noise = _noise((2, 8, 8, 4), 9)
    want = reference.latents(PROMPTS, noise, 4, micro=ref_micro)
    assert rel(loaded(PROMPTS, steps=4, noise=noise, output_type="latent"), want) <= TOL  # measured 8.6e-7
    want_cfg = reference.latents(PROMPTS, noise, 4, guidance=2.5, negative=NEGATIVE, micro=ref_micro)
    ours = loaded(PROMPTS, steps=4, guidance_scale=2.5, negative_prompt=NEGATIVE, noise=noise, output_type="latent")
    assert rel(ours, want_cfg) <= TOL  # measured 1.7e-6
    # the time ids count (the tiny UNet's added embedding moves the latents little: 3.5e-3 without CFG)
    assert rel(reference.latents(PROMPTS, noise, 4, guidance=2.5, negative=NEGATIVE), want_cfg) > 100 * TOL  # 7.3e-3
    # a call's own setting replaces the loaded one for that call, the others stay
    want_call = reference.latents(PROMPTS, noise, 4, micro=dict(ref_micro, target=(16, 16)))
    assert rel(loaded(PROMPTS, steps=4, noise=noise, output_type="latent", target_size=(16, 16)), want_call) <= TOL
    assert loaded.target_size == (64, 80)
    stream = PromptStream(loaded, slots_per_stream=2, guidance=True, output_type="latent")
    ids = [stream.submit(PROMPTS[i], steps=[4, 5][i], noise=noise[i], guidance_scale=[None, 2.5][i],
                         negative_prompt=["", NEGATIVE[1]][i]) for i in range(2)]
    results = stream.run()
    for i, rid in enumerate(ids):
        want = reference.latents(PROMPTS[i : i + 1], noise[i : i + 1], [4, 5][i], guidance=[None, 2.5][i],
                                 negative=[None, NEGATIVE[1:]][i], micro=ref_micro)[0]
        assert rel(results[rid], want) <= TOL, i


def test_force_zeros_for_empty_prompt_false(sdxl_dir, reference, tmp_path):
    """``"force_zeros_for_empty_prompt": false`` in model_index.json: with guidance on and no (or
    an empty) negative prompt, the negative is the encoded empty string, as diffusers'
    StableDiffusionXLPipeline loaded from that directory encodes it (in the pipeline and through
    ``PromptStream``). Measured 2.1e-6 (no negative prompt and "" alike) and 1.9e-6 (stream); the
    zeros of the default setting are 1.08 away."""
    import shutil

    root = tmp_path / "no-zeros"
    shutil.copytree(sdxl_dir, root)
    index = json.loads((root / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True  # what diffusers' save_pretrained wrote
    (root / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    ref = Reference(root)
    assert ref.pipe.config.force_zeros_for_empty_prompt is False
    pipe = sf.Pipeline.from_diffusers(root, **OVERRIDE)
    assert not pipe.force_zeros_for_empty_prompt
    noise = _noise((2, 8, 8, 4), 10)
    want = ref.latents(PROMPTS, noise, 4, guidance=2.5)  # negative_prompt=None: "" encoded
    assert rel(pipe(PROMPTS, steps=4, guidance_scale=2.5, noise=noise, output_type="latent"), want) <= TOL
    assert rel(pipe(PROMPTS, steps=4, guidance_scale=2.5, negative_prompt="", noise=noise, output_type="latent"),
               want) <= TOL
    assert rel(reference.latents(PROMPTS, noise, 4, guidance=2.5), want) > 100 * TOL  # zeros instead
    stream = PromptStream(pipe, slots_per_stream=2, guidance=True, output_type="latent")
    rid = stream.submit(PROMPTS[1], steps=4, noise=noise[1], guidance_scale=2.5)
    assert rel(stream.run()[rid], want[1]) <= TOL


def test_taesdxl_decodes_as_diffusers(sdxl_dir, reference, tmp_path):
    """``taesd=`` takes a TAESDXL (a 4-channel ``AutoencoderTiny``): its "np" images are what
    diffusers' SDXL pipeline computes with ``pipe.vae = AutoencoderTiny(...)`` (latents /
    scaling_factor, decode, its image processor's "np"), and the latents are the reference's at
    the TAESD's image size (its x8: 64x64 images from 8x8 latents, time ids of 64x64). Measured
    1.2e-6 on the latents, 6.6e-7 on the images; the VAE's images are 16x16."""
    tiny = randomize(diffusers.AutoencoderTiny(**TAESD), 5, std=0.1).eval()
    tiny.save_pretrained(tmp_path / "taesd")
    pipe = sf.Pipeline.from_diffusers(sdxl_dir, **OVERRIDE, taesd=tmp_path / "taesd")
    noise = _noise((2, 8, 8, 4), 11)
    latents = pipe(PROMPTS, steps=4, guidance_scale=2.0, noise=noise, output_type="latent")
    want = reference.latents(PROMPTS, noise, 4, guidance=2.0, micro={"original": (64, 64), "target": (64, 64)})
    assert rel(latents, want) <= TOL
    images = pipe(PROMPTS, steps=4, guidance_scale=2.0, noise=noise, output_type="np")
    ref = diffusers.StableDiffusionXLPipeline(**reference.pipe.components)
    ref.vae = tiny
    with torch.no_grad():  # StableDiffusionXLPipeline's decode (no latents_mean/std in a TAESD's config)
        scaled = torch.from_numpy(np.array(latents)).permute(0, 3, 1, 2) / ref.vae.config.scaling_factor
        decoded = ref.vae.decode(scaled, return_dict=False)[0]
    want_img = ref.image_processor.postprocess(decoded, output_type="np")
    assert images.shape == want_img.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(images, want_img, atol=1e-5)  # measured 6.6e-7
    vae_images = sf.Pipeline.from_diffusers(sdxl_dir, **OVERRIDE)(PROMPTS[:1], steps=4, noise=noise[:1],
                                                                  output_type="np")
    assert vae_images.shape == (1, 16, 16, 3)


def test_prompt_stream_equals_reference(pipe, reference):
    """Through the stream engine (mixed steps, so the batch holds different timesteps; CFG with
    and without a negative prompt; an empty prompt; two slots for five requests), at the
    pipeline's default size: each request's latents are the reference's. Measured 6.7e-7 .. 1.8e-6."""
    noise = _noise((5, 8, 8, 4), 3)
    reqs = [(PROMPTS[0], NEGATIVE[0], 4, 3.0), (PROMPTS[1], "", 6, 2.0), (PROMPTS[1], NEGATIVE[1], 5, None),
            (PROMPTS[0], "", 4, None), ("", "", 5, 2.5)]  # the last: "" encoded as the prompt, zeros as the negative
    stream = PromptStream(pipe, slots_per_stream=2, guidance=True, output_type="latent")
    with pytest.warns(UserWarning, match="negative prompt .* is ignored: classifier-free guidance is off") as caught:
        ids = [stream.submit(p, steps=s, noise=noise[i], guidance_scale=g, negative_prompt=n)
               for i, (p, n, s, g) in enumerate(reqs)]
    assert len(caught) == 1 and str(caught[0].message).startswith(f"request {ids[2]}: "), [str(w.message) for w in caught]
    results = stream.run()
    for i, (rid, (p, n, s, g)) in enumerate(zip(ids, reqs)):
        want = reference.latents([p], noise[i : i + 1], s, guidance=g, negative=[n] if n and g else None)[0]
        assert rel(results[rid], want) <= TOL, i


def test_prompt_stream_at_another_size_takes_its_time_ids(sdxl_dir, reference):
    """A stream of 16x24 images: every request's time ids are that size's (16, 24, 0, 0, 16, 24),
    in both branches, as the pipeline (and diffusers) compute them at that size."""
    pipe = sf.Pipeline.from_diffusers(sdxl_dir, prediction_type="diff_eps")
    noise = _noise((2, 8, 12, 4), 4)
    stream = PromptStream(pipe, slots_per_stream=2, guidance=True, height=16, width=24, output_type="latent")
    ids = [stream.submit(PROMPTS[i], steps=4, noise=noise[i], guidance_scale=[None, 2.0][i]) for i in range(2)]
    results = stream.run()
    for i, rid in enumerate(ids):
        want = reference.latents(PROMPTS[i : i + 1], noise[i : i + 1], 4, prediction="diff_eps",
                                 guidance=[None, 2.0][i])[0]
        assert rel(results[rid], want) <= TOL, i


def test_img2img_per_prompt_strength(pipe, reference):
    """Image-to-image with one strength per prompt (per-element grids: the elements start at
    different times, in different windows): the image encoded by diffusers' VAE (mean, x0.13025),
    noised by the training marginal to each element's start, then the reference loop. Measured
    6.6e-7, 6.2e-7 (before the padded steps at t = 0 gave a velocity 0/0: NaN)."""
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    noise = _noise((2, 8, 8, 4), 5)
    ours = pipe(PROMPTS, image=image, strength=[0.6, 0.3], steps=6, noise=noise, output_type="latent")
    vae = reference.pipe.vae
    with torch.no_grad():
        x0 = vae.encode(torch.from_numpy(image * 2 - 1).permute(0, 3, 1, 2)).latent_dist.mean
    x0 = (x0 * 0.13025).permute(0, 2, 3, 1).numpy().astype(np.float64)
    grid = perflow_grid(6, 4)
    for i, strength in enumerate([0.6, 0.3]):
        tail = grid[int(6 - min(6 * strength, 6)):]  # diffusers' img2img cut
        a = reference.ac[int(tail[0] * 1000) - 1]
        x = np.sqrt(a) * x0[i : i + 1] + np.sqrt(1 - a) * noise[i : i + 1]
        want = reference.latents([PROMPTS[i]], noise[i : i + 1], 6, grid=tail, x=x)
        assert rel(ours[i : i + 1], want) <= TOL, i
    assert rel(pipe(PROMPTS, steps=6, noise=noise, output_type="latent")[1:], want) > 1e-2  # the image counts


def test_output_types_and_sdxl_vae(pipe, sdxl_dir, reference):
    """"np" is diffusers' VAE decode of latents / 0.13025 (SDXL's factor, read from the VAE
    config), in [0, 1]; "pil" its uint8 rounding."""
    assert reference.pipe.vae.config.scaling_factor == 0.13025 and not reference.pipe.vae.config.force_upcast
    noise = _noise((1, 8, 8, 4), 6)
    latents = pipe("a cat", noise=noise, output_type="latent")
    images = pipe("a cat", noise=noise, output_type="np")
    with torch.no_grad():
        want = reference.pipe.vae.decode(torch.from_numpy(np.array(latents)).permute(0, 3, 1, 2) / 0.13025).sample
    want = np.clip(want.permute(0, 2, 3, 1).numpy() / 2 + 0.5, 0, 1)
    assert images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(images, want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pipe("a cat", noise=noise)[0]), (images[0] * 255).round().astype(np.uint8))


def test_tokenizer_2_pads_with_its_own_token(pipe, sdxl_dir):
    """SDXL's tokenizer_2 pads with ``!``, tokenizer with ``<|endoftext|>``: both as transformers'."""
    for sub, (_, ours) in (("tokenizer", pipe.clip_l), ("tokenizer_2", pipe.clip_g)):
        ref = transformers.CLIPTokenizer.from_pretrained(sdxl_dir / sub)
        want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(ours(PROMPTS), want)
    assert pipe.clip_l[1](["a"])[0, -1] != pipe.clip_g[1](["a"])[0, -1]


# ---------------------------------------------------------------------------------------------
# Directories, the CLI
# ---------------------------------------------------------------------------------------------


def test_scheduler_override_and_converted_directory(sdxl_dir, pipe, tmp_path):
    """SDXL's EulerDiscreteScheduler needs the PeRFlow override (the error says how); a converted
    directory (both text encoders converted, tokenizer_2 and model_index.json copied) gives the
    same latents, bit for bit."""
    # the override PeRFlow gives for SDXL (ddim_eps): the error suggested SD1.5's diff_eps, which ran and made
    # other images
    with pytest.raises(sf.ConfigError, match="EulerDiscreteScheduler .* is not a rectified flow.*"
                                             "prediction_type='ddim_eps', num_time_windows=4.*--prediction-type "
                                             "ddim_eps --windows 4"):
        sf.Pipeline.from_diffusers(sdxl_dir)
    sf.convert(sdxl_dir, tmp_path / "conv", progress=False)
    record = json.loads((tmp_path / "conv" / "conversion.json").read_text())
    assert record["converted"]["text_encoder_2"] == "CLIPTextModelWithProjection"
    noise = _noise((1, 8, 8, 4), 7)
    converted = sf.Pipeline.from_diffusers(tmp_path / "conv", **OVERRIDE)
    assert isinstance(converted, PeRFlowSDXLPipeline) and converted.force_zeros_for_empty_prompt
    np.testing.assert_array_equal(converted("a cat", noise=noise, output_type="latent"),
                                  pipe("a cat", noise=noise, output_type="latent"))


def test_generate_cli(sdxl_dir, pipe, tmp_path):
    """``generate --model SDXL_DIR --prompt ... --prediction-type ddim_eps --windows 4``: the PNG
    is the pipeline's images side by side; ``--stream`` gives the same."""
    args = ["generate", "--model", str(sdxl_dir), "--prompt", "a cat", "--prompt", "a dog", "--steps", "4",
            "--guidance", "2", "--prediction-type", "ddim_eps", "--windows", "4", "--seed", "3"]
    assert cli([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert cli([*args, "--stream", "--slots", "2", "--out", str(tmp_path / "s.png")]) == 0
    want = np.concatenate([np.asarray(im) for im in pipe(["a cat", "a dog"], steps=4, guidance_scale=2.0, seed=3)],
                          axis=1)
    for name in "bs":
        got = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
        assert got.shape == want.shape == (16, 32, 3) and np.abs(got - want).max() <= 1
    assert want.std() > 5


def test_not_an_sdxl_unet(sdxl_dir, tmp_path):
    import shutil

    from conftest import UNETS

    root = tmp_path / "p"
    shutil.copytree(sdxl_dir, root)
    shutil.rmtree(root / "unet")
    diffusers.UNet2DConditionModel(**dict(UNETS["sd15"], cross_attention_dim=80)).save_pretrained(root / "unet")
    with pytest.raises(sf.ConfigError, match="runs an SDXL UNet"):
        sf.Pipeline.from_diffusers(root, **OVERRIDE)


def test_delta_weights_go_to_the_sdxl_unet(sdxl_dir, tmp_path):
    """``convert SDXL_DIR OUT --delta DIR``: W = W_base + dW on the UNet, the SDXL-only weights
    (add_embedding) included; the other components as they were."""
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from streamflow_jax.models import flat_params

    base = load_file(sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors")
    rng = np.random.default_rng(8)
    delta = {k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
    (tmp_path / "delta").mkdir()
    save_file(delta, tmp_path / "delta" / "diffusion_pytorch_model.v0-1.safetensors")
    assert cli(["convert", str(sdxl_dir), str(tmp_path / "out"), "--delta", str(tmp_path / "delta"), "-q"]) == 0
    ours = flat_params(nnx.to_pure_dict(sf.load(tmp_path / "out", component="unet").state))[0]
    for key in ("add_embedding.linear_1", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"):
        want = (base[f"{key}.weight"] + delta[f"{key}.weight"]).T
        np.testing.assert_allclose(np.asarray(ours[f"{key}.kernel"]), want, rtol=1e-6, atol=1e-7)
    te = flat_params(nnx.to_pure_dict(sf.load(tmp_path / "out", component="text_encoder_2").state))[0]
    te_ref = flat_params(nnx.to_pure_dict(sf.load(sdxl_dir, component="text_encoder_2").state))[0]
    assert all(np.array_equal(te[k], te_ref[k]) for k in te)


def test_served_equals_the_pipeline(sdxl_dir, pipe):
    """``serve`` of the SDXL directory (the app in-process, as ``streamflow-jax serve`` runs it):
    a generation through the stream engine is the pipeline's image of the same seed."""
    pytest.importorskip("starlette")
    import base64
    import io
    import time

    from starlette.testclient import TestClient

    from streamflow_jax.serve import create_app

    app = create_app(sdxl_dir, slots_per_stream=2, streams=1, max_steps=8, **OVERRIDE)
    with TestClient(app) as client:
        deadline = time.time() + 300
        while (health := client.get("/health")).status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert health.json()["size"] == "16x16", health.text
        r = client.post("/v1/images/generations", json={"prompt": "a cat", "steps": 4, "guidance_scale": 2.0,
                                                        "seed": 3, "negative_prompt": "a dog"})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)
    want = np.asarray(pipe(["a cat"], steps=4, guidance_scale=2.0, seed=3, negative_prompt="a dog")[0]).astype(int)
    assert got.shape == want.shape == (16, 16, 3) and np.abs(got - want).max() <= 1 and want.std() > 5
    other = np.asarray(pipe(["a cat"], steps=4, guidance_scale=2.0, seed=3)[0]).astype(int)  # "" as the negative
    assert np.abs(got - other).max() > 2  # the served request's negative prompt counted
