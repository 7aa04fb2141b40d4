"""Flux and SD3 from a prompt: our pipelines against diffusers' FluxPipeline and
StableDiffusion3Pipeline on tiny random components saved with ``save_pretrained``, with the
same starting latents; compared in float at the latent level and as uint8 images."""

from __future__ import annotations

import collections
import json
import re
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import randomize, write_tiny_clip_vocab, write_tiny_t5_tokenizer

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.pipelines import FluxPipeline, SD3Pipeline

PROMPTS = ["a photo of the cat", "the dog on a mat, hello world"]
CLIP_BASE = dict(intermediate_size=37, layer_norm_eps=1e-5, num_hidden_layers=2, max_position_embeddings=77)
VAE_BASE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)


def _tokenizers(root):
    """CLIP (pad <|endoftext|>), CLIP-G style (pad "!") and T5 tokenizers, as transformers saves them."""
    write_tiny_clip_vocab(root / "vocab")
    tok = transformers.CLIPTokenizer.from_pretrained(root / "vocab", model_max_length=77)
    tok_g = transformers.CLIPTokenizer.from_pretrained(root / "vocab", model_max_length=77, pad_token="!")
    write_tiny_t5_tokenizer(root / "t5vocab")
    tok_t5 = transformers.T5TokenizerFast.from_pretrained(root / "t5vocab")
    special = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.eos_token_id)
    return tok, tok_g, tok_t5, special


def _t5(tok_t5, d_model, seed):
    cfg = transformers.T5Config(vocab_size=len(tok_t5), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, decoder_start_token_id=0)
    return randomize(transformers.T5EncoderModel(cfg), seed, std=0.3).eval()


def make_sd3_pipeline(root, with_t5=True):
    tok, tok_g, tok_t5, special = _tokenizers(root)
    clip = lambda hidden, heads, act, seed: randomize(transformers.CLIPTextModelWithProjection(  # noqa: E731
        transformers.CLIPTextConfig(hidden_size=hidden, num_attention_heads=heads, projection_dim=hidden,
                                    hidden_act=act, **CLIP_BASE, **special)), seed, std=0.3).eval()
    transformer = randomize(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=16 + 24,
        pos_embed_max_size=16), 4, std=0.2).eval()
    vae = randomize(diffusers.AutoencoderKL(**VAE_BASE, latent_channels=16, scaling_factor=1.5305,
                                            shift_factor=0.0609), 5, std=0.1).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(16, 2, "quick_gelu", 1), tokenizer=tok, text_encoder_2=clip(24, 3, "gelu", 2),
        tokenizer_2=tok_g, text_encoder_3=_t5(tok_t5, 48, 3) if with_t5 else None,
        tokenizer_3=tok_t5 if with_t5 else None)
    pipe.save_pretrained(root / "pipe")
    return pipe


def make_flux_pipeline(root, guidance=True):
    tok, _, tok_t5, special = _tokenizers(root)
    clip = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, num_attention_heads=2, hidden_act="quick_gelu", **CLIP_BASE, **special)), 1, std=0.3).eval()
    transformer = randomize(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(4, 4, 8)),
        4, std=0.2).eval()
    vae = randomize(diffusers.AutoencoderKL(**VAE_BASE, latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159),
                    5, std=0.1).eval()
    sched = (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
             if guidance else diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok,
                                  text_encoder_2=_t5(tok_t5, 32, 3), tokenizer_2=tok_t5, transformer=transformer)
    pipe.save_pretrained(root / "pipe")
    return pipe


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _uint8(images_01):
    return (np.clip(images_01, 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# SD3
# ---------------------------------------------------------------------------------------------


def sd3_reference(ref, prompts, noise, steps, guidance, text_len, output_type):
    out = ref(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance,
              max_sequence_length=text_len, latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
              output_type=output_type).images
    return out.permute(0, 2, 3, 1).numpy() if output_type == "latent" else out


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_pipeline_matches_diffusers(tmp_path, with_t5):
    ref = make_sd3_pipeline(tmp_path, with_t5)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=12)
    assert isinstance(pipe, SD3Pipeline) and (pipe.t5 is not None) == with_t5
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)
    ours = pipe(PROMPTS, steps=3, guidance_scale=5.0, noise=noise, output_type="latent")
    want = sd3_reference(ref, PROMPTS, noise, 3, 5.0, 12, "latent")
    err = _rel(ours, want)
    assert err <= 3e-5, err  # measured 3.2e-6 (2.2e-6 without T5)
    # the text matters: swapped prompts move the reference far more than the tolerance
    swapped = sd3_reference(ref, PROMPTS[::-1], noise, 3, 5.0, 12, "latent")
    assert _rel(swapped, want) > 100 * 3e-5  # measured 0.21
    images = pipe(PROMPTS, steps=3, guidance_scale=5.0, noise=noise, output_type="np")
    want_img = sd3_reference(ref, PROMPTS, noise, 3, 5.0, 12, "np")
    assert images.shape == want_img.shape == (2, 16, 16, 3)
    assert np.abs(images - want_img).max() <= 2e-6  # measured 1.8e-7
    assert np.abs(_uint8(images).astype(int) - _uint8(want_img).astype(int)).max() <= 2
    # guidance 1 (and 0) is no CFG in diffusers' SD3 pipeline, not a fall back to the default 7
    no_cfg = sd3_reference(ref, PROMPTS, noise, 3, 1.0, 12, "latent")
    assert _rel(no_cfg, want) > 100 * 3e-5
    for g in (1.0, 0.0):
        assert _rel(pipe(PROMPTS, steps=3, guidance_scale=g, noise=noise, output_type="latent"), no_cfg) <= 3e-5


