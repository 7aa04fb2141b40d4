"""Repeated blocks as one ``lax.scan`` (``FlowModel.with_scanned_blocks``, ``$STREAMFLOW_JAX_SCAN_BLOCKS``):
SD3.5, Flux and an SDXL UNet against diffusers and T5's encoder against transformers with their
blocks scanned; what stays unrolled;
saving, quantizing, sharding and exporting see the checkpoint's blocks; the stream engine."""

from __future__ import annotations

import diffusers
import jax
import numpy as np
import pytest
from conftest import SDXL_UNETS, VARIANTS, make_sd3, randomize, sd3_inputs, sdxl_added_inputs, torch_velocity
from flax import nnx

import streamflow_jax as sf
from streamflow_jax import ops
from streamflow_jax.models.layers import ScannedBlocks
from streamflow_jax.models.unet import Transformer2DModel


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _runs(blocks) -> list:
    """A block list as ``[n, 1, ...]``: ``n`` for a scanned run of n blocks, 1 for a block alone."""
    return [b.length if isinstance(b, ScannedBlocks) else 1 for b in blocks]


def _leaves_equal(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dots(model, x, t, cond) -> int:
    return str(jax.make_jaxpr(lambda m: m.velocity(x, t, cond))(model)).count("dot_general")


def test_switch_values(monkeypatch):
    monkeypatch.delenv(ops.SCAN_BLOCKS_ENV, raising=False)
    assert ops.scan_blocks_choice() is None
    assert ops.scan_blocks_choice("on") is True and ops.scan_blocks_choice(" OFF ") is False
    monkeypatch.setenv(ops.SCAN_BLOCKS_ENV, "yes")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_SCAN_BLOCKS='yes': expected auto, on or off"):
        ops.scan_blocks_choice()


def test_sd35_scanned_matches_diffusers_and_saves_unrolled(tmp_path, monkeypatch):
    """SD3.5-medium's layout (dual-attention blocks first, the last block text-pre-only): two
    runs scanned, the last block alone; diffusers' velocity; one block body in the program;
    ``sf.save`` writes the checkpoint's names, and loads back unrolled. Measured: 1.2e-5 from
    diffusers, as the unrolled model; 58 products in the program against 118."""
    cfg = dict(VARIANTS["sd35_medium"], num_layers=6, dual_attention_layers=(0, 1, 2))
    ref = make_sd3(tmp_path / "src", "sd35_medium", seed=3, num_layers=6, dual_attention_layers=(0, 1, 2))
    monkeypatch.delenv(ops.SCAN_BLOCKS_ENV, raising=False)
    plain = sf.load(tmp_path / "src")
    assert not plain.scanned and plain.with_scanned_blocks(False) is plain
    monkeypatch.setenv(ops.SCAN_BLOCKS_ENV, "on")
    model = sf.load(tmp_path / "src")
    assert model.scanned and model.with_scanned_blocks() is model
    assert _runs(model.module.transformer_blocks) == [3, 2, 1]  # dual x3, plain x2, the last
    x, t, cond = sd3_inputs(cfg, 3, 8, 6)
    want = torch_velocity(ref, x, t, cond)
    got = np.asarray(model.velocity(x, t, cond))
    assert _rel(got, want) <= 1e-4
    np.testing.assert_allclose(got, np.asarray(plain.velocity(x, t, cond)), rtol=1e-5, atol=1e-5)
    # the program holds each run's block once
    assert _dots(model, x, t, cond) < _dots(plain, x, t, cond)
    # saved as the checkpoint names its blocks, and loaded back as it was converted
    monkeypatch.delenv(ops.SCAN_BLOCKS_ENV)
    sf.save(model, tmp_path / "saved")
    again = sf.load(tmp_path / "saved")
    assert not again.scanned
    _leaves_equal(again, plain)
    _leaves_equal(model.with_scanned_blocks(False), plain)
    assert model.fingerprint() == plain.fingerprint()  # the export caches' key: the same graph


def test_flux_scanned_matches_diffusers(tmp_path):
    """Both kinds of block scanned, each one run (measured 9.2e-6 from diffusers, as unrolled)."""
    from test_flux import FLUX_TINY, flux_inputs, reference_velocity

    cfg = dict(FLUX_TINY, num_layers=3, num_single_layers=4)
    ref = randomize(diffusers.FluxTransformer2DModel(**cfg, guidance_embeds=True), 2, std=0.2).eval()
    ref.save_pretrained(tmp_path / "flux")
    model = sf.load(tmp_path / "flux").with_scanned_blocks()
    module = model.module
    assert _runs(module.transformer_blocks) == [3] and _runs(module.single_transformer_blocks) == [4]
    x, t, cond = flux_inputs(2, 8, 6)
    assert _rel(model.velocity(x, t, cond), reference_velocity(ref, x, t, cond)) <= 1e-4


def test_sdxl_unet_scanned_matches_diffusers(tmp_path):
    """SDXL's transformers of depth 2 scan their two blocks (measured 7.7e-7 from diffusers, as
    unrolled)."""
    from test_unet import sdxl_eps, torch_sdxl_eps

    ref = randomize(diffusers.UNet2DConditionModel(**SDXL_UNETS["sdxl"]), 4, std=0.1).eval()
    ref.save_pretrained(tmp_path / "src")
    model = sf.load(tmp_path / "src").with_scanned_blocks()
    runs = [_runs(n.transformer_blocks) for _, n in nnx.iter_graph(model.module) if isinstance(n, Transformer2DModel)]
    assert runs and all(r == [2] for r in runs)  # every transformer of the tiny SDXL has depth 2
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 12, 4), dtype=np.float32)
    t = np.array([999, 10], np.float32)
    ehs = rng.standard_normal((2, 5, 80), dtype=np.float32)
    text_embeds, time_ids = sdxl_added_inputs(2)
    want = torch_sdxl_eps(ref, x, t, ehs, text_embeds, time_ids)
    assert _rel(sdxl_eps(model, x, t, ehs, text_embeds, time_ids), want) <= 1e-5


