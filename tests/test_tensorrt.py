"""TensorRT: engines built for real, on the CPU, by TensorRT-RTX from every family's exported
graph (the engine's inputs, outputs, dtypes and profile against the spec; no parser or builder
warnings), the graph clean-up that removed TensorRT's warnings, the export CLI's engine, the
flavour choice and the engine cache. Execution skips: no GPU here runs a TensorRT-RTX engine."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from conftest import VARIANTS, make_sd3, sd3_inputs

pytest.importorskip("jax2onnx")
trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (make test installs it)")
import onnx  # noqa: E402

import streamflow_jax as sf  # noqa: E402
from streamflow_jax.backends import tensorrt as trt_backend  # noqa: E402
from streamflow_jax.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from streamflow_jax.backends.tensorrt import (  # noqa: E402
    FLAVOUR_ENV,
    GPU,
    TensorRTRunner,
    TensorRTUnavailable,
    build_engine,
    engine_for,
    engine_key,
    engine_record,
    local_gpu,
    tensorrt_flavour,
)
from streamflow_jax.cli import main as cli  # noqa: E402
from streamflow_jax.export import ExportedGraph, export_onnx, load_export, export_spec  # noqa: E402
from streamflow_jax.export import onnx as onnx_export  # noqa: E402
from streamflow_jax.export.clean import clean_graph  # noqa: E402

RTX = "tensorrt_rtx"
RTX_CCS = "7.5/8.0/8.6/8.9/12.x"
EXEC_SKIP = (f"executing needs a GPU that TensorRT-RTX runs on (compute capability {RTX_CCS}) with JAX on it; "
             "this machine has no GPU (and the suite runs JAX on the CPU), and the lent GPU machine is an H100/H200 "
             "(9.0, not an RTX target) without network to install datacenter TensorRT; on such a GPU run "
             "STREAMFLOW_JAX_TEST_PLATFORMS=cuda,cpu pytest tests/test_tensorrt.py -k engine_matches")


def _digits_dir():
    from streamflow_jax.pipelines.digits import DIGITS_DIR  # the embedded model

    return DIGITS_DIR


# ---------------------------------------------------------------------------------------------
# One exported graph per family, built once (module scope)
# ---------------------------------------------------------------------------------------------

FAMILIES = ["digits", "sd3-float32", "sd3-bfloat16", "sd35_medium-float32", "sd35_medium-bfloat16", "unet-perflow",
            "unet-sdxl-bfloat16", "vae", "taesd", "flux", "t5", "clip"]


def _export_family(family: str, root) -> ExportedGraph:
    """The family's tiny model exported with its dynamic axes (B always; H, W where it can)."""
    import diffusers
    import transformers
    from conftest import CLIP, TAESD, UNETS, VAES, randomize

    src = root / "src"
    if family == "digits":  # the embedded model, as the README's example exports it
        model = sf.load(_digits_dir())
        spec = export_spec(model, latent=16, latent_scale=1, text_len=1)
    elif family.startswith("sd3"):
        variant, dtype = family.split("-")
        make_sd3(src, variant, seed=11)
        model = sf.load(src)
        spec = export_spec(model, batch="1:3:8", latent="4:8:12", text_len=7, dtype=dtype)
    elif family == "unet-perflow":
        from streamflow_jax.models.perflow import PeRFlowAdapter

        randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 6, std=0.1).save_pretrained(src)
        model = sf.load(src).with_adapter(PeRFlowAdapter("diff_eps", 4))
        spec = export_spec(model, batch="1:3:8", latent=16, text_len=5)
    elif family == "unet-sdxl-bfloat16":  # SDXL's added conditions as inputs, in the GPU benchmark's dtype
        from conftest import SDXL_UNET

        from streamflow_jax.models.perflow import PeRFlowAdapter

        randomize(diffusers.UNet2DConditionModel(**SDXL_UNET), 6, std=0.1).save_pretrained(src)
        model = sf.load(src).with_adapter(PeRFlowAdapter("ddim_eps", 4))
        spec = export_spec(model, batch="1:2:4", latent=8, text_len=77, dtype="bfloat16")
    elif family in ("vae", "taesd"):
        module = diffusers.AutoencoderKL(**VAES["sd"]) if family == "vae" else diffusers.AutoencoderTiny(**TAESD)
        randomize(module, 0, std=0.1).save_pretrained(src)
        model = sf.load(src)
        spec = export_spec(model, batch="1:2:3", resolution="16:32:64" if family == "vae" else "32:64:128")
    elif family == "flux":
        from test_flux import make_flux

        make_flux(src, True, seed=7)
        model = sf.load(src)
        spec = export_spec(model, batch="1:2:4", latent="4:8:16", text_len=5)
    elif family == "t5":
        from test_t5 import T5_A, make_t5

        make_t5(src, T5_A, seed=3)
        model = sf.load(src)
        spec = export_spec(model, batch="1:2:4", text_len=24)
    else:
        randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3).save_pretrained(src)
        model = sf.load(src)
        spec = export_spec(model, batch="1:2:4", text_len=77)
    return export_onnx(model, spec, root / "onnx", progress=False)


