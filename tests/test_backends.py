"""The on-demand export cache behind ``sf.sample(..., backend=...)``: ``runner_for``'s cache
directory, a cache entry made from another model, and graphs over protobuf's 2 GB (weights in
``model.onnx.data``)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import VARIANTS, make_sd3, sd3_inputs

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

import streamflow_jax as sf  # noqa: E402
from streamflow_jax import backends  # noqa: E402
from streamflow_jax.export import load_export  # noqa: E402

CFG = VARIANTS["sd3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny SD3 models of one config, different weights (loaded once: exports are per test)."""
    root = tmp_path_factory.mktemp("models")
    make_sd3(root / "a", seed=0)
    make_sd3(root / "b", seed=1)
    return sf.load(root / "a"), sf.load(root / "b")


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_cache_entry_made_from_another_model_is_rebuilt(models, isolated_cache):
    """A cache entry at this model's path whose export.json says another model made it (intact
    files, right hashes) is rebuilt, never used: the samples are this model's."""
    a, b = models
    x, _, cond = sd3_inputs(CFG, 2, 8, 8, seed=3)
    grid = sf.schedules.flow_match(2)
    from_a = np.asarray(sf.sample(a, x, grid, cond, backend="onnxruntime"))
    (entry_a,) = (isolated_cache / "exports").iterdir()
    # the entry b would use: its name carries b's fingerprint where a's is
    entry_b = entry_a.with_name(entry_a.name.replace(a.fingerprint()[:16], b.fingerprint()[:16]))
    assert entry_b != entry_a
    shutil.copytree(entry_a, entry_b)
    assert load_export(entry_b).meta["model_fingerprint"] == a.fingerprint()  # a valid export, of a
    backends.clear_runners()
    from_b = np.asarray(sf.sample(b, x, grid, cond, backend="onnxruntime"))
    assert load_export(entry_b).meta["model_fingerprint"] == b.fingerprint()  # rebuilt
    want = np.asarray(sf.sample(b, x, grid, cond))
    assert rel(from_b, want) <= 1e-5  # measured 1.05e-6
    assert rel(from_a, want) > 0.1  # using a's graph would have shown (measured 0.82)


def test_a_cached_export_covering_the_call_is_used_by_a_new_process(models, isolated_cache):
    """A call of another batch in a new process takes the cached export whose profile covers it
    (the cache was keyed on the exact shapes, so each new batch or size re-exported the whole
    model); an entry made by other versions (the library, JAX, jax2onnx) is not used."""
    a, _ = models
    grid = sf.schedules.flow_match(2)
    x, _, cond = sd3_inputs(CFG, 2, 8, 8, seed=3)
    sf.sample(a, x, grid, cond, backend="onnxruntime")
    exports = isolated_cache / "exports"
    (entry,) = exports.iterdir()
    backends.clear_runners()  # as a new process
    x3, _, cond3 = sd3_inputs(CFG, 3, 8, 8, seed=4)
    got = sf.sample(a, x3, grid, cond3, backend="onnxruntime")
    assert [p.name for p in exports.iterdir()] == [entry.name]  # no second export
    assert rel(got, sf.sample(a, x3, grid, cond3)) <= 1e-5
    meta = json.loads((entry / "export.json").read_text())
    meta["versions"]["jax2onnx"] = "0.0.1"
    (entry / "export.json").write_text(json.dumps(meta))
    backends.clear_runners()
    sf.sample(a, x3, grid, cond3, backend="onnxruntime")
    assert len(list(exports.iterdir())) == 2  # made again by the versions installed here


def test_cache_dir_and_weights_outside_a_graph_over_the_protobuf_limit(models, tmp_path, monkeypatch,
                                                                       isolated_cache):
    """``runner_for(cache_dir=...)`` exports there (not under the default cache root) and a fresh
    process finds the export there again; over protobuf's 2 GB (the limit made small here) the
    weights go to ``model.onnx.data``: recorded and hashed in export.json, loaded and run by ONNX
    Runtime as the XLA model."""
    import onnx

    from streamflow_jax.export import onnx as export_onnx_module

    model, _ = models
    monkeypatch.setattr(export_onnx_module, "_PROTO_LIMIT", 1 << 10)
    x, t, cond = sd3_inputs(CFG, 3, 8, 8, seed=4)
    runner = backends.runner_for(model, "onnxruntime", batch=3, height=8, width=8, cond=cond,
                                 cache_dir=tmp_path / "mine")
    path = runner.exported.path
    assert [p.name for p in (tmp_path / "mine" / "exports").iterdir()] == [path.name]
    assert not (isolated_cache / "exports").exists()
    meta = json.loads((path / "export.json").read_text())
    assert meta["files"] == ["model.onnx", "model.onnx.data"]
    data, graph = (path / "model.onnx.data").stat().st_size, (path / "model.onnx").stat().st_size
    weights = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(model.state))
    assert data > 0.9 * weights and graph < data / 2  # the weights (all but the tiny ones) are outside
    assert not any(init.HasField("raw_data") and len(init.raw_data) > 1024
                   for init in onnx.load(path / "model.onnx", load_external_data=False).graph.initializer)
    assert rel(runner.velocity(x, t, cond), model.velocity(x, t, cond)) <= 5e-5  # measured 6.6e-6

    backends.clear_runners()  # as in a new process: the same entry, no new export
    again = backends.runner_for(model, "onnxruntime", batch=3, height=8, width=8, cond=cond,
                                cache_dir=tmp_path / "mine")
    assert again is not runner and again.exported.path == path
    assert [p.name for p in (tmp_path / "mine" / "exports").iterdir()] == [path.name]

    (path / "model.onnx.data").write_bytes(b"\0" * data)  # the data file is covered by the hashes
    with pytest.raises(sf.ExportError, match="corrupt or stale"):
        load_export(path)


