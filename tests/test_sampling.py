"""The scan sampler: heterogeneous per-element grids, use under a caller's jit, input checks."""

from __future__ import annotations

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
    out = sf.sample(model, x, np.array([0.5, 0.5, 0.5], np.float32), cond)
    np.testing.assert_array_equal(np.asarray(out), x)


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
    with pytest.raises(ValueError, match="unknown backend"):
        sf.sample(model, x, grid, cond, backend="cuda")
    with pytest.raises(ValueError, match="larger than the position table"):
        model.velocity(np.zeros((1, 26, 8, 4), np.float32), np.ones(1, np.float32), _one(cond, 0))


def test_cli_lists_the_backends_dispatch_knows():
    from streamflow_jax import backends, cli

    assert cli.BACKENDS == backends.BACKENDS