@pytest.fixture(scope="module", params=FAMILIES)
def family_graph(request, tmp_path_factory):
    return request.param, _export_family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def family_engine(family_graph):
    family, graph = family_graph
    return family, graph, build_engine(graph, flavour=RTX)


def _engine_dims(spec, tensor):
    """The shape the built engine lists for ``tensor``: -1 where the axis varies in the profile."""
    out = []
    for d in tensor.shape:
        if isinstance(d, int):
            out.append(d)
            continue
        factor, _, name = d.rpartition("*")
        r = spec.dims[name]
        out.append(-1 if r.min != r.max else int(factor or 1) * r.min)
    return tuple(out)


def test_engine_io_and_profile_match_spec(family_engine):
    """What TensorRT-RTX built, checked against the spec: the network's inputs and outputs
    (names in order, dtypes, -1 on every symbolic axis), the optimization profile as TensorRT
    holds it (min/opt/max per input), the built engine's I/O as the builder lists its layers,
    and not one parser or builder warning.

    The engine itself cannot be deserialized here (that needs a CUDA driver), hence the
    network, the profile and the builder's own listing of the engine."""
    family, graph, built = family_engine
    spec = graph.spec
    assert built.flavour == RTX and built.version == trt.__version__
    assert built.targets == ("8.0", "8.6", "8.9", "12.0", "12.1")  # every RTX target but Turing, by default
    assert built.warnings == []
    assert list(built.inputs) == spec.input_names
    assert list(built.outputs) == [t.name for t in spec.outputs]
    for t in spec.inputs + spec.outputs:
        dtype, shape = (built.inputs | built.outputs)[t.name]
        assert dtype == t.dtype, t.name  # float32 I/O in bf16 graphs too; int32 token ids
        assert shape == tuple(-1 if isinstance(d, str) else d for d in t.shape), t.name
        assert built.engine_io[t.name] == (t.dtype, _engine_dims(spec, t)), t.name
    assert built.profile == spec.profile()
    assert len(built.plan) > 100_000
    print(f"{family}: built in {built.seconds:.2f} s, engine {len(built.plan) / 2**20:.2f} MiB")


def _parse(path):
    """TensorRT-RTX's network for an ONNX file, and the warnings its parser logged."""
    logger = trt_backend._process_logger(trt)  # TensorRT takes one logger per process
    with logger.capture() as log:
        builder = trt.Builder(logger)
        network = tensorrt_flavour(RTX).create_network(builder)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    return network, log.warnings, (builder, parser)  # the builder and parser own the network


def _runtime_zero_placeholders(network) -> int:
    """Shuffle layers that read 0 as "copy" from a shape known only at run time: what datacenter
    TensorRT warns about ("IShuffleLayer with zeroIsPlaceHolder=true has reshape dimension at
    position N that might or might not be zero")."""
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.SHUFFLE:
            layer.__class__ = trt.IShuffleLayer  # TensorRT's Python API: downcast by class
            count += layer.zero_is_placeholder and layer.num_inputs > 1 and layer.get_input(1) is not None
    return count


