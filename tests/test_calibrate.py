"""FP8 with static activation scales (``sf.calibrate``): the measured scales against the same
measurement by forward hooks on diffusers' own transformer, the calibrated velocity against a
torch emulation with those scales, batch independence (the stream engine equals ``sf.sample``),
save/load, and the export TensorRT takes (QuantizeLinear / DequantizeLinear)."""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import VARIANTS, make_sd3, sd3_inputs, torch_velocity
from test_quantize import E4M3_MAX, VS_EMULATION, _rel, _torch_fake_quant, fp8_dot_operand_types

import streamflow_jax as sf
from streamflow_jax.models import FAMILIES
from streamflow_jax.pipelines import DIGITS_DIR, DigitsPipeline
from streamflow_jax.quantization import Fp8Linear, activation_scales, quantize, quantized_layers


def _scales(model) -> dict[str, float]:
    from flax import nnx

    return {".".join(map(str, p)): float(n.input_scale[...]) for p, n in nnx.iter_graph(model.module)
            if isinstance(n, Fp8Linear)}


def _torch_scale(amax: float) -> float:
    return float(2.0 ** np.ceil(np.log2(amax / E4M3_MAX)))


def _hook_diffusers(model: torch.nn.Module, pattern: str, static: dict[str, float] | None = None) -> dict[str, float]:
    """The FP8 emulation on diffusers' linears (weights and inputs quantized per tensor); with
    ``static``, inputs use those scales (saturating). Returns the dict each call's largest input
    magnitude is recorded into, per module name."""
    seen: dict[str, float] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and re.search(pattern, name):
            wq = _torch_fake_quant(mod.weight.detach())

            def forward(x, wq=wq, b=mod.bias, name=name):
                seen[name] = max(seen.get(name, 0.0), float(x.abs().max()))
                if static is None:
                    xq = _torch_fake_quant(x)
                else:
                    s = static[name]
                    xq = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
                return torch.nn.functional.linear(xq, wq, b)

            mod.forward = forward
    return seen


def test_scales_and_velocity_against_diffusers(tmp_path):
    """Calibrated on two batches, each layer's scale is the power of two of the largest input
    magnitude that hooks on diffusers' transformer (running the same FP8 emulation) record; the
    calibrated velocity matches the emulation with those scales, and stays an FP8 error away
    from float32."""
    ref = make_sd3(tmp_path / "src", "sd3", seed=4)
    model = sf.load(tmp_path / "src")
    batches = [sd3_inputs(VARIANTS["sd3"], 3, 8, 8, seed=s) for s in (4, 5)]
    want32 = torch_velocity(ref, *batches[0])
    q = quantize(model, "fp8")
    assert activation_scales(q) == "dynamic" and activation_scales(model) is None
    calls = []
    c = sf.calibrate(q, lambda m: calls.extend(np.asarray(m.velocity(*b)) for b in batches))
    assert len(calls) == 2 and activation_scales(c) == "static"
    pattern = FAMILIES["SD3Transformer2DModel"].fp8_linears
    seen = _hook_diffusers(ref, pattern)
    for b in batches:
        torch_velocity(ref, *b)
    ours = _scales(c)
    assert set(ours) == set(seen) == set(quantized_layers(c)) and len(ours) == 25
    assert ours == {name: _torch_scale(amax) for name, amax in seen.items()}
    assert len(set(ours.values())) > 1  # the layers' ranges differ: a scale each
    # one input, one scale: queries, keys and values of the image tokens, and of the text
    # tokens, measured the same range in diffusers too (what layers.project relies on)
    triples = [[n.replace("q", kind) for kind in "qkv"] for n in ours if n.endswith(("to_q", "add_q_proj"))]
    assert len(triples) == 4
    for names in triples:
        assert len({ours[n] for n in names}) == 1 and len({seen[n] for n in names}) == 1, names

    static_ref = make_sd3(tmp_path / "again", "sd3", seed=4)  # the same weights
    _hook_diffusers(static_ref, pattern, static=ours)
    for x, t, cond in batches:
        got = np.asarray(c.velocity(x, t, cond))
        assert _rel(got, torch_velocity(static_ref, x, t, cond)) <= VS_EMULATION
    assert 0.01 < _rel(np.asarray(c.velocity(*batches[0])), want32) <= 0.3  # FP8's error (measured 0.086-0.091, 3 seeds)
    # headroom widens the range: scales double (or more) where it crosses a power of two
    wide = _scales(sf.calibrate(q, lambda m: [m.velocity(*b) for b in batches], headroom=2.0))
    assert wide == {name: 2 * s for name, s in ours.items()}


