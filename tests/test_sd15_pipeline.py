"""Prompt to image for a PeRFlow-style SD1.5 pipeline: our Pipeline (and PromptStream) vs an
independent loop, at the latent level, in float: transformers' CLIPTokenizer + CLIPTextModel,
diffusers' UNet, and PeRFlow's grid and window updates written here from the reference
scheduler's formulas (nothing of ``sf.schedules`` or ``models.perflow``)."""

from __future__ import annotations

import itertools
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from conftest import CLIP, TAESD, UNETS, VAES, perflow_window_end, randomize, write_tiny_clip_vocab

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.pipelines import PeRFlowPipeline, PromptStream

PROMPTS = ["a photo of the cat", "string theory!"]
NEGATIVE = ["the photo", "cat string"]
TOL = 3e-5  # relative (max |ours - ref| / max |ref|) at the latent level; measured <= 2.5e-6 (CPU fp32)


# ---------------------------------------------------------------------------------------------
# The tiny pipeline: a text path that matters
# ---------------------------------------------------------------------------------------------

# SD1.5's layout with one resnet per level (compiles and exports faster), CLIP's width
UNET = dict(UNETS["sd15"], layers_per_block=1, cross_attention_dim=CLIP["hidden_size"])



def make_pipeline(root, scheduler: dict):
    """A tiny PeRFlow SD1.5 pipeline directory whose output depends on the prompt: random CLIP
    with std 0.5, cross-attention keys/values x10 and outputs x3, and ``conv_out`` x10 so that
    the UNet's eps is the size of the noise (with diffusers' small init the final latents would
    be ~15x the noise whatever the UNet says, and a 1e-4 bound would hardly test it). Measured:
    swapping the prompts moves the final latents by 1.7e-2 .. 5.9e-2."""
    unet = randomize(diffusers.UNet2DConditionModel(**UNET), 1, std=0.1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name:
                p.mul_(10)
            elif ".attn2.to_out." in name:
                p.mul_(3)
            elif name.startswith("conv_out."):
                p.mul_(10)
    unet.save_pretrained(root / "unet")
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 2, std=0.1).save_pretrained(root / "vae")
    randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3, std=0.5).save_pretrained(
        root / "text_encoder")
    write_tiny_clip_vocab(root / "tokenizer")
    set_scheduler(root, scheduler)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["perflow", "PeRFlowScheduler"]}))
    return root


def set_scheduler(root, scheduler: dict):
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))


def perflow_scheduler(prediction="diff_eps", windows=4):
    return {"_class_name": "PeRFlowScheduler", "prediction_type": prediction, "num_time_windows": windows}


@pytest.fixture(scope="module")
def perflow_dir(tmp_path_factory):
    """Built once; a test that changes it works on a copy (``copy_of``)."""
    return make_pipeline(tmp_path_factory.mktemp("perflow") / "perflow", perflow_scheduler())


def copy_of(src, dst, scheduler: dict | None = None):
    shutil.copytree(src, dst)
    if scheduler is not None:
        set_scheduler(dst, scheduler)
    return dst


@pytest.fixture(scope="module")
def pipelines(perflow_dir, tmp_path_factory):
    """``get(prediction, windows)``: the pipeline with that scheduler config, loaded once."""
    made = {}

    def get(prediction="diff_eps", windows=4):
        if (prediction, windows) not in made:
            root = perflow_dir if (prediction, windows) == ("diff_eps", 4) else copy_of(
                perflow_dir, tmp_path_factory.mktemp("sched") / "p", perflow_scheduler(prediction, windows))
            made[prediction, windows] = sf.Pipeline.from_diffusers(root)
        return made[prediction, windows]

    return get


# ---------------------------------------------------------------------------------------------
# The reference: PeRFlow's scheduler (magic-research/piecewise-rectified-flow,
# src/scheduler_perflow.py) written out, in float64 around the float32 torch networks
# ---------------------------------------------------------------------------------------------


def perflow_windows(k):
    """Time_Windows: starts i/K for i = K..1, ends the next start, the last 0."""
    starts = [i / k for i in range(k, 0, -1)]
    return starts, starts[1:] + [0.0]


def perflow_grid(steps, k):
    """set_timesteps: S < K raised to K; the first S mod K windows get one more step;
    linspace(t_s, t_e, n, endpoint=False) inside each; then 0."""
    steps = max(steps, k)
    starts, ends = perflow_windows(k)
    times = []
    for w in range(k):
        n = steps // k + (1 if w < steps % k else 0)
        times += list(np.linspace(starts[w], ends[w], n, endpoint=False))
    return times + [0.0]