def test_sd3_negative_prompt_matches_diffusers(tmp_path):
    """Classifier-free guidance against an explicit negative prompt (one for all prompts, and
    one per prompt) is diffusers' StableDiffusion3Pipeline with the same ``negative_prompt`` and
    latents. Measured 2.1e-6 (one string) and 1.9e-6 (a list); the same scale with diffusers'
    default negative "" is 1.9e-1 away, swapped negatives 2.3e-1 (ours with "" for the
    negatives: 2.5e-1 from diffusers')."""
    ref = make_sd3_pipeline(tmp_path)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=12)
    noise = np.random.default_rng(5).standard_normal((2, 8, 8, 16)).astype(np.float32)
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2)

    def diffusers_latents(negative):
        out = ref(PROMPTS, negative_prompt=negative, height=16, width=16, num_inference_steps=3, guidance_scale=6.0,
                  max_sequence_length=12, latents=latents, output_type="latent").images
        return out.permute(0, 2, 3, 1).numpy()

    negatives = ["the dog on a mat", "a photo of the cat"]
    for negative in ("a cat on the mat", negatives):
        want = diffusers_latents(negative)
        ours = pipe(PROMPTS, negative_prompt=negative, steps=3, guidance_scale=6.0, noise=noise, output_type="latent")
        err = _rel(ours, want)
        assert err <= 3e-5, (negative, err)  # measured 2.1e-6, 1.9e-6
    # the negative prompt is read: diffusers' default negative "" and swapped negatives are far away
    assert _rel(diffusers_latents(None), want) > 100 * 3e-5
    assert _rel(diffusers_latents(negatives[::-1]), want) > 100 * 3e-5


