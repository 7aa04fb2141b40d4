"""The switches behind issue 22's GPU levers: the attention-implementation switch (default
unchanged), and levers_gpu.py's variant table (XLA knows every flag) and ratios."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamflow_jax import ops
from streamflow_jax.stream import TICK_ENV, TICK_GRAPHS_ENV, TICKS_PER_CALL_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from first_image_gpu import ratios as cache_ratios  # noqa: E402
from levers_gpu import NEWER_XLA, VARIANTS, ratios  # noqa: E402


class FakeDevice:
    """What ``attention_implementation`` reads of a device."""

    def __init__(self, platform: str, compute_capability: str = "9.0"):
        self.platform, self.compute_capability = platform, compute_capability


H100, A100, CPU = FakeDevice("gpu", "9.0"), FakeDevice("gpu", "8.0"), FakeDevice("cpu", "")


def _impl(head_dim, device, dtype=jnp.bfloat16):
    return ops.attention_implementation(jnp.zeros((1, 4, 2, head_dim), dtype), device)


def test_default_rule_unchanged(monkeypatch):
    monkeypatch.delenv(ops.ATTENTION_ENV, raising=False)
    assert [_impl(k, H100) for k in (40, 64, 160, 256, 264, 36)] == ["cudnn"] * 4 + ["xla"] * 2
    assert [_impl(k, A100) for k in (64, 128, 160)] == ["cudnn", "cudnn", "xla"]
    assert _impl(64, H100, jnp.float32) == _impl(64, CPU) == "xla"
    monkeypatch.setenv(ops.ATTENTION_ENV, "auto")
    assert _impl(160, A100) == "xla" and _impl(160, H100) == "cudnn"


@pytest.mark.parametrize("setting,want", [
    ("xla", {40: "xla", 64: "xla", 160: "xla"}),
    ("cudnn", {40: "cudnn", 64: "cudnn", 160: "cudnn"}),  # even past the A100's 128: cuDNN may refuse
    ("40=xla", {40: "xla", 64: "cudnn", 160: "xla"}),    # 160 keeps the A100 rule
    ("40=xla, 160=cudnn", {40: "xla", 64: "cudnn", 160: "cudnn"}),
])
def test_switch(monkeypatch, setting, want):
    monkeypatch.setenv(ops.ATTENTION_ENV, setting)
    assert {k: _impl(k, A100) for k in want} == want
    assert _impl(64, CPU) == _impl(64, A100, jnp.float32) == "xla"  # never cuDNN where it cannot run


@pytest.mark.parametrize("bad", ["fast", "40=fast", "k=xla", "40"])
def test_switch_refuses_typos(monkeypatch, bad):
    monkeypatch.setenv(ops.ATTENTION_ENV, bad)
    with pytest.raises(ValueError, match=ops.ATTENTION_ENV):
        ops.attention_choice(40)


def test_fp8_attention_switch_per_device(monkeypatch):
    """$STREAMFLOW_JAX_ATTENTION=fp8: cuDNN's FP8 attention where it serves (FP8 tensor cores,
    half precision, head dim a multiple of 16 up to 256), the XLA-written emulation on a CPU,
    the usual rule elsewhere and wherever the caller cannot take it (a bias, a causal mask)."""
    ada = FakeDevice("gpu", "8.9")
    monkeypatch.setenv(ops.ATTENTION_ENV, "fp8")
    assert [_impl(k, H100) for k in (64, 128, 256)] == ["cudnn_fp8"] * 3
    assert [_impl(k, H100) for k in (40, 80, 160, 264)] == ["cudnn", "cudnn_fp8", "cudnn_fp8", "xla"]  # 40: not x16
    assert _impl(64, ada) == "cudnn_fp8" and _impl(64, A100) == "cudnn"  # no FP8 tensor cores on an A100
    assert _impl(64, H100, jnp.float32) == "xla" and _impl(64, CPU) == "xla_fp8"
    q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    assert ops.attention_implementation(q, H100, fp8=False) == "cudnn"
    assert ops.attention_implementation(q, CPU, fp8=False) == "xla"
    monkeypatch.setenv(ops.ATTENTION_ENV, "128=fp8")
    assert (_impl(64, H100), _impl(128, H100)) == ("cudnn", "cudnn_fp8")


def _reference_fp8_attention(q, k, v, scale):
    """cuDNN's FP8 attention forward as its documentation states it, in torch (float64, torch's
    own e4m3): descale * (q8 k8^T) * scale, softmax, P quantized with 448, descales on P V, the
    output quantized with scale 1 / amax(v)-scale."""
    import torch

    def scale_of(x):  # the power of two that brings amax into (224, 448]
        m = float(np.abs(x).max())
        return 2.0 ** np.ceil(np.log2(m / 448)) if m > 0 else 1.0

    def q8(x, s):
        return torch.from_numpy(x / s).to(torch.float8_e4m3fn).to(torch.float64)

    sq, sk, sv = scale_of(q), scale_of(k), scale_of(v)
    qh, kh, vh = (q8(a, s).permute(0, 2, 1, 3) for a, s in ((q, sq), (k, sk), (v, sv)))
    p = torch.softmax(qh @ kh.transpose(-1, -2) * (sq * sk * scale), dim=-1)
    p8 = (p * 448).to(torch.float8_e4m3fn).to(torch.float64)
    o = p8 @ vh * (sv / 448)
    o8 = (o / sv).to(torch.float8_e4m3fn).to(torch.float64) * sv
    return o8.permute(0, 2, 1, 3).numpy()


def test_fp8_attention_numerics():
    """The XLA-written FP8 attention against the same steps in torch (float64, torch's e4m3
    casts), and the cost of FP8 against full-precision attention: on random inputs (the worst
    case: flat softmax, so every probability is small) 6-9% RMS, against bf16's 0.5-1.3%."""
    rng = np.random.default_rng(0)
    for length, heads, dim, temperature in ((256, 4, 64, 1.0), (300, 2, 128, 3.0)):
        q, k, v = (rng.standard_normal((1, length, heads, dim)).astype(np.float32) for _ in range(3))
        q = q * temperature
        scale = dim ** -0.5
        got = np.asarray(ops.fp8_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=scale, cudnn=False))
        want = _reference_fp8_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale)
        # float32 logits against float64 ones: now and then a probability or an output lands on
        # the other side of an e4m3 rounding boundary (one step: 6.25%)
        close = np.isclose(got, want, rtol=1e-5, atol=1e-6)
        assert close.mean() > 0.99 and np.abs(got - want).max() <= 0.07 * np.abs(want).max()
        exact = np.asarray(ops.attention(q, k, v))
        rms = float(np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)))
        assert 0.02 < rms < 0.1, rms