def sd_alphas_cumprod():
    """The scheduler's scaled_linear betas, in torch float32 as it computes them."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


def window_of(t, k):
    """get_window: the first window whose end is below t - 0.1/1000."""
    starts, ends = perflow_windows(k)
    w = 0
    while t - 1e-4 <= ends[w]:
        w += 1
    return starts[w], ends[w]


def perflow_velocity(prediction, out, x, t, k, ac):
    """step(): the window end predicted from the model output, and the straight line to it."""
    if prediction == "velocity":
        return out
    t_s, t_e = window_of(t, k)
    c_x, c_eps = perflow_window_end(prediction, t, t_s, t_e, ac)
    return (c_x * x + c_eps * out - x) / (t_e - t)


class Reference:
    """transformers' tokenizer and CLIP, diffusers' UNet and VAE, read from the directory."""

    def __init__(self, root):
        self.tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
        self.text = transformers.CLIPTextModel.from_pretrained(root / "text_encoder").eval()
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval()
        self.ac = sd_alphas_cumprod()

    def embed(self, prompts):
        ids = self.tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text(ids).last_hidden_state

    def latents(self, prompts, noise, steps, *, guidance=None, negative=None, prediction="diff_eps", k=4):
        """The pipeline's loop: CFG on the UNet's output (eps), as PeRFlow's pipeline does, then
        the scheduler step. Returns NHWC float64 latents."""
        cond = self.embed(prompts)
        if guidance is not None:
            cond = torch.cat([self.embed(negative), cond])
        x = noise.astype(np.float64)
        grid = perflow_grid(steps, k)
        for t, t_next in itertools.pairwise(grid):
            xin = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
            if guidance is not None:
                xin = torch.cat([xin, xin])
            with torch.no_grad():  # the UNet sees the integer timestep, as set_timesteps makes them
                out = self.unet(xin, int(t * 1000), cond).sample.permute(0, 2, 3, 1).numpy().astype(np.float64)
            if guidance is not None:
                u, c = np.split(out, 2)
                out = u + guidance * (c - u)
            x = x + (t_next - t) * perflow_velocity(prediction, out, x, t, k, self.ac)
        return x


@pytest.fixture(scope="module")
def reference(perflow_dir):
    return Reference(perflow_dir)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_reference_grid_is_perflows():
    """The written grid rule on hand-computed cases (the pipeline's own grid is never compared
    with it: the latents are)."""
    np.testing.assert_allclose(perflow_grid(1, 4), [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(perflow_grid(6, 4), [1.0, 0.875, 0.75, 0.625, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(perflow_grid(6, 5), [1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert window_of(0.7501, 4) == (0.75, 0.5) and window_of(0.75, 4) == (0.75, 0.5)


# (prediction, windows, steps, guidance): CFG with negative prompts at 4 and 6 steps; each
# prediction type; 5 windows (diff_eps at 6 steps with CFG: the stream test below). Measured rel.
# errors: 2.5e-6, 1.1e-6, 2.9e-7, 6.4e-7. Each of these moves the reference by more than 1e-3:
# the prompts swapped (1.7e-2 .. 5.9e-2), diff_eps <-> ddim_eps (>= 1.6e-1), one more step
# (>= 1.15e-3), guidance x1.1 (>= 4.5e-3), an empty negative prompt (>= 1.5e-2), one more window
# (>= 1.6e-3).
CASES = [("diff_eps", 4, 4, 3.0), ("ddim_eps", 4, 6, 2.0), ("velocity", 4, 4, None), ("diff_eps", 5, 6, None)]


@pytest.mark.parametrize("prediction,windows,steps,guidance", CASES)
def test_pipeline_latents_match_reference_loop(pipelines, reference, prediction, windows, steps, guidance):
    pipe = pipelines(prediction, windows)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = {"guidance": guidance, "negative": NEGATIVE, "prediction": prediction, "k": windows}
    want = reference.latents(PROMPTS, noise, steps, **kw)
    negative = NEGATIVE if guidance else ""  # without guidance a negative prompt is unread (and warned about)
    ours = pipe(PROMPTS, steps=steps, guidance_scale=guidance, negative_prompt=negative, noise=noise,
                output_type="latent")
    assert ours.shape == want.shape == (2, 8, 8, 4)
    assert rel(ours, want) <= TOL
    # the test sees the text: the prompts swapped move the reference by far more than TOL
    assert rel(reference.latents(PROMPTS[::-1], noise, steps, **kw), want) > 100 * TOL


def test_pipeline_beyond_twice_the_training_size(pipelines, reference):
    """A UNet takes any latent size, as diffusers' does: 12x20 latents, past twice the tiny UNet's
    sample_size of 8 (the pipelines refused it, where the model and sf.sample took it)."""
    pipe = pipelines("diff_eps", 4)
    noise = np.random.default_rng(5).standard_normal((1, 12, 20, 4)).astype(np.float32)
    ours = pipe(PROMPTS[:1], steps=4, noise=noise, output_type="latent")
    assert rel(ours, reference.latents(PROMPTS[:1], noise, 4)) <= TOL
    assert pipe(PROMPTS[:1], steps=4, height=24, width=40, output_type="np").shape == (1, 24, 40, 3)  # pixels


def test_fewer_steps_than_windows_run_one_per_window_with_a_warning(pipelines, reference):
    """README: fewer steps than PeRFlow's windows are raised to one per window, with a warning:
    steps=2 at 4 windows is the reference loop's 4-step (one per window) run."""
    pipe = pipelines("diff_eps", 4)
    noise = np.random.default_rng(7).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match="steps=2 is below the 4 PeRFlow time windows: running 4 steps"):
        ours = pipe(PROMPTS[:1], steps=2, noise=noise, output_type="latent")
    want = reference.latents(PROMPTS[:1], noise, 4)
    assert rel(ours, want) <= TOL
    assert np.allclose(perflow_grid(2, 4), perflow_grid(4, 4))  # the rule written out: the same grid