def test_sd3_converted_pipeline_and_stream(tmp_path):
    """The converted directory gives the same latents, and the stream engine (PromptStream)
    gives each request what the pipeline gives it alone."""
    from streamflow_jax.pipelines import PromptStream

    make_sd3_pipeline(tmp_path)
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "conv"), "-q"]) == 0
    direct = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=12)
    conv = sf.Pipeline.from_diffusers(tmp_path / "conv", max_sequence_length=12)
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 16)).astype(np.float32)
    a = direct(PROMPTS, steps=2, guidance_scale=4.0, noise=noise, output_type="latent")
    np.testing.assert_allclose(conv(PROMPTS, steps=2, guidance_scale=4.0, noise=noise, output_type="latent"), a,
                               rtol=1e-6, atol=1e-6)
    stream = PromptStream(conv, slots_per_stream=2, guidance=True, output_type="latent")
    ids = first_ids = [stream.submit(p, steps=[2, 3][i], noise=noise[i], guidance_scale=[4.0, 6.0][i])
                       for i, p in enumerate(PROMPTS)]
    results = stream.run()
    for i, rid in enumerate(ids):
        alone = conv(PROMPTS[i], steps=[2, 3][i], guidance_scale=[4.0, 6.0][i], noise=noise[i : i + 1],
                     output_type="latent")[0]
        np.testing.assert_allclose(results[rid], alone, rtol=1e-4, atol=1e-5)
    # two ticks a compiled call: the first call's two ticks admit both requests, whose prompts
    # are encoded together (room looks two ticks ahead), and the results are the same
    stream = PromptStream(conv, slots_per_stream=2, guidance=True, output_type="latent", ticks_per_call=2)
    ids = [stream.submit(p, steps=[2, 3][i], noise=noise[i], guidance_scale=[4.0, 6.0][i])
           for i, p in enumerate(PROMPTS)]
    stream.tick()
    assert (stream.engine.ticks, stream.encode_calls, stream.engine.scheduler.queue) == (2, 1, collections.deque())
    twice = stream.run()
    np.testing.assert_allclose(np.stack([twice[r] for r in ids]), np.stack([results[r] for r in first_ids]),
                               rtol=1e-4, atol=1e-5)  # the prompts encoded as a batch of two: 3e-6 apart
    # in bfloat16 too (its text embeddings are bf16 arrays, numpy kind 'V': every request was
    # refused as "not real numbers", and a bf16 server answered every request 400)
    bf16 = sf.Pipeline.from_diffusers(tmp_path / "conv", max_sequence_length=12, dtype="bfloat16")
    stream = PromptStream(bf16, slots_per_stream=2, guidance=True, output_type="latent")
    rid = stream.submit(PROMPTS[0], steps=2, noise=noise[0], guidance_scale=4.0)
    got = stream.run()[rid]
    assert not isinstance(got, Exception), got
    alone = bf16(PROMPTS[0], steps=2, guidance_scale=4.0, noise=noise[:1], output_type="latent")[0]
    assert _rel(got, alone) < 0.05, _rel(got, alone)  # bf16 rounding in another batch: measured 0.016
    assert _rel(got, a[0]) < 0.05, _rel(got, a[0])  # and float32's latents: measured 0.018
    bad = stream.submit(PROMPTS[0], steps=2, noise=noise[0].astype(np.int32), guidance_scale=4.0)
    assert "noise must be real floating-point numbers, got an array of int32" in str(stream.run()[bad])
    # converted with --quantize fp8: the transformer alone is FP8, and the pipeline gives what the
    # float pipeline with sf.quantize on its transformer gives
    from streamflow_jax.quantization import is_quantized, quantize

    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "conv-fp8"), "--quantize", "fp8", "-q"]) == 0
    assert json.loads((tmp_path / "conv-fp8" / "conversion.json").read_text())["quantized"] == {"transformer": "fp8"}
    fp8 = sf.Pipeline.from_diffusers(tmp_path / "conv-fp8", max_sequence_length=12)
    assert is_quantized(fp8.model) and "quantization" not in (tmp_path / "conv-fp8" / "text_encoder_3" /
                                                              "config.json").read_text()
    conv.model = quantize(conv.model, "fp8")
    np.testing.assert_array_equal(fp8(PROMPTS, steps=2, guidance_scale=4.0, noise=noise, output_type="latent"),
                                  conv(PROMPTS, steps=2, guidance_scale=4.0, noise=noise, output_type="latent"))
    # a TAESD of another family (4-channel SD1.5 latents, for a 16-channel SD3): refused at load,
    # naming both, not by a convolution after sampling
    from conftest import TAESD

    randomize(diffusers.AutoencoderTiny(**TAESD), 0, std=0.1).save_pretrained(tmp_path / "taesd")
    with pytest.raises(sf.ConfigError, match=r"taesd: AutoencoderTiny takes 4-channel latents, and this pipeline's "
                                             r"SD3Transformer2DModel makes 16-channel ones"):
        sf.Pipeline.from_diffusers(tmp_path / "conv", taesd=tmp_path / "taesd")


