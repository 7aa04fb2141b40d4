"""The embedded default model: it converts, it makes legible digits, and so does diffusers with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from safetensors.torch import load_file

import streamflow_jax as sf
from streamflow_jax.eval import digit_accuracy, real_digits, upscale2x
from streamflow_jax.cli import main as cli
from streamflow_jax.pipelines import DIGITS_DIR, NULL_CLASS, DigitsPipeline, image_grid

REPO = Path(__file__).resolve().parents[1]
LABELS = np.repeat(np.arange(10), 8)
STEPS, GUIDANCE = 16, 3.0  # the CLI's defaults


@pytest.fixture(scope="module")
def ours():
    pipe = DigitsPipeline.load()
    return pipe(LABELS, steps=STEPS, guidance_scale=GUIDANCE, seed=0)


def diffusers_digits(labels, steps, guidance, noise, negative=NULL_CLASS):
    """The same checkpoint sampled by diffusers + torch with diffusers' own scheduler and CFG,
    from the given NHWC noise, the unconditional branch the ``negative`` class."""
    model = SD3Transformer2DModel.from_pretrained(DIGITS_DIR / "transformer").eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(DIGITS_DIR / "scheduler")
    sched.set_timesteps(steps)
    table = load_file(DIGITS_DIR / "conditioning.safetensors")
    idx = torch.from_numpy(np.concatenate([np.full(len(labels), negative), labels]))
    ehs, pooled = table["encoder_hidden_states"][idx], table["pooled_projections"][idx]
    x = torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2)
    with torch.no_grad():
        for t in sched.timesteps:
            v = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=ehs, pooled_projections=pooled,
                      timestep=t.expand(2 * len(labels))).sample
            v_u, v_c = v.chunk(2)
            x = sched.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
    return ((x[:, 0].numpy() + 1) / 2).clip(0, 1)


def test_training_record_is_shipped():
    record = json.loads((DIGITS_DIR / "training.json").read_text())
    assert record["script"] == "scripts/train_digits.py" and record["steps"] > 0 and "final_loss" in record
    size = sum(p.stat().st_size for p in DIGITS_DIR.rglob("*") if p.is_file())
    assert size < 4 * 2**20, f"embedded model is {size / 2**20:.1f} MiB"


def test_classifier_recognizes_real_digits():
    images, labels = real_digits()
    assert digit_accuracy(images, labels) > 0.97  # training accuracy; held-out is ~97% (5-fold CV)
    assert digit_accuracy(np.zeros((10, 16, 16)), np.arange(10)) <= 0.2  # blank images are not digits


def test_our_digits_are_legible(ours):
    assert ours.shape == (80, 16, 16)
    acc = digit_accuracy(ours, LABELS)
    assert acc >= 0.90, acc


def test_diffusers_makes_the_same_digits(ours):
    """diffusers' SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler loop with CFG, started
    from our noise, gives our pixels (a quarter of the images: two per digit). Measured max
    1.5e-6; guidance x1.1 moves diffusers' by 0.17, 17 steps instead of 16 by 1.7e-2."""
    pick = np.arange(0, len(LABELS), 4)
    noise = np.asarray(DigitsPipeline.load().noise(len(LABELS), 0))[pick]
    theirs = diffusers_digits(LABELS[pick], STEPS, GUIDANCE, noise)
    assert theirs.shape == (len(pick), 16, 16)
    np.testing.assert_allclose(ours[pick], theirs, rtol=0, atol=2e-5)


def test_onnxruntime_backend_same_images(ours):
    """The embedded model exported to ONNX and sampled by ONNX Runtime: the XLA images
    (measured max difference 1.8e-6)."""
    pytest.importorskip("onnxruntime")

    theirs = DigitsPipeline.load()(LABELS, steps=STEPS, guidance_scale=GUIDANCE, seed=0, backend="onnxruntime")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5)


def test_stream_engine_same_images(ours):
    """Through the stream engine (one request per digit), the same images as one batch
    (measured max difference 1.4e-6)."""
    theirs = DigitsPipeline.load().stream(LABELS, steps=STEPS, guidance_scale=GUIDANCE, seed=0,
                                              slots_per_stream=8, streams=2)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5)


