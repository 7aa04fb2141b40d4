"""Time grids against diffusers' FlowMatchEulerDiscreteScheduler, as each pipeline drives it."""

from __future__ import annotations

import re

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
    """The grid FluxPipeline makes, with diffusers' own mu (calculate_shift), not ours."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline does
    np.testing.assert_allclose(sf.schedules.flux(steps, image_seq_len=seq_len), sched.sigmas.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seq_len", [1, 256, 1024, 4096, 9000])
@pytest.mark.parametrize("line", [(256, 4096, 0.5, 1.15), (64, 8192, 0.25, 2.0)])
def test_flux_mu_equals_diffusers_calculate_shift(seq_len, line):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert sf.schedules.flux_mu(seq_len, *line) == pytest.approx(calculate_shift(seq_len, *line), rel=1e-12)


def test_truncate_computes_in_python_floats_as_diffusers():
    """img2img's rule ``grid[int(S - min(S * strength, S)):]`` in Python floats: 5 steps at 0.6
    keep 3 (5 * float32(0.6) would be 3.0000001 and keep 4)."""
    grid = sf.schedules.flow_match(5)
    for steps, strength in ((5, 0.6), (5, 0.3), (28, 0.6), (10, 0.35), (7, 0.7)):
        grid = sf.schedules.flow_match(steps)
        start = int(max(steps - min(steps * strength, steps), 0))  # diffusers' get_timesteps
        np.testing.assert_array_equal(sf.schedules.truncate(grid, strength), grid[start:])
    assert sf.schedules.truncate(sf.schedules.flow_match(5), 0.6).shape == (4,)


def test_strengths_are_numbers_one_or_one_per_image():
    """``strength="0.5"`` and ``True`` were taken as numbers, and a per-image list of the wrong
    length failed in NumPy's broadcasting."""
    assert sf.schedules.strength_values(0.5, 3) == [0.5, 0.5, 0.5]
    assert sf.schedules.strength_values([0.5, 1], 2) == [0.5, 1.0]
    # bfloat16 numbers are numbers (numpy calls ml_dtypes' floats kind 'V': they were refused)
    import jax.numpy as jnp
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    assert sf.schedules.strength_values(bf16(0.5), 2) == [0.5, 0.5]
    assert sf.schedules.strength_values(np.array([0.5, 0.75], bf16), 2) == [0.5, 0.75]
    assert sf.schedules.strength_values(jnp.bfloat16(0.5), 1) == [0.5]
    np.testing.assert_array_equal(sf.schedules.flow_match(4, shift=bf16(3.0)), sf.schedules.flow_match(4, shift=3.0))
    with pytest.raises(ValueError, match="shift must be a positive number, got True"):
        sf.schedules.flow_match(4, shift=True)
    for bad, message in [("0.5", "strength must be a number in (0, 1], got '0.5'"),
                         (True, "strength must be a number in (0, 1], got True"),
                         (None, "strength must be a number in (0, 1], got None"),
                         ([0.5, 0.6, 0.7], "strength has shape (3,); expected one number or one per image (2)"),
                         ([[0.5, 0.6]], "strength has shape (1, 2)"),
                         (float("nan"), "strength must be in (0, 1], got nan"),
                         ([0.5, 0.0], "strength must be in (0, 1], got 0.0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sf.schedules.strength_values(bad, 2)
    with pytest.raises(ValueError, match=re.escape("strength must be one number in (0, 1] here, got shape (1,)")):
        sf.schedules.truncate(sf.schedules.flow_match(4), [0.5])


def test_stack_pads_with_zero_length_steps():
    a, b = sf.schedules.flow_match(2), sf.schedules.flow_match(4, shift=1.0)
    grid = sf.schedules.stack([a, b])
    assert grid.shape == (5, 2)
    np.testing.assert_array_equal(grid[:3, 0], a)
    np.testing.assert_array_equal(grid[3:, 0], [0.0, 0.0])
    np.testing.assert_array_equal(grid[:, 1], b)


@pytest.mark.parametrize("bad", [0.0, -1, float("nan"), "3", True, None])
def test_bad_shifts_and_an_empty_stack(bad):
    """A shift of 0 made a NaN grid, a negative one a grid running the wrong way, a string a
    ufunc error; ``stack([])`` failed in ``max``."""
    with pytest.raises(ValueError, match=r"shift must be a positive number, got"):
        sf.schedules.flow_match(4, shift=bad)
    with pytest.raises(ValueError, match="stack needs at least one grid"):
        sf.schedules.stack([])


def test_shifts_and_windows_outside_what_schedulers_use_are_named():
    """Found by a user's pass: NaN, inf or out-of-range grids came back, or raw Python errors
    (OverflowError, ZeroDivisionError, UFuncTypeError); an unknown time_shift was taken for linear."""
    S = sf.schedules
    for call, message in [
            (lambda: S.flux(4, shift=0), "shift must be a positive number, got 0"),
            (lambda: S.flux(4, shift="2"), "shift must be a positive number, got '2'"),
            (lambda: S.flow_match(4, mu=float("nan")), "mu must be a finite number, got nan"),
            (lambda: S.flow_match(4, mu=1000), "mu=1000: e^mu overflows"),
            (lambda: S.flow_match(4, mu=-1000), "mu=-1000 (exponential) gives no grid from 1 down to 0"),
            (lambda: S.flow_match(4, mu=1.0, time_shift="cubic"), "time_shift must be one of exponential, linear"),
            (lambda: S.flow_match(4, mu=-1, time_shift="linear"), "mu=-1 (linear) gives no grid from 1 down to 0"),
            (lambda: S.flux(4, -10**6), "image_seq_len=-1000000"),
            (lambda: S.flux(4, base_seq_len=256, max_seq_len=256), "mu's line needs two points"),
            (lambda: S.perflow(4, 4.0), "num_windows must be an integer in [1, 1000], got 4.0"),
            (lambda: S.perflow(4, 2000), "num_windows must be an integer in [1, 1000], got 2000"),
            (lambda: S.truncate(np.linspace(0, 1, 5), 0.5), "truncate takes one [S+1] grid running down"),
            (lambda: S.stack([np.array([1, np.nan, 0])]), "grid 0 must be finite times running down")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert S.flow_match(4, mu=1.0, time_shift="linear")[0] == 1  # what schedulers use still works


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True, "4"])
def test_bad_step_counts(bad):
    for grid in (sf.schedules.flow_match, sf.schedules.flux, sf.schedules.perflow):
        with pytest.raises(ValueError, match="steps must be"):
            grid(bad)


# ---------------------------------------------------------------------------------------------
# The scheduler record: diffusers' own configs, saved by diffusers, parsed strictly
# ---------------------------------------------------------------------------------------------


def _saved(tmp_path, scheduler):
    scheduler.save_config(tmp_path / "scheduler")
    return sf.schedules.read_scheduler(tmp_path)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_config_gives_the_sd3_pipeline_grid(tmp_path, shift):
    record = _saved(tmp_path, FlowMatchEulerDiscreteScheduler(shift=shift))
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(28)
    np.testing.assert_array_equal(record.flow_match_grid(28), reference.sigmas.numpy())


@pytest.mark.parametrize("time_shift", ["exponential", "linear"])
def test_dynamic_shifting_as_the_sd3_pipeline_drives_it(tmp_path, time_shift):
    """``use_dynamic_shifting`` in an SD3-style config: the SD3 pipeline passes mu from the
    image token count (diffusers' calculate_shift) to ``set_timesteps(steps, mu=...)``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096, time_shift_type=time_shift)
    record = _saved(tmp_path, FlowMatchEulerDiscreteScheduler(**cfg))
    reference = FlowMatchEulerDiscreteScheduler(**cfg)
    reference.set_timesteps(12, mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    np.testing.assert_allclose(record.flow_match_grid(12, image_seq_len=1024), reference.sigmas.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="image_seq_len"):
        record.flow_match_grid(12)


def test_flux_schnell_config_static_shift(tmp_path):
    """schnell ships use_dynamic_shifting=False: the Flux pipeline's sigmas under the static shift."""
    record = _saved(tmp_path, FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=False))
    reference = FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=False)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.7)
    np.testing.assert_allclose(record.flux_grid(4, image_seq_len=4096), reference.sigmas.numpy(), rtol=1e-6)


