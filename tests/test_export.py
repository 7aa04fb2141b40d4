"""Export path: XLA vs ONNX Runtime on one exported graph, sampling through each backend,
the graph TensorRT would parse, engine-cache keys, and bad input."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from conftest import VARIANTS, make_sd3, sd3_inputs, torch_velocity

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
import onnx  # noqa: E402

import streamflow_jax as sf  # noqa: E402
from streamflow_jax import backends  # noqa: E402
from streamflow_jax.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from streamflow_jax.backends.tensorrt import EngineCache, engine_key, engine_record  # noqa: E402
from streamflow_jax.cli import main as cli  # noqa: E402
from streamflow_jax.export import ExportError, Range, export_onnx, load_export, export_spec  # noqa: E402
from streamflow_jax.export.tensorrt_ops import tensorrt_problems  # noqa: E402


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


DIFFUSERS = {}  # variant -> the diffusers model each export was converted from (the reference)


@pytest.fixture(scope="module", params=["sd3", "sd35_medium"])
def exported(request, tmp_path_factory):
    """One model per variant, exported once with dynamic batch 1..8 and latent 4..12 (H, W apart)."""
    root = tmp_path_factory.mktemp(request.param)
    DIFFUSERS[request.param] = make_sd3(root / "src", request.param, seed=11)
    model = sf.load(root / "src")
    spec = export_spec(model, batch="1:3:8", latent="4:8:12", text_len=7)
    return request.param, model, export_onnx(model, spec, root / "onnx", progress=False)


@pytest.mark.parametrize("batch,height,width", [(1, 8, 8), (3, 8, 8), (8, 8, 8), (3, 12, 4), (2, 6, 10)])
def test_onnxruntime_velocity_matches_xla(exported, batch, height, width):
    variant, model, graph = exported
    runner = OnnxRuntimeRunner(graph)
    x, t, cond = sd3_inputs(VARIANTS[variant], batch, height, width, seed=batch)
    got = runner.velocity(x, t, cond)
    assert _rel(got, model.velocity(x, t, cond)) <= 1e-4
    # and against diffusers' own transformer, as SD3's pipeline calls it (measured <= 1.1e-5)
    assert _rel(got, torch_velocity(DIFFUSERS[variant], x, t, cond)) <= 1e-4


def test_graph_is_valid_and_tensorrt_parsable(exported):
    _, _, graph = exported
    proto = onnx.load(graph.onnx_path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 23
    assert [i.name for i in proto.graph.input] == ["x", "t", "encoder_hidden_states", "pooled_projections"]
    assert tensorrt_problems(proto) == []
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "B"  # dynamic, not baked in


@pytest.mark.parametrize("dtype,onnx_type", [("float16", onnx.TensorProto.FLOAT16),
                                              ("bfloat16", onnx.TensorProto.BFLOAT16)])
def test_half_precision_export_keeps_float32_io(tmp_path, dtype, onnx_type):
    make_sd3(tmp_path / "src", "sd35_medium", seed=12)
    model = sf.load(tmp_path / "src")
    spec = export_spec(model, batch="1:2:4", latent=8, text_len=7, dtype=dtype)
    graph = export_onnx(model, spec, tmp_path / "onnx", progress=False)
    proto = onnx.load(graph.onnx_path)
    assert tensorrt_problems(proto) == []
    io_types = {v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert io_types == {onnx.TensorProto.FLOAT}
    assert any(init.data_type == onnx_type for init in proto.graph.initializer)
    if dtype == "float16":  # ONNX Runtime's CPU provider has no bfloat16 Conv; TensorRT has
        x, t, cond = sd3_inputs(VARIANTS["sd35_medium"], 2, 8, 8)
        assert _rel(OnnxRuntimeRunner(graph).velocity(x, t, cond), model.velocity(x, t, cond)) <= 5e-3


def test_tensorrt_check_flags_unsupported_graphs():
    from onnx import TensorProto, helper

    node = helper.make_node("Unique", ["x"], ["y"], name="u")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    problems = tensorrt_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert any("Unique is not supported" in p for p in problems)
    node = helper.make_node("Sin", ["x"], ["y"], name="s")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3])])
    assert any("DOUBLE" in p for p in tensorrt_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])))


def test_sample_onnxruntime_equals_xla_heterogeneous_cfg(tiny_sd3):
    model = sf.load(tiny_sd3[0])
    x, _, cond = sd3_inputs(VARIANTS["sd3"], 3, 8, 8, seed=21)
    _, _, uncond = sd3_inputs(VARIANTS["sd3"], 3, 8, 8, seed=22)
    grid = sf.schedules.stack([sf.schedules.flow_match(3), sf.schedules.flow_match(5, shift=1.0),
                               sf.schedules.flow_match(4, shift=6.0)])
    g = np.array([1.0, 2.5, 6.0], np.float32)
    ref = sf.sample(model, x, grid, cond, guidance_scale=g, uncond=uncond)
    ours = sf.sample(model, x, grid, cond, guidance_scale=g, uncond=uncond, backend="onnxruntime")
    assert _rel(ours, ref) <= 6e-5  # measured 6.3e-6


def test_stale_cached_export_is_rebuilt(tiny_sd3, isolated_cache):
    model = sf.load(tiny_sd3[0])
    x, _, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8, seed=23)
    grid = sf.schedules.flow_match(2)
    first = np.asarray(sf.sample(model, x, grid, cond, backend="onnxruntime"))
    (cached,) = (isolated_cache / "exports").iterdir()
    (cached / "model.onnx").write_bytes(b"corrupted")
    backends.clear_runners()  # as in a new process
    again = np.asarray(sf.sample(model, x, grid, cond, backend="onnxruntime"))
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-6)
    assert load_export(cached).meta["model_fingerprint"] == model.fingerprint()  # rebuilt, verified


def test_bad_inputs_to_an_export(exported):
    variant, _, graph = exported
    runner = backends.open_export(graph.path, "onnxruntime")
    x, t, cond = sd3_inputs(VARIANTS[variant], 2, 8, 8)
    with pytest.raises(ValueError, match=r"input 'x': rank 3"):
        runner.velocity(x[0], t, cond)
    with pytest.raises(ValueError, match=r"input 'x': axis 3 is 5, the graph takes 4"):
        runner.velocity(np.zeros((2, 8, 8, 5), np.float32), t, cond)
    xb, tb, cb = sd3_inputs(VARIANTS[variant], 9, 8, 8)
    with pytest.raises(ValueError, match=r"B=9 is outside the exported profile \[1, 8\]"):
        runner.velocity(xb, tb, cb)
    with pytest.raises(ValueError, match=r"H=14 is outside"):
        runner.velocity(np.zeros((2, 14, 8, 4), np.float32), t, cond)
    with pytest.raises(ValueError, match=r"'encoder_hidden_states': axis 1 is 9, the graph takes 7"):
        runner.velocity(x, t, {**cond, "encoder_hidden_states": np.zeros((2, 9, 12), np.float32)})


def test_corrupt_or_missing_export_files(exported, tmp_path):
    _, _, graph = exported
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(graph.path, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ExportError, match="corrupt or stale"):
        load_export(copy)
    meta = json.loads((copy / "export.json").read_text())
    for edit in ({"sha256": None}, {"spec": {**meta["spec"], "dims": {"B": [4, 2, 1]}}}, {"files": 3}):
        broken = {k: v for k, v in {**meta, **edit}.items() if v is not None}
        (copy / "export.json").write_text(json.dumps(broken))
        with pytest.raises(ExportError, match=r"export.json: unreadable export metadata \(.*\); export again"):
            load_export(copy)  # KeyError 'sha256' and a bare ValueError before
    (copy / "model.onnx").write_bytes(data)
    for edit in ({"spec": {**meta["spec"], "dims": {**meta["spec"]["dims"], "B": [1, 1, 64]}}},
                 {"model_fingerprint": "0" * 64}, {"class_name": "FluxTransformer2DModel"}):
        (copy / "export.json").write_text(json.dumps({**meta, **edit}))  # readable, files intact: edited
        with pytest.raises(ExportError, match=r"export.json: edited since the export \(its spec, model or files"):
            load_export(copy)
    (copy / "export.json").write_text(json.dumps({**meta, "tensorrt": {"engine": "x"}}))  # added later: fine
    load_export(copy)
    (copy / "export.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "identity_sha256"}))
    load_export(copy)  # an export made before identity_sha256 existed still loads
    (copy / "export.json").write_text(json.dumps(meta))
    (copy / "model.onnx").unlink()
    with pytest.raises(ExportError, match="missing"):
        load_export(copy)
    with pytest.raises(ExportError, match="not a streamflow-jax export"):
        load_export(tmp_path)


def test_spec_ranges_and_profile(tiny_sd3):
    model = sf.load(tiny_sd3[0])
    spec = export_spec(model, batch="1:4:8", resolution="64:64:96", latent_scale=8, text_len=7)
    assert spec.dims == {"B": Range(1, 4, 8), "H": Range(8, 8, 12), "W": Range(8, 8, 12)}
    prof = spec.profile()
    assert prof["x"] == ((1, 8, 8, 4), (4, 8, 8, 4), (8, 12, 12, 4))
    assert prof["t"] == ((1,), (4,), (8,))
    assert prof["encoder_hidden_states"][2] == (8, 7, 12)
    assert type(spec).from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match=r"resolution 60 px is not a multiple of 16 \(sd3: 2 latent pixels of 8\)"):
        export_spec(model, resolution="60:64:96")
    with pytest.raises(ValueError, match="exceeds the largest the sd3 model takes"):
        export_spec(model, latent="8:8:26")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range.parse("8:4:2")
    with pytest.raises(ValueError, match="min:opt:max"):
        Range.parse("a:b")
    # found by a user's pass: batch 0 or "" took the default, True became 1:1:1; arguments the
    # graph has no input for were ignored; a spec of another configuration failed inside JAX
    assert Range.parse(np.int64(4)) == Range(4, 4, 4)  # numpy integers stay accepted
    assert Range.parse("1:8") == Range(1, 8, 8)  # MIN:MAX, OPT = MAX (README)
    for batch in (0, "", True, 2.5):
        with pytest.raises(ValueError, match="expected an integer or min:opt:max|need 1 <= min"):
            export_spec(model, batch=batch)
    make_sd3(tiny_sd3[0].parent / "wider", joint_attention_dim=16)
    other = sf.load(tiny_sd3[0].parent / "wider")  # same class, another text width
    with pytest.raises(ExportError, match=r"the spec does not fit this SD3Transformer2DModel .*encoder_hidden_states"):
        export_onnx(other, spec, tiny_sd3[0].parent / "never", progress=False)
    for opset in (22, 1000, "23", 23.5, True):
        with pytest.raises(ExportError, match="the export takes an integer from 23"):
            export_onnx(model, spec, tiny_sd3[0].parent / "never", opset=opset, progress=False)
    assert not (tiny_sd3[0].parent / "never").exists()


def test_engine_cache_keys_and_stale_entries(exported, tmp_path):
    _, _, graph = exported
    rec = engine_record(graph, tensorrt_version="10.15.1", gpu_name="NVIDIA H200", opt_level=3)
    others = [engine_record(graph, tensorrt_version="11.0.0", gpu_name="NVIDIA H200", opt_level=3),
              engine_record(graph, tensorrt_version="10.15.1", gpu_name="NVIDIA H100", opt_level=3),
              engine_record(graph, tensorrt_version="10.15.1", gpu_name="NVIDIA H200", opt_level=5)]
    assert len({engine_key(r) for r in [rec, *others]}) == 4
    assert rec["profile"]["x"] == [[1, 4, 4, 4], [3, 8, 8, 4], [8, 12, 12, 4]]
    cache = EngineCache(tmp_path)
    assert cache.lookup(rec) is None
    cache.store(rec, b"plan-bytes")
    assert cache.lookup(rec) == b"plan-bytes"
    plan_path, meta_path = cache.paths(engine_key(rec))
    plan_path.write_bytes(b"tampered")  # a damaged plan is dropped, so it gets rebuilt
    assert cache.lookup(rec) is None and not plan_path.exists() and not meta_path.exists()
    cache.store(rec, b"plan-bytes")
    meta = json.loads(meta_path.read_text())
    meta["record"]["onnx_sha256"] = "0" * 64  # an entry recorded for another graph is stale
    meta_path.write_text(json.dumps(meta))
    assert cache.lookup(rec) is None


def test_export_makes_missing_parents_and_removes_them_when_it_fails(tiny_sd3, tmp_path, monkeypatch, capsys):
    """README: export, like convert, makes OUT's missing parent directories and removes them
    again when it fails (here in the tracing, inside the partial directory)."""
    from streamflow_jax.export import onnx as onnx_export

    src, _ = tiny_sd3
    flags = ["--batch", "1:1:2", "--resolution", "8", "--latent-scale", "1", "--text-len", "7", "-q"]
    with monkeypatch.context() as m:
        m.setattr(onnx_export, "trace_onnx", lambda *a, **k: (_ for _ in ()).throw(ValueError("tracing failed")))
        assert cli(["export", str(src), str(tmp_path / "new" / "deeper" / "out"), *flags]) == 1
    assert "tracing failed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert cli(["export", str(src), str(tmp_path / "new" / "deeper" / "out"), *flags]) == 0
    assert load_export(tmp_path / "new" / "deeper" / "out").spec.dims["B"] == Range(1, 1, 2)


def test_export_cli(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    out = tmp_path / "onnx"
    assert cli(["export", str(src), str(out), "--batch", "1:2:4", "--resolution", "8:8:16", "--latent-scale", "1",
                "--text-len", "7", "-q"]) == 0
    graph = load_export(out)
    assert graph.spec.dims["B"] == Range(1, 2, 4) and graph.spec.dims["H"] == Range(8, 8, 16)
    assert cli(["export", str(src), str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["export", str(src), str(tmp_path / "bad"), "--batch", "4:2:1", "-q"]) == 1
    assert "min <= opt <= max" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # --resolution is in pixels, and so are its refusals (they spoke of latent sides); the text
    # length is bounded by what the pipelines feed (77 CLIP + 512 T5 tokens for SD3)
    for argv, message in ((["--resolution", "8:16:4000", "--latent-scale", "2"],
                           "resolution up to 4000 px exceeds the largest the sd3 model takes (48 px: 24 latent "
                           "pixels of 2)"),
                          (["--resolution", "6:16:16", "--latent-scale", "2"],
                           "resolution 6 px is not a multiple of 4 (sd3: 2 latent pixels of 2)"),
                          (["--text-len", "600"], "text_len 600 is longer than any text the sd3 pipelines feed (589: "
                                                  "77 CLIP tokens, then T5's 512 at most)")):
        assert cli(["export", str(src), str(tmp_path / "bad"), *argv, "-q"]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_export_cli_tensorrt_without_tensorrt(tiny_sd3, tmp_path, capsys, monkeypatch):
    """Neither TensorRT flavour importable: one clear error naming both extras, before exporting.
    (TensorRT-RTX is installed for the tests; building engines with it: tests/test_tensorrt.py.)"""
    import sys

    monkeypatch.delenv("STREAMFLOW_JAX_TENSORRT", raising=False)
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    assert cli(["export", str(tiny_sd3[0]), str(tmp_path / "trt"), "--backend", "tensorrt", "-q"]) == 1
    err = capsys.readouterr().err
    assert "needs TensorRT: pip install 'streamflow-jax[tensorrt]'" in err and "[tensorrt-rtx]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "trt").exists()


@pytest.mark.parametrize("cls", ["AutoencoderKL", "AutoencoderTiny"])
def test_decoder_export_matches_xla(tmp_path, cls):
    """VAE and TAESD decoders: one graph, dynamic batch and latent size, fp32 in and out."""
    import diffusers
    from conftest import TAESD, VAES, randomize

    cfg = VAES["sd"] if cls == "AutoencoderKL" else TAESD
    randomize(getattr(diffusers, cls)(**cfg), 0, std=0.1).save_pretrained(tmp_path / "src")
    model = sf.load(tmp_path / "src")
    assert cli(["export", str(tmp_path / "src"), str(tmp_path / "onnx"), "--batch", "1:2:3",
                "--resolution", "16:32:64" if cls == "AutoencoderKL" else "32:64:128", "-q"]) == 0
    graph = load_export(tmp_path / "onnx")
    assert graph.spec.method == "decode_latents" and tensorrt_problems(onnx.load(graph.onnx_path)) == []
    runner = OnnxRuntimeRunner(graph)
    lo, hi = graph.spec.dims["H"].min, graph.spec.dims["H"].max
    for b, h, w in [(1, lo, lo), (3, hi, lo)]:
        z = np.random.default_rng(b).standard_normal((b, h, w, 4)).astype(np.float32)
        want = np.asarray(model.module.decode_latents(z))
        got = runner.decode_latents(z)
        assert got.shape == want.shape and _rel(got, want) <= 1e-4
    with pytest.raises(ValueError, match="B=4 is outside"):
        runner.decode_latents(np.zeros((4, lo, lo, 4), np.float32))


@pytest.mark.parametrize("prediction", ["diff_eps", "velocity"])
def test_perflow_unet_velocity_export_matches_xla(tmp_path, prediction):
    """The UNet family's velocity graph (UNet + PeRFlow adapter): one graph, batches 1/3/8; one
    latent size per graph (jax2onnx cannot trace strided convs over symbolic sizes), said clearly."""
    import diffusers
    from conftest import UNETS, randomize

    from streamflow_jax.models.perflow import PeRFlowAdapter

    randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 6, std=0.1).save_pretrained(tmp_path / "unet")
    model = sf.load(tmp_path / "unet").with_adapter(PeRFlowAdapter(prediction, 4))
    with pytest.raises(ValueError, match="one latent height .* strided convolutions"):
        export_spec(model, batch="1:3:8", latent="8:8:16", text_len=5)
    spec = export_spec(model, batch="1:3:8", latent=16, text_len=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = OnnxRuntimeRunner(export_onnx(model, spec, tmp_path / "onnx", progress=False))
    assert not [str(w.message) for w in caught if "float64" in str(w.message)]  # traced float32 throughout
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 4)).astype(np.float32)
    t = np.linspace(1.0, 0.05, 8).astype(np.float32)  # elements in different windows
    cond = {"encoder_hidden_states": rng.standard_normal((8, 5, 768)).astype(np.float32)}
    want = np.asarray(model.velocity(x, t, cond))  # XLA once: each element's velocity is its own
    for b in (1, 3, 8):
        got = runner.velocity(x[:b], t[:b], {k: v[:b] for k, v in cond.items()})
        assert _rel(got, want[:b]) <= 1e-4
    with pytest.raises(ValueError, match="axis 1 is 8, the graph takes 16"):
        runner.velocity(np.zeros((1, 8, 16, 4), np.float32), np.ones(1, np.float32),
                        {"encoder_hidden_states": np.zeros((1, 5, 768), np.float32)})
    if prediction == "diff_eps":  # a model relaid OHWI (the stream engine's GPU layout) exports as HWIO
        ohwi = OnnxRuntimeRunner(export_onnx(model.with_conv_layout("OHWI"), spec, tmp_path / "ohwi", progress=False))
        got = ohwi.velocity(x[:3], t[:3], {k: v[:3] for k, v in cond.items()})
        assert _rel(got, want[:3]) <= 1e-4


def test_sdxl_unet_velocity_export_matches_xla_and_diffusers(tmp_path):
    """The SDXL UNet's velocity graph (PeRFlow ddim_eps adapter): the added conditions
    (``text_embeds``, ``time_ids``) are inputs with the dynamic batch, from the Family record;
    ONNX Runtime equals XLA at batches 1, 2, 4 with per-element t and time ids, and, through
    the adapter's formulas, diffusers' UNet with ``added_cond_kwargs`` (measured <= 1.8e-7 rel.
    both); TensorRT's operator table takes the graph."""
    import diffusers
    import torch
    from conftest import SDXL_UNET, perflow_reference_velocity, randomize, sdxl_added_inputs

    from streamflow_jax.models.perflow import PeRFlowAdapter

    ref = randomize(diffusers.UNet2DConditionModel(**SDXL_UNET), 7, std=0.1).eval()
    ref.save_pretrained(tmp_path / "unet")
    model = sf.load(tmp_path / "unet").with_adapter(PeRFlowAdapter("ddim_eps", 4))
    spec = export_spec(model, batch="1:2:4", latent="8:8:8", text_len=5)
    assert spec.input_names == ["x", "t", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [i.shape for i in spec.inputs[2:]] == [("B", 5, 80), ("B", 24), ("B", 6)]
    graph = export_onnx(model, spec, tmp_path / "onnx", progress=False)
    assert tensorrt_problems(onnx.load(graph.onnx_path)) == []
    runner = OnnxRuntimeRunner(graph)
    rng = np.random.default_rng(0)
    x4 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t4 = np.linspace(1.0, 0.1, 4).astype(np.float32)  # elements in different windows
    text_embeds4, time_ids4 = sdxl_added_inputs(4, seed=4)
    cond4 = {"encoder_hidden_states": rng.standard_normal((4, 5, 80)).astype(np.float32),
             "text_embeds": text_embeds4, "time_ids": time_ids4}
    xla = np.asarray(model.velocity(x4, t4, cond4))  # XLA once: each element's velocity is its own
    for b in (1, 2, 4):
        x, t, cond = x4[:b], t4[:b], {k: v[:b] for k, v in cond4.items()}
        text_embeds, time_ids = cond["text_embeds"], cond["time_ids"]
        got = runner.velocity(x, t, cond)
        assert _rel(got, xla[:b]) <= 1e-4
        with torch.no_grad():
            eps = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([int(v * 1000) for v in t]),
                      torch.from_numpy(cond["encoder_hidden_states"]),
                      added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                         "time_ids": torch.from_numpy(time_ids)}).sample
        eps = eps.permute(0, 2, 3, 1).numpy().astype(np.float64)
        want = np.stack([perflow_reference_velocity("ddim_eps", eps[i], x[i].astype(np.float64), float(t[i]))
                         for i in range(b)])
        assert _rel(got, want) <= 1e-4
    with pytest.raises(ValueError, match="time_ids"):
        runner.velocity(x, t, {**cond, "time_ids": time_ids[:, :5]})


