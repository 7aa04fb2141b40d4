"""FP8 quantization (``quantize(model, "fp8")``): the scheme against an independent torch
emulation of it on diffusers' own transformers, its error against float32 diffusers, the digits
model's accuracy, parameter bytes, and the quantized model in jit, scan and the stream engine."""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import UNETS, VARIANTS, make_sd3, randomize, sd3_inputs, torch_velocity
from flax import nnx
from test_flux import flux_inputs, make_flux, reference_velocity

import streamflow_jax as sf
from streamflow_jax import ops
from streamflow_jax.eval import digit_accuracy
from streamflow_jax.models import FlowModel, abstract_module, family_of
from streamflow_jax.pipelines import DIGITS_DIR, DigitsPipeline
from streamflow_jax.models import FAMILIES
from streamflow_jax.quantization import Fp8Linear, parameter_bytes, quantize

E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------------
# The reference: the same scheme written independently in torch, on diffusers' modules
# ---------------------------------------------------------------------------------------------


def _torch_fake_quant(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor e4m3 with a power-of-two scale bringing the largest magnitude into
    (224, 448], rounded by torch's own float8 conversion, back to float32."""
    amax = t.abs().max().float()
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX))) if amax > 0 else torch.tensor(1.0)
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def fake_quantize_diffusers(model: torch.nn.Module, pattern: str) -> int:
    """Replaces the forward of every ``nn.Linear`` whose name matches ``pattern`` by the FP8
    emulation (weights and inputs quantized); returns how many."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and re.search(pattern, name):
            wq = _torch_fake_quant(mod.weight.detach())
            mod.forward = lambda x, wq=wq, b=mod.bias: torch.nn.functional.linear(_torch_fake_quant(x), wq, b)
            n += 1
    return n


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _with_model(pipe, model):
    """The same pipeline (conditioning, scheduler) around another model."""
    out = copy.copy(pipe)
    out.model = model
    return out


def _fp8_layers(model: FlowModel) -> list[Fp8Linear]:
    return [node for _, node in nnx.iter_graph(model.module) if isinstance(node, Fp8Linear)]


# Tolerances. Against the torch emulation the differences are float32 summation order, and now
# and then one activation that float32 noise puts on the other side of an e4m3 rounding boundary
# (one e4m3 step, 6%, on one element): measured <= 2e-5 relative over SD3, SD3.5-medium,
# SD3.5-large and both Flux variants (3 seeds each) and 1e-6 to 4e-5 on the UNet, but 1.05e-3 on
# one UNet seed (a flip). Against float32 the error is FP8's own: e4m3 keeps 3 mantissa bits
# (relative rounding error up to 2^-4, ~3.6% rms per operand) on both operands of every block
# linear, compounded through the chained projections of 2-3 blocks; measured 0.058-0.138
# (max |err| / max |v|) on the same 15 transformers, 0.021-0.032 on the UNet (3 seeds). The
# digits model keeps all its accuracy (below).
VS_EMULATION, VS_FLOAT32 = 3e-3, 0.2


@pytest.mark.parametrize("variant", ["sd3", "sd35_medium"])
def test_sd3_velocity(tmp_path, variant):
    ref = make_sd3(tmp_path / "src", variant, seed=1)
    model = sf.load(tmp_path / "src")
    x, t, cond = sd3_inputs(VARIANTS[variant], 3, 8, 8, seed=1)
    want = torch_velocity(ref, x, t, cond)
    got = np.asarray(quantize(model, "fp8").velocity(x, t, cond))
    assert fake_quantize_diffusers(ref, FAMILIES["SD3Transformer2DModel"].fp8_linears) == (47 if variant == "sd35_medium" else 25)
    want_fp8 = torch_velocity(ref, x, t, cond)
    assert _rel(got, want_fp8) <= VS_EMULATION
    assert 0.01 < _rel(got, want) <= VS_FLOAT32  # quantized for real, and not more than FP8 costs


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_velocity(tmp_path, guidance):
    ref = make_flux(tmp_path / "src", guidance, seed=2)
    model = sf.load(tmp_path / "src")
    x, t, cond = flux_inputs(3, 8, 8, guidance=guidance, seed=2)
    want = reference_velocity(ref, x, t, cond)
    q = quantize(model, "fp8")
    got = np.asarray(q.velocity(x, t, cond))
    assert fake_quantize_diffusers(ref, FAMILIES["FluxTransformer2DModel"].fp8_linears) == len(_fp8_layers(q)) == 40
    want_fp8 = reference_velocity(ref, x, t, cond)
    assert _rel(got, want_fp8) <= VS_EMULATION
    assert 0.01 < _rel(got, want) <= VS_FLOAT32


def test_flux_split_concat_product(tmp_path, monkeypatch):
    """FP8 ``proj_out`` split over its parts (``$STREAMFLOW_JAX_CONCAT_PRODUCT=split``) quantizes
    each part with the concatenation's scale: the emulation's numbers, dynamic and calibrated, and
    calibration measures the same scales."""
    from test_calibrate import _scales

    ref = make_flux(tmp_path / "src", True, seed=4)
    x, t, cond = flux_inputs(3, 8, 8, seed=4)
    q = quantize(sf.load(tmp_path / "src"), "fp8")
    fake_quantize_diffusers(ref, FAMILIES["FluxTransformer2DModel"].fp8_linears)
    want = reference_velocity(ref, x, t, cond)
    concat = np.asarray(q.velocity(x, t, cond))
    static = sf.calibrate(q, lambda m: m.velocity(x, t, cond))
    static_concat = np.asarray(static.velocity(x, t, cond))
    monkeypatch.setenv("STREAMFLOW_JAX_CONCAT_PRODUCT", "split")
    split = np.asarray(q.velocity(x, t, cond))
    assert _rel(split, want) <= VS_EMULATION and _rel(split, concat) <= VS_EMULATION
    assert _scales(sf.calibrate(q, lambda m: m.velocity(x, t, cond))) == _scales(static)
    assert _rel(static.velocity(x, t, cond), static_concat) <= VS_EMULATION


def test_unet_noise_prediction(tmp_path):
    """The UNet's rule: the linears of its transformer blocks (attention and GEGLU), checked on
    diffusers' own UNet with the same emulation; convolutions and embeddings stay float32."""
    import diffusers

    ref = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 3, std=0.1).eval()
    ref.save_pretrained(tmp_path / "src")
    q = quantize(sf.load(tmp_path / "src"), "fp8")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 16, 16, 4), dtype=np.float32)
    t = np.array([999, 500, 1], np.float32)
    ehs = rng.standard_normal((3, 5, UNETS["sd15"]["cross_attention_dim"]), dtype=np.float32)

    def diffusers_eps():
        with torch.no_grad():
            out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ehs)).sample
        return out.permute(0, 2, 3, 1).numpy()

    want = diffusers_eps()
    got = np.asarray(jax.jit(lambda m, x, t, e: m.module(x, t, e))(q, x, t, ehs))
    # 6 transformer blocks (2 down, 1 mid, 3 up) x (attn1: 4, attn2: 4, GEGLU: 2)
    assert fake_quantize_diffusers(ref, FAMILIES["UNet2DConditionModel"].fp8_linears) == len(_fp8_layers(q)) == 6 * 10
    assert _rel(got, diffusers_eps()) <= VS_EMULATION
    assert 0.001 < _rel(got, want) <= VS_FLOAT32
    assert q.module.conv_in.kernel[...].dtype == jnp.float32