def test_fp8_attention_in_the_sd3_velocity(tiny_sd3, monkeypatch):
    """The switch reaches the model: SD3's velocity with FP8 attention (the CPU's emulation)
    differs from the full-precision one, and stays within 10% RMS of diffusers' float32
    velocity."""
    from conftest import SD3_TINY, sd3_inputs, torch_velocity

    import streamflow_jax as sf

    path, ref = tiny_sd3
    model = sf.load(path)
    x, t, cond = sd3_inputs(SD3_TINY, batch=2, height=16, width=16)
    want = torch_velocity(ref, x, t, cond)
    got = {}
    for setting in ("auto", "fp8"):
        monkeypatch.setenv(ops.ATTENTION_ENV, setting)
        # the module's velocity in a new function: traced again (FlowModel.velocity's program
        # is cached by the model's structure and keeps the setting it was first traced with)
        velocity = jax.jit(lambda m, x, t, c: m.module.velocity(x, t, c))
        got[setting] = np.asarray(velocity(model, x, t, cond))
    rms = lambda a: float(np.sqrt(np.mean((a - want) ** 2) / np.mean(want**2)))  # noqa: E731
    assert rms(got["auto"]) < 1e-4  # float32 parity (test_sd3_parity bounds it closer, by max error)
    assert 1e-3 < rms(got["fp8"]) < 0.1, rms(got["fp8"])