def test_flux_scales_and_velocity_against_diffusers(tmp_path):
    """Tiny Flux: calibrated scales equal those measured by hooks on diffusers' transformer; a
    single block's q/k/v and MLP input projection read one tensor and got one scale, in
    diffusers too (``layers.project`` quantizes it once for the four); the calibrated velocity
    matches diffusers' static emulation with those scales."""
    from test_flux import flux_inputs, make_flux, reference_velocity

    ref = make_flux(tmp_path / "src", True, seed=6)
    batches = [flux_inputs(2, 8, 8, seed=s) for s in (6, 7)]
    c = sf.calibrate(quantize(sf.load(tmp_path / "src"), "fp8"),
                     lambda m: [np.asarray(m.velocity(*b)) for b in batches])
    seen = _hook_diffusers(ref, FAMILIES["FluxTransformer2DModel"].fp8_linears)
    for b in batches:
        reference_velocity(ref, *b)
    ours = _scales(c)
    assert set(ours) == set(seen) and len(ours) == 40
    assert ours == {name: _torch_scale(amax) for name, amax in seen.items()}
    assert len(set(ours.values())) > 1
    for i in range(2):
        block = f"single_transformer_blocks.{i}"
        names = [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
        assert len({ours[n] for n in names}) == 1 and len({seen[n] for n in names}) == 1, names

    static_ref = make_flux(tmp_path / "again", True, seed=6)  # the same weights
    _hook_diffusers(static_ref, FAMILIES["FluxTransformer2DModel"].fp8_linears, static=ours)
    for x, t, cond in batches:
        assert _rel(np.asarray(c.velocity(x, t, cond)), reference_velocity(static_ref, x, t, cond)) <= VS_EMULATION


def _qkv_scales(model) -> dict[str, list[float]]:
    from flax import nnx

    from streamflow_jax.models.layers import Attention

    return {".".join(map(str, p)): [float(v) for v in np.asarray(n.qkv_scale[...])]
            for p, n in nnx.iter_graph(model.module) if isinstance(n, Attention) and n.qkv_scale is not None}


def test_static_fp8_attention_scales(tmp_path, monkeypatch):
    """``calibrate(..., attention=True)``: each attention's q/k/v scales are the powers of two of
    the largest magnitudes that forward hooks on diffusers' projections (the FP8 emulation
    running) record (SD3's joint attention: image and text tokens together); with FP8
    attention (here the CPU's emulation) the static scales give the per-call ones' numbers on
    the calibration input, and an element's velocity no longer depends on its batch; save and
    load keep them."""
    from streamflow_jax import ops
    from streamflow_jax.quantization import attention_scales

    ref = make_sd3(tmp_path / "src", "sd3", seed=4)
    model = sf.load(tmp_path / "src")
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8, seed=4)
    q = quantize(model, "fp8")
    c = sf.calibrate(q, lambda m: m.velocity(x, t, cond), attention=True)
    assert activation_scales(c) == "static" and attention_scales(c) == "static" and attention_scales(q) is None
    _hook_diffusers(ref, FAMILIES["SD3Transformer2DModel"].fp8_linears)  # the FP8 linears, emulated
    seen: dict[str, float] = {}
    for name, mod in ref.named_modules():
        if re.search(r"\.attn\.(to_[qkv]|add_[qkv]_proj)$", name):
            mod.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, float(out.abs().max())))
    torch_velocity(ref, x, t, cond)
    ours = _qkv_scales(c)
    assert len(ours) == VARIANTS["sd3"]["num_layers"] == 2
    for name, scales in ours.items():
        want = [_torch_scale(max(seen[f"{name}.to_{p}"], seen[f"{name}.add_{p}_proj"])) for p in "qkv"]
        assert scales == want, name

    monkeypatch.setenv(ops.ATTENTION_ENV, "fp8")  # part of the programs' key (ops.trace_switches)
    static = np.asarray(c.velocity(x, t, cond))
    per_call = np.asarray(sf.calibrate(q, lambda m: m.velocity(x, t, cond)).velocity(x, t, cond))
    np.testing.assert_array_equal(static, per_call)  # the same scales on this input
    alone = np.asarray(c.velocity(x[:1], t[:1], {k: v[:1] for k, v in cond.items()}))
    np.testing.assert_allclose(alone[0], static[0], rtol=1e-5, atol=1e-5)
    monkeypatch.delenv(ops.ATTENTION_ENV)
    assert not np.array_equal(np.asarray(c.velocity(x, t, cond)), static)  # FP8 attention did run

    sf.save(c, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["streamflow_jax"]["quantization"][
        "attention_scales"] == "static"
    again = sf.load(tmp_path / "saved")
    assert attention_scales(again) == "static" and _qkv_scales(again) == ours
    with pytest.raises(ValueError, match="attention inputs"):
        sf.calibrate(q, lambda m: None, attention=True)


@pytest.fixture(scope="module")
def digits():
    return DigitsPipeline.load(DIGITS_DIR)


def _with_model(pipe, model):
    out = copy.copy(pipe)
    out.model = model
    return out


def test_static_scales_make_the_stream_equal_sample(digits):
    """With dynamic scales an element's result depends on its batch companions; calibrated,
    the stream engine's results (other batches) equal the pipeline's, and the digits keep their
    accuracy."""
    from streamflow_jax.eval import digit_accuracy

    labels = np.arange(10)
    q = quantize(digits.model, "fp8")
    c = sf.calibrate(q, lambda m: _with_model(digits, m)(labels, steps=8, guidance_scale=3.0, seed=1, progress=False))
    pipe = _with_model(digits, c)
    images = pipe(labels, steps=8, guidance_scale=3.0, seed=0)
    streamed = pipe.stream(labels, steps=8, guidance_scale=3.0, seed=0)
    assert digit_accuracy(images, labels) >= 0.9  # measured 1.0
    assert float(np.max(np.abs(streamed - images))) <= 2e-5  # measured 0
    dynamic = _with_model(digits, q)
    moved = dynamic.stream(labels, steps=8, guidance_scale=3.0, seed=0) - dynamic(labels, steps=8, guidance_scale=3.0,
                                                                                   seed=0)
    assert float(np.max(np.abs(moved))) > 1e-2  # what static scales remove (measured 0.15)


def test_save_load_and_errors(tmp_path):
    make_sd3(tmp_path / "src")
    q = quantize(sf.load(tmp_path / "src"), "fp8")
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8)
    c = sf.calibrate(q, lambda m: m.velocity(x, t, cond))
    sf.save(c, tmp_path / "c")
    cfg = tmp_path / "c" / "config.json"
    meta = json.loads(cfg.read_text())["streamflow_jax"]["quantization"]
    assert meta["activation_scales"] == "static" and meta["layers"] == quantized_layers(c)
    loaded = sf.load(tmp_path / "c", dtype="bfloat16")
    assert activation_scales(loaded) == "static" and _scales(loaded) == _scales(c)
    np.testing.assert_array_equal(np.asarray(sf.load(tmp_path / "c").velocity(x, t, cond)),
                                  np.asarray(c.velocity(x, t, cond)))
    sf.save(q, tmp_path / "q")  # dynamic: no record of scales, loaded dynamic
    assert "activation_scales" not in json.loads((tmp_path / "q" / "config.json").read_text())["streamflow_jax"][
        "quantization"]
    assert activation_scales(sf.load(tmp_path / "q")) == "dynamic"
    raw = json.loads(cfg.read_text())
    raw["streamflow_jax"]["quantization"]["activation_scales"] = "per-row"
    cfg.write_text(json.dumps(raw))
    with pytest.raises(sf.ConversionError, match=re.escape(str(cfg)) + ".*activation_scales must be 'static' or "
                                                                      "'dynamic', got 'per-row'"):
        sf.load(tmp_path / "c")

    with pytest.raises(ValueError, match=r"calibrate takes a quantized model: sf.quantize\(model, 'fp8'\) first"):
        sf.calibrate(sf.load(tmp_path / "src"), lambda m: None)
    # headroom 0.5 clipped the range; inf or 1e30 gave a model 108% off (found by a user's pass)
    for headroom in (0.5, float("inf"), 1e30, "2", True):
        with pytest.raises(ValueError, match=re.escape(f"headroom must be a number from 1 to 256, got {headroom!r}")):
            sf.calibrate(q, lambda m: None, headroom=headroom)
    with pytest.raises(ValueError, match="run must be a function that calls the model it is given, got NoneType"):
        sf.calibrate(q, None)
    with pytest.raises(ValueError, match=r"calibration saw no call of 25 of the 25 FP8 layers "
                                         r"\('transformer_blocks.0.attn.add_k_proj' first\): run must call the model"):
        sf.calibrate(q, lambda m: q.velocity(x, t, cond))  # the model it was given, not this one
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"calibration saw non-finite inputs \(NaN or inf\) at 18 FP8 layer\(s\) "
                                         r"\('transformer_blocks.0.attn.to_add_out' first\): the model diverged"):
        sf.calibrate(q, lambda m: [m.velocity(x, t, cond), m.velocity(bad, t, cond), m.velocity(x, t, cond)])
    with pytest.raises(ValueError, match="calibration measures the model as XLA runs it: call it with backend xla"):
        sf.calibrate(q, lambda m: sf.sample(m, x, sf.schedules.flow_match(2), cond, backend="onnxruntime"))


