"""LoRA merged at conversion, at load and at run time, against diffusers' own LoRA loading and
``fuse_lora`` (peft), in diffusers/PEFT and kohya formats, for the SD1.5 UNet and CLIP, SD3 and
Flux (its kohya LoRAs name BFL's fused layers); swapping a LoRA compiles nothing; bad LoRAs."""

from __future__ import annotations

import copy
import json
import re

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP, UNETS, randomize
from safetensors import safe_open
from safetensors.torch import save_file

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.lora import apply_loras

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

SCALE = 0.7


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_peft_lora(model, targets, path, component, r=4, alpha=8, seed=0, **config):
    """A random LoRA on ``model`` (a copy gets the adapter), saved as diffusers does, with its
    alpha in the metadata (``config``: more ``LoraConfig`` fields); returns the file."""
    import copy

    from peft import inject_adapter_in_model

    m = copy.deepcopy(model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config)
    inject_adapter_in_model(cfg, m)
    sd = get_peft_model_state_dict(m)
    gen = torch.Generator().manual_seed(seed)
    sd = {f"{component}.{k}": torch.randn(v.shape, generator=gen) * 0.1 for k, v in sd.items()}
    meta = {f"{component}.{k}": v for k, v in cfg.to_dict().items()}
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(meta, default=list), "format": "pt"})
    return path


def _fused(model, path, load, scale=SCALE):
    """diffusers' reading of a LoRA file (as ``load_lora_weights`` reads it: alphas and the
    adapter metadata), loaded into a copy of ``model`` and fused at ``scale``."""
    import copy

    m = copy.deepcopy(model)
    if load == "text_encoder":
        return _peft_merged(m, path, "text_encoder", scale)
    if load == "sd3":  # SD3's loader reads no network alphas
        sd, meta = diffusers.StableDiffusion3Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        diffusers.StableDiffusion3Pipeline.load_lora_into_transformer(sd, transformer=m, metadata=meta)
        m.fuse_lora(lora_scale=scale)
        return m
    pipe = diffusers.FluxPipeline if load == "flux" else diffusers.StableDiffusionPipeline
    out = pipe.lora_state_dict(str(path), return_lora_metadata=True, **({"return_alphas": True} if load == "flux" else {}))
    sd, alphas, meta = out
    if load == "unet":
        pipe.load_lora_into_unet(sd, alphas, unet=m, metadata=meta)
    else:
        pipe.load_lora_into_transformer(sd, alphas, transformer=m, metadata=meta)
    m.fuse_lora(lora_scale=scale)
    return m


def _peft_merged(model, path, component, scale):
    """peft's own injection and merge (transformers 5's LoRA loading wants peft >= 0.22, which
    the package index here does not have; diffusers reaches the same peft layers)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    with safe_open(path, "pt") as f:
        sd = {k[len(component) + 1:]: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    cfg = LoraConfig(r=meta[f"{component}.r"], lora_alpha=meta[f"{component}.lora_alpha"],
                     target_modules=meta[f"{component}.target_modules"])
    inject_adapter_in_model(cfg, model)
    set_peft_model_state_dict(model, sd)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(scale)
            module.merge()
    return model


@jax.jit
def _unet_call(model, x, t, ehs):
    return model.module(x, t, ehs)


def _unet_outputs(torch_unet, ours, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([900.0, 100.0], np.float32)
    ehs = rng.standard_normal((2, 5, 768)).astype(np.float32)
    with torch.no_grad():
        want = torch_unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                          torch.from_numpy(ehs)).sample.permute(0, 2, 3, 1).numpy()
    return np.asarray(_unet_call(ours, x, t, ehs)), want


def to_kohya(path, out, component="unet", prefix="lora_unet_"):
    """The same LoRA in kohya's names: lora_down/lora_up and an .alpha per module."""
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    alpha, r = meta[f"{component}.lora_alpha"], meta[f"{component}.r"]
    out_sd = {}
    for k, v in sd.items():
        module, _, part = k[len(component) + 1:].rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        out_sd[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = v
        out_sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    assert all(sd[k].shape[0] == r for k in sd if ".lora_A." in k)
    save_file(out_sd, out)
    return out


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    model = randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0, std=0.1).eval()
    model.save_pretrained(root / "unet")
    return model, root / "unet"


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_unet_lora_equals_diffusers_fuse_lora(unet, tmp_path, fmt):
    ref, path = unet
    lora = make_peft_lora(ref, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
                          tmp_path / "peft.safetensors", "unet")
    if fmt == "kohya":
        lora = to_kohya(lora, tmp_path / "kohya.safetensors")
    fused = _fused(ref, lora, "unet")
    got, want = _unet_outputs(fused, sf.load(path, loras=[(lora, SCALE)]))
    assert _rel(got, want) <= 1e-4  # measured ~1e-6
    base, _ = _unet_outputs(ref, sf.load(path))
    assert _rel(base, want) > 1e-2  # the LoRA changes the output
    # merged at conversion (CLI, FILE:SCALE) = merged at load
    assert cli(["convert", str(path), str(tmp_path / "out"), "--lora", f"{lora}:{SCALE}", "-q"]) == 0
    np.testing.assert_allclose(_unet_outputs(fused, sf.load(tmp_path / "out"))[0], got, rtol=1e-5, atol=1e-5)