@pytest.mark.parametrize("variant", ["sd3", "sd35_medium"])
def test_modulation_apart_matches_diffusers(tmp_path, monkeypatch, variant):
    """``$STREAMFLOW_JAX_MODULATION=apart`` on SD3 and SD3.5-medium (dual attention: nine
    modulation chunks a block; the last block's text modulation is the continuous kind):
    diffusers' velocity (float32), and the default's up to rounding."""
    from conftest import VARIANTS, make_sd3, sd3_inputs, torch_velocity

    import streamflow_jax as sf

    ref = make_sd3(tmp_path / variant, variant, seed=8)
    model = sf.load(tmp_path / variant)
    x, t, cond = sd3_inputs(VARIANTS[variant], 2, 8, 8, seed=8)
    want = torch_velocity(ref, x, t, cond)
    got = {}
    for setting in ("auto", "apart"):
        monkeypatch.setenv(ops.MODULATION_ENV, setting)
        got[setting] = np.asarray(model.velocity(x, t, cond))
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
    assert rel(got["apart"], want) <= 1e-4 and rel(got["apart"], got["auto"]) <= 1e-5
    assert ops.modulation_choice() == "apart" and ops.modulation_choice("auto") == "merged"


def test_attention_still_runs_with_the_switch(monkeypatch):
    monkeypatch.setenv(ops.ATTENTION_ENV, "cudnn")  # on this CPU: XLA's lowering regardless
    q = jnp.ones((1, 3, 2, 8))
    assert ops.attention(q, q, q).shape == (1, 3, 2, 8)


@pytest.mark.parametrize("setting", ["groups", "channels", "onepass", "auto"])
def test_group_norm_switch_matches_torch(monkeypatch, setting):
    """Every way of reducing GroupNorm's statistics gives torch's GroupNorm (no affine), in
    float32 and from bfloat16 input, on uneven sides and an offset mean."""
    import numpy as np
    import torch

    monkeypatch.setenv(ops.GROUPNORM_ENV, setting)
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 64)).astype(np.float32) * 3 + 1.5
    for dtype in (jnp.float32, jnp.bfloat16):
        xi = jnp.asarray(x, dtype)
        got = np.asarray(jax.jit(lambda v: ops.group_norm(v, 32, 1e-5))(xi))
        ref = torch.from_numpy(np.array(xi.astype(jnp.float32))).permute(0, 3, 1, 2)
        want = torch.nn.functional.group_norm(ref, 32, eps=1e-5).permute(0, 2, 3, 1).numpy()
        assert np.max(np.abs(got - want)) <= 1e-5


@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_one_pass_group_norm_does_not_cancel(monkeypatch, offset):
    """A mean far from zero (std 2): the one-pass moments are shifted, so their variance does
    not cancel; as close to float64's GroupNorm as the two-pass ways (torch's CPU GroupNorm is
    4e-3 off at offset 100, and wrong by thousands at 1e4)."""
    x = (np.random.default_rng(0).standard_normal((2, 16, 16, 64)) * 2 + offset).astype(np.float32)
    g = x.astype(np.float64).reshape(2, 16, 16, 32, 2)
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    errors = {}
    for setting in ("groups", "channels", "onepass"):
        monkeypatch.setenv(ops.GROUPNORM_ENV, setting)
        errors[setting] = float(np.abs(np.asarray(jax.jit(lambda v: ops.group_norm(v, 32, 1e-5))(x)) - want).max())
    assert errors["onepass"] <= max(errors["groups"], errors["channels"]) and errors["onepass"] < 2e-3 * offset / 1e4 + 1e-5


def test_group_norm_switch_refuses_typos(monkeypatch):
    monkeypatch.setenv(ops.GROUPNORM_ENV, "channel")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_GROUPNORM='channel': expected auto, groups, channels or onepass"):
        ops.group_norm(jnp.ones((1, 2, 2, 4)), 2, 1e-5)
    monkeypatch.delenv(ops.GROUPNORM_ENV)  # auto: what measured faster on the CPU, on an H200, and the rest's
    assert ops.group_norm_choice(platform="cpu") == "channels" and ops.group_norm_choice(platform="gpu") == "onepass"
    assert ops.group_norm_choice(platform="cuda") == "onepass" and ops.group_norm_choice(platform="tpu") == "groups"
    assert ops.group_norm_choice(platform="GPU") == "onepass" and ops.conv1x1_choice(platform="Cuda") == "dot"