def test_quantized_layers(tmp_path):
    """Weights in e4m3 as [out, in] with power-of-two scales; embedders and the final
    projection untouched; the other parameters keep their dtype."""
    make_flux(tmp_path / "src", True)
    model = sf.load(tmp_path / "src", dtype="bfloat16")
    q = quantize(model, "fp8")
    assert q.class_name == model.class_name and q.config == model.config and q.family is model.family
    layers = _fp8_layers(q)
    for layer in layers:
        w, s = layer.weight[...], float(layer.weight_scale[...])
        assert w.dtype == jnp.float8_e4m3fn and w.ndim == 2
        assert s == 2.0 ** np.round(np.log2(s))
        assert 224 <= float(jnp.max(jnp.abs(w.astype(jnp.float32)))) <= 448  # (224, 448] before rounding
        assert layer.bias is None or layer.bias[...].dtype == jnp.bfloat16
    mod = q.module
    assert mod.transformer_blocks[0].attn.to_q.weight[...].shape == (32, 32)
    assert mod.single_transformer_blocks[0].proj_mlp.weight[...].shape == (128, 32)
    for name in ("x_embedder", "context_embedder", "proj_out"):
        assert getattr(mod, name).kernel[...].dtype == jnp.bfloat16
    assert mod.norm_out.linear.kernel[...].dtype == jnp.bfloat16
    assert q.dtype == jnp.bfloat16
    fp8 = sum(layer.weight[...].size for layer in layers)  # the repr says how much is FP8 (it said bfloat16 only)
    assert repr(q).endswith(f", bfloat16, {fp8 / 1e6:.1f}M of them FP8)") and "FP8" not in repr(model)