def test_bad_input_to_pipelines_and_streams(tmp_path):
    """Found by a user's pass over the pipelines: requests lost without a result, scales taken
    that were ignored or wrong, per-prompt scales <= 1 running the unconditional image, raw
    JAX/tokenizer messages, errors naming the engine's request id instead of the caller's."""
    from streamflow_jax.errors import RequestError
    from streamflow_jax.pipelines import PromptStream

    (tmp_path / "sd3").mkdir()
    make_sd3_pipeline(tmp_path / "sd3")
    sd3 = sf.Pipeline.from_diffusers(tmp_path / "sd3" / "pipe", max_sequence_length=12)
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 16)).astype(np.float32)
    # a download without the T5 its model_index.json names sampled with zeros for T5's embeddings
    shutil.copytree(tmp_path / "sd3" / "pipe", tmp_path / "no-t5")
    shutil.rmtree(tmp_path / "no-t5" / "text_encoder_3")
    with pytest.raises(sf.ConfigError, match=re.escape(f"model_index.json names text_encoder_3 (T5EncoderModel) and "
                                                       f"{tmp_path / 'no-t5' / 'text_encoder_3'} does not exist (an "
                                                       "incomplete download?")):
        sf.Pipeline.from_diffusers(tmp_path / "no-t5")
    # the same for any family and any component a pipeline runs on (here Flux's VAE), before loading
    (tmp_path / "flux").mkdir()
    make_flux_pipeline(tmp_path / "flux")
    shutil.rmtree(tmp_path / "flux" / "pipe" / "vae")
    with pytest.raises(sf.ConfigError, match=re.escape("model_index.json names vae (AutoencoderKL) and")):
        sf.Pipeline.from_diffusers(tmp_path / "flux" / "pipe")
    assert cli(["convert", str(tmp_path / "no-t5"), str(tmp_path / "no-t5-conv"), "-q"]) == 1
    assert not (tmp_path / "no-t5-conv").exists()
    run = lambda g, **kw: sd3(PROMPTS, steps=2, guidance_scale=g, noise=noise, output_type="latent", **kw)  # noqa: E731
    # per prompt, a scale <= 1 means no guidance, as it does alone (it ran v_u, the unconditional image)
    mixed = run([0.0, 4.0])
    unguided = run(0.0)
    # a negative prompt per prompt, where that prompt's scale turns guidance off, is said to be unread
    with pytest.warns(UserWarning, match=re.escape("the negative prompt(s) of prompt(s) [0] are ignored: their "
                                                   "guidance scales are <= 1")):
        np.testing.assert_array_equal(run([0.0, 4.0], negative_prompt=["x", ""]), mixed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one negative prompt for all: read where guidance runs, no warning
        run([0.0, 4.0], negative_prompt="x")
    assert _rel(run([0.0, 0.0]), run(4.0)) > 1e-2  # guidance matters here
    np.testing.assert_allclose(mixed[0], unguided[0], rtol=1e-5, atol=1e-5)  # batch 4 against 2: not bit-equal
    np.testing.assert_allclose(mixed[1], run(4.0)[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(run([1.0, 0.5]), unguided)  # every scale <= 1: the same call
    for kwargs, message in [
            ({"guidance_scale": [2.0, 5.0, 3.0]}, "3 guidance scales for 2 prompts"),
            ({"negative_prompt": 5}, "negative_prompt must be a string or a list of strings"),
            ({"noise": noise + 1j}, "noise must be real floating-point numbers, got complex"),
            ({"backend": ["xla"]}, "unknown backend ['xla']"),
            ({"max_sequence_length": 100000}, "max_sequence_length must be an integer from 1 to 512")]:
        args = {"steps": 2, "noise": noise, "output_type": "latent", **kwargs}
        with pytest.raises(ValueError, match=re.escape(message)):
            sd3(PROMPTS, **args)
    # diffusers' keywords are named with ours (pipe(prompt=...) was "missing 1 required positional argument")
    with pytest.raises(TypeError, match=re.escape("got unexpected keyword argument(s) 'prompt' (pass the prompts first: "
                                                  "pipe('a cat')")):
        sd3(prompt=PROMPTS[0], steps=2)
    with pytest.raises(TypeError, match=re.escape("'num_inference_steps' (steps=), 'generator' (seed= (an int")):
        sd3(PROMPTS, num_inference_steps=2, generator=0)
    with pytest.raises(TypeError, match=re.escape("argument(s) 'step'")):
        sd3(PROMPTS, step=2)
    with pytest.raises(TypeError, match="needs the prompts"):
        sd3()
    # diffusers' latents: a torch tensor is read (it was "Cannot interpret 'torch.float32' as a data type"), an
    # NCHW one is said to be NCHW
    import torch

    np.testing.assert_array_equal(sd3(PROMPTS, steps=1, noise=torch.from_numpy(noise), output_type="latent"),
                                  sd3(PROMPTS, steps=1, noise=noise, output_type="latent"))
    with pytest.raises(ValueError, match=re.escape("noise has shape (2, 16, 8, 8), expected (2, 16, 8, 16): [n, h, "
                                                   "w, C] latents (NHWC); this is NCHW, as diffusers' latents are")):
        sd3(PROMPTS, steps=1, noise=noise.transpose(0, 3, 1, 2))
    # from_pretrained's keywords, named under from_diffusers with this library's names
    with pytest.raises(TypeError, match=re.escape("from_diffusers() for SD3Pipeline got unexpected keyword "
                                                  "argument(s) 'torch_dtype' (dtype=")):
        sf.Pipeline.from_diffusers(tmp_path / "sd3" / "pipe", torch_dtype="float16")
    with pytest.raises(sf.ConversionError, match="x.safetensors: no such LoRA file"):  # loras= is taken, and read
        sf.Pipeline.from_diffusers(tmp_path / "sd3" / "pipe", loras=[str(tmp_path / "x.safetensors")])
    for length in (-5, 12.7, "12", 513):  # at load: -5 failed at the first call, 12.7 became 12
        with pytest.raises(ValueError, match="max_sequence_length must be an integer from 1 to 512"):
            sf.Pipeline.from_diffusers(tmp_path / "sd3" / "pipe", max_sequence_length=length)
    with pytest.raises(ValueError, match="from_diffusers takes a directory path, got NoneType"):
        sf.Pipeline.from_diffusers(None)
    with pytest.warns(UserWarning, match="longer than CLIP's limit of 77 tokens were truncated"):
        sd3(["cat " * 100], steps=1, output_type="latent", guidance_scale=1.0)

    # PromptStream: guided by default where the pipeline's default scale asks (SD3's 7.0: its
    # default request failed); errors carry the caller's ids; an encoder failure of any kind is
    # the request's own (it escaped run() and lost the request)
    stream = PromptStream(sd3, slots_per_stream=2, output_type="latent")
    assert stream.guided
    ok = stream.submit(PROMPTS[0], steps=2, noise=noise[0])
    stream.submit(None)
    bad = stream.submit(PROMPTS[1], steps=2, noise=np.zeros((4, 4, 16), np.float32))
    original = sd3.encode

    def encode(prompts, text_len=None):
        if "boom" in prompts:
            raise RuntimeError("the device fell over")
        return original(prompts, text_len)

    sd3.encode = encode
    boom = stream.submit("boom", steps=2, noise=noise[1])
    results = stream.run()
    np.testing.assert_allclose(results[ok], sd3(PROMPTS[0], steps=2, noise=noise[:1], output_type="latent")[0],
                               rtol=1e-4, atol=1e-5)
    assert str(results[1]) == "request 1: prompt must be a string, got NoneType"
    assert str(results[bad]).startswith(f"request {bad}: latent shape (4, 4, 16)")
    assert isinstance(results[boom], RequestError) and "RuntimeError: the device fell over" in str(results[boom])
    assert stream.pending == 0


# ---------------------------------------------------------------------------------------------
# Flux
# ---------------------------------------------------------------------------------------------


def flux_reference(ref, prompts, noise, steps, guidance, text_len, output_type):
    b, h, w, c = noise.shape
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(noise).permute(0, 3, 1, 2), b, c, h, w)
    out = ref(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance,
              max_sequence_length=text_len, latents=packed, output_type=output_type).images
    if output_type != "latent":
        return out
    return diffusers.FluxPipeline._unpack_latents(out, 16, 16, ref.vae_scale_factor).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_pipeline_matches_diffusers(tmp_path, guidance):
    ref = make_flux_pipeline(tmp_path, guidance)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=10)
    assert isinstance(pipe, FluxPipeline) and pipe.guidance_mode == ("embedded" if guidance else "none")
    assert pipe.default_steps == (28 if guidance else 4)
    noise = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = pipe(PROMPTS, steps=3, guidance_scale=3.5, noise=noise, output_type="latent")
    want = flux_reference(ref, PROMPTS, noise, 3, 3.5, 10, "latent")
    err = _rel(ours, want)
    assert err <= 2e-4, err  # measured 2.7e-5 (dev), 7.1e-6 (schnell)
    swapped = flux_reference(ref, PROMPTS[::-1], noise, 3, 3.5, 10, "latent")
    assert _rel(swapped, want) > 100 * 2e-4  # measured 0.18
    if guidance:  # the guidance input matters too
        assert _rel(flux_reference(ref, PROMPTS, noise, 3, 5.0, 10, "latent"), want) > 100 * 2e-4
    # scales checked where the model ignores them too (schnell took NaN and strings), and one per
    # prompt or one for all (dev: a raw broadcasting error, and [2.0] taken for every prompt)
    for scale, message in [(float("nan"), "guidance_scale nan is not finite"),
                           ("abc", "guidance_scale must be a number, got 'abc'")] + \
            ([([2.0, 5.0, 3.0], "3 guidance scales for 2 prompts"), ([2.0], "1 guidance scales for 2 prompts")]
             if guidance else []):
        with pytest.raises(ValueError, match=re.escape(message)):
            pipe(PROMPTS, steps=3, guidance_scale=scale, noise=noise, output_type="latent")
    # no classifier-free guidance here: a negative prompt is said to be ignored (diffusers: silently)
    why = "takes the guidance scale as an input" if guidance else "takes no guidance"
    with pytest.warns(UserWarning, match=f"negative prompt 'blurry' is ignored: this model {why}"):
        ignored = pipe(PROMPTS, steps=3, guidance_scale=3.5, noise=noise, output_type="latent",
                       negative_prompt="blurry")
    np.testing.assert_array_equal(ignored, ours)
    images = pipe(PROMPTS, steps=3, guidance_scale=3.5, noise=noise, output_type="np")
    want_img = flux_reference(ref, PROMPTS, noise, 3, 3.5, 10, "np")
    assert np.abs(images - want_img).max() <= 2e-5  # measured 1.5e-6
    assert np.abs(_uint8(images).astype(int) - _uint8(want_img).astype(int)).max() <= 2


def test_flux_generate_cli_and_long_prompt(tmp_path, capsys):
    make_flux_pipeline(tmp_path)
    out = tmp_path / "out.png"
    with pytest.warns(UserWarning, match="limit of 512 tokens"):
        code = cli(["generate", "--model", str(tmp_path / "pipe"), "--prompt", "a cat " * 300, "--steps", "2",
                    "--guidance", "3.5", "--height", "16", "--width", "16", "--out", str(out)])
    assert code == 0
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (16, 16)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe")
    with pytest.raises(ValueError, match="image height 10 is not a multiple of 4"):
        pipe("a cat", height=10, width=16)
    capsys.readouterr()
    assert cli(["generate", "--model", str(tmp_path / "pipe"), "--prompt", "a cat", "--negative-prompt", "blurry",
                "--out", str(tmp_path / "neg.png")]) == 1
    assert "--negative-prompt: negative prompt 'blurry' is ignored: Flux.1 runs no unconditional branch" in \
        capsys.readouterr().err


def test_flux_prompt_stream_takes_guidance_as_input(tmp_path):
    """Through the stream engine, Flux-dev's guidance scale is each request's model input (no
    CFG): each request equals the pipeline's output for it alone."""
    from streamflow_jax.pipelines import PromptStream

    make_flux_pipeline(tmp_path)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=10)
    stream = PromptStream(pipe, slots_per_stream=2, guidance=True, height=16, width=16, output_type="latent")
    assert not stream.guided and stream.engine.cond_shapes["guidance"] == ()
    noise = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ids = [stream.submit(p, steps=2 + i, noise=noise[i], guidance_scale=[2.0, 5.0][i]) for i, p in enumerate(PROMPTS)]
    results = stream.run()
    for i, rid in enumerate(ids):
        alone = pipe(PROMPTS[i], steps=2 + i, guidance_scale=[2.0, 5.0][i], noise=noise[i : i + 1],
                     output_type="latent")[0]
        np.testing.assert_allclose(results[rid], alone, rtol=1e-5, atol=1e-5)
    # a T5 length of the stream's own: every request encoded at it, as the pipeline does
    short = PromptStream(pipe, slots_per_stream=2, height=16, width=16, output_type="latent", max_sequence_length=4)
    assert short.engine.cond_shapes["encoder_hidden_states"][0] == 4
    rid = short.submit(PROMPTS[1], steps=2, noise=noise[1], guidance_scale=2.0)
    alone = pipe(PROMPTS[1], steps=2, guidance_scale=2.0, noise=noise[1:], output_type="latent", max_sequence_length=4)
    default = pipe(PROMPTS[1], steps=2, guidance_scale=2.0, noise=noise[1:], output_type="latent")
    assert np.abs(alone[0] - default[0]).max() > 1e-4  # the length matters
    np.testing.assert_allclose(short.run()[rid], alone[0], rtol=1e-5, atol=1e-5)
    for length in (0, 513, 100000, 12.7, "12"):  # 100000 ran out of memory in the encoder
        with pytest.raises(ValueError, match=re.escape(f"max_sequence_length must be an integer from 1 to 512, "
                                                       f"got {length!r}")):
            PromptStream(pipe, max_sequence_length=length)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_served_equals_the_pipeline(tmp_path, family):
    """``serve`` of a diffusers SD3 or Flux-dev directory (the app in-process, as ``streamflow-jax
    serve`` runs it): a generation through the stream engine, with its guidance (SD3: CFG with
    the request's negative prompt; Flux-dev: the guidance input), is the pipeline's image of the
    same seed."""
    pytest.importorskip("starlette")
    import base64
    import io
    import time

    from PIL import Image
    from starlette.testclient import TestClient

    from streamflow_jax.serve import create_app

    (make_sd3_pipeline if family == "sd3" else make_flux_pipeline)(tmp_path)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe")
    extra = {"negative_prompt": "a dog"} if family == "sd3" else {}
    app = create_app(tmp_path / "pipe", slots_per_stream=2, streams=1, max_steps=8, size="16x16")
    with TestClient(app) as client:
        deadline = time.time() + 300
        while (health := client.get("/health")).status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert health.json()["size"] == "16x16", health.text
        r = client.post("/v1/images/generations", json={"prompt": PROMPTS[0], "steps": 3, "guidance_scale": 4.0,
                                                        "seed": 5, **extra})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)
        bad = client.post("/v1/images/generations", json={"prompt": PROMPTS[0], "steps": 9})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"
        # a negative prompt nothing would read is refused (Flux-dev: no CFG; SD3 at a scale <= 1)
        unread = {"guidance_scale": 1.0} if family == "sd3" else {}
        bad = client.post("/v1/images/generations", json={"prompt": PROMPTS[0], "negative_prompt": "a dog", **unread})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "negative_prompt", bad.text
        assert "negative prompt 'a dog' is ignored" in bad.json()["error"]["message"]
    kw = dict(steps=3, seed=5, height=16, width=16, **extra)
    want = np.asarray(pipe([PROMPTS[0]], guidance_scale=4.0, **kw)[0]).astype(int)
    assert got.shape == want.shape == (16, 16, 3) and np.abs(got - want).max() <= 1 and want.std() > 5
    reseeded = np.asarray(pipe([PROMPTS[0]], guidance_scale=4.0, **{**kw, "seed": 6})[0]).astype(int)
    assert np.abs(got - reseeded).max() > 5  # the request's seed counted (measured 21 SD3, 9 Flux)
    if family == "flux":  # the guidance input counted (the tiny SD3's text moves its image by <= 2
        # levels; its CFG per request is checked on latents in test_sd3_converted_pipeline_and_stream)
        other = np.asarray(pipe([PROMPTS[0]], guidance_scale=1.5, **kw)[0]).astype(int)
        assert np.abs(got - other).max() > 2