def test_target_device_steers_the_trace_time_choices(monkeypatch):
    """Compiling ahead of time for a GPU from a CPU process (``benchmarks/hlo_gpu.py``): inside
    ``ops.target_device`` the platform choices are the target's, and they are restored after."""
    monkeypatch.delenv(ops.ATTENTION_ENV, raising=False)
    monkeypatch.delenv(ops.GROUPNORM_ENV, raising=False)
    monkeypatch.delenv(ops.CONV1X1_ENV, raising=False)
    monkeypatch.delenv(ops.CONV_LAYOUT_ENV, raising=False)
    q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    with ops.target_device(H100):
        assert ops.attention_implementation(q) == "cudnn" and ops.group_norm_choice() == "onepass"
        assert ops.conv1x1_choice() == "dot" and ops.conv_layout_choice() == "OHWI"
        with ops.target_device(A100):
            assert ops.attention_implementation(jnp.zeros((1, 4, 2, 160), jnp.bfloat16)) == "xla"
        assert ops.attention_implementation(jnp.zeros((1, 4, 2, 160), jnp.bfloat16)) == "cudnn"
    assert ops.attention_implementation(q) == "xla" and ops.group_norm_choice() == "channels"  # this CPU
    assert ops.conv1x1_choice() == "conv" and ops.conv_layout_choice() == "HWIO"


def test_a_trace_for_a_gpu_target_is_not_reused_on_this_cpu(tmp_path, monkeypatch):
    """A model's jitted function traced under ``target_device`` (the H100's one-pass GroupNorm)
    traces again outside it (this CPU's GroupNorm by channels): the target is part of the
    model's trace key. Before, the second lowering was the first's program, text for text."""
    import diffusers
    from conftest import VAES, randomize

    import streamflow_jax as sf
    from streamflow_jax.models import flow

    monkeypatch.delenv(ops.GROUPNORM_ENV, raising=False)
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1).save_pretrained(tmp_path / "vae")
    vae = sf.load(tmp_path / "vae")
    z = jnp.zeros((1, 8, 8, 4))
    with ops.target_device(H100):
        gpu = flow.decode_latents.lower(vae, z).as_text()
    cpu = flow.decode_latents.lower(vae, z).as_text()
    jax.clear_caches()
    fresh = flow.decode_latents.lower(vae, z).as_text()  # what this CPU traces with nothing cached
    assert cpu == fresh and gpu != cpu


def test_conv_layout_switch_and_round_trip(tmp_path, monkeypatch):
    """``FlowModel.with_conv_layout``: OHWI kernels are the HWIO ones transposed, decode as
    diffusers' VAE does (float32), come back bit for bit, and ``sf.save`` writes HWIO."""
    import diffusers
    from conftest import VAES, randomize

    import streamflow_jax as sf

    monkeypatch.delenv(ops.CONV_LAYOUT_ENV, raising=False)
    assert ops.conv_layout_choice() == "HWIO" and ops.conv_layout_choice("OHWI") == "OHWI"  # this CPU
    assert ops.conv_layout_choice(platform="gpu") == "OHWI" and ops.conv_layout_choice("hwio", platform="gpu") == "HWIO"
    monkeypatch.setenv(ops.CONV_LAYOUT_ENV, "nchw")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_CONV_LAYOUT='nchw': expected auto, hwio or ohwi"):
        ops.conv_layout_choice()
    import torch

    ref = randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1)
    ref.save_pretrained(tmp_path / "vae")
    vae = sf.load(tmp_path / "vae")
    assert vae.with_conv_layout("HWIO") is vae
    ohwi = vae.with_conv_layout("OHWI")
    hw, oh = vae.module.decoder.conv_in.kernel[...], ohwi.module.decoder.conv_in.kernel[...]
    assert oh.shape == (hw.shape[3], *hw.shape[:3])
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ohwi.module.decode(z)), want, rtol=1e-4, atol=1e-4)
    back = ohwi.with_conv_layout("HWIO")
    for a, b in zip(jax.tree_util.tree_leaves(back.state), jax.tree_util.tree_leaves(vae.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sf.save(ohwi, tmp_path / "saved")
    again = sf.load(tmp_path / "saved")
    for a, b in zip(jax.tree_util.tree_leaves(again.state), jax.tree_util.tree_leaves(vae.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="unsupported conv kernel layout 'NCHW'"):
        vae.with_conv_layout("NCHW")


def _count_convs(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


@pytest.mark.parametrize("layout", ["HWIO", "OHWI"])
def test_conv1x1_as_dot_matches_diffusers(tmp_path, monkeypatch, layout):
    """$STREAMFLOW_JAX_CONV1X1=dot: SD1.5's 1x1 convolutions (the transformers' conv
    ``proj_in``/``proj_out``, the resnets' shortcuts) run as matrix products, in either kernel
    layout, and the UNet still gives diffusers' noise prediction; only the 3x3 ones stay
    convolutions."""
    import diffusers
    import torch
    from conftest import UNETS, randomize

    import streamflow_jax as sf

    ref = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0, std=0.1).eval()
    ref.save_pretrained(tmp_path / "unet")
    model = sf.load(tmp_path / "unet").with_conv_layout(layout)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)
    t = np.array([999, 3], np.float32)
    ehs = rng.standard_normal((2, 5, 768), dtype=np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ehs)).sample
    want = want.permute(0, 2, 3, 1).numpy()
    convs = {}
    for setting in ("conv", "dot"):
        monkeypatch.setenv(ops.CONV1X1_ENV, setting)
        eps = lambda m, x, t, e: m.module(x, t, e)  # noqa: E731  (a new function: traced again)
        convs[setting] = _count_convs(eps, model, x, t, ehs)
        got = np.asarray(jax.jit(eps)(model, x, t, ehs))
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), setting
    # the transformers' proj_in/proj_out and the shortcuts: 19 of the tiny UNet's 47
    one_by_one = sum(1 for _, n in nnx_convs(model) if n.kernel.shape[:2] == (1, 1) or n.kernel.shape[1:3] == (1, 1))
    assert one_by_one > 0 and convs["conv"] - convs["dot"] == one_by_one