# ---------------------------------------------------------------------------------------------
# The embedded digits model: accuracy, bytes, jit / scan / stream engine
# ---------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 8)


@pytest.fixture(scope="module")
def digits():
    return DigitsPipeline.load(DIGITS_DIR)


def test_digits_keep_their_accuracy(digits):
    labels = LABELS[1::4]  # 2 of each digit
    quantized = _with_model(digits, quantize(digits.model, "fp8"))
    images = quantized(labels, steps=8, guidance_scale=3.0, seed=0)
    assert digit_accuracy(images, labels) >= 0.9  # measured 1.0 (float32: 1.0)
    # the stream engine runs it too; per-tensor activation scales couple a batch's elements,
    # so the engine's batches (other companions) move pixels a little: measured mean 0.014 (8 steps)
    streamed = quantized.stream(labels, steps=8, guidance_scale=3.0, seed=0)
    assert digit_accuracy(streamed, labels) >= 0.9
    assert float(np.mean(np.abs(streamed - images))) < 0.05


@pytest.fixture
def fp8_attention(monkeypatch):
    """$STREAMFLOW_JAX_ATTENTION=fp8 for one test. Read at trace time; the models' programs are
    keyed by it too (``ops.trace_switches``), so no cache needs clearing either way."""
    from streamflow_jax import ops

    monkeypatch.setenv(ops.ATTENTION_ENV, "fp8")
    yield


def test_digits_keep_their_accuracy_with_fp8_attention(digits, fp8_attention):
    """FP8 attention (on this CPU: the XLA-written emulation of cuDNN's) on top of the FP8
    linears: the digits keep their accuracy, and the images moved (the switch took effect)."""
    labels = LABELS[1::4]
    quantized = _with_model(digits, quantize(digits.model, "fp8"))
    images = quantized(labels, steps=8, guidance_scale=3.0, seed=0)
    assert digit_accuracy(images, labels) >= 0.9  # measured 1.0
    from streamflow_jax import ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ops.ATTENTION_ENV, "xla")
        plain = quantized(labels, steps=8, guidance_scale=3.0, seed=0)
    moved = float(np.mean(np.abs(images - plain)))
    assert 1e-4 < moved < 0.05, moved  # measured 0.026 in [0, 1]


def test_digits_bfloat16_accuracy_and_bytes():
    pipe = DigitsPipeline.load(DIGITS_DIR, dtype="bfloat16")
    q = quantize(pipe.model, "fp8")
    ratio = parameter_bytes(q) / parameter_bytes(pipe.model)
    assert 0.5 <= ratio <= 0.56  # measured 0.542: the embedders and proj_out stay bf16
    images = _with_model(pipe, q)(LABELS[::4], steps=8, guidance_scale=3.0, seed=1)
    assert digit_accuracy(images, LABELS[::4]) >= 0.9


