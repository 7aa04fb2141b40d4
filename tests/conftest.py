"""Shared fixtures: tiny random diffusers checkpoints built and saved by the tests themselves."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ["JAX_PLATFORMS"] = "cpu"  # forced: the suite's tolerances are CPU fp32's

import numpy as np
import pytest


torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test stands alone: its own export/engine cache (never ~/.cache) and no runners
    left over from another test."""
    from streamflow_jax import backends

    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("STREAMFLOW_JAX_CACHE", str(root))
    backends.clear_runners()
    yield root
    backends.clear_runners()

# Tiny SD3-family configs, named after the variant each stands for. Odd head counts and
# widths on purpose (3 heads x 8, text width 12, pooled width 10).
SD3_TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=3,
    joint_attention_dim=12, caption_projection_dim=24, pooled_projection_dim=10, out_channels=4,
    pos_embed_max_size=12,
)
SD35_TINY = dict(SD3_TINY, num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")
SD35_LARGE_TINY = dict(SD3_TINY, num_layers=2, qk_norm="rms_norm", num_attention_heads=5, caption_projection_dim=40)
VARIANTS = {"sd3": SD3_TINY, "sd35_medium": SD35_TINY, "sd35_large": SD35_LARGE_TINY}


def randomize(module, seed: int, std: float = 0.2):
    """Replaces every parameter with N(0, std): diffusers' init leaves ones and zeros that could
    hide a wrong mapping (norm weights, biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def make_sd3(path, variant: str = "sd3", seed: int = 0, **overrides):
    """Builds a random ``SD3Transformer2DModel``, saves it with ``save_pretrained`` at ``path``."""
    cfg = dict(VARIANTS[variant], **overrides)
    model = randomize(diffusers.SD3Transformer2DModel(**cfg), seed).eval()
    model.save_pretrained(path)
    return model


def sd3_inputs(cfg: dict, batch: int, height: int, width: int, text_len: int = 7, seed: int = 0):
    """Random NHWC latents, conditioning and a different t per element (numpy float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, cfg["in_channels"]), dtype=np.float32)
    cond = {
        "encoder_hidden_states": rng.standard_normal((batch, text_len, cfg["joint_attention_dim"]), dtype=np.float32),
        "pooled_projections": rng.standard_normal((batch, cfg["pooled_projection_dim"]), dtype=np.float32),
    }
    t = np.linspace(0.95, 0.1, batch).astype(np.float32) if batch > 1 else np.array([0.6], np.float32)
    return x, t, cond


def torch_velocity(model, x, t, cond):
    """diffusers forward on NHWC numpy inputs, as SD3's pipeline calls it (timestep = t*1000)."""
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
            pooled_projections=torch.from_numpy(cond["pooled_projections"]),
            timestep=torch.from_numpy(t) * 1000,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture
def tiny_sd3(tmp_path):
    path = tmp_path / "sd3_tiny"
    model = make_sd3(path)
    return path, model