# ---------------------------------------------------------------------------------------------
# Image to image
# ---------------------------------------------------------------------------------------------


def _deterministic_posterior(vae, channels):
    """diffusers samples the VAE posterior, our pipelines take its mean: a log-variance of -40
    (clamped to -30: std 3e-7) makes the two the same image."""
    with torch.no_grad():
        vae.encoder.conv_out.weight[channels:] = 0
        vae.encoder.conv_out.bias[channels:] = -40.0


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_sd3_img2img_matches_diffusers(tmp_path):
    ref = make_sd3_pipeline(tmp_path)
    _deterministic_posterior(ref.vae, 16)
    ref.save_pretrained(tmp_path / "pipe")
    i2i = diffusers.StableDiffusion3Img2ImgPipeline(**ref.components)
    images = _images(2)
    gen = torch.Generator().manual_seed(7)
    want = i2i(PROMPTS, image=images, strength=0.6, num_inference_steps=4, guidance_scale=5.0,
               max_sequence_length=12, generator=gen, output_type="latent").images.permute(0, 2, 3, 1).numpy()
    gen = torch.Generator().manual_seed(7)  # the same draws: the posterior sample's, then the noise
    torch.randn((2, 16, 8, 8), generator=gen)
    noise = torch.randn((2, 16, 8, 8), generator=gen).permute(0, 2, 3, 1).numpy()
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=12)
    ours = pipe(PROMPTS, image=images, strength=0.6, steps=4, guidance_scale=5.0, noise=noise, output_type="latent")
    assert _rel(ours, want) <= 5e-5  # measured 5.0e-6
    gen = torch.Generator().manual_seed(7)
    want_img = i2i(PROMPTS, image=images, strength=0.6, num_inference_steps=4, guidance_scale=5.0,
                   max_sequence_length=12, generator=gen, output_type="np").images
    img = pipe(PROMPTS, image=images, strength=0.6, steps=4, guidance_scale=5.0, noise=noise, output_type="np")
    assert np.abs(_uint8(img).astype(int) - _uint8(want_img).astype(int)).max() <= 2  # measured 0
    # the image matters, and so does the strength
    other = pipe(PROMPTS, image=_images(2, seed=1), strength=0.6, steps=4, guidance_scale=5.0, noise=noise,
                 output_type="latent")
    assert _rel(other, want) > 100 * 5e-5
    assert _rel(pipe(PROMPTS, image=images, strength=0.9, steps=4, guidance_scale=5.0, noise=noise,
                     output_type="latent"), want) > 100 * 5e-5
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe(PROMPTS, image=images, strength=1.5, steps=4)
    # step counts and strengths where float32 strengths would cut the grid elsewhere than diffusers
    # (5 steps at 0.6: diffusers keeps 3, float32(0.6) * 5 would keep 4)
    for steps, strength in ((5, 0.6), (10, 0.7)):
        gen = torch.Generator().manual_seed(7)
        want = i2i(PROMPTS, image=images, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                   max_sequence_length=12, generator=gen, output_type="latent").images.permute(0, 2, 3, 1).numpy()
        ours = pipe(PROMPTS, image=images, strength=strength, steps=steps, guidance_scale=5.0, noise=noise,
                    output_type="latent")
        assert _rel(ours, want) <= 5e-5, (steps, strength)
    with pytest.raises(ValueError, match="image has shape"):
        pipe(PROMPTS, image=np.zeros((2, 16, 16, 4), np.float32), steps=4)
    with pytest.raises(ValueError, match="image height 10 is not a multiple of 4"):
        pipe(PROMPTS, image=np.zeros((2, 10, 16, 3), np.float32), steps=4)
    # height/width that are not the image's size are named first, even when the image is too large
    # for the model (that error named neither the image nor the flags)
    with pytest.raises(ValueError, match=r"height/width 16x16 differ from the image's size 400x300"):
        pipe(PROMPTS, image=np.zeros((2, 400, 300, 3), np.float32), height=16, width=16, steps=4)
    with pytest.raises(ValueError, match=r"height/width -x8 differ from the image's size 16x16"):
        pipe(PROMPTS, image=images, width=8, steps=4)
    assert pipe(PROMPTS, image=images, height=16, width=16, strength=0.6, steps=4, guidance_scale=5.0,
                noise=noise, output_type="latent").shape == (2, 8, 8, 16)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_img2img_matches_diffusers(tmp_path, guidance):
    """Flux image-to-image against diffusers' FluxImg2ImgPipeline: the same generator draws (the
    posterior's sample, made the mean here, then the noise), the grid cut by strength, the
    resolution-dependent shift."""
    ref = make_flux_pipeline(tmp_path, guidance)
    _deterministic_posterior(ref.vae, 4)
    ref.save_pretrained(tmp_path / "pipe")
    i2i = diffusers.FluxImg2ImgPipeline(**ref.components)
    images = _images(2)
    gen = torch.Generator().manual_seed(7)
    out = i2i(PROMPTS, image=images, strength=0.6, num_inference_steps=5, guidance_scale=3.5, height=16, width=16,
              max_sequence_length=10, generator=gen, output_type="latent").images
    want = diffusers.FluxPipeline._unpack_latents(out, 16, 16, ref.vae_scale_factor).permute(0, 2, 3, 1).numpy()
    gen = torch.Generator().manual_seed(7)  # the same draws: the posterior sample's, then the noise
    torch.randn((2, 4, 8, 8), generator=gen)
    noise = torch.randn((2, 4, 8, 8), generator=gen).permute(0, 2, 3, 1).numpy()
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=10)
    ours = pipe(PROMPTS, image=images, strength=0.6, steps=5, guidance_scale=3.5, noise=noise, output_type="latent")
    assert _rel(ours, want) <= 1e-4  # measured 3.6e-5 (dev), 5.2e-6 (schnell)
    other = pipe(PROMPTS, image=_images(2, seed=1), strength=0.6, steps=5, guidance_scale=3.5, noise=noise,
                 output_type="latent")
    assert _rel(other, want) > 1e-3  # the image matters (the tiny random VAE moves it little: 1.7e-3, 4.0e-3)


