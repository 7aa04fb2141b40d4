"""The scan sampler: heterogeneous per-element grids, use under a caller's jit, input checks."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, sd3_inputs

import streamflow_jax as sf

CFG = VARIANTS["sd3"]


@pytest.fixture
def model(tiny_sd3):
    return sf.load(tiny_sd3[0])


def _one(tree, i):
    return {k: v[i : i + 1] for k, v in tree.items()}


def test_heterogeneous_grids_equal_per_element_runs(model):
    """3 elements, 3 schedules (different step counts and shifts): each equals sampling it alone."""
    x, _, cond = sd3_inputs(CFG, batch=3, height=8, width=8, seed=7)
    grids = [sf.schedules.flow_match(3, shift=3.0), sf.schedules.flow_match(6, shift=1.0),
             sf.schedules.flow_match(5, shift=6.0)]
    batched = np.asarray(sf.sample(model, x, sf.schedules.stack(grids), cond))
    for i, grid in enumerate(grids):
        alone = np.asarray(sf.sample(model, x[i : i + 1], grid, _one(cond, i)))
        np.testing.assert_allclose(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)  # measured <= 1.9e-6
    # and the schedules really differ in effect
    same_grid = np.asarray(sf.sample(model, x, grids[1], cond))
    assert not np.allclose(batched[0], same_grid[0], atol=1e-3)


def test_heterogeneous_guidance_scales(model):
    """A [B] guidance scale: each element equals a run with its own scalar scale."""
    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=8)
    _, _, uncond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=9)
    grid = sf.schedules.flow_match(3)
    g = np.array([1.5, 7.0], np.float32)
    batched = np.asarray(sf.sample(model, x, grid, cond, guidance_scale=g, uncond=uncond))
    for i in range(2):
        alone = sf.sample(model, x[i : i + 1], grid, _one(cond, i), guidance_scale=float(g[i]), uncond=_one(uncond, i))
        # guidance 7 amplifies batch-size-dependent rounding about 8x, hence 1e-4 (measured <= 2.0e-5)
        np.testing.assert_allclose(batched[i : i + 1], alone, rtol=1e-4, atol=1e-4)


def test_sample_inside_caller_jit(model):
    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=10)
    grid = jnp.asarray(sf.schedules.flow_match(4))

    @jax.jit
    def run(m, noise, ts, c):
        return sf.sample(m, noise, ts, c) * 2.0

    np.testing.assert_allclose(run(model, x, grid, cond), 2.0 * np.asarray(sf.sample(model, x, grid, cond)),
                               rtol=1e-5, atol=1e-5)


def test_zero_length_steps_are_identity(model):
    x, _, cond = sd3_inputs(CFG, batch=1, height=8, width=8)
    out = sf.sample(model, x, np.array([1.0, 0.5, 0.5, 0.5], np.float32), cond)  # stack's padding
    np.testing.assert_array_equal(np.asarray(out), np.asarray(sf.sample(model, x, np.array([1.0, 0.5]), cond)))
    # a grid that never moves at all is refused (test_bad_inputs_name_the_problem): it is a mistake


def test_bad_inputs_name_the_problem(model):
    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8)
    grid = sf.schedules.flow_match(2)
    with pytest.raises(ValueError, match=r"NHWC"):
        sf.sample(model, x[0], grid, cond)
    with pytest.raises(ValueError, match=r"\[S\+1, B=2\]"):
        sf.sample(model, x, np.zeros((3, 5), np.float32), cond)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        sf.sample(model, x, grid, {**cond, "encoder_hidden_states": cond["encoder_hidden_states"][:1]})
    with pytest.raises(ValueError, match="needs uncond"):
        sf.sample(model, x, grid, cond, guidance_scale=3.0)
    with pytest.raises(ValueError, match="uncond is given without guidance_scale"):  # was dropped without a word
        sf.sample(model, x, grid, cond, uncond=cond)
    with pytest.raises(ValueError, match=r"guidance_scale has shape \(3,\); expected a scalar or one per element, "
                                         r"\[B=2\]"):
        sf.sample(model, x, grid, cond, guidance_scale=np.ones(3, np.float32), uncond=cond)
    with pytest.raises(ValueError, match=re.escape("cond lacks 'pooled_projections' (SD3Transformer2DModel takes "
                                                   "'encoder_hidden_states', 'pooled_projections')")):
        sf.sample(model, x, grid, {"encoder_hidden_states": cond["encoder_hidden_states"]})
    # found by a user's pass: each of these ran (a wrong answer) or failed inside JAX
    pooled = cond["pooled_projections"]
    bad = {
        "noise must be a real floating-point array": lambda: sf.sample(model, x.astype(np.int32), grid, cond),
        "noise has 2 channels": lambda: sf.sample(model, x[..., :2], grid, cond),
        "every axis needs at least one element": lambda: sf.sample(
            model, x[:0], grid, {k: v[:0] for k, v in cond.items()}),
        "cond['pooled_projections'] has shape (2, 5); SD3Transformer2DModel takes (2, ": lambda: sf.sample(
            model, x, grid, {**cond, "pooled_projections": pooled[:, :5]}),
        "cond['encoder_hidden_states'] has shape": lambda: sf.sample(
            model, x, grid, {**cond, "encoder_hidden_states": cond["encoder_hidden_states"][:, 0]}),
        "cond has 'bogus', not an input of this model": lambda: sf.sample(model, x, grid, {**cond, "bogus": np.zeros((2, 3))}),
        "time grid has 1001 steps; at most 1000": lambda: sf.sample(model, x, np.linspace(1, 0, 1002), cond),
        # the caller's shape, not the grid broadcast over the batch ((1, 2) before)
        "time grid must be [S+1] or [S+1, B=2] with S >= 1, got shape (1,)": lambda: sf.sample(
            model, x, np.array([1.0]), cond),
        "time grid must run down from at most 1 to at least 0": lambda: sf.sample(model, x, grid[::-1], cond),
        "must run down": lambda: sf.sample(model, x, np.array([5.0, 2.0, -3.0], np.float32), cond),
        "t has shape (3,); expected one time per element, [B=2]": lambda: model.velocity(
            x, np.ones(3, np.float32), cond),
        "x0 has shape": lambda: model.noise_to(x, x[:, :4], np.ones(2, np.float32)),
        "cond must be a dict of [B, ...] arrays, got NoneType": lambda: sf.sample(model, x, grid, None),
        "guidance_scale must be a number": lambda: sf.sample(model, x, grid, cond, guidance_scale="3", uncond=cond),
        "guidance_scale 1e+40 is beyond float32's range": lambda: sf.sample(
            model, x, grid, cond, guidance_scale=1e40, uncond=cond),
        # a second pass: these returned the noise unchanged, or raised from inside
        "time grid moves no time for element 0 (it stays at t=0.5)": lambda: sf.sample(
            model, x, np.array([0.5, 0.5], np.float32), cond),
        "time grid moves no time for element 0 (it stays at t=1)": lambda: sf.sample(  # [B, S+1] for [S+1, B]
            model, x, np.array([[1.0, 0.0], [1.0, 0.0]], np.float32), cond),
        "model must be a velocity model (sf.load(...)) or a runner, got NoneType": lambda: sf.sample(
            None, x, grid, cond),
        "model must be a velocity model (sf.load(...)) or a runner, got str": lambda: sf.sample(
            "converted/sd3", x, grid, cond),
        "ts: grids of different lengths; pad them into one [S+1, B] grid with schedules.stack": lambda: sf.sample(
            model, x, [sf.schedules.flow_match(2), sf.schedules.flow_match(3)], cond),
        "ts must be times (real numbers), got None": lambda: sf.sample(model, x, None, cond),
        "ts must be times (real numbers)": lambda: sf.sample(model, x, grid + 0j, cond),
    }
    for message, call in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    with pytest.raises(ValueError, match="unknown backend"):
        sf.sample(model, x, grid, cond, backend="cuda")
    with pytest.raises(ValueError, match="larger than the position table"):
        model.velocity(np.zeros((1, 26, 8, 4), np.float32), np.ones(1, np.float32), _one(cond, 0))


def test_cli_backend_choices_are_the_registry():
    from streamflow_jax import backends, cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("generate", "bench"):
        action = next(a for a in sub.choices[command]._actions if a.dest == "backend")
        assert list(action.choices) == list(backends.BACKENDS)
    export = next(a for a in sub.choices["export"]._actions if a.dest == "backend")
    assert list(export.choices) == [b for b, entry in backends.BACKENDS.items() if entry.exported]


def test_guided_velocity_is_the_written_formula(model):
    """``v_u + g (v_c - v_u)`` from two separate velocity calls, per element."""
    x, t, cond = sd3_inputs(CFG, batch=3, height=8, width=8, seed=3)
    _, _, uncond = sd3_inputs(CFG, batch=3, height=8, width=8, seed=4)
    g = np.array([0.5, 3.0, 7.5], np.float32)
    v_c = np.asarray(model.velocity(x, t, cond), np.float64)
    v_u = np.asarray(model.velocity(x, t, uncond), np.float64)
    want = v_u + g[:, None, None, None] * (v_c - v_u)
    got = np.asarray(sf.guided_velocity(model, x, t, cond, g, uncond))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # one doubled batch vs two calls
    np.testing.assert_array_equal(np.asarray(sf.guided_velocity(model, x, t, cond)), np.asarray(model.velocity(x, t, cond)))


def test_guidance_is_one_doubled_batch_per_step(model):
    """design.md: classifier-free guidance doubles the batch, never loops: the scan's step makes
    one velocity call of 2B rows (conditional and unconditional together), traced once for all
    steps; the result is the written formula's (test above) and diffusers' loop's
    (test_sd3_parity.test_cfg_matches_diffusers_formula)."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def velocity(self, x, t, cond):
            self.calls.append((x.shape[0], tuple(np.shape(t)), sorted(cond)))
            return self.inner.velocity(x, t, cond)

    x, _, cond = sd3_inputs(CFG, batch=3, height=8, width=8, seed=3)
    _, _, uncond = sd3_inputs(CFG, batch=3, height=8, width=8, seed=4)
    counting = Counting(model)
    got = sf.sample(counting, x, sf.schedules.flow_match(4), cond, guidance_scale=4.0, uncond=uncond)
    assert counting.calls == [(6, (6,), sorted(cond))]  # one call, the doubled batch, for all 4 steps
    want = sf.sample(model, x, sf.schedules.flow_match(4), cond, guidance_scale=4.0, uncond=uncond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_the_guidance_rule():
    """One rule: None is the default; CFG only above 1 (diffusers); an embedded scale is taken as
    given; a model with neither ignores it; non-finite scales are refused."""
    G = sf.Guidance
    assert G.resolve(None, mode="cfg", default=None) == G()
    assert G.resolve(None, mode="cfg", default=7.0) == G("cfg", 7.0)
    assert G.resolve(1.0, mode="cfg", default=7.0) == G()
    assert G.resolve(0, mode="cfg") == G() and G.resolve(-2.0, mode="cfg") == G()
    assert G.resolve(1.5, mode="cfg").cfg_scale == 1.5
    assert G.resolve(0.5, mode="embedded") == G("embedded", 0.5)
    assert G.resolve(None, mode="embedded", default=3.5).scale == 3.5
    assert G.resolve(9.0, mode="none") == G()
    per_element = G.resolve([1.0, 4.0], mode="cfg")
    assert per_element.cfg and per_element.scale.tolist() == [1.0, 4.0]
    for bad in (float("nan"), float("inf"), [1.0, float("nan")], "3", True):
        with pytest.raises(ValueError, match="guidance_scale"):
            G.resolve(bad, mode="cfg")
    with pytest.raises(ValueError, match="takes the guidance scale as an input"):
        G.resolve(None, mode="embedded")


def test_the_seed_rule():
    from streamflow_jax.sampling import check_seed

    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1 and check_seed(np.int64(5)) == 5
    for bad in (-1, 2**32, 99999999999999999999, 1.0, True, "1"):
        with pytest.raises(ValueError, match="seed"):
            check_seed(bad)


def test_non_finite_inputs_are_refused(model):
    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8)
    grid = sf.schedules.flow_match(2)
    with pytest.raises(ValueError, match="noise has non-finite"):
        sf.sample(model, np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), grid, cond)
    bad = {**cond, "pooled_projections": np.full_like(cond["pooled_projections"], np.inf)}
    with pytest.raises(ValueError, match=r"cond\['pooled_projections'\] has non-finite"):
        sf.sample(model, x, grid, bad)
    with pytest.raises(ValueError, match="guidance_scale nan is not finite"):
        sf.sample(model, x, grid, cond, guidance_scale=np.nan, uncond=cond)
    with pytest.raises(ValueError, match="grid has non-finite"):
        sf.sample(model, x, np.array([1.0, np.nan, 0.0], np.float32), cond)