def test_base_scheduler_needs_an_override_and_gives_only_its_betas(tmp_path):
    """PeRFlow's hub layout: SD1.5's PNDMScheduler. Without an override it is refused with the line
    to give; with one only its betas are kept (linear betas here, to tell them from SD's)."""
    from diffusers import PNDMScheduler

    PNDMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear").save_config(tmp_path / "scheduler")
    with pytest.raises(sf.ConfigError, match="prediction_type='diff_eps'"):
        sf.schedules.read_scheduler(tmp_path)
    record = sf.schedules.read_scheduler(tmp_path, prediction_type="ddim_eps", num_time_windows=5)
    assert (record.prediction_type, record.num_time_windows) == ("ddim_eps", 5)
    assert (record.beta_start, record.beta_end, record.beta_schedule) == (0.0001, 0.02, "linear")
    np.testing.assert_array_equal(record.perflow_grid(5), sf.schedules.perflow(5, 5))
    np.testing.assert_allclose(sf.schedules.alphas_cumprod(0.0001, 0.02, "linear"),
                               PNDMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
                               .alphas_cumprod.numpy(), rtol=1e-6)


def test_scheduler_config_is_read_strictly(tmp_path):
    def parse(raw, **kw):
        return sf.schedules.parse_scheduler(raw, source="cfg.json", **kw)

    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    assert parse(flow).shift == 3.0
    with pytest.raises(sf.ConfigError, match="cfg.json: unknown field 'shifty'"):
        parse({**flow, "shifty": 1})
    with pytest.raises(sf.ConfigError, match="use_karras_sigmas=True"):
        parse({**flow, "use_karras_sigmas": True})
    with pytest.raises(sf.ConfigError, match="shift='3'"):
        parse({**flow, "shift": "3"})
    with pytest.raises(sf.ConfigError, match="shift must be > 0"):
        parse({**flow, "shift": 0})
    with pytest.raises(sf.ConfigError, match="apply to PeRFlow"):
        parse(flow, prediction_type="diff_eps")
    with pytest.raises(sf.ConfigError, match="unsupported scheduler class 'LMSSomething'"):
        parse({"_class_name": "LMSSomething"})
    perflow = {"_class_name": "PeRFlowScheduler", "prediction_type": "diff_eps", "num_time_windows": 4}
    assert parse(perflow).perflow
    with pytest.raises(sf.ConfigError, match=r"num_time_windows \(--windows\) must be an integer >= 1, got 0"):
        parse(perflow, num_time_windows=0)
    with pytest.raises(sf.ConfigError, match="num_time_windows must be an integer >= 1, got 0"):
        parse({**perflow, "num_time_windows": 0})
    with pytest.raises(sf.ConfigError, match="t_noise=0.9"):
        parse({**perflow, "t_noise": 0.9})
    with pytest.raises(sf.ConfigError, match="beta_schedule='cosine'"):
        parse({**perflow, "beta_schedule": "cosine"})
    with pytest.raises(sf.ConfigError, match="missing"):
        sf.schedules.read_scheduler(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(sf.ConfigError, match="not valid JSON"):
        sf.schedules.read_scheduler(tmp_path)