def test_export_is_quantize_dequantize(tmp_path):
    """A calibrated model exports as ONNX QuantizeLinear / DequantizeLinear around each product,
    with its weights as FLOAT8E4M3FN initializers (a byte each): ONNX Runtime gives the XLA
    velocity, and TensorRT-RTX builds an engine from it, for compute capability 8.9 and later
    only (FP8). A dynamic model's export (Casts to FP8) is refused, with the way out."""
    import onnx
    import onnxruntime as ort

    from streamflow_jax.export import export_onnx, velocity_spec

    make_sd3(tmp_path / "src")
    q = quantize(sf.load(tmp_path / "src"), "fp8")
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 3, 8, 8)
    c = sf.calibrate(q, lambda m: m.velocity(x, t, cond))
    exported = export_onnx(c, velocity_spec(c, batch="1:2:4", latent=8, text_len=7), tmp_path / "onnx", progress=False)
    graph = onnx.load(exported.onnx_path).graph
    kinds = [n.op_type for n in graph.node]
    assert kinds.count("QuantizeLinear") == 25 and kinds.count("DequantizeLinear") == 50
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN}
    assert not any(n.op_type == "Cast" and n.attribute[0].i in fp8 for n in graph.node)
    assert sum(i.data_type in fp8 and len(i.dims) == 2 for i in graph.initializer) == 25
    session = ort.InferenceSession(str(exported.onnx_path))
    feeds = {"x": x, "t": t, **cond}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    assert _rel(got, np.asarray(c.velocity(x, t, cond))) <= 1e-5  # measured 9e-7

    pytest.importorskip("tensorrt_rtx")
    from streamflow_jax.backends.tensorrt import FP8_TARGETS, build_engine, fp8_graph

    assert fp8_graph(exported.onnx_path) == "static"
    built = build_engine(exported, flavour="tensorrt_rtx")
    assert len(built.plan) > 0 and built.targets and all(float(cc) >= 8.9 for cc in built.targets)
    with pytest.raises(ValueError, match=re.escape(f"compute capability '8.6': {FP8_TARGETS}")):
        build_engine(exported, flavour="tensorrt_rtx", targets="8.6,8.9")
    dynamic = export_onnx(q, velocity_spec(q, batch="1:2:4", latent=8, text_len=7), tmp_path / "dyn", progress=False)
    assert fp8_graph(dynamic.onnx_path) == "dynamic"
    with pytest.raises(ValueError, match=r"dyn/model\.onnx: FP8 models with dynamic activation scales do not build "
                                         r"as TensorRT engines.*calibrate them first"):
        build_engine(dynamic, flavour="tensorrt_rtx")