def test_a_negative_digit_is_the_unconditional_class(tmp_path, capsys):
    """``negative_label=3`` (``generate --negative-prompt 3``, as the server takes it): guidance
    against class 3 instead of the null class, as diffusers' loop with that class; the stream and
    the CLI give the same digits."""
    labels = np.arange(10)
    pipe = DigitsPipeline.load()
    ours = pipe(labels, steps=4, guidance_scale=GUIDANCE, seed=0, negative_label=3)
    theirs = diffusers_digits(labels, 4, GUIDANCE, pipe.noise(10, 0), negative=3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
    assert np.abs(ours - pipe(labels, steps=4, guidance_scale=GUIDANCE, seed=0)).max() > 0.1  # it changed them
    streamed = pipe.stream(labels, steps=4, guidance_scale=GUIDANCE, seed=0, negative_label=3, slots_per_stream=5)
    np.testing.assert_allclose(streamed, ours, rtol=0, atol=2e-5)
    assert cli(["generate", "--per-digit", "1", "--steps", "4", "--negative-prompt", "3", "-q",
                "--out", str(tmp_path / "d.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "d.png"), np.float32)
    np.testing.assert_allclose(grid, np.asarray(image_grid(ours, rows=10), np.float32), atol=1)
    with pytest.raises(ValueError, match="negative_label must be a class 0-9"):
        pipe(labels, steps=2, negative_label=10)
    with pytest.warns(UserWarning, match="negative label '3' is ignored: classifier-free guidance is off"):
        pipe(labels, steps=2, guidance_scale=1.0, negative_label=3)


def test_generate_quantize_fp8_runs_the_quantized_model(tmp_path):
    """``generate --quantize fp8`` is the pipeline with ``sf.quantize(model, "fp8")`` (whose numerics
    test_quantize checks against a torch emulation on diffusers' modules), not the float model."""
    labels = np.arange(10)
    pipe = DigitsPipeline.load()
    float_images = pipe(labels, steps=3, seed=0)
    pipe.model = sf.quantize(pipe.model, "fp8")
    fp8_images = pipe(labels, steps=3, seed=0)
    assert cli(["generate", "--per-digit", "1", "--steps", "3", "--quantize", "fp8", "-q",
                "--out", str(tmp_path / "q.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "q.png"), np.float32)
    np.testing.assert_allclose(grid, np.asarray(image_grid(fp8_images, rows=10), np.float32), atol=1)
    assert np.abs(grid - np.asarray(image_grid(float_images, rows=10), np.float32)).max() > 1  # FP8 shows


def test_sample_under_grad_and_vmap():
    """The contract says ``sf.sample`` (XLA) works under ``jax.grad`` and ``jax.vmap``: the
    gradient of a loss on the samples with respect to the noise and to the guidance scale is
    torch autograd's through diffusers' transformer and scheduler loop, and a vmapped call is
    each call's."""
    import jax
    import jax.numpy as jnp

    labels, steps = np.arange(4), 3
    pipe = DigitsPipeline.load()
    noise = np.asarray(pipe.noise(len(labels), 0))
    cond, uncond = pipe.cond(labels), pipe.cond(np.full(len(labels), NULL_CLASS))
    grid = pipe.scheduler.flow_match_grid(steps)

    def loss(n, g):
        return jnp.sum(sf.sample(pipe.model, n, grid, cond, guidance_scale=g, uncond=uncond) ** 2)

    d_noise, d_scale = jax.grad(loss, argnums=(0, 1))(jnp.asarray(noise), jnp.float32(GUIDANCE))

    model = SD3Transformer2DModel.from_pretrained(DIGITS_DIR / "transformer").eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(DIGITS_DIR / "scheduler")
    sched.set_timesteps(steps)
    table = load_file(DIGITS_DIR / "conditioning.safetensors")
    idx = torch.from_numpy(np.concatenate([np.full(len(labels), NULL_CLASS), labels]))
    x0 = torch.from_numpy(noise.copy()).permute(0, 3, 1, 2).requires_grad_(True)
    scale = torch.tensor(GUIDANCE, requires_grad=True)
    x = x0
    for t in sched.timesteps:
        v = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=table["encoder_hidden_states"][idx],
                  pooled_projections=table["pooled_projections"][idx], timestep=t.expand(2 * len(labels))).sample
        v_u, v_c = v.chunk(2)
        x = sched.step(v_u + scale * (v_c - v_u), t, x).prev_sample
    (x ** 2).sum().backward()
    theirs = x0.grad.permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(d_noise) - theirs).max() / np.abs(theirs).max() <= 1e-4  # measured 4.5e-6
    assert float(d_scale) == pytest.approx(float(scale.grad), rel=1e-4)  # 21.05491 vs 21.05494
    batched = jax.vmap(lambda n: sf.sample(pipe.model, n, grid, cond, guidance_scale=GUIDANCE, uncond=uncond))(
        jnp.stack([noise, 0.5 * noise]))
    for i, n in enumerate((noise, 0.5 * noise)):
        want = sf.sample(pipe.model, n, grid, cond, guidance_scale=GUIDANCE, uncond=uncond)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(want), rtol=0, atol=1e-5)


def test_per_label_guidance_follows_the_scalar_rule():
    """A scale <= 1 among per-label scales means no guidance for that label, as the same scale
    alone does (it ran v_u + g (v_c - v_u): the unconditional image at 0); one scale per label."""
    pipe = DigitsPipeline.load()
    labels = np.array([3, 7])
    run = lambda g: pipe(labels, steps=4, guidance_scale=g, seed=0, progress=False)  # noqa: E731
    alone_off, alone_on = run(0.0), run(3.0)
    assert np.abs(alone_off - alone_on).max() > 0.05  # guidance matters here
    mixed = run([0.0, 3.0])
    np.testing.assert_allclose(mixed[0], alone_off[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], alone_on[1], atol=1e-5)
    np.testing.assert_array_equal(run([0.0, 0.5]), alone_off)
    with pytest.raises(ValueError, match="1 guidance scales for 2 labels"):
        run([2.0])
    for n, counts in ((1, "[1, 16, 16]"), (2, "[1 or 2, 16, 16]")):  # "[1 or 1, 16, 16]" for one label
        with pytest.raises(ValueError, match=re.escape(f"image has shape (1, 8, 8) (grey, one channel); the model "
                                                       f"takes {counts} grey images")):
            pipe(labels[:n], steps=4, image=np.zeros((8, 8)), progress=False)


def test_numpy_upscale_equals_training_upscale():
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (5, 8, 8)).astype(np.float32))
    ref = F.interpolate(x[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(upscale2x(x.numpy()), ref, atol=1e-6)


def test_generate_cli_writes_grid(tmp_path, capsys):

    out = tmp_path / "digits.png"
    assert cli(["generate", "--out", str(out), "--per-digit", "2", "--steps", "8"]) == 0
    stdout = capsys.readouterr().out
    assert "images/s" in stdout and "digit accuracy" in stdout
    with Image.open(out) as img:
        assert img.size[1] > img.size[0]  # 10 rows of 2
        assert np.asarray(img).std() > 10  # not blank


def test_python_dash_m_entry_point():
    """``python -m streamflow_jax`` is the CLI (its --help answers without loading JAX)."""
    proc = subprocess.run([sys.executable, "-m", "streamflow_jax", "generate", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--per-digit" in proc.stdout


def test_generate_cli_stream(tmp_path, capsys, monkeypatch):
    """``generate --stream --slots --streams`` (in process) runs the stream engine with those
    slots and writes the grid of its images (the engine's images equal the batch's, above);
    ``--ticks-per-call 3``: the same images, three ticks a compiled call."""
    from streamflow_jax.pipelines import image_grid
    from streamflow_jax.stream import StreamEngine

    made = []
    original = StreamEngine.__init__

    def spy(self, *a, **k):
        made.append((k.get("slots_per_stream"), k.get("streams"), k.get("ticks_per_call")))
        original(self, *a, **k)

    monkeypatch.setattr(StreamEngine, "__init__", spy)
    out = tmp_path / "stream.png"
    assert cli(["generate", "--per-digit", "1", "--steps", "2", "--stream", "--slots", "2", "--streams", "1",
                "--out", str(out)]) == 0
    assert "stream engine 1 x 2 slots" in capsys.readouterr().out
    assert made == [(2, 1, None), (2, 1, None)]  # the compiling call, the timed call
    want = DigitsPipeline.load().stream(np.arange(10), steps=2, guidance_scale=GUIDANCE, seed=0,
                                            slots_per_stream=2, streams=1)
    with Image.open(out) as img:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(image_grid(want, rows=10)))
    made.clear()
    assert cli(["generate", "--per-digit", "1", "--steps", "2", "--stream", "--slots", "2", "--ticks-per-call", "3",
                "--out", str(out)]) == 0
    assert made == [(2, 1, 3), (2, 1, 3)]
    with Image.open(out) as img:  # uint8 images: equal, though a scan's arithmetic may round otherwise
        assert np.abs(np.asarray(img).astype(int) - np.asarray(image_grid(want, rows=10))).max() <= 1
    for rows, message in ((0, "rows must be an integer >= 1, got 0"),  # divided by zero
                          (3, "rows=3: 10 images do not fill equal rows"),  # dropped an image
                          (2.0, "rows must be an integer >= 1, got 2.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            image_grid(want, rows=rows)


def test_generate_cli_bad_input(tmp_path, capsys):

    assert cli(["generate", "--steps", "0"]) == 1
    assert "--steps must be in [1, 1000], got 0" in capsys.readouterr().err
    assert cli(["generate", "--model", str(tmp_path)]) == 1
    assert "conditioning.safetensors" in capsys.readouterr().err
    assert cli(["generate", "--per-digit", "0"]) == 1
    assert "--per-digit must be >= 1" in capsys.readouterr().err


def test_training_script_smoke(tmp_path):
    """A few steps of the training script run and produce a directory our pipeline loads."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_digits
    finally:
        sys.path.pop(0)
    record = train_digits.main(["--out", str(tmp_path / "d"), "--steps", "3", "--batch", "8"])
    assert record["steps"] == 3 and np.isfinite(record["final_loss"])
    pipe = DigitsPipeline.load(tmp_path / "d")
    images = pipe(np.arange(10), steps=2)
    assert images.shape == (10, 16, 16) and np.isfinite(images).all()
    sf.convert(tmp_path / "d", tmp_path / "converted", progress=False)  # the pipeline, converted
    record = json.loads((tmp_path / "converted" / "conversion.json").read_text())
    assert record["converted"] == {"transformer": "SD3Transformer2DModel"} and record["copied"] == ["scheduler"]
    again = DigitsPipeline.load(tmp_path / "converted")(np.arange(10), steps=2)
    np.testing.assert_allclose(again, images, atol=1e-6)