@pytest.mark.parametrize("class_name,preset,most", [
    ("SD3Transformer2DModel", "sd3_medium", 0.53),   # measured 0.519
    ("FluxTransformer2DModel", "dev", 0.51),         # measured 0.503
    ("UNet2DConditionModel", "sd15", 0.87),          # measured 0.859: convolutions stay bf16
])
def test_full_size_bytes(class_name, preset, most):
    """The published architectures, quantized abstractly (``jax.eval_shape``: nothing allocated)."""
    family = family_of(class_name)
    config = getattr(family.config_cls, preset)()
    graphdef, state = nnx.split(abstract_module(family, config))
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), state)
    bf16 = FlowModel(class_name, config, graphdef, state, family=family)
    q = jax.eval_shape(lambda m: quantize(m, "fp8"), bf16)
    assert parameter_bytes(q) / parameter_bytes(bf16) <= most


def test_sample_inside_jit(digits):
    """A quantized FlowModel is a pytree: it goes into a caller's jit and through the scan."""
    q = quantize(digits.model, "fp8")
    labels = np.arange(4)
    cond = digits.cond(labels)
    noise = digits.noise(4, 3)
    grid = sf.schedules.flow_match(4)
    inside = jax.jit(lambda m, n, c: sf.sample(m, n, grid, c))(q, noise, cond)
    np.testing.assert_allclose(np.asarray(inside), np.asarray(sf.sample(q, noise, grid, cond)), rtol=1e-5, atol=1e-5)


def test_errors_and_include(digits):
    with pytest.raises(ValueError, match="unsupported quantization mode 'int4'"):
        quantize(digits.model, "int4")
    q = quantize(digits.model, "fp8")
    with pytest.raises(ValueError, match="is it quantized already"):
        quantize(q, "fp8")
    with pytest.raises(ValueError, match=r"include='\(\[' is not a regular expression"):
        quantize(digits.model, "fp8", include="([")
    only = quantize(digits.model, "fp8", include=r"^transformer_blocks\.0\.attn\.to_q$")
    assert [type(only.module.transformer_blocks[0].attn.to_q).__name__, len(_fp8_layers(only))] == ["Fp8Linear", 1]
    # proj_out gives SD3's compute dtype: quantized, the model failed when run (AttributeError)
    for include in (r"^proj_out$", "", ".*"):
        with pytest.raises(ValueError, match=f"include={re.escape(repr(include))} picks proj_out, which stays in"):
            quantize(digits.model, "fp8", include=include)
    with pytest.raises(ValueError, match="include must be a regular expression .*got 3"):
        quantize(digits.model, "fp8", include=3)
    noise, cond = digits.noise(2, 0), {k: v[:2] for k, v in digits.conditioning.items()}
    assert np.isfinite(np.asarray(sf.sample(only, noise, sf.schedules.flow_match(2), cond))).all()
    family = family_of("AutoencoderTiny")
    config = family.config_cls()
    graphdef, state = nnx.split(abstract_module(family, config))
    taesd = FlowModel("AutoencoderTiny", config, graphdef, state, family=family)
    with pytest.raises(ValueError, match="no FP8 rule for the taesd family"):
        jax.eval_shape(lambda m: quantize(m, "fp8"), taesd)