def test_prompt_stream_latents_match_reference_loop(pipelines, reference):
    """Through the stream engine (mixed steps and scales, negative prompts, one slot fewer than
    requests) each request's latents are the reference's; bad requests fail alone.
    Measured rel. errors 1.3e-6 .. 2.0e-6."""
    from streamflow_jax.pipelines import PromptStream
    from streamflow_jax.stream import RequestError

    pipe = pipelines()
    noise = np.random.default_rng(2).standard_normal((3, 8, 8, 4)).astype(np.float32)
    reqs = [(PROMPTS[0], NEGATIVE[0], 4, 3.0), (PROMPTS[1], NEGATIVE[1], 6, 2.0), (PROMPTS[1], "", 4, 3.0)]
    stream = PromptStream(pipe, slots_per_stream=2, streams=1, guidance=True, output_type="latent")
    ids = [stream.submit(p, steps=s, noise=noise[i], guidance_scale=g, negative_prompt=n)
           for i, (p, n, s, g) in enumerate(reqs)]
    bad = [stream.submit(["not", "a", "string"], guidance_scale=2.0), stream.submit("ok", steps=0, guidance_scale=2.0),
           stream.submit("nan", guidance_scale=float("nan")), stream.submit("seed", seed=-1)]
    # no scale: the pipeline's default (none for PeRFlow), in a guided stream too: its conditional velocity
    plain = stream.submit(PROMPTS[0], steps=4, noise=noise[0])
    results = stream.run()
    assert len(results) == 8
    assert rel(results[plain], reference.latents([PROMPTS[0]], noise[:1], 4)[0]) <= TOL
    for i, (rid, (p, n, s, g)) in enumerate(zip(ids, reqs)):
        want = reference.latents([p], noise[i : i + 1], s, guidance=g, negative=[n])[0]
        assert results[rid].shape == (8, 8, 4)
        assert rel(results[rid], want) <= TOL
    other = reference.latents([PROMPTS[1]], noise[:1], 4, guidance=3.0, negative=[NEGATIVE[0]])[0]
    assert rel(other, reference.latents([PROMPTS[0]], noise[:1], 4, guidance=3.0, negative=[NEGATIVE[0]])[0]) > 100 * TOL
    for rid in bad:
        assert isinstance(results[rid], RequestError)