def test_text_encoder_lora(tmp_path):
    ref = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 1).eval()
    ref.save_pretrained(tmp_path / "te")
    lora = make_peft_lora(ref, ["q_proj", "v_proj", "fc1"], tmp_path / "te.safetensors", "text_encoder")
    fused = _fused(ref, lora, "text_encoder")
    ids = np.array([[527, 5, 7, 9, 528, 528, 528, 528]])
    with torch.no_grad():
        want = fused(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = sf.load(tmp_path / "te", loras=[(lora, SCALE)]).module(ids)["last_hidden_state"]
    assert _rel(got, want) <= 1e-4


def _flux():
    from test_flux import FLUX_TINY

    return randomize(diffusers.FluxTransformer2DModel(**FLUX_TINY, guidance_embeds=True), 2, std=0.2).eval()


def _bfl_kohya(peft_path, out):
    """A Flux PEFT LoRA on to_q/to_k/to_v (+ proj_out of single blocks) written as a kohya file
    in BFL's names: the double blocks' q/k/v LoRAs fused into one qkv LoRA (down stacked, up
    block-diagonal), as trainers that see BFL's fused layers save them."""
    with safe_open(peft_path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    alpha, r = meta["transformer.lora_alpha"], meta["transformer.r"]
    out_sd = {}
    for i in range(2):
        p = f"transformer.transformer_blocks.{i}.attn."
        downs = [sd[f"{p}to_{c}.lora_A.weight"] for c in "qkv"]
        ups = [sd[f"{p}to_{c}.lora_B.weight"] for c in "qkv"]
        name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        out_sd[f"{name}.lora_down.weight"] = torch.cat(downs)  # [3r, in]
        out_sd[f"{name}.lora_up.weight"] = torch.block_diag(*ups)  # [3 out, 3r]
        out_sd[f"{name}.alpha"] = torch.tensor(float(alpha * 3))  # rank 3r: keep the same scale
    for i in range(2):
        p = f"transformer.single_transformer_blocks.{i}.proj_out."
        name = f"lora_unet_single_blocks_{i}_linear2"
        out_sd[f"{name}.lora_down.weight"] = sd[f"{p}lora_A.weight"]
        out_sd[f"{name}.lora_up.weight"] = sd[f"{p}lora_B.weight"]
        out_sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    assert r == 4
    save_file({k: v.contiguous() for k, v in out_sd.items()}, out)
    return out


@pytest.mark.parametrize("fmt", ["peft", "kohya_bfl"])
def test_flux_lora(tmp_path, fmt):
    from test_flux import flux_inputs, reference_velocity

    ref = _flux()
    ref.save_pretrained(tmp_path / "flux")
    targets = ["to_q", "to_k", "to_v"] if fmt == "kohya_bfl" else ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]
    lora = make_peft_lora(ref, targets + ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
                          if fmt == "kohya_bfl" else targets, tmp_path / "flux_lora.safetensors", "transformer")
    fused = _fused(ref, lora, "flux")
    if fmt == "kohya_bfl":
        # only the double blocks' to_q/k/v and the single blocks' proj_out are in the kohya file
        lora = _bfl_kohya(lora, tmp_path / "kohya.safetensors")
        fused = _fused(ref, lora, "flux")
    x, t, cond = flux_inputs(2, 8, 8)
    got = sf.load(tmp_path / "flux", loras=[(lora, SCALE)]).velocity(x, t, cond)
    assert _rel(got, reference_velocity(fused, x, t, cond)) <= 1e-4


def test_swapping_a_lora_compiles_nothing(unet, tmp_path):
    from jax import monitoring

    ref, path = unet
    a = make_peft_lora(ref, ["to_q", "to_v"], tmp_path / "a.safetensors", "unet", seed=1)
    b = make_peft_lora(ref, ["to_q", "to_v"], tmp_path / "b.safetensors", "unet", seed=2)
    base = sf.load(path)
    rng = np.random.default_rng(0)
    x, ehs = rng.standard_normal((1, 16, 16, 4)).astype(np.float32), rng.standard_normal((1, 5, 768)).astype(np.float32)
    t = np.array([500.0], np.float32)
    out_a = np.asarray(_unet_call(apply_loras(base, [(a, 1.0)]), x, t, ehs))  # compiles once
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None)
    out_b = np.asarray(_unet_call(apply_loras(base, [(b, 0.5)]), x, t, ehs))
    out_a2 = np.asarray(_unet_call(apply_loras(base, [(a, 1.0)]), x, t, ehs))
    assert compiles == [] and not np.allclose(out_a, out_b)
    np.testing.assert_array_equal(out_a, out_a2)