def test_save_and_load_a_quantized_model(tmp_path):
    """``sf.save`` of a quantized model writes its e4m3 weights as they are and lists the FP8
    layers; ``sf.load`` restores the same quantized model (the same velocity, bit for bit; with
    ``dtype`` the float parameters cast, the FP8 ones kept). A bad layer list is an error naming
    the file."""
    import json

    from streamflow_jax.quantization import quantized_layers

    make_sd3(tmp_path / "src")
    base = sf.load(tmp_path / "src")
    q = quantize(base, "fp8")
    sf.save(q, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["streamflow_jax"]
    assert meta["quantization"] == {"mode": "fp8", "layers": quantized_layers(q)} and len(quantized_layers(q)) > 10
    index = json.loads((tmp_path / "q" / "params" / "parts.json").read_text())
    assert sum(d == "float8_e4m3fn" for d in index["dtypes"].values()) == len(quantized_layers(q))
    loaded = sf.load(tmp_path / "q")
    assert quantized_layers(loaded) == quantized_layers(q) and parameter_bytes(loaded) == parameter_bytes(q)
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(loaded.velocity(x, t, cond)), np.asarray(q.velocity(x, t, cond)))
    half = sf.load(tmp_path / "q", dtype="bfloat16")
    assert half.dtype == jnp.bfloat16 and quantized_layers(half) == quantized_layers(q)
    assert {str(layer.weight[...].dtype) for layer in _fp8_layers(half)} == {"float8_e4m3fn"}
    cfg = tmp_path / "q" / "config.json"
    raw = json.loads(cfg.read_text())
    for bad, message in ((["transformer_blocks.0.attn.nope"], "no linear layer named 'transformer_blocks.0.attn.nope'"),
                         ("all", "quantization.layers must be a list of layer names")):
        raw["streamflow_jax"]["quantization"]["layers"] = bad
        cfg.write_text(json.dumps(raw))
        with pytest.raises(sf.ConversionError, match=re.escape(str(cfg)) + ".*" + re.escape(message)):
            sf.load(tmp_path / "q")


def test_convert_straight_to_fp8(tmp_path, capsys):
    """``convert --quantize fp8`` writes the model part by part as ``quantize`` makes it: loaded,
    it is ``quantize(load(src, dtype))`` bit for bit, and ``--quantize`` on it again changes
    nothing. A family without an FP8 rule is refused before anything is written."""
    import diffusers
    from conftest import VAES

    from streamflow_jax.cli import main as cli
    from streamflow_jax.quantization import quantized, quantized_layers

    make_sd3(tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "q"), "--quantize", "fp8", "--dtype", "bfloat16",
                "-q"]) == 0
    assert capsys.readouterr().out.strip().endswith("q (fp8)")
    conv = sf.load(tmp_path / "q")
    want = quantize(sf.load(tmp_path / "src", dtype="bfloat16"), "fp8")
    assert quantized_layers(conv) == quantized_layers(want) and parameter_bytes(conv) == parameter_bytes(want)
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(conv.velocity(x, t, cond), np.float32),
                                  np.asarray(want.velocity(x, t, cond), np.float32))
    assert quantized(conv) is conv
    diffusers.AutoencoderKL(**VAES["sd"]).save_pretrained(tmp_path / "vae")
    assert cli(["convert", str(tmp_path / "vae"), str(tmp_path / "vae-q"), "--quantize", "fp8", "-q"]) == 1
    assert "no FP8 rule for the vae family" in capsys.readouterr().err and not (tmp_path / "vae-q").exists()


def test_loras_go_in_before_quantizing(tmp_path):
    """A LoRA merged into an FP8 model would land in the weights' scaled units (it used to,
    silently): refused, saying what to do; merged first, then quantized, the model is as far
    from the float merged model as FP8 puts the base from the float base."""
    from test_lora import make_peft_lora

    from streamflow_jax.quantization import is_quantized

    ref = make_sd3(tmp_path / "sd3", "sd35_medium", seed=4)
    lora = make_peft_lora(ref, ["to_q", "to_k", "to_v"], tmp_path / "l.safetensors", "transformer")
    base = sf.load(tmp_path / "sd3")
    q = quantize(base, "fp8")
    assert is_quantized(q) and not is_quantized(base)
    with pytest.raises(ValueError, match=r"FP8 \(sf.quantize\): LoRAs merge into float weights; apply them first"):
        sf.apply_loras(q, [lora])
    merged = sf.apply_loras(base, [lora])
    x, t, cond = sd3_inputs(VARIANTS["sd35_medium"], 2, 8, 8)
    v = lambda m: np.asarray(m.velocity(x, t, cond))  # noqa: E731
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
    fp8_error = rel(v(q), v(base))  # measured 0.117 on this tiny random model
    assert rel(v(quantize(merged, "fp8")), v(merged)) <= 1.5 * fp8_error  # measured 0.114
    assert rel(v(merged), v(base)) > 0.03  # the LoRA counts (measured 0.066)