def test_output_types_agree(perflow_dir, pipelines):
    """"np" is diffusers' VAE decode of "latent", in [0, 1]; "pil" its uint8 rounding."""
    pipe = pipelines()
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    latents = pipe("a cat", noise=noise, output_type="latent")
    images = pipe("a cat", noise=noise, output_type="np")
    vae = diffusers.AutoencoderKL.from_pretrained(perflow_dir / "vae").eval()
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(np.array(latents)).permute(0, 3, 1, 2) / vae.config.scaling_factor).sample
    want = np.clip(want.permute(0, 2, 3, 1).numpy() / 2 + 0.5, 0, 1)
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images, want, atol=1e-6)  # measured 6e-8
    pil = np.asarray(pipe("a cat", noise=noise)[0])
    np.testing.assert_array_equal(pil, (images[0] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", noise=noise, output_type="tensor")


def test_converted_dir_same_latents_and_taesd_matches_diffusers(perflow_dir, pipelines, tmp_path):
    """The converted pipeline gives the same latents, bit for bit; with a TAESD directory the
    images are diffusers' AutoencoderTiny decode of them."""
    noise = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    direct = pipelines()("a cat", noise=noise, output_type="latent")
    sf.convert(perflow_dir, tmp_path / "conv", progress=False)
    converted = sf.Pipeline.from_diffusers(tmp_path / "conv")("a cat", noise=noise, output_type="latent")
    np.testing.assert_array_equal(direct, converted)

    ref_taesd = randomize(diffusers.AutoencoderTiny(**TAESD), 5, std=0.1).eval()
    ref_taesd.save_pretrained(tmp_path / "taesd")
    tiny = sf.Pipeline.from_diffusers(perflow_dir, taesd=tmp_path / "taesd")
    assert tiny.vae_scale == 8 and tiny.latent_shape(64, 64) == (8, 8, 4)
    images = tiny("a cat", noise=noise, height=64, width=64, output_type="np")
    with torch.no_grad():  # diffusers' pipelines: decode(latents / scaling_factor), then /2 + 0.5
        want = ref_taesd.decode(torch.from_numpy(np.array(direct)).permute(0, 3, 1, 2) / ref_taesd.config.scaling_factor).sample
    want = np.clip(want.permute(0, 2, 3, 1).numpy() / 2 + 0.5, 0, 1)
    assert images.shape == want.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(images, want, atol=1e-5)  # measured 6e-7
    assert want.std() > 0.01  # not blank


def test_onnxruntime_backend_cli_taesd_and_size(perflow_dir, tmp_path):
    """``generate --backend onnxruntime --taesd --height --width``: the PNG is the XLA
    pipeline's images at that size, decoded by the TAESD; then, on the export the CLI made
    (CFG doubles the batch to 4), ``backend="onnxruntime"`` with negative prompts gives the XLA
    pipeline's latents."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from streamflow_jax.backends import cache_root

    randomize(diffusers.AutoencoderTiny(**TAESD), 5, std=0.1).save_pretrained(tmp_path / "taesd")
    out = tmp_path / "ort.png"
    assert cli(["generate", "--model", str(perflow_dir), "--prompt", "a cat", "--prompt", "a dog", "--steps", "4",
                "--guidance", "2", "--backend", "onnxruntime", "--taesd", str(tmp_path / "taesd"),
                "--height", "32", "--width", "64", "--seed", "3", "--out", str(out)]) == 0
    with Image.open(out) as img:
        got = np.asarray(img)
    pipe = sf.Pipeline.from_diffusers(perflow_dir, taesd=tmp_path / "taesd")
    want = np.concatenate([np.asarray(im) for im in pipe(["a cat", "a dog"], steps=4, guidance_scale=2.0, seed=3,
                                                          height=32, width=64)], axis=1)
    assert got.shape == want.shape == (32, 2 * 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # uint8 levels; measured 0
    assert want.std() > 5

    noise = np.random.default_rng(4).standard_normal((2, 4, 8, 4)).astype(np.float32)
    kw = {"steps": 4, "guidance_scale": 3.0, "negative_prompt": NEGATIVE, "noise": noise, "output_type": "latent"}
    assert rel(pipe(PROMPTS, backend="onnxruntime", **kw), pipe(PROMPTS, **kw)) <= 1e-5  # measured 1.9e-6
    assert len(list((cache_root() / "exports").iterdir())) == 1  # the CLI's export, reused


def test_generate_cli_prompt_stream(perflow_dir, tmp_path, monkeypatch):
    """``generate --stream`` runs the stream engine and gives the batch path's images (same noise
    rows); ``--negative-prompt`` reaches both, as the Python API's ``negative_prompt``."""
    from streamflow_jax.stream import StreamEngine

    args = ["generate", "--model", str(perflow_dir), "--prompt", "a cat", "--prompt", "a dog", "--steps", "3",
            "--guidance", "2.5", "--negative-prompt", "blurry"]
    negatives = []  # what reached the pipeline (the tiny VAE shows it in one grey level at most)
    call, submit = PeRFlowPipeline.__call__, PromptStream.submit
    monkeypatch.setattr(PeRFlowPipeline, "__call__",
                        lambda self, *a, **k: negatives.append(k.get("negative_prompt")) or call(self, *a, **k))
    assert cli([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert negatives == ["blurry"]
    pipe = sf.Pipeline.from_diffusers(perflow_dir)
    want = np.concatenate([np.asarray(im) for im in pipe(["a cat", "a dog"], steps=3, guidance_scale=2.5, seed=0,
                                                         negative_prompt="blurry")], axis=1).astype(int)
    assert np.abs(np.asarray(Image.open(tmp_path / "b.png")).astype(int) - want).max() <= 1  # uint8 levels
    monkeypatch.setattr(PromptStream, "submit",
                        lambda self, *a, **k: negatives.append(k.get("negative_prompt")) or submit(self, *a, **k))
    runs = []
    original = StreamEngine.run
    monkeypatch.setattr(StreamEngine, "run", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))

    def batch_path(*a, **k):  # fail at once, before any compilation
        raise AssertionError("generate --stream ran the pipeline's batch path")

    monkeypatch.setattr(PeRFlowPipeline, "__call__", batch_path)
    assert cli([*args, "--stream", "--slots", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert runs, "the stream engine did not run"
    assert negatives[-2:] == ["blurry", "blurry"]  # one request per prompt
    want, got = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in "bs")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1  # uint8 levels


def test_pipeline_bad_input(perflow_dir, pipelines, tmp_path):
    pipe = pipelines()
    with pytest.raises(ValueError, match="non-empty list"):
        pipe([])
    with pytest.raises(ValueError, match="noise has shape"):
        pipe("a cat", noise=np.zeros((1, 8, 8, 3), np.float32))  # the size may vary, the channels may not
    with pytest.raises(ValueError, match="image height 15 is not a multiple of 2"):
        pipe("a cat", height=15)
    with pytest.raises(ValueError, match="image height must be positive, got 0"):
        pipe("a cat", height=0)
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(ValueError, match="seed"):
            pipe("a cat", seed=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale .* is not finite"):
            pipe("a cat", guidance_scale=bad)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 20000"):
        pipe("a cat", steps=20000)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipe("a cat", guidance_scale=2.0, negative_prompt=NEGATIVE)
    # a negative prompt that guidance does not read (PeRFlow's default: none; a scale <= 1) is
    # said to be ignored, and is: diffusers drops it silently
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    plain = pipe("a cat", steps=1, noise=noise, output_type="latent")
    for scale in (None, 1.0):
        with pytest.warns(UserWarning, match=r"negative prompt 'blurry' is ignored: classifier-free guidance is "
                                             r"off: it runs at guidance scales above 1 \(off by default for "
                                             r"PeRFlowPipeline\)"):
            ignored = pipe("a cat", steps=1, noise=noise, output_type="latent", negative_prompt="blurry",
                           guidance_scale=scale)
        np.testing.assert_array_equal(ignored, plain)
    with pytest.raises(ValueError, match="max_sequence_length does not apply"):
        pipe("a cat", max_sequence_length=64)
    with pytest.raises(ValueError, match="max_sequence_length does not apply"):
        PromptStream(pipe, max_sequence_length=64)

    root = copy_of(perflow_dir, tmp_path / "p", {"_class_name": "DDIMScheduler", "prediction_type": "epsilon"})
    with pytest.raises(sf.ConfigError, match="not a rectified flow"):
        sf.Pipeline.from_diffusers(root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(sf.ConfigError, match="unsupported pipeline class 'KandinskyPipeline'"):
        sf.Pipeline.from_diffusers(root)
    (root / "model_index.json").unlink()
    with pytest.raises(sf.ConfigError, match="no model_index.json"):
        sf.Pipeline.from_diffusers(root)
    set_scheduler(root, perflow_scheduler(windows=0))
    with pytest.raises(sf.ConfigError, match="scheduler_config.json: num_time_windows must be an integer >= 1"):
        PeRFlowPipeline.load(root)
    set_scheduler(root, perflow_scheduler())
    with pytest.raises(sf.ConfigError, match=r"num_time_windows \(--windows\) must be an integer >= 1, got 0"):
        PeRFlowPipeline.load(root, num_time_windows=0)  # an override of 0 is refused, not read as "none given"