def test_flux_velocity_export_dynamic_shapes(tmp_path):
    """Flux with guidance: one graph for any batch, height and width (position ids computed in
    the graph), equal to diffusers' transformer and to XLA; within TensorRT's operator table."""
    from test_flux import flux_inputs, make_flux, reference_velocity

    ref = make_flux(tmp_path / "src", True, seed=7)
    model = sf.load(tmp_path / "src")
    spec = export_spec(model, batch="1:2:4", latent="4:8:16", text_len=5)
    assert spec.input_names == ["x", "t", "encoder_hidden_states", "pooled_projections", "guidance"]
    graph = export_onnx(model, spec, tmp_path / "onnx", progress=False)
    assert tensorrt_problems(onnx.load(graph.onnx_path)) == []
    runner = OnnxRuntimeRunner(graph)
    for b, h, w in [(1, 8, 8), (3, 6, 10), (4, 16, 4)]:
        x, t, cond = flux_inputs(b, h, w, seed=b)
        got = runner.velocity(x, t, cond)
        assert _rel(got, model.velocity(x, t, cond)) <= 1e-4  # measured <= 8.7e-6
        assert _rel(got, reference_velocity(ref, x, t, cond)) <= 1e-4
    with pytest.raises(ValueError, match="H=7 is not a multiple of 2"):
        runner.velocity(np.zeros((1, 7, 8, 4), np.float32), t[:1], {k: v[:1] for k, v in cond.items()})