# ---------------------------------------------------------------------------------------------
# ops: the scale, the rounding, and the HLO form XLA compiles into FP8 GEMMs
# ---------------------------------------------------------------------------------------------


def test_fp8_scale_and_rounding():
    amax = np.array([0.0, 1e-3, 0.5, 224.0, 224.01, 448.0, 449.0, 3e4], np.float32)
    scales = np.array([float(ops.fp8_scale(a)) for a in amax])
    assert scales[0] == 1.0
    assert np.all(np.log2(scales) == np.round(np.log2(scales)))  # powers of two
    ratio = amax[1:] / scales[1:]
    assert np.all((ratio > 224) & (ratio <= 448))
    # at and next to every power of two the scale takes (where a float log2 is off by one):
    # exactly the power of two that numpy's frexp gives
    at = (448.0 * 2.0 ** np.arange(-120, 119)).astype(np.float32)
    amax = np.concatenate([at, np.nextafter(at, np.float32(0)), np.nextafter(at, np.float32(np.inf))])
    got = np.asarray(jax.jit(jax.vmap(ops.fp8_scale))(jnp.asarray(amax)))
    mantissa, exponent = np.frexp(amax.astype(np.float64) / 448.0)  # r = m * 2**e, m in [0.5, 1)
    want = np.ldexp(1.0, exponent - (mantissa == 0.5))  # the least power of two >= r
    np.testing.assert_array_equal(got, want)
    x = np.array([-1000.0, -448.0, -0.3, 0.0, 1.7, 300.0, 460.0], np.float32)
    got = np.asarray(ops.quantize_fp8(jnp.asarray(x), jnp.float32(1.0)).astype(jnp.float32))
    want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)  # ml_dtypes rounds
    np.testing.assert_array_equal(got, want)


def test_fp8_matmul_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 48)).astype(np.float32) * 3
    w = rng.standard_normal((48, 40)).astype(np.float32) * 0.1  # [in, out]

    def np_fake_quant(a):
        scale = 2.0 ** np.ceil(np.log2(np.abs(a).max() / E4M3_MAX))
        return (a / scale).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale

    want = np_fake_quant(x) @ np_fake_quant(w)
    scale = ops.fp8_scale(jnp.max(jnp.abs(w)))
    got = ops.fp8_matmul(jnp.asarray(x), ops.quantize_fp8(jnp.asarray(w.T), scale), scale)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert _rel(got, x @ w) > 1e-3  # and it did quantize