def nnx_convs(model):
    from flax import nnx

    from streamflow_jax.models.layers import Conv2d

    return [(p, n) for p, n in nnx.iter_graph(model.module) if isinstance(n, Conv2d)]


def test_conv1x1_switch_refuses_typos(monkeypatch):
    monkeypatch.delenv(ops.CONV1X1_ENV, raising=False)
    assert ops.conv1x1_choice() == "conv" and ops.conv1x1_choice("DOT") == "dot"  # this CPU
    assert ops.conv1x1_choice(platform="gpu") == "dot" and ops.conv1x1_choice("conv", platform="gpu") == "conv"
    monkeypatch.setenv(ops.CONV1X1_ENV, "gemm")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_CONV1X1='gemm': expected auto, conv or dot"):
        ops.conv1x1_choice()


def test_xla_knows_every_lever_flag():
    """An unknown flag in XLA_FLAGS aborts the process: every variant's flags parse here (GPU
    flags are fields of the same DebugOptions, so XLA:CPU parses them too)."""
    flags = " ".join(f for name, (f, _) in VARIANTS.items() if f and name not in NEWER_XLA)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(2).sum()))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
    assert list(VARIANTS)[0] == "default" and list(VARIANTS)[-1] == "default_again"
    switches = {ops.ATTENTION_ENV, ops.GROUPNORM_ENV, ops.CONV_LAYOUT_ENV, ops.CONV1X1_ENV, ops.SCAN_BLOCKS_ENV, TICK_ENV,
                TICK_GRAPHS_ENV, TICKS_PER_CALL_ENV, ops.GEMM_ENV, ops.CONCAT_PRODUCT_ENV, ops.MODULATION_ENV, "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_ALLOCATOR"}
    assert all(env_extra.keys() <= switches for _, env_extra in VARIANTS.values())
    assert NEWER_XLA <= set(VARIANTS)  # the flags only a newer XLA parses: named, and checked there (JAX 0.12)


def test_ratios():
    results = {"default": {"stream": {"ms_per_call": 20.0}, "sd3": {"ms_per_call": 40.0}},
               "cmdbuf_off": {"stream": {"ms_per_call": 25.0}, "sd3": {"error": "x"}},
               "cublaslt": {"stream": {"ms_per_call": 16.0}, "sd3": {"ms_per_call": 32.0}}}
    assert ratios(results, ["stream", "sd3"]) == {"cmdbuf_off": {"stream": 0.8},
                                                  "cublaslt": {"stream": 1.25, "sd3": 1.25}}


