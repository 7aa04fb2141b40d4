"""Time grids against diffusers' FlowMatchEulerDiscreteScheduler, as each pipeline drives it."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

import streamflow_jax as sf


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_match_equals_sd3_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = sf.schedules.flow_match(steps, shift=shift)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_array_equal(ours, sched.sigmas.numpy())
    assert ours[0] == 1.0 and ours[-1] == 0.0


@pytest.mark.parametrize("steps,seq_len", [(4, 256), (28, 4096), (20, 1024), (50, 64 * 64 // 4)])
def test_flux_equals_flux_pipeline_scheduler(steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    mu = sf.schedules.flux_mu(seq_len)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline does
    np.testing.assert_allclose(sf.schedules.flux(steps, image_seq_len=seq_len), sched.sigmas.numpy(), rtol=1e-6, atol=0)


def test_stack_pads_with_zero_length_steps():
    a, b = sf.schedules.flow_match(2), sf.schedules.flow_match(4, shift=1.0)
    grid = sf.schedules.stack([a, b])
    assert grid.shape == (5, 2)
    np.testing.assert_array_equal(grid[:3, 0], a)
    np.testing.assert_array_equal(grid[3:, 0], [0.0, 0.0])
    np.testing.assert_array_equal(grid[:, 1], b)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="num_steps"):
        sf.schedules.flow_match(bad)
    with pytest.raises(ValueError, match="num_steps"):
        sf.schedules.flux(bad)
