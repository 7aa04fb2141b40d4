"""PeRFlow: windows, timesteps, and the vectorized UNet-to-velocity adapter against the
reference note's formulas evaluated element by element (with diffusers' UNet for the network)."""

from __future__ import annotations

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import UNETS, perflow_reference_velocity, perflow_window_end, randomize

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


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """One random SD1.5-style UNet (one resnet per level: it compiles faster), saved once (each
    adapter compiles anew); ``conv_out`` x10 so that its eps is the size of x, and a wrong eps
    term shows."""
    root = tmp_path_factory.mktemp("unet")
    unet = randomize(diffusers.UNet2DConditionModel(**dict(UNETS["sd15"], layers_per_block=1)), 3, std=0.1)
    with torch.no_grad():
        unet.conv_out.weight.mul_(10)
        unet.conv_out.bias.mul_(10)
    unet.save_pretrained(root / "unet")
    return root / "unet"


@pytest.fixture(scope="module")
def torch_unet(unet_dir):
    return diffusers.UNet2DConditionModel.from_pretrained(unet_dir).eval()


def torch_eps(unet, x, timestep, ehs):
    """diffusers' UNet on NHWC numpy, one integer timestep per element."""
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.as_tensor(timestep),
                   torch.from_numpy(ehs)).sample
    return out.permute(0, 2, 3, 1).numpy().astype(np.float64)


# "velocity" (the UNet's output as is) runs end to end in test_sd15_pipeline's parity cases
@pytest.mark.parametrize("prediction", ["diff_eps", "ddim_eps"])
def test_vectorized_velocity_equals_per_element_reference(unet_dir, torch_unet, prediction):
    """Measured: max |ours - want| <= 1.1e-6 of max |want|."""
    model = sf.load(unet_dir).with_adapter(PeRFlowAdapter(prediction, 4))
    rng = np.random.default_rng(0)
    t = np.array([1.0, 0.8, 0.7501, 0.5, 0.3, 0.05], np.float32)  # elements in every window
    x = rng.standard_normal((len(t), 8, 8, 4), dtype=np.float32)
    ehs = rng.standard_normal((len(t), 5, 768), dtype=np.float32)
    ours = np.asarray(model.velocity(x, t, {"encoder_hidden_states": ehs}))
    # the UNet sees the integer timestep int(t*1000); one batched torch call, then the note's
    # formulas element by element
    eps = torch_eps(torch_unet, x, [int(ti * 1000) for ti in t], ehs)
    for i, ti in enumerate(t):
        want = perflow_reference_velocity(prediction, eps[i], x[i].astype(np.float64), float(ti))
        np.testing.assert_allclose(ours[i], want, rtol=0, atol=1.5e-5 * np.abs(want).max())


# PeRFlow's scheduler (magic-research/piecewise-rectified-flow, src/scheduler_perflow.py) written
# out: the window of t, the window's alphas, and lambda_t, eta_t of x_end = lambda_t*x + eta_t*eps


def window_end_coefficients(prediction, t, k=4):
    starts = [i / k for i in range(k, 0, -1)]
    ends = starts[1:] + [0.0]
    w = 0
    while t - 1e-4 <= ends[w]:
        w += 1
    t_s, t_e = starts[w], ends[w]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0).double().numpy()
    return (*perflow_window_end(prediction, t, t_s, t_e, ac), t_e)


@pytest.mark.parametrize("prediction", ["diff_eps", "ddim_eps"])
def test_euler_to_window_end_lands_on_x_end(unet_dir, torch_unet, prediction):
    """One ``sf.sample`` step from t to its window's end (from a window's start and from inside
    one) reaches the window end PeRFlow predicts from diffusers' eps: lambda_t*x + eta_t*eps.
    Measured rel. error <= 4.0e-7; the other prediction type's formulas are off by >= 1.5e-1,
    the eps of timestep+1 by >= 9e-3 (eta_t*eps is half of the result)."""
    model = sf.load(unet_dir).with_adapter(PeRFlowAdapter(prediction, 4))
    rng = np.random.default_rng(1)
    t = np.array([1.0, 0.875, 0.5, 0.3], np.float32)  # two window starts, two inside a window
    x = rng.standard_normal((len(t), 8, 8, 4), dtype=np.float32)
    ehs = rng.standard_normal((len(t), 5, 768), dtype=np.float32)
    coef = [window_end_coefficients(prediction, float(ti)) for ti in t]
    grid = np.stack([t, np.array([c[2] for c in coef], np.float32)])  # [2, B]: each to its window end
    ours = np.asarray(sf.sample(model, x, grid, {"encoder_hidden_states": ehs}), np.float64)
    eps = torch_eps(torch_unet, x, [int(ti * 1000) for ti in t], ehs)
    want = np.stack([lam * x[i] + eta * eps[i] for i, (lam, eta, _) in enumerate(coef)])
    assert np.max(np.abs(ours - want)) <= 5e-6 * np.max(np.abs(want))


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


def test_save_keeps_the_adapter(unet_dir, tmp_path):
    """``sf.save`` of a PeRFlow UNet writes its adapter (prediction type, windows, training
    schedule) and ``sf.load`` puts it back: the same velocity, no flags; flags given to ``load``
    override the saved ones; a broken record is an error naming the file."""
    import json

    model = sf.load(unet_dir, prediction_type="ddim_eps", num_time_windows=2)
    sf.save(model, tmp_path / "saved")
    loaded = sf.load(tmp_path / "saved")
    assert loaded.adapter == model.adapter == PeRFlowAdapter("ddim_eps", 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([0.9, 0.3], np.float32)
    cond = {"encoder_hidden_states": rng.standard_normal((2, 5, 768)).astype(np.float32)}
    np.testing.assert_array_equal(np.asarray(loaded.velocity(x, t, cond)), np.asarray(model.velocity(x, t, cond)))
    assert sf.load(tmp_path / "saved", prediction_type="diff_eps").adapter == PeRFlowAdapter("diff_eps", 2)

    class Custom:  # an adapter of the caller's own: not written, said
        def velocity(self, module, x, t, cond):
            return x

    with pytest.warns(UserWarning, match="Custom is not saved"):
        sf.save(model.with_adapter(Custom()), tmp_path / "custom")
    assert sf.load(tmp_path / "custom").adapter is None
    cfg = tmp_path / "saved" / "config.json"
    raw = json.loads(cfg.read_text())
    raw["streamflow_jax"]["adapter"]["prediction_type"] = "epsilon"
    cfg.write_text(json.dumps(raw))
    with pytest.raises(sf.ConfigError, match=r"config\.json: streamflow_jax\.adapter: unsupported: prediction_type"):
        sf.load(tmp_path / "saved")