def test_bf16_model_refused_by_onnxruntime_on_the_cpu_before_exporting(models, isolated_cache):
    """ONNX Runtime's CPU provider has no bfloat16 Conv: a bf16 model was exported (minutes for a
    real one), then failed to load with ONNX Runtime's NOT_IMPLEMENTED. Refused first now."""
    from streamflow_jax.backends.onnxruntime import default_providers

    if "CUDAExecutionProvider" in default_providers():
        pytest.skip("ONNX Runtime with CUDA here: its bf16 kernels decide")
    a, _ = models
    x, _, cond = sd3_inputs(CFG, 1, 8, 8, seed=3)
    with pytest.raises(ValueError, match="this model's weights are bfloat16, and ONNX Runtime's CPU provider has no "
                                         "bfloat16 kernels"):
        sf.sample(a.astype("bfloat16"), x, sf.schedules.flow_match(2), cond, backend="onnxruntime")
    assert not (isolated_cache / "exports").exists() or not any((isolated_cache / "exports").iterdir())


def test_an_export_too_small_for_guidance_says_why(models, tmp_path):
    """A runner opened from an export whose batch range takes the samples but not classifier-free
    guidance's doubled batch: the refusal says the doubling ("B=10 is outside [1, 8]" alone
    named a batch nobody asked for); a path that does not exist is named as such."""
    from streamflow_jax.export import export_onnx, export_spec

    a, _ = models
    x, _, cond = sd3_inputs(CFG, 5, 8, 8, seed=3)
    export_onnx(a, export_spec(a, batch="1:2:8", latent=8, text_len=cond["encoder_hidden_states"].shape[1]),
                tmp_path / "e", progress=False)
    runner = backends.open_export(tmp_path / "e", "onnxruntime")
    with pytest.raises(sf.ShapeError, match=r"B=10 .*\(classifier-free guidance runs the batch twice: 10 rows for 5 "
                                            r"samples\)"):
        sf.sample(runner, x, sf.schedules.flow_match(2), cond, guidance_scale=2.0, uncond=cond, backend="onnxruntime")
    with pytest.raises(sf.ExportError, match="nope: no such export directory"):
        backends.open_export(tmp_path / "nope", "onnxruntime")


def test_use_export_runs_that_export_and_only_it(models, tmp_path, isolated_cache):
    """``backends.use_export``: the export given runs the model's calls (nothing is exported on
    demand), a call outside its profile is refused naming it (not exported anew), and an export
    of other weights (another model, or this one loaded as float16) is refused with how the two
    loads differ; the other model still exports on demand. A conditioning entry the graph does
    not take is refused by the runner."""
    from streamflow_jax.export import export_onnx, export_spec

    a, b = models
    grid = sf.schedules.flow_match(2)
    x, _, cond = sd3_inputs(CFG, 2, 8, 8, seed=3)
    export_onnx(a, export_spec(a, batch="1:2:2", latent=8, text_len=cond["encoder_hidden_states"].shape[1]),
                tmp_path / "a-onnx", progress=False)
    with pytest.raises(ValueError, match="a-onnx: exported from other weights than this model's "
                                         r"\(float32 weights both: another checkpoint, LoRA or adapter\)"):
        backends.use_export(b, tmp_path / "a-onnx", "onnxruntime")
    with pytest.raises(ValueError, match=r"float32 weights there; float16 weights here"):
        backends.use_export(a.astype("float16"), tmp_path / "a-onnx", "onnxruntime")
    with pytest.raises(ValueError, match=r"float32 weights there; float32 weights, FP8 here"):
        backends.use_export(sf.quantize(a, "fp8"), tmp_path / "a-onnx", "onnxruntime")
    with pytest.raises(ValueError, match="backend 'xla' runs models directly"):
        backends.use_export(a, tmp_path / "a-onnx", "xla")
    runner = backends.use_export(a, tmp_path / "a-onnx", "onnxruntime")
    got = sf.sample(a, x, grid, cond, backend="onnxruntime")
    assert not (isolated_cache / "exports").exists()  # the given export ran: none made on demand
    assert runner.exported.path == (tmp_path / "a-onnx").absolute()
    assert rel(got, sf.sample(a, x, grid, cond)) <= 1e-5
    with pytest.raises(ValueError, match=r"cond has \['guidance'\], which the graph does not take"):
        runner.velocity(x, 0.5, {**cond, "guidance": np.ones(2, np.float32)})  # it was dropped silently
    x3, _, cond3 = sd3_inputs(CFG, 3, 8, 8, seed=4)
    with pytest.raises(sf.ShapeError, match=r"export .*a-onnx does not take this call: input 'x': B=3 is outside the "
                                            r"exported profile \[1, 2\].* \(its profile: B 1:2:2, H 8:8:8, W 8:8:8;"):
        sf.sample(a, x3, grid, cond3, backend="onnxruntime")
    assert not (isolated_cache / "exports").exists()
    assert rel(sf.sample(b, x, grid, cond, backend="onnxruntime"), sf.sample(b, x, grid, cond)) <= 1e-5
    assert len(list((isolated_cache / "exports").iterdir())) == 1  # b's, on demand