def test_swapping_a_lora_recompiles_neither_sample_nor_a_stream_engine(tmp_path):
    """design.md: apply_loras keeps the structure, so nothing recompiles: sf.sample's compiled
    steps and a stream engine's tick run the other LoRA's model as they are (each LoRA's result
    is diffusers' fuse_lora loop's in test_sd3_transformer_lora)."""
    from conftest import VARIANTS, compiles, make_sd3, sd3_inputs

    from streamflow_jax.stream import StreamEngine

    ref = make_sd3(tmp_path / "sd3", "sd3", seed=3)
    a = make_peft_lora(ref, ["to_q", "to_v"], tmp_path / "a.safetensors", "transformer", seed=1)
    b = make_peft_lora(ref, ["to_q", "to_v"], tmp_path / "b.safetensors", "transformer", seed=2)
    base = sf.load(tmp_path / "sd3")
    # shapes no other test samples at (a program compiled by one in this process would be reused)
    x, _, cond = sd3_inputs(VARIANTS["sd3"], 3, 6, 10, text_len=9, seed=1)
    grid = sf.schedules.flow_match(3)
    shapes = {k: v.shape[1:] for k, v in cond.items()}

    def engine_result(model):
        engine = StreamEngine(model, (6, 10, 4), shapes, slots_per_stream=3)
        rid = engine.submit({k: v[0] for k, v in cond.items()}, steps=3, shift=3.0, noise=x[0])  # flow_match's
        engine.run()
        return np.asarray(engine.result(rid))

    with compiles() as compiled:
        with_a = apply_loras(base, [(a, 1.0)])
        first = np.asarray(sf.sample(with_a, x, grid, cond)), engine_result(with_a)
        assert compiled  # the first LoRA's model compiles (the listener hears it)
        compiled.clear()
        with_b = apply_loras(base, [(b, 0.5)])
        second = np.asarray(sf.sample(with_b, x, grid, cond)), engine_result(with_b)
    assert compiled == []
    assert not np.allclose(first[0], second[0]) and not np.allclose(first[1], second[1])
    np.testing.assert_allclose(second[1], second[0][0], rtol=1e-5, atol=1e-5)