def test_cache_ratios():
    results = {"no_cache": {"stream": {"first_s": 20.0}, "sd3": {"first_s": 16.0}},
               "cache_cold": {"stream": {"first_s": 21.0}, "sd3": {"first_s": 17.0}},
               "cache_warm": {"stream": {"first_s": 5.0}, "sd3": {"error": "x"}}}
    assert cache_ratios(results, ["stream", "sd3"]) == {"stream": 0.25}


def test_fp8_benchmark_runs_its_variants(tmp_path):
    """fp8_gpu.py's plumbing, on tiny configs on this CPU (its ``--smoke``): bf16, dynamic and
    calibrated FP8, and calibrated FP8 with FP8 attention (here its CPU emulation), each
    compile, run and are compared in one JSON row (the device run's script must not be the
    first to run it). No speed is read from it."""
    import json

    out = tmp_path / "fp8.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_gpu.py"),
                           "--smoke", "--workloads", "sd3", "--static", "sd3", "--attention", "sd3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert "error" not in row, row
    for label in ("fp8", "fp8_static", "fp8_static_attention"):
        assert row[f"{label}_ms"] > 0 and 0 < row[f"{label}_max_rel_diff"] < 0.3
    assert row["fp8_static_attention_max_rel_diff"] != row["fp8_static_max_rel_diff"]  # the switch took
    assert row["fp8_GB"] < row["bf16_GB"] and row["calibrate_s"] > 0


def test_switches_read_while_tracing_retrace_when_changed(tmp_path, monkeypatch):
    """A trace-time switch changed within a process takes effect at the next call: the model's
    pytree structure (and its velocity's static arguments) carry the switches as they are set
    (``ops.trace_switches``), so jitted functions taking the model trace again, and going back
    finds the first program."""
    from conftest import VARIANTS, make_sd3, sd3_inputs

    import streamflow_jax as sf
    from streamflow_jax.models.flow import _velocity

    make_sd3(tmp_path / "sd3", "sd3", seed=7)
    model = sf.load(tmp_path / "sd3")
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8)
    seen = []

    @jax.jit
    def call(m, x):
        seen.append(os.environ.get(ops.ATTENTION_ENV))
        return m.velocity(x, t, cond)

    outs = []
    for setting in ("auto", "xla", "auto"):
        monkeypatch.setenv(ops.ATTENTION_ENV, setting)
        outs.append(np.asarray(call(model, x)))
    assert seen == ["auto", "xla"]  # traced once per setting
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    before = _velocity._cache_size()
    monkeypatch.setenv(ops.ATTENTION_ENV, "40=xla")
    model.velocity(x, t, cond)
    assert _velocity._cache_size() == before + 1  # the velocity's own program too


def test_a_variant_whose_flag_xla_does_not_know_says_so():
    """XLA aborts a process whose XLA_FLAGS it cannot parse, then prints every flag it knows:
    the variant's error names the flag (NEWER_XLA's on an older device), not that list's tail."""
    from common import run_child

    env = {**os.environ, "XLA_FLAGS": "--xla_gpu_no_such_flag=1", "JAX_PLATFORMS": "cpu"}
    got = run_child([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(1))"], env, timeout=120)
    assert got == {"error": "this XLA does not know a flag (--xla_gpu_no_such_flag=1)"}


def test_gemm_switch_and_its_compile_options(monkeypatch):
    """``$STREAMFLOW_JAX_GEMM``: ``auto`` is XLA's default until a device measures ``cublas``;
    ``cublas`` is two compile options on GPUs, none on this CPU; a typo is refused."""
    monkeypatch.delenv(ops.GEMM_ENV, raising=False)
    assert ops.gemm_choice() == "xla" and ops.compiler_options(platform="gpu") is None
    assert ops.compiler_options() is None  # this CPU
    monkeypatch.setenv(ops.GEMM_ENV, "cuBLAS")
    assert ops.compiler_options(platform="cuda") == {"xla_gpu_enable_triton_gemm": False,
                                                     "xla_gpu_dot_merger_threshold_mb": 0}
    assert ops.compiler_options(platform="cpu") is None
    with ops.target_device(H100):
        assert ops.compiler_options() == ops.compiler_options(platform="gpu")
    monkeypatch.setenv(ops.GEMM_ENV, "triton")
    with pytest.raises(ValueError, match=r"STREAMFLOW_JAX_GEMM='triton': expected auto, xla or cublas"):
        ops.check_switches()


@pytest.mark.parametrize("env,bad,choices", [(ops.CONCAT_PRODUCT_ENV, "sideways", "auto, concat or split"),
                                             (ops.MODULATION_ENV, "together", "auto, merged or apart")])
def test_every_trace_time_switch_is_checked_before_loading(monkeypatch, env, bad, choices):
    """``ops.check_switches`` (the CLI's first step) refuses a typo in each trace-time switch,
    naming it, rather than after a model has loaded (as both did when first added)."""
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=rf"{env}='{bad}': expected {choices}"):
        ops.check_switches()