def test_convert_calibrated_pipeline_and_tensorrt_export(tmp_path, capsys):
    """``convert --quantize fp8 --calibrate PROMPTS``: the converted pipeline's transformer has
    the static scales ``PromptPipeline.calibrate`` measures on the same prompts, and exports to
    a TensorRT-RTX engine through the CLI; a checkpoint converted with ``--quantize fp8`` alone is
    refused before exporting, and bad calibration flags before anything is written."""
    from test_prompt_pipelines import make_sd3_pipeline

    from streamflow_jax.cli import main as cli

    make_sd3_pipeline(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube on a table\n\n  a lighthouse at dusk \n")
    out = tmp_path / "calibrated"
    assert cli(["convert", str(tmp_path / "pipe"), str(out), "--quantize", "fp8", "--calibrate", str(prompts),
                "--calibration-steps", "2", "-q"]) == 0
    assert "converted transformer (SD3Transformer2DModel, fp8, static activation scales from 2 prompt(s))" in \
        capsys.readouterr().out
    record = json.loads((out / "conversion.json").read_text())
    assert record["calibrated"] == {"transformer": {"prompts": 2, "steps": 2}}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    loaded = sf.Pipeline.from_diffusers(out)
    assert activation_scales(loaded.model) == "static"
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "float"), "-q"]) == 0
    by_hand = sf.Pipeline.from_diffusers(tmp_path / "float").calibrate(
        ["a red cube on a table", "a lighthouse at dusk"], steps=2, progress=False)
    assert _scales(loaded.model) == _scales(by_hand.model)

    for argv, message in (
            (["--calibrate", str(prompts)], "--calibrate measures FP8 activation scales: it needs --quantize fp8"),
            (["--quantize", "fp8", "--calibrate", str(tmp_path / "none.txt")], "none.txt: cannot read it"),
            (["--quantize", "fp8", "--calibration-steps", "2"], "--calibration-steps goes with --calibrate FILE"),
            (["--quantize", "fp8", "--calibrate", str(prompts), "--calibration-steps", "0"],
             "--calibration-steps must be in [1, 1000], got 0")):
        assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "bad"), *argv, "-q"]) == 1
        assert message in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n \n")
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "bad"), "--quantize", "fp8",
                "--calibrate", str(tmp_path / "empty.txt"), "-q"]) == 1
    assert "empty.txt: no prompt in it (one per line)" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "pipe" / "transformer"), str(tmp_path / "bad"), "--quantize", "fp8",
                "--calibrate", str(prompts), "-q"]) == 1
    assert "calibrate runs prompts through a pipeline (model_index.json), and this is a single model" in \
        capsys.readouterr().err
    # a pipeline that would not load to be calibrated: said before converting, naming the source
    # (it failed after the whole conversion, naming a temporary directory)
    shutil.copytree(tmp_path / "pipe", tmp_path / "base")
    sched = tmp_path / "base" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "_class_name": "EulerDiscreteScheduler"}))
    assert cli(["convert", str(tmp_path / "base"), str(tmp_path / "bad"), "--quantize", "fp8",
                "--calibrate", str(prompts), "-q"]) == 1
    err = capsys.readouterr().err
    assert "calibrate runs the converted pipeline, and it would not load" in err and str(sched) in err, err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="headroom must be a number from 1 to 256, got 0"):  # before quantizing
        loaded.calibrate(["a cube"], headroom=0)
    assert activation_scales(loaded.model) == "static"

    pytest.importorskip("tensorrt_rtx")
    assert cli(["export", str(out), str(tmp_path / "engine"), "--backend", "tensorrt", "--tensorrt", "tensorrt_rtx",
                "--quantize", "fp8", "-q"]) == 0
    said = capsys.readouterr().out
    assert "tensorrt_rtx" in said and "engine ->" in said and "compute capability 8.0" not in said
    assert (tmp_path / "engine" / "model.engine").is_file()
    assert cli(["convert", str(tmp_path / "pipe"), str(tmp_path / "dynamic"), "--quantize", "fp8", "-q"]) == 0
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "dynamic"), str(tmp_path / "dyn-engine"), "--backend", "tensorrt",
                "--tensorrt", "tensorrt_rtx", "-q"]) == 1
    assert "FP8 models with dynamic activation scales do not build" in capsys.readouterr().err
    assert not (tmp_path / "dyn-engine").exists()


def test_static_product_keeps_the_fp8_gemm_pattern():
    """With a static scale the product is still a dot of two e4m3 operands (the form XLA
    compiles into an FP8 GEMM), and no reduction finds the input's range."""
    import jax
    import jax.numpy as jnp

    from streamflow_jax import ops

    x = jax.ShapeDtypeStruct((4, 32, 64), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((48, 64), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    static = jax.jit(ops.fp8_matmul).lower(x, w, s, s).as_text(dialect="hlo")
    dynamic = jax.jit(ops.fp8_matmul).lower(x, w, s).as_text(dialect="hlo")
    for hlo in (static, dynamic):
        assert fp8_dot_operand_types(hlo) == (["f8e4m3fn", "f8e4m3fn"], "bf16")
    assert " reduce(" in dynamic and " reduce(" not in static