def test_bad_loras(unet, tmp_path, capsys):
    ref, path = unet
    good = make_peft_lora(ref, ["to_q"], tmp_path / "good.safetensors", "unet")
    with safe_open(good, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    # a LoRA for another architecture: its keys match nothing (never loaded silently)
    save_file({"unet.single_blocks.0.linear1.lora_A.weight": torch.zeros(4, 8),
               "unet.single_blocks.0.linear1.lora_B.weight": torch.zeros(8, 4)}, tmp_path / "other.safetensors")
    assert cli(["convert", str(path), str(tmp_path / "o1"), "--lora", str(tmp_path / "other.safetensors"), "-q"]) == 1
    assert "match no weight of the unet model: 'unet.single_blocks.0.linear1.lora_A.weight'" in capsys.readouterr().err
    # wrong rank between the halves, and a shape that does not fit the weight
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    bad = dict(sd, **{key: torch.zeros(sd[key].shape[0], 3)})
    save_file(bad, tmp_path / "rank.safetensors")
    with pytest.raises(sf.ConversionError, match="ranks differ"):
        sf.load(path, loras=[tmp_path / "rank.safetensors"])
    bad = dict(sd, **{key: torch.zeros(sd[key].shape[0] + 1, 4)})
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(sf.ConversionError, match="does not fit"):
        sf.load(path, loras=[tmp_path / "shape.safetensors"])
    with pytest.raises(sf.ConversionError, match="not finite"):
        sf.load(path, loras=[(good, float("nan"))])
    # a scale beyond float32, and a finite one whose merge overflows the weights' dtype (float16
    # here): refused naming the file or the weight, where a warning and inf weights went through
    with pytest.raises(sf.ConversionError, match="exists, but its scale 'abc' is not a number"):
        sf.load(path, loras=[f"{good}:abc"])
    with pytest.raises(sf.ConversionError, match="LoRA scale 1e[+]40 is beyond float32's range"):
        sf.load(path, loras=[(good, 1e40)])
    with pytest.raises(ValueError, match="merging the LoRAs into .* makes non-finite weights"):
        sf.apply_loras(sf.load(path, dtype="float16"), [(good, 1e7)])
    # the same overflow at conversion: the finiteness check ran before the cast, so the
    # converted float16 model held inf weights and sampled NaN
    with pytest.raises(sf.ConversionError, match=r"non-finite value\(s\) .* once cast to float16 .*bfloat16 or float32"):
        sf.convert(path, tmp_path / "o2", dtype="float16", loras=[(good, 1e7)])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # one file alone is a list of one (its characters were taken for files); pairs are checked
    assert sf.apply_loras(sf.load(path), str(good)) is not None
    for loras, message in [([(good, "abc")], "its scale 'abc' is not a number"), ([(good, None)], "its scale None"),
                           ([(good, 1, 2)], "a pair is (file, scale)"), ([3], "give a file, (file, scale)")]:
        with pytest.raises(sf.ConversionError, match=re.escape(message)):
            sf.load(path, loras=loras)


def test_malformed_lora_files_are_named(unet, tmp_path):
    """Found by a user's pass: each raised a raw TypeError, ZeroDivisionError, IndexError or
    AttributeError from inside, or was merged wrongly (one of two adapters silently dropped)."""
    ref, path = unet
    good = make_peft_lora(ref, ["to_q"], tmp_path / "good.safetensors", "unet")
    with safe_open(good, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    a_key = next(k for k in sd if k.endswith("lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")
    kohya = to_kohya(good, tmp_path / "kohya.safetensors")
    with safe_open(kohya, "pt") as f:
        kd = {k: f.get_tensor(k) for k in f.keys()}
    alpha = next(k for k in kd if k.endswith(".alpha"))
    down = alpha.replace(".alpha", ".lora_down.weight")
    up = alpha.replace(".alpha", ".lora_up.weight")

    def meta_with(field, value):
        fields = {**json.loads(meta["lora_adapter_metadata"]), f"unet.{field}": value}
        return {**meta, "lora_adapter_metadata": json.dumps(fields)}

    two = {k.replace(".weight", ".a.weight"): v for k, v in sd.items()}
    two.update({k.replace(".weight", ".b.weight"): v for k, v in sd.items()})
    cases = [
        (two, meta, "holds several PEFT adapters (a, b); save one adapter per file"),
        (dict(kd, **{alpha: torch.tensor([8.0, 8.0])}), None, f"{alpha!r} has shape (2,); an alpha is one number"),
        (dict(kd, **{alpha: torch.tensor(float("nan"))}), None, f"{alpha!r} is nan, not a finite number"),
        (dict(kd, **{down: torch.zeros(0, kd[down].shape[1]), up: torch.zeros(kd[up].shape[0], 0)}), None,
         "have rank 0"),
        (dict(kd, **{alpha.replace("to_q", "to_nothing"): torch.tensor(8.0)}), None,
         "alpha key(s) with no lora_down/lora_up beside them"),
        (dict(sd, **{a_key: torch.zeros(4)}), meta, "are not [r, in(, kh, kw)] and [out, r(, 1, 1)]"),
        (dict(sd, **{b_key: torch.zeros(sd[b_key].shape[0], 4, 3, 3)}), meta, "are not [r, in(, kh, kw)]"),
        (dict(sd, **{a_key: sd[a_key].to(torch.int32)}), meta, f"LoRA tensor {a_key!r} is int32"),
        (dict(sd, **{a_key: sd[a_key] * float("nan")}), meta, "give non-finite values"),
        (sd, {"lora_adapter_metadata": "[1, 2]"}, "lora_adapter_metadata must be a JSON object, got list"),
        (sd, {"lora_adapter_metadata": "{bad"}, "its lora_adapter_metadata is not JSON"),
        (sd, meta_with("r", 0), "lora_adapter_metadata's r must be a positive number, got 0"),
        (sd, meta_with("r", "4"), "lora_adapter_metadata's r must be a positive number, got '4'"),
        (sd, meta_with("rank_pattern", [1]), "rank_pattern must be an object"),
    ]
    for i, (tensors, metadata, message) in enumerate(cases):
        file = tmp_path / f"bad{i}.safetensors"
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, file, metadata=metadata)
        with pytest.raises(sf.ConversionError, match=re.escape(message)) as caught:
            sf.load(path, loras=[file])
        assert str(file) in str(caught.value)
    # one module in two formats in one file: both applied, summed (twice the update)
    both = dict(sd, **{k: v for k, v in kd.items()})
    save_file({k: v.clone().contiguous() for k, v in both.items()}, tmp_path / "both.safetensors", metadata=meta)
    with pytest.raises(sf.ConversionError, match=r"both update .* \(one module written twice"):
        sf.load(path, loras=[tmp_path / "both.safetensors"])


def test_sd3_transformer_lora(tmp_path):
    from conftest import make_sd3, sd3_inputs, torch_velocity, VARIANTS

    ref = make_sd3(tmp_path / "sd3", "sd35_medium", seed=4)
    lora = make_peft_lora(ref, ["to_q", "to_k", "to_v", "add_k_proj", "proj"], tmp_path / "sd3.safetensors",
                          "transformer")
    fused = _fused(ref, lora, "sd3")
    x, t, cond = sd3_inputs(VARIANTS["sd35_medium"], 2, 8, 8)
    got = sf.load(tmp_path / "sd3", loras=[(lora, SCALE)]).velocity(x, t, cond)
    assert _rel(got, torch_velocity(fused, x, t, cond)) <= 1e-4
    # a model with its blocks scanned (with_scanned_blocks) takes the LoRA by the blocks' own names
    scanned = apply_loras(sf.load(tmp_path / "sd3").with_scanned_blocks(), [(lora, SCALE)])
    assert scanned.scanned
    assert _rel(scanned.velocity(x, t, cond), torch_velocity(fused, x, t, cond)) <= 1e-4


def test_peft_rank_and_alpha_patterns_and_rslora(tmp_path):
    """A PEFT LoRA's scale per module from its metadata as peft computes it: ``use_rslora``
    (alpha / sqrt(rank)), and ``rank_pattern``/``alpha_pattern`` keys matched as peft matches
    them, a regular expression over the whole name or a dotted tail of it: ``q_proj`` is not
    ``add_q_proj``'s (it was, by a suffix test: scale 2.0 where peft's is 1.0)."""
    from conftest import VARIANTS, make_sd3, sd3_inputs, torch_velocity

    ref = make_sd3(tmp_path / "sd3", "sd35_medium", seed=4)
    lora = make_peft_lora(ref, ["to_q", "add_q_proj", "to_k"], tmp_path / "p.safetensors", "transformer", r=4,
                          alpha=40, use_rslora=True, rank_pattern={"q_proj": 2, r"transformer_blocks\.1\..*to_k": 2},
                          alpha_pattern={"q_proj": 120, "to_q": 60})
    fused = _fused(ref, lora, "sd3")
    x, t, cond = sd3_inputs(VARIANTS["sd35_medium"], 2, 8, 8)
    want = torch_velocity(fused, x, t, cond)
    assert _rel(torch_velocity(ref, x, t, cond), want) > 1e-2  # the LoRA changes it
    assert _rel(sf.load(tmp_path / "sd3", loras=[(lora, SCALE)]).velocity(x, t, cond), want) <= 1e-4


def test_t5_lora(tmp_path):
    from test_t5 import T5_A, make_t5, padded_ids

    ref = make_t5(tmp_path / "t5", T5_A, seed=5)
    lora = make_peft_lora(ref, ["q", "v", "wi_0", "wo"], tmp_path / "t5.safetensors", "text_encoder_2")
    fused = _peft_merged(ref, lora, "text_encoder_2", SCALE)
    ids = padded_ids(24)
    with torch.no_grad():
        want = fused(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = sf.load(tmp_path / "t5", loras=[(lora, SCALE)], component="text_encoder_2")
    assert _rel(got.module(ids)["last_hidden_state"], want) <= 1e-4


def test_kohya_t5_lora_in_sd3s_third_slot(tmp_path):
    """kohya's ``lora_te3_`` names SD3's T5 (its third text encoder): the same halves written in
    kohya's names (module path with underscores, ``lora_down``/``lora_up``, ``.alpha``) merge as
    peft merges the PEFT file (diffusers reads no ``lora_te3_`` keys to compare with)."""
    from test_t5 import T5_A, make_t5, padded_ids

    ref = make_t5(tmp_path / "t5", T5_A, seed=6)
    peft_file = make_peft_lora(ref, ["q", "wi_0", "o"], tmp_path / "peft.safetensors", "text_encoder_3", alpha=6)
    kohya = {}
    with safe_open(peft_file, "pt") as f:
        for key in f.keys():
            module, part = key[len("text_encoder_3."):].rsplit(".lora_", 1)
            name = "lora_te3_" + module.replace(".", "_")
            kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = f.get_tensor(key)
            kohya[f"{name}.alpha"] = torch.tensor(6.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    fused = _peft_merged(ref, peft_file, "text_encoder_3", SCALE)
    ids = padded_ids(24)
    with torch.no_grad():
        want = fused(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = sf.load(tmp_path / "t5", loras=[(tmp_path / "kohya.safetensors", SCALE)], component="text_encoder_3")
    assert _rel(got.module(ids)["last_hidden_state"], want) <= 1e-4
    plain = sf.load(tmp_path / "t5").module(ids)["last_hidden_state"]
    assert _rel(plain, want) > 1e-3  # the LoRA shows


# ---------------------------------------------------------------------------------------------
# SDXL: kohya's names (the UNet's LDM/SGM modules, lora_te1_/lora_te2_) and diffusers'
# ---------------------------------------------------------------------------------------------

# kohya's SDXL LoRAs name the modules of the LDM/SGM UNet it trains SDXL on (sd-scripts'
# sdxl_original_unet; what published SDXL LoRAs hold), written here for the tiny SDXL UNet
# (2 resnets per level: input_blocks 1-2 level 0, 3 its downsampler, 4-5 level 1, 7-8 level 2;
# output_blocks 0-2 the deepest level, a level's last block ends with the upsampler "conv")
SGM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_8_1_proj_in": "down_blocks.2.attentions.1.proj_in",
    "middle_block_1_transformer_blocks_1_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_2_1_transformer_blocks_1_attn2_to_k": "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "output_blocks_5_1_transformer_blocks_0_attn1_to_out_0":
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "label_emb_0_0": "add_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "out_2": "conv_out",
}
# the text encoders in transformers' (4.x) names, by pipeline slot
TE_NAMES = {"lora_te1_": "text_model.encoder.layers.0.self_attn.q_proj",
            "lora_te2_": "text_model.encoder.layers.1.mlp.fc1"}


def _kohya_module(weight, gen, r=4):
    """Random kohya halves of a weight: linear ``[r, in]``, ``[out, r]``; conv ``[r, in, kh, kw]``,
    ``[out, r, 1, 1]``."""
    if weight.ndim == 4:
        return (torch.randn(r, *weight.shape[1:], generator=gen) * 0.1,
                torch.randn(weight.shape[0], r, 1, 1, generator=gen) * 0.1)
    return torch.randn(r, weight.shape[1], generator=gen) * 0.1, torch.randn(weight.shape[0], r, generator=gen) * 0.1


def _sdxl_kohya_lora(unet, text_encoders, path, sgm=True, alpha=8.0):
    """A kohya SDXL LoRA: UNet modules in the SGM names (or diffusers' with ``_``), one module of
    each text encoder; returns the file and ``{(component, module): (down, up)}``."""
    gen = torch.Generator().manual_seed(5)
    modules = dict(unet.named_modules())
    sd, halves = {}, {}
    for sgm_name, name in SGM_NAMES.items():
        if not sgm and name.startswith("add_embedding"):
            continue  # diffusers' kohya reader strips the index of add_embedding_linear_1 (a rule for SGM names)
        down, up = _kohya_module(modules[name].weight, gen)
        key = f"lora_unet_{sgm_name if sgm else name.replace('.', '_')}"
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        halves["unet", name] = down, up
    for (prefix, name), (component, encoder) in zip(TE_NAMES.items(), text_encoders.items()):
        named = dict(encoder.named_modules())  # transformers 5 drops CLIPTextModel's text_model.
        down, up = _kohya_module((named.get(name) or named[name.removeprefix("text_model.")]).weight, gen)
        key = prefix + name.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        halves[component, name] = down, up
    save_file(sd, path)
    return path, halves


@pytest.mark.parametrize("names", ["sgm", "diffusers"])
def test_sdxl_kohya_lora_equals_diffusers(tmp_path, names):
    """A kohya SDXL LoRA (UNet in the SGM names kohya's SDXL LoRAs use, or in diffusers' names;
    lora_te1_/lora_te2_) merged into a whole SDXL pipeline at conversion: the UNet equals diffusers'
    ``StableDiffusionXLPipeline.lora_state_dict`` (its SGM remapping) + ``load_lora_into_unet`` +
    ``fuse_lora`` (measured 1.9e-6 rel. with the SGM names, 1.5e-6 with diffusers'), the text
    encoders ``W + scale * alpha / r * up @ down`` (diffusers' text-encoder loading fails here:
    "Could not automatically infer state dict type" with the peft the index has)."""
    from conftest import SDXL_UNETS, sdxl_added_inputs
    from flax import nnx
    from test_sdxl_pipeline import make_sdxl_pipeline

    from streamflow_jax.models import flat_params

    root = make_sdxl_pipeline(tmp_path, SDXL_UNETS["sdxl"])  # SGM_NAMES are SDXL's published layout
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(root, add_watermarker=False)
    encoders = {"text_encoder": ref.text_encoder, "text_encoder_2": ref.text_encoder_2}
    lora, halves = _sdxl_kohya_lora(ref.unet, encoders, tmp_path / "kohya.safetensors", sgm=names == "sgm")
    assert cli(["convert", str(root), str(tmp_path / "out"), "--lora", f"{lora}:{SCALE}", "-q"]) == 0

    sd, alphas, meta = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(lora), unet_config=ref.unet.config,
                                                                           return_lora_metadata=True)
    fused = copy.deepcopy(ref.unet)
    diffusers.StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=fused, metadata=meta)
    fused.fuse_lora(lora_scale=SCALE)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    t = np.array([900.0, 100.0], np.float32)
    ehs = rng.standard_normal((2, 5, SDXL_UNETS["sdxl"]["cross_attention_dim"])).astype(np.float32)
    text_embeds, time_ids = sdxl_added_inputs(2)

    def torch_eps(unet):
        with torch.no_grad():
            out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ehs),
                       added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                          "time_ids": torch.from_numpy(time_ids)}).sample
        return out.permute(0, 2, 3, 1).numpy()

    want_eps = torch_eps(fused)
    assert _rel(torch_eps(ref.unet), want_eps) > 1e-2  # the LoRA changes the output
    # at conversion, and merged as the diffusers pipeline loads (Pipeline.from_diffusers(loras=))
    pipe = sf.Pipeline.from_diffusers(root, loras=[f"{lora}:{SCALE}"], prediction_type="ddim_eps",
                                      num_time_windows=4)
    for where, models in [("convert", {c: sf.load(tmp_path / "out", component=c) for c in ("unet", *encoders)}),
                          ("from_diffusers", {"unet": pipe.model, "text_encoder": pipe.clip_l[0],
                                             "text_encoder_2": pipe.clip_g[0]})]:
        got = np.asarray(_sdxl_unet_call(models["unet"], x, t, ehs, text_embeds, time_ids))
        assert _rel(got, want_eps) <= 1e-4, where
        for component, encoder in encoders.items():
            name = next(n for (c, n) in halves if c == component)
            down, up = halves[component, name]
            params = flat_params(nnx.to_pure_dict(models[component].state))[0]
            named = dict(encoder.named_modules())
            weight = (named.get(name) or named[name.removeprefix("text_model.")]).weight.detach()
            want = weight + SCALE * 8.0 / 4 * (up @ down)  # kohya: alpha / r
            kernel = next(v for k, v in params.items() if k.endswith(name.removeprefix("text_model.") + ".kernel"))
            np.testing.assert_allclose(np.asarray(kernel).T, want.numpy(), rtol=1e-5, atol=1e-6, err_msg=where)