def test_no_runtime_zero_placeholder_reshapes(family_graph):
    _, graph = family_graph
    network, warnings, _keep = _parse(graph.onnx_path)
    assert warnings == [] and _runtime_zero_placeholders(network) == 0


def test_clean_graph_removes_tensorrt_warnings_and_keeps_results(tmp_path, monkeypatch):
    """The digits graph as jax2onnx writes it: TensorRT-RTX's parser warns on its empty
    initializers and makes every shape-computed Reshape a zero-placeholder shuffle; after
    ``clean_graph`` neither, and ONNX Runtime gives the same velocity."""
    model = sf.load(_digits_dir())
    spec = export_spec(model, batch="1:2:4", latent=16, latent_scale=1, text_len=1)
    monkeypatch.setattr(onnx_export, "clean_graph", lambda proto: {})
    raw = onnx_export.trace_onnx(model, spec)
    monkeypatch.undo()
    paths = {}
    for name in ("raw", "clean"):
        (tmp_path / name).mkdir()
        if name == "clean":
            counts = clean_graph(raw)
            assert clean_graph(raw) == {}  # idempotent
        onnx_export.save_onnx(raw, tmp_path / name)
        paths[name] = tmp_path / name / "model.onnx"
    network, warnings, _keep = _parse(paths["raw"])
    assert warnings and all("Empty initializer" in w for w in warnings)
    assert counts["reshape_to_squeeze"] == len(warnings)  # one per reshape-to-scalar's empty shape
    assert 0 < _runtime_zero_placeholders(network) <= counts["reshape_allowzero"]
    network, warnings, _keep = _parse(paths["clean"])
    assert warnings == [] and _runtime_zero_placeholders(network) == 0
    onnx.checker.check_model(str(paths["clean"]), full_check=True)
    x, t, cond = sd3_inputs({"in_channels": 1, "joint_attention_dim": 32, "pooled_projection_dim": 32}, 3, 16, 16,
                            text_len=1, seed=4)
    runners = {k: OnnxRuntimeRunner(ExportedGraph(p.parent, spec, {})) for k, p in paths.items()}
    np.testing.assert_array_equal(runners["clean"].velocity(x, t, cond), runners["raw"].velocity(x, t, cond))


# ---------------------------------------------------------------------------------------------
# Export CLI, engine cache, flavours
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cli_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits-trt"
    assert cli(["export", str(_digits_dir()), str(out), "--backend", "tensorrt", "--tensorrt", RTX,
                "--latent-scale", "1", "-q"]) == 0
    return out


def test_export_cli_builds_engine_on_cpu(digits_cli_export):
    """`streamflow-jax export --backend tensorrt` on a machine without a GPU: model.onnx, the
    engine beside it, and export.json recording flavour, version, targets and build time."""
    out = digits_cli_export
    graph = load_export(out)
    entry = graph.meta["tensorrt"]
    engine = out / entry["engine"]
    assert engine.name.endswith(".engine") and engine.stat().st_size == entry["engine_bytes"]
    assert hashlib.sha256(engine.read_bytes()).hexdigest() == entry["engine_sha256"]
    assert entry["flavour"] == RTX and entry["version"] == trt.__version__
    assert entry["targets"] == ["8.0", "8.6", "8.9", "12.0", "12.1"] and entry["build_seconds"] > 0
    assert entry["warnings"] == []
    assert entry["record"]["flavour"] == RTX and entry["record"]["targets"] == entry["targets"]
    assert entry["record"]["onnx_sha256"] == graph.meta["sha256"] and entry["record"]["gpu"] is None
    assert (engine.stat().st_mode & 0o777) == ((out / "model.onnx").stat().st_mode & 0o777)


def test_build_shows_its_phases(digits_cli_export, capsys):
    """``build_engine(progress=True)`` (``export --backend tensorrt`` without -q): a bar per phase
    TensorRT's progress monitor reports (the build of a large model was minutes without a word);
    none without it."""
    graph = load_export(digits_cli_export)
    capsys.readouterr()
    build_engine(graph, flavour=RTX, targets=["8.6"], opt_level=0)
    assert "TensorRT: " not in capsys.readouterr().err
    build_engine(graph, flavour=RTX, targets=["8.6"], opt_level=0, progress=True)
    assert "TensorRT: " in capsys.readouterr().err