def test_t5_scanned_matches_transformers(tmp_path):
    """T5's encoder (SD3's and Flux's text encoder, 24 blocks in T5-XXL): the blocks after the
    first (which holds the relative-position table) scanned."""
    from test_t5 import T5_A, encode, make_t5, padded_ids, reference

    ref = make_t5(tmp_path / "t5", dict(T5_A, num_layers=4))
    model = sf.load(tmp_path / "t5").with_scanned_blocks()
    assert _runs(model.module.encoder.block) == [1, 3]
    ids = padded_ids(24)
    assert _rel(encode(model, ids), reference(ref, ids).last_hidden_state) <= 1e-5


def test_transforms_see_the_blocks_unrolled(tmp_path):
    """Quantizing, calibrating and sharding a scanned model equal doing it unrolled then
    scanning; the ONNX export of a scanned model is the unrolled model's graph."""
    from streamflow_jax.export import export_spec
    from streamflow_jax.export.onnx import trace_onnx

    cfg = dict(VARIANTS["sd3"], num_layers=4)
    make_sd3(tmp_path / "src", "sd3", seed=5, num_layers=4)
    plain = sf.load(tmp_path / "src")
    scanned = plain.with_scanned_blocks()
    assert _runs(scanned.module.transformer_blocks) == [3, 1]

    q_scanned = sf.quantize(scanned, "fp8")
    assert q_scanned.scanned
    _leaves_equal(q_scanned.with_scanned_blocks(False), sf.quantize(plain, "fp8"))
    x, t, cond = sd3_inputs(cfg, 2, 8, 8)
    np.testing.assert_allclose(np.asarray(q_scanned.velocity(x, t, cond)),
                               np.asarray(sf.quantize(plain, "fp8").velocity(x, t, cond)), rtol=1e-5, atol=1e-5)

    seen = []
    calibrated = sf.calibrate(q_scanned, lambda m: (seen.append(m.scanned), m.velocity(x, t, cond)))
    assert seen == [False] and calibrated.scanned  # ``run`` sees each layer under its own name
    _leaves_equal(calibrated.with_scanned_blocks(False),
                  sf.calibrate(sf.quantize(plain, "fp8"), lambda m: m.velocity(x, t, cond)))

    mesh = sf.make_mesh(1)
    sharded = sf.shard(scanned, mesh, "fsdp")
    assert sharded.scanned
    np.testing.assert_allclose(np.asarray(sharded.velocity(x, t, cond)), np.asarray(plain.velocity(x, t, cond)),
                               rtol=1e-5, atol=1e-5)

    spec = export_spec(plain, batch="1:2:4", latent=8, text_len=7)
    a, b = trace_onnx(plain, spec), trace_onnx(scanned, spec)
    assert sorted(i.name for i in a.graph.initializer) == sorted(i.name for i in b.graph.initializer)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


def test_stream_engine_scans_on_the_switch(tmp_path, monkeypatch):
    """``$STREAMFLOW_JAX_SCAN_BLOCKS=on``: the engine runs a scanned copy and finishes each request
    as ``sf.sample`` does with the unrolled model."""
    cfg = VARIANTS["sd3"]
    make_sd3(tmp_path / "src", "sd3", seed=6, num_layers=3)
    model = sf.load(tmp_path / "src")
    _, _, cond = sd3_inputs(cfg, 2, 8, 8)
    grid = np.linspace(1.0, 0.0, 4).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    monkeypatch.setenv(ops.SCAN_BLOCKS_ENV, "on")
    engine = sf.StreamEngine(model, (8, 8, 4), model.cond_shapes(7), slots_per_stream=2)
    assert engine._velocity_model.scanned and not model.scanned
    ids = [engine.submit({k: v[i] for k, v in cond.items()}, grid=grid, noise=noise[i]) for i in range(2)]
    engine.run()
    want = np.asarray(sf.sample(model, noise, grid, cond))
    for i, rid in enumerate(ids):
        np.testing.assert_allclose(engine.result(rid), want[i], rtol=1e-4, atol=1e-4)