def test_img2img_through_the_stream_engine(tmp_path):
    """PromptStream with a starting image per request (and its own strength) equals the pipeline."""
    from streamflow_jax.pipelines import PromptStream

    make_sd3_pipeline(tmp_path)
    pipe = sf.Pipeline.from_diffusers(tmp_path / "pipe", max_sequence_length=12)
    images = _images(2, seed=3)
    noise = np.random.default_rng(4).standard_normal((2, 8, 8, 16)).astype(np.float32)
    stream = PromptStream(pipe, slots_per_stream=2, guidance=True, height=16, width=16, output_type="latent")
    # (5 steps, 0.6): the pair where float32 strengths would keep 4 steps instead of diffusers' 3
    requests = [(4, 0.6), (4, 0.9), (5, 0.6)]
    ids = [stream.submit(PROMPTS[i % 2], steps=steps, noise=noise[i % 2], guidance_scale=4.0, image=images[i % 2],
                         strength=strength) for i, (steps, strength) in enumerate(requests)]
    bad = stream.submit("x", steps=4, guidance_scale=4.0, image=images[0], strength=0.0)
    wide = stream.submit("x", steps=4, guidance_scale=4.0, image=np.zeros((16, 32, 3), np.float32))
    results = stream.run()
    for i, (rid, (steps, strength)) in enumerate(zip(ids, requests)):
        alone = pipe(PROMPTS[i % 2], steps=steps, guidance_scale=4.0, noise=noise[i % 2 : i % 2 + 1],
                     image=images[i % 2], strength=strength, output_type="latent")[0]
        np.testing.assert_allclose(results[rid], alone, rtol=1e-4, atol=1e-5)
    assert "strength must be in (0, 1]" in str(results[bad])
    assert "the image is 32x16 pixels (latents (8, 16, 16)), and this stream runs latents (8, 8, 16): resize the " \
           "image, or make the stream with its height= and width=" in str(results[wide])
    # generate --stream --image sizes its stream from the image, as the batch path does (it was refused)
    from PIL import Image

    Image.fromarray(np.asarray(images[0]).repeat(2, axis=1)).save(tmp_path / "wide.png")
    args = ["generate", "--model", str(tmp_path / "pipe"), "--prompt", "a cat", "--image", str(tmp_path / "wide.png"),
            "--steps", "2", "--max-sequence-length", "12", "-q"]
    assert cli([*args, "--out", str(tmp_path / "batch.png")]) == 0
    assert cli([*args, "--stream", "--out", str(tmp_path / "stream.png")]) == 0
    assert cli([*args, "--stream", "--height", "16", "--out", str(tmp_path / "stream16.png")]) == 0  # one side given
    batch, streamed, one_side = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("batch", "stream", "stream16"))
    assert batch.shape == (16, 32, 3) and np.abs(batch.astype(int) - streamed.astype(int)).max() <= 1
    np.testing.assert_array_equal(one_side, streamed)


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG and a float TIFF in [0, 1], as image-to-image inputs (--image, uploads,
    frames, PIL images): Pillow's convert clipped them (the PNG read 99.6% white, the TIFF black)."""
    from PIL import Image

    from streamflow_jax.pipelines.images import images_to_array, read_image

    want = np.arange(256, dtype=np.float64).reshape(16, 16) / 255
    Image.fromarray((want * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(want.astype(np.float32), mode="F").save(tmp_path / "g.tif")
    for name in ("g16.png", "g.tif"):
        got = images_to_array(read_image(tmp_path / name, name), 3)
        np.testing.assert_allclose(got[0], np.repeat(want[..., None], 3, -1), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(images_to_array(Image.open(tmp_path / name), 1)[0, ..., 0], want, atol=1e-6)
    Image.fromarray((want * 2).astype(np.float32), mode="F").save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr.tif: float pixels must lie in \[0, 1\], these span \[0, 2\]"):
        read_image(tmp_path / "hdr.tif", "hdr.tif")