def test_long_grids_run_in_segments_with_the_scans_result(model):
    """Past 8 steps a concrete call runs in compiled segments (progress, Ctrl-C between two);
    every step is the scan's own: the result is the scan's, bit for bit."""
    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=5)
    _, _, uncond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=6)
    grid = sf.schedules.stack([sf.schedules.flow_match(13), sf.schedules.flow_match(9, shift=1.0)])
    segmented = np.asarray(sf.sample(model, x, grid, cond, guidance_scale=[2.0, 4.0], uncond=uncond, progress=True))
    g = jnp.asarray([2.0, 4.0])
    scanned = np.asarray(jax.jit(sf.sample)(model, x, grid, cond, g, uncond))  # traced: one scan
    np.testing.assert_array_equal(segmented, scanned)


def test_step_counts_share_one_program_per_bucket(model):
    """Concrete calls of 1..8 steps run one compiled program (the grid padded to 8 steps, the
    padding never read), each with the scan's result bit for bit; 9..16 steps the next one."""
    from streamflow_jax import ops, sampling

    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=7)
    jitted = ops.jitted(sampling.steps_between)  # what steps_between_jit calls (no compile options here)
    before = jitted._cache_size()
    for steps in (3, 5, 8):
        grid = sf.schedules.flow_match(steps)
        np.testing.assert_array_equal(np.asarray(sf.sample(model, x, grid, cond)),
                                      np.asarray(jax.jit(sf.sample)(model, x, grid, cond)))
    assert jitted._cache_size() - before <= 1  # 0 where an earlier test compiled it


def test_sample_in_a_jit_whose_closure_holds_the_conditioning(model):
    """Concrete arrays captured by the caller's jit are constants of its trace: no value check
    (and no TracerBoolConversionError), the same result as passing them as arguments."""
    x, _, cond = sd3_inputs(CFG, batch=2, height=8, width=8, seed=11)
    grid = sf.schedules.flow_match(3)
    closed = jax.jit(lambda m, n: sf.sample(m, n, grid, cond))(model, x)
    np.testing.assert_allclose(np.asarray(closed), np.asarray(sf.sample(model, x, grid, cond)), rtol=1e-5, atol=1e-5)