def fp8_dot_operand_types(hlo: str) -> tuple[list[str], str]:
    """The element types of the first ``dot``'s operands and of its result, in HLO text."""
    types = {m[1]: m[2] for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[", hlo, re.M)}
    dot = next(line for line in hlo.splitlines() if " dot(" in line)
    operands = re.search(r"dot\(([^)]*)\)", dot)[1].replace("%", "").split(", ")
    return [types[o] for o in operands], re.search(r"= (\w+)\[", dot)[1]


def test_fp8_matmul_hlo_multiplies_e4m3_operands():
    """The dot takes both operands in e4m3 (the activation converted, the weight as stored),
    with the scales applied to its output: the form XLA compiles into an FP8 GEMM for Hopper,
    whether Triton's or cuBLASLt's. Dequantized operands (``convert(f8) * scale`` into a bf16
    dot) compiled for an H200 into dequantizing kernels and a bf16 GEMM under XLA's default
    flags (``benchmarks/hlo_gpu.py``, deviceless on the CPU)."""
    x = jax.ShapeDtypeStruct((4, 32, 64), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((48, 64), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    hlo = jax.jit(ops.fp8_matmul).lower(x, w, s).as_text(dialect="hlo")
    operands, result = fp8_dot_operand_types(hlo)
    assert operands == ["f8e4m3fn", "f8e4m3fn"] and result == "bf16"
    dot = next(line for line in hlo.splitlines() if " dot(" in line)
    assert "lhs_contracting_dims={2}, rhs_contracting_dims={1}" in dot  # the weight is not transposed
    # float16 accumulates into float32 (the unscaled sums overflow float16), then casts back
    hlo16 = jax.jit(ops.fp8_matmul).lower(jax.ShapeDtypeStruct((4, 32, 64), jnp.float16), w, s).as_text(dialect="hlo")
    assert fp8_dot_operand_types(hlo16) == (["f8e4m3fn", "f8e4m3fn"], "f32")


def test_fp8_matmul_float16_does_not_overflow():
    """Unscaled e4m3 sums reach K * 448^2: float16 inputs still give finite, right results."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 1024)) * 4).astype(np.float16).astype(np.float32)  # float16's values
    w = rng.standard_normal((1024, 16)).astype(np.float32) + 2.0  # same-sign sums: large
    scale = ops.fp8_scale(jnp.max(jnp.abs(w)))
    wq = ops.quantize_fp8(jnp.asarray(w.T), scale)
    got32 = ops.fp8_matmul(jnp.asarray(x), wq, scale)
    got16 = ops.fp8_matmul(jnp.asarray(x, jnp.float16), wq, scale)
    assert np.isfinite(np.asarray(got16, np.float32)).all()
    assert _rel(got16, got32) < 1e-3  # float16's rounding of the output alone
    # a small activation: its scale (2^-18 here) is below float16's normal range, which a backend
    # flushes to zero: every value saturated (relative error 2) and an exact zero became NaN
    small = (x[:2] * 1e-4).astype(np.float16).astype(np.float32)
    small[0, 0] = 0.0
    got32 = ops.fp8_matmul(jnp.asarray(small), wq, scale)
    got16 = ops.fp8_matmul(jnp.asarray(small, jnp.float16), wq, scale)
    assert np.isfinite(np.asarray(got16, np.float32)).all() and _rel(got16, got32) < 1e-3
    assert float(ops.fp8_scale(jnp.max(jnp.abs(small)))) < 2.0 ** -14
    q16 = ops.quantize_fp8(jnp.asarray(small, jnp.float16), ops.fp8_scale(jnp.max(jnp.abs(small))))
    np.testing.assert_array_equal(np.asarray(q16), np.asarray(ops.quantize_fp8(
        jnp.asarray(small), ops.fp8_scale(jnp.max(jnp.abs(small))))))


def test_onnx_export_keeps_the_fp8_numerics(tmp_path):
    """Exported (``export --quantize fp8``), the graph rounds to e4m3 as XLA does: ONNX Runtime
    gives the quantized model's velocity (measured 9e-7). The weights are FLOAT8E4M3FN
    initializers behind DequantizeLinear, and (dynamic scales) activations go through Cast to
    FLOAT8E4M3FN; a calibrated model's export is test_calibrate's."""
    ort = pytest.importorskip("onnxruntime")
    from streamflow_jax.export import export_onnx, velocity_spec

    make_sd3(tmp_path / "src")
    q = quantize(sf.load(tmp_path / "src"), "fp8")
    exported = export_onnx(q, velocity_spec(q, batch="1:2:4", latent=8, text_len=7), tmp_path / "onnx", progress=False)
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 3, 8, 8)
    session = ort.InferenceSession(str(exported.onnx_path))
    feeds = {"x": x, "t": t, **cond}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    assert _rel(got, np.asarray(q.velocity(x, t, cond))) <= 1e-4
    # in bfloat16 too (a valid graph: the product is MatMul, not Einsum, which ONNX refuses in
    # bfloat16; ONNX Runtime's CPU provider cannot run it, TensorRT's parser can read it)
    import onnx

    half = export_onnx(q, velocity_spec(q, batch="1:2:4", latent=8, text_len=7, dtype="bfloat16"),
                       tmp_path / "onnx-bf16", progress=False)
    ops = {n.op_type for n in onnx.load(half.onnx_path).graph.node}
    assert "MatMul" in ops and "Einsum" not in ops