@jax.jit
def _sdxl_unet_call(model, x, t, ehs, text_embeds, time_ids):
    return model.module(x, t, ehs, text_embeds=text_embeds, time_ids=time_ids)


def test_pipeline_loras_merged_as_it_loads(tmp_path, capsys):
    """``Pipeline.from_diffusers(path, loras=...)`` and ``generate --lora``: a LoRA that diffusers'
    ``save_lora_weights`` would write (a directory holding ``pytorch_lora_weights.safetensors``)
    merged into the UNet as the pipeline loads, equal to diffusers' ``load_lora_into_unet`` +
    ``fuse_lora``; without a warning about the file's other components; a component the
    pipeline lacks is refused."""
    import warnings

    from conftest import make_perflow_pipeline

    root = make_perflow_pipeline(tmp_path / "p")
    ref = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval()
    (tmp_path / "lora").mkdir()
    file = make_peft_lora(ref, ["to_q", "to_v"], tmp_path / "lora" / "pytorch_lora_weights.safetensors", "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = sf.Pipeline.from_diffusers(root, loras=[f"{tmp_path / 'lora'}:{SCALE}"])
    fused = _fused(ref, file, "unet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([900.0, 100.0], np.float32)
    ehs = rng.standard_normal((2, 5, ref.config.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        want = fused(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                     torch.from_numpy(ehs)).sample.permute(0, 2, 3, 1).numpy()
        base = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   torch.from_numpy(ehs)).sample.permute(0, 2, 3, 1).numpy()
    assert _rel(np.asarray(_unet_call(pipe.model, x, t, ehs)), want) <= 1e-4
    assert _rel(base, want) > 1e-2  # the LoRA changes the output
    from streamflow_jax.pipelines import PeRFlowPipeline  # the class's load takes the files as they are too

    direct = PeRFlowPipeline.load(root, loras=[(file, SCALE)])
    np.testing.assert_array_equal(_unet_call(direct.model, x, t, ehs), _unet_call(pipe.model, x, t, ehs))
    # the CLI: generate --lora gives the pipeline's image
    out = tmp_path / "cat.png"
    assert cli(["generate", "--model", str(root), "--prompt", "a cat", "--lora", f"{tmp_path / 'lora'}:{SCALE}",
                "--out", str(out), "-q"]) == 0
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(pipe(["a cat"], progress=False)[0]))
    # keys for a component this pipeline does not have: refused, naming it (they would be merged nowhere)
    save_file({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 32),
               "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(37, 2)},
              tmp_path / "te2.safetensors")
    with pytest.raises(sf.ConfigError, match=r"LoRA key\(s\) for text_encoder_2 \(e.g. .*\), which this pipeline "
                                             "does not have"):
        sf.Pipeline.from_diffusers(root, loras=[tmp_path / "te2.safetensors"])
    assert cli(["generate", "--lora", str(file), "--out", str(tmp_path / "d.png"), "-q"]) == 1  # digits: none
    assert "--lora is for prompt pipelines" in capsys.readouterr().err
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        (tmp_path / "two" / f"{name}.safetensors").write_bytes(file.read_bytes())
    with pytest.raises(sf.ConversionError, match=re.escape("holding 2 .safetensors files (a.safetensors, "
                                                           "b.safetensors): give one")):
        sf.Pipeline.from_diffusers(root, loras=[tmp_path / "two"])