def test_export_cli_tensorrt_errors(tmp_path, capsys):
    digits = str(_digits_dir())
    assert cli(["export", digits, str(tmp_path / "a"), "--backend", "tensorrt", "--tensorrt", RTX,
                "--compute-capability", "9.0", "-q"]) == 1
    err = capsys.readouterr().err
    assert "compute capability '9.0'" in err and "needs datacenter TensorRT" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()  # refused before exporting
    # what the flags and the model say is refused before exporting too (the export was written,
    # the build failed in TensorRT's words, and the directory stayed behind without an engine)
    for flags, message in [(["--compute-capability", "7.5"], "--compute-capability 7.5 (Turing) builds float16 "
                                                               "graphs only, and this one computes in float32"),
                           (["--compute-capability", ""], "--compute-capability is empty")]:
        assert cli(["export", digits, str(tmp_path / "a"), "--backend", "tensorrt", "--tensorrt", RTX, *flags,
                    "-q"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "a").exists()


def test_sample_refuses_tensorrt_before_exporting_without_a_gpu(tmp_path, monkeypatch):
    """``sf.sample(..., backend="tensorrt")`` said an engine cannot run here only after exporting
    the model into the cache (seconds, and an entry left for nothing)."""
    if local_gpu() is not None:
        pytest.skip("a GPU is visible to JAX")
    monkeypatch.setenv("STREAMFLOW_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("STREAMFLOW_JAX_TENSORRT", RTX)
    pipe = sf.pipelines.DigitsPipeline.load()
    with pytest.raises(TensorRTUnavailable, match="tensorrt_rtx engine cannot run here: JAX sees no NVIDIA GPU"):
        pipe([1, 2], steps=2, backend="tensorrt")
    assert not (tmp_path / "exports").exists()


def test_engine_for_uses_the_exported_engine_then_the_cache(digits_cli_export, tmp_path, monkeypatch):
    graph = load_export(digits_cli_export)
    built = []
    real_build = trt_backend.build_engine
    monkeypatch.setattr(trt_backend, "build_engine", lambda *a, **k: built.append(k) or real_build(*a, **k))
    plan, record, where = engine_for(graph, flavour=RTX, cache_dir=tmp_path)
    assert where == str(digits_cli_export / "model.engine") and not built  # the export's own engine
    assert plan == (digits_cli_export / "model.engine").read_bytes()
    plan86, record86, where86 = engine_for(graph, flavour=RTX, targets="8.6", cache_dir=tmp_path)
    assert record86["targets"] == ["8.6"] and len(built) == 1 and where86.startswith(str(tmp_path))
    assert engine_for(graph, flavour=RTX, targets="sm86", cache_dir=tmp_path)[0] == plan86 and len(built) == 1
    assert engine_key(record86) != engine_key(record)


def test_engine_built_with_flags_is_the_one_used(tmp_path, monkeypatch):
    """An export built with ``--compute-capability`` and ``--opt-level`` other than the defaults:
    its own engine is used, not rebuilt with the default targets and level on the deployment
    machine (``open_export``/``TensorRTRunner`` took the defaults; the engine was skipped)."""
    out = tmp_path / "digits-86"
    assert cli(["export", str(_digits_dir()), str(out), "--backend", "tensorrt", "--tensorrt", RTX,
                "--latent-scale", "1", "--compute-capability", "8.6", "--opt-level", "0", "-q"]) == 0
    built = []
    real_build = trt_backend.build_engine
    monkeypatch.setattr(trt_backend, "build_engine", lambda *a, **k: built.append(k) or real_build(*a, **k))
    plan, record, where = engine_for(load_export(out), flavour=RTX, cache_dir=tmp_path / "cache")
    assert where == str(out / "model.engine") and not built
    assert record["targets"] == ["8.6"] and record["opt_level"] == 0


def test_engine_record_keys_flavour_and_targets(digits_cli_export):
    graph = load_export(digits_cli_export)
    base = {"tensorrt_version": "1.7.1.116", "gpu_name": None, "opt_level": 3}
    records = [engine_record(graph, flavour=RTX, targets=["8.6"], **base),
               engine_record(graph, flavour=RTX, targets=["8.6", "12.0"], **base),
               engine_record(graph, flavour="tensorrt", targets=["8.6"], **base)]
    assert len({engine_key(r) for r in records}) == 3
    assert records[0]["flavour"] == RTX and records[0]["targets"] == ["8.6"]


def test_flavour_choice(monkeypatch):
    monkeypatch.delenv(FLAVOUR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # datacenter TensorRT absent (as it is here)
    assert tensorrt_flavour().name == RTX  # the one installed
    monkeypatch.setenv(FLAVOUR_ENV, "tensorrt")
    with pytest.raises(TensorRTUnavailable, match=r"tensorrt \(from STREAMFLOW_JAX_TENSORRT\) is not installed: "
                                                  r"pip install 'streamflow-jax\[tensorrt\]'"):
        tensorrt_flavour()
    assert tensorrt_flavour("tensorrt-rtx").name == RTX  # the argument wins; pip's spelling accepted
    monkeypatch.setenv(FLAVOUR_ENV, "cuda")
    with pytest.raises(ValueError, match="unknown TensorRT flavour 'cuda'"):
        tensorrt_flavour()
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.delenv(FLAVOUR_ENV)
    with pytest.raises(TensorRTUnavailable, match=r"needs TensorRT: pip install 'streamflow-jax\[tensorrt\]' .* "
                                                  r"or 'streamflow-jax\[tensorrt-rtx\]'"):
        tensorrt_flavour()


def test_rtx_targets_and_where_engines_run():
    fl = tensorrt_flavour(RTX)
    assert fl.portable and "7.5" in fl.rtx_targets() and "7.5" not in fl.targets()
    assert fl.targets("7.5, sm86,120,8.6") == ("7.5", "8.6", "12.0")
    with pytest.raises(ValueError, match=r"'9\.0'.*needs datacenter TensorRT"):
        fl.targets(["8.6", "9.0"])
    assert fl.cannot_run(("8.6", "8.9"), GPU("NVIDIA GeForce RTX 4090", "8.9")) is None
    assert "use datacenter TensorRT" in fl.cannot_run(("8.6", "8.9"), GPU("NVIDIA H100 80GB HBM3", "9.0"))
    assert "JAX sees no NVIDIA GPU" in fl.cannot_run(("8.6",), None)


def test_fp8_models_are_refused_with_the_reason(tmp_path, capsys):
    """A quantized model's graph (dynamic activation scales) casts activations to FP8 with
    scales computed per call; TensorRT takes FP8 tensors only from its Q/DQ layers with
    build-time scales (TensorRT-RTX's own builder says "has datatype FP8 but is not produced by
    ... IQuantizeLayer"). Refused with that reason and the way out (calibrate): by the CLI before
    loading, by runner_for before exporting, by build_engine. (Calibrated models build:
    test_calibrate.)"""
    from streamflow_jax.backends import runner_for
    from streamflow_jax.pipelines import DigitsPipeline
    from streamflow_jax.quantization import quantize

    digits = str(_digits_dir())
    refusal = "FP8 models with dynamic activation scales do not build as TensorRT engines"
    for argv in (["export", digits, str(tmp_path / "a"), "--backend", "tensorrt", "--quantize", "fp8", "-q"],
                 ["generate", "--backend", "tensorrt", "--quantize", "fp8", "--out", str(tmp_path / "a.png")]):
        assert cli(argv) == 1
        err = capsys.readouterr().err
        assert f"--quantize fp8 --backend tensorrt: {refusal}" in err and "calibrate them first" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.png").exists()
    q = quantize(DigitsPipeline.load().model, "fp8")
    with pytest.raises(ValueError, match="scales computed per call, and TensorRT's FP8"):
        runner_for(q, "tensorrt", batch=1, height=8, width=8, cond={})
    assert cli(["export", digits, str(tmp_path / "q"), "--quantize", "fp8", "--latent-scale", "1", "-q"]) == 0
    with pytest.raises(ValueError, match=r"q/model\.onnx: " + refusal):
        build_engine(load_export(tmp_path / "q"), flavour=RTX)


def test_datacenter_targets_resolve_to_themselves(monkeypatch):
    """Datacenter TensorRT builds for the GPU it runs on: its own compute capability, given
    back (as ``export_engine`` and the runner pass resolved targets on), is accepted; another
    is refused; an FP8 graph needs 8.9 or later. (The module is TensorRT-RTX's, standing in
    only for its version string; the GPU is what JAX would report.)"""
    fl = trt_backend.Flavour("tensorrt", tensorrt_flavour(RTX).trt)
    monkeypatch.setattr(trt_backend, "local_gpu", lambda: GPU("NVIDIA H200", "9.0"))
    assert fl.targets() == fl.targets(("9.0",)) == fl.targets(fl.targets(fp8=True), fp8=True) == ("9.0",)
    with pytest.raises(ValueError, match="compute-capability targets are a TensorRT-RTX option"):
        fl.targets("8.6")
    monkeypatch.setattr(trt_backend, "local_gpu", lambda: GPU("NVIDIA A100-SXM4-80GB", "8.0"))
    assert fl.targets() == ("8.0",)
    with pytest.raises(ValueError, match=r"an FP8 graph runs on compute capability 8\.9 \(Ada\) or later only.*"
                                         r"NVIDIA A100-SXM4-80GB is 8\.0"):
        fl.targets(fp8=True)


def test_runner_refuses_before_building_without_a_gpu(digits_cli_export, tmp_path):
    if local_gpu() is not None:
        pytest.skip("a GPU is visible to JAX")
    with pytest.raises(TensorRTUnavailable, match="tensorrt_rtx engine cannot run here: JAX sees no NVIDIA GPU"):
        TensorRTRunner(digits_cli_export, cache_dir=tmp_path, flavour=RTX, targets="8.6")
    assert not (tmp_path / "engines").exists()  # nothing built for nothing


def test_failed_parse_is_one_clear_error(tmp_path):
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Unique", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])]),
        opset_imports=[onnx.helper.make_opsetid("", 23)])
    onnx.save(proto, tmp_path / "model.onnx")
    from streamflow_jax.export.spec import ExportSpec, Range, TensorSpec

    spec = ExportSpec("X", (TensorSpec("x", (3,)),), (TensorSpec("y", ("B",)),), {"B": Range(1, 1, 1)},
                      method="decode_latents")
    with pytest.raises(ValueError, match=r"model\.onnx: tensorrt_rtx's ONNX parser failed: "
                                         r"node #0 \(Unique\): UNSUPPORTED_NODE"):
        build_engine(ExportedGraph(tmp_path, spec, {}), flavour=RTX)


# ---------------------------------------------------------------------------------------------
# Execution (needs a GPU TensorRT-RTX runs on)
# ---------------------------------------------------------------------------------------------


def _runnable(targets) -> bool:
    return tensorrt_flavour(RTX).cannot_run(targets, local_gpu()) is None


@pytest.mark.parametrize("variant", ["sd3", "sd35_medium"])
def test_tensorrt_engine_matches_xla(variant, tmp_path):
    if not _runnable(tensorrt_flavour(RTX).targets()):
        pytest.skip(EXEC_SKIP)
    make_sd3(tmp_path / "src", variant, seed=11)
    model = sf.load(tmp_path / "src")
    graph = export_onnx(model, export_spec(model, batch="1:3:8", latent="4:8:12", text_len=7), tmp_path / "onnx",
                        progress=False)
    runner = TensorRTRunner(graph, cache_dir=tmp_path, flavour=RTX)
    for b, h, w in [(1, 8, 8), (3, 12, 4), (8, 8, 8)]:
        x, t, cond = sd3_inputs(VARIANTS[variant], b, h, w)
        got, want = np.asarray(runner.velocity(x, t, cond)), np.asarray(model.velocity(x, t, cond))
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-3
    assert json.loads(json.dumps(runner.record))["flavour"] == RTX