@pytest.mark.parametrize("rows", [(1,), (2, 3), (20,)])
def test_fp8_products_of_few_rows_are_padded_for_cublas(monkeypatch, rows):
    """With cuBLAS GEMMs on a GPU (traced for one here: ``target_device``), an FP8 product of
    fewer than 16 rows is computed on 16 (zero rows added, then dropped): cuBLASLt's FP8 GEMM
    does not take a matrix-vector product, and XLA dequantized such weights per call. The
    result is the unpadded product's; XLA's GEMMs, the CPU and 16 rows or more are left alone."""
    from conftest import jaxpr_eqns

    from streamflow_jax.quantization import quantize_kernel

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((*rows, 48)), jnp.float32)
    weight, scale = quantize_kernel(rng.standard_normal((48, 40)).astype(np.float32))
    def padded(setting, device):
        fn = lambda v: ops.fp8_matmul(v, weight, scale)  # noqa: E731 - a new function: traced anew
        monkeypatch.setenv(ops.GEMM_ENV, setting)
        with contextlib.ExitStack() as stack:
            if device is not None:
                stack.enter_context(ops.target_device(device))
            jaxpr = jax.make_jaxpr(fn)(x)
            got = np.asarray(jax.jit(fn)(x))
        return any(e.primitive.name == "pad" for e in jaxpr_eqns(jaxpr.jaxpr)), got

    plain, want = padded("xla", None)
    assert not plain and want.shape == (*rows, 40)
    assert padded("cublas", None)[0] is False and padded("xla", H100)[0] is False
    pad, got = padded("cublas", H100)
    assert pad == (int(np.prod(rows)) < ops.FP8_GEMM_MIN_ROWS)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_compile_options_reach_every_program_of_the_library(tiny_sd3, monkeypatch):
    """``ops.compiler_options`` goes into the programs the library compiles: ``sf.sample``'s
    segments, ``FlowModel.velocity`` and the stream engine's tick. Shown on this CPU with an
    option XLA does not know, which only a compile that received it can refuse."""
    from conftest import SD3_TINY, sd3_inputs

    import streamflow_jax as sf

    model = sf.load(tiny_sd3[0])
    x, t, cond = sd3_inputs(SD3_TINY, batch=1, height=8, width=8)
    grid = sf.schedules.flow_match(2)
    monkeypatch.setattr(ops, "compiler_options", lambda platform=None: {"xla_no_such_option": 1})
    for run in (lambda: sf.sample(model, x, grid, cond),
                lambda: model.velocity(x, t, cond),
                lambda: sf.StreamEngine(model, x.shape[1:], {k: v.shape[1:] for k, v in cond.items()},
                                        slots_per_stream=1).warm_up(image_to_image=False)):
        with pytest.raises(Exception, match="xla_no_such_option"):
            run()
    # inside a caller's jit the caller's compile holds the program: none of the library's options
    # (JAX refuses compile options on a nested jit), so that option goes unseen
    nested = jax.jit(lambda m, x: m.velocity(x, t, cond))(model, x)
    monkeypatch.setattr(ops, "compiler_options", lambda platform=None: {"xla_cpu_enable_fast_math": False})
    np.testing.assert_allclose(np.asarray(nested), np.asarray(model.velocity(x, t, cond)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sf.sample(model, x, grid, cond)),
                               np.asarray(sampling_reference(model, x, grid, cond)), rtol=1e-6, atol=1e-6)


def sampling_reference(model, x, grid, cond):
    """Euler steps of the model's velocity, written out."""
    for i in range(len(grid) - 1):
        v = model.velocity(x, jnp.full((x.shape[0],), grid[i], jnp.float32), cond)
        x = x + (grid[i + 1] - grid[i]) * v
    return x
