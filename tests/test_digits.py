"""The embedded default model: it converts, it makes legible digits, and so does diffusers with it."""

from __future__ import annotations

import json
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
from streamflow_jax.pipelines import DIGITS_DIR, NULL_CLASS, DigitsPipeline

REPO = Path(__file__).resolve().parents[1]
LABELS = np.repeat(np.arange(10), 8)
STEPS, GUIDANCE = 16, 3.0  # the CLI's defaults


@pytest.fixture(scope="module")
def ours():
    pipe = DigitsPipeline.from_dir()
    return pipe(LABELS, steps=STEPS, guidance_scale=GUIDANCE, seed=0)


def diffusers_digits(labels, steps, guidance, seed):
    """The same checkpoint sampled by diffusers + torch with diffusers' own scheduler and CFG."""
    model = SD3Transformer2DModel.from_pretrained(DIGITS_DIR / "transformer").eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(DIGITS_DIR / "scheduler")
    sched.set_timesteps(steps)
    table = load_file(DIGITS_DIR / "conditioning.safetensors")
    idx = torch.from_numpy(np.concatenate([np.full(len(labels), NULL_CLASS), labels]))
    ehs, pooled = table["encoder_hidden_states"][idx], table["pooled_projections"][idx]
    x = torch.randn((len(labels), 1, 16, 16), generator=torch.Generator().manual_seed(seed))
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


def test_diffusers_agrees_the_model_is_good(ours):
    """The model itself is good: diffusers' samples from the same checkpoint score within 5 points."""
    theirs = diffusers_digits(LABELS, STEPS, GUIDANCE, seed=0)
    acc_ours, acc_theirs = digit_accuracy(ours, LABELS), digit_accuracy(theirs, LABELS)
    assert acc_theirs >= 0.85 and abs(acc_ours - acc_theirs) <= 0.05, (acc_ours, acc_theirs)


def test_onnxruntime_backend_same_quality(ours):
    """The embedded model exported to ONNX and sampled by ONNX Runtime: same accuracy within 2 points."""
    pytest.importorskip("onnxruntime")

    theirs = DigitsPipeline.from_dir()(LABELS, steps=STEPS, guidance_scale=GUIDANCE, seed=0, backend="onnxruntime")
    assert abs(digit_accuracy(theirs, LABELS) - digit_accuracy(ours, LABELS)) <= 0.02
    np.testing.assert_allclose(theirs, ours, atol=2e-3)  # and, pixel for pixel, the same images


def test_stream_engine_same_images(ours):
    """Through the stream engine (one request per digit), the same images as one batch."""
    theirs = DigitsPipeline.from_dir().stream(LABELS, steps=STEPS, guidance_scale=GUIDANCE, seed=0,
                                              slots_per_stream=8, streams=2)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert abs(digit_accuracy(theirs, LABELS) - digit_accuracy(ours, LABELS)) <= 0.02


def test_numpy_upscale_equals_training_upscale():
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (5, 8, 8)).astype(np.float32))
    ref = F.interpolate(x[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(upscale2x(x.numpy()), ref, atol=1e-6)


def test_generate_cli_writes_grid(tmp_path):
    out = tmp_path / "digits.png"
    proc = subprocess.run([sys.executable, "-m", "streamflow_jax", "generate", "--out", str(out), "--per-digit", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout and "digit accuracy" in proc.stdout
    with Image.open(out) as img:
        assert img.size[1] > img.size[0]  # 10 rows of 3
        assert np.asarray(img).std() > 10  # not blank


def test_generate_cli_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streamflow_jax", "generate", "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--steps must be >= 1" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "streamflow_jax", "generate", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "conditioning.safetensors" in proc.stderr


def test_training_script_smoke(tmp_path):
    """A few steps of the training script run and produce a directory our pipeline loads."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_digits
    finally:
        sys.path.pop(0)
    record = train_digits.main(["--out", str(tmp_path / "d"), "--steps", "3", "--batch", "8"])
    assert record["steps"] == 3 and np.isfinite(record["final_loss"])
    pipe = DigitsPipeline.from_dir(tmp_path / "d")
    images = pipe(np.arange(10), steps=2)
    assert images.shape == (10, 16, 16) and np.isfinite(images).all()
    sf.convert(tmp_path / "d", tmp_path / "converted", progress=False)  # the pipeline, converted
    record = json.loads((tmp_path / "converted" / "conversion.json").read_text())
    assert record["converted"] == {"transformer": "SD3Transformer2DModel"} and record["copied"] == ["scheduler"]
    again = DigitsPipeline.from_dir(tmp_path / "converted")(np.arange(10), steps=2)
    np.testing.assert_allclose(again, images, atol=1e-6)