@pytest.mark.parametrize("family", ["t5", "clip"])
def test_text_encoder_export(tmp_path, family):
    """T5 and CLIP text encoders export with int32 ids (dynamic batch) and match XLA and
    transformers; within TensorRT's operator table."""
    import torch
    import transformers

    if family == "t5":
        from test_t5 import T5_A, make_t5, padded_ids

        ref = make_t5(tmp_path / "src", T5_A, seed=3)
        ids, length = padded_ids(24), 24
    else:
        from conftest import CLIP, randomize

        ref = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3).eval()
        ref.save_pretrained(tmp_path / "src")
        ids, length = np.array([[527] + list(range(5, 80)) + [528]] * 2), 77
    model = sf.load(tmp_path / "src")
    for kwargs, message in [({"text_len": 0}, "text_len must be an integer >= 1, got 0"),  # was 77
                            ({"text_len": 2.5}, "text_len must be an integer >= 1, got 2.5"),  # was 2
                            ({"resolution": 64}, "resolution: not an input of a text_encoder's graph")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            export_spec(model, **kwargs)
    graph = export_onnx(model, export_spec(model, batch="1:2:4", text_len=length), tmp_path / "onnx",
                        progress=False)
    assert graph.spec.inputs[0].dtype == "int32" and tensorrt_problems(onnx.load(graph.onnx_path)) == []
    runner = OnnxRuntimeRunner(graph)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = runner.encode(ids)
    assert got.shape == want.shape and _rel(got, want) <= 1e-5  # measured 2.8e-7 (T5)


def test_linear_output_binding_leaves_the_graph_unchanged(tmp_path, monkeypatch):
    """Our shortcut around jax2onnx's quadratic output check (export/onnx.py) is taken, and the
    graph it gives is byte for byte the one jax2onnx gives on its own."""
    import contextlib

    from jax2onnx.converter import output_binding

    from streamflow_jax.export import onnx as onnx_export

    make_sd3(tmp_path / "src", "sd35_medium", seed=2)
    model = sf.load(tmp_path / "src")
    spec = export_spec(model, batch="1:2:4", latent="4:8:12", text_len=7)
    scans = []
    original = output_binding._value_is_graph_connected
    monkeypatch.setattr(output_binding, "_value_is_graph_connected",
                        lambda ctx, v: scans.append(1) or original(ctx, v))  # jax2onnx's scan, counted
    fast = onnx_export.trace_onnx(model, spec).SerializeToString()
    fast_scans, scans[:] = len(scans), []
    monkeypatch.setattr(onnx_export, "linear_output_binding", contextlib.nullcontext)
    assert onnx_export.trace_onnx(model, spec).SerializeToString() == fast
    assert len(scans) > 500 and fast_scans < len(scans) / 4, (fast_scans, len(scans))
