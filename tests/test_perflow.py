"""PeRFlow: windows, timesteps, and the vectorized UNet-to-velocity adapter against the
reference note's formulas evaluated element by element (with diffusers' UNet for the network)."""

from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import UNETS, perflow_reference_velocity, randomize

import streamflow_jax as sf
from streamflow_jax.models.perflow import PeRFlowAdapter, window_index


@pytest.mark.parametrize("t,window", [(1.0, 0), (0.7501, 1), (0.75, 1), (0.7499, 1), (0.5, 2), (0.25, 3), (0.0, 3)])
def test_window_lookup_at_boundaries(t, window):
    _, ends = sf.schedules.perflow_windows(4)
    assert int(window_index(jnp.float32(t), jnp.asarray(ends))) == window


@pytest.mark.parametrize("steps,expected", [
    (1, [1.0, 0.75, 0.5, 0.25, 0.0]),  # S < K is raised to K
    (4, [1.0, 0.75, 0.5, 0.25, 0.0]),
    (5, [1.0, 0.875, 0.75, 0.5, 0.25, 0.0]),  # the first S mod K windows get one more step
    (8, [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]),
])
def test_perflow_timesteps(steps, expected):
    np.testing.assert_allclose(sf.schedules.perflow(steps, 4), expected, atol=1e-7)





@pytest.mark.parametrize("prediction", ["diff_eps", "ddim_eps", "velocity"])
def test_vectorized_velocity_equals_per_element_reference(tmp_path, prediction):
    ref = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 3, std=0.1).eval()
    ref.save_pretrained(tmp_path / "unet")
    model = sf.load(tmp_path / "unet").with_adapter(PeRFlowAdapter(prediction, 4))
    rng = np.random.default_rng(0)
    t = np.array([1.0, 0.8, 0.7501, 0.5, 0.3, 0.05], np.float32)  # elements in every window
    x = rng.standard_normal((len(t), 8, 8, 4), dtype=np.float32)
    ehs = rng.standard_normal((len(t), 5, 768), dtype=np.float32)
    ours = np.asarray(model.velocity(x, t, {"encoder_hidden_states": ehs}))
    for i, ti in enumerate(t):
        with torch.no_grad():  # the UNet sees the integer timestep int(t*1000)
            eps = ref(torch.from_numpy(x[i : i + 1]).permute(0, 3, 1, 2), int(ti * 1000),
                      torch.from_numpy(ehs[i : i + 1])).sample.permute(0, 2, 3, 1).numpy()[0]
        want = perflow_reference_velocity(prediction, eps.astype(np.float64), x[i].astype(np.float64), float(ti))
        np.testing.assert_allclose(ours[i], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_euler_to_window_end_lands_on_x_end(tmp_path):
    """A step from t to the window's end reaches the predicted window end exactly."""
    ref = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 4, std=0.1).eval()
    ref.save_pretrained(tmp_path / "unet")
    adapter = PeRFlowAdapter("diff_eps", 4)
    model = sf.load(tmp_path / "unet").with_adapter(adapter)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    cond = {"encoder_hidden_states": rng.standard_normal((2, 5, 768), dtype=np.float32)}
    grid = sf.schedules.perflow(4)  # one step per window
    out = np.asarray(sf.sample(model, x, grid[:2], cond))
    lam, eta, _ = adapter.coefficients(jnp.float32(1.0))
    eps = np.asarray(model.module(x, jnp.full((2,), 1000.0), cond["encoder_hidden_states"]))
    np.testing.assert_allclose(out, float(lam) * x + float(eta) * eps, rtol=1e-4, atol=1e-4)


def test_bad_adapter_settings():
    with pytest.raises(ValueError, match="unsupported: prediction_type='epsilon'"):
        PeRFlowAdapter("epsilon")
    with pytest.raises(ValueError, match="num_windows"):
        PeRFlowAdapter("diff_eps", 0)


def test_unet_without_adapter_is_not_a_velocity_field(tmp_path):
    diffusers.UNet2DConditionModel(**UNETS["sd15"]).save_pretrained(tmp_path / "unet")
    model = sf.load(tmp_path / "unet")
    x = np.zeros((1, 8, 8, 4), np.float32)
    with pytest.raises(ValueError, match="with_adapter"):
        model.velocity(x, np.ones(1, np.float32), {"encoder_hidden_states": np.zeros((1, 5, 768), np.float32)})
