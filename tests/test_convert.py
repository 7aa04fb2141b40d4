"""Conversion: layouts diffusers writes (single file, sharded, pipeline), dtypes, and strict errors."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import VARIANTS, make_sd3, sd3_inputs, torch_velocity
from safetensors.torch import load_file, save_file

import streamflow_jax as sf
from streamflow_jax.cli import main as cli

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _convert_fails(capsys, src, dst, *needles):
    """The CLI exits 1 with one line naming the problem and leaves no output behind."""
    assert cli(["convert", str(src), str(dst), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()
    assert not any(p.name.startswith(f".{dst.name}.") for p in dst.parent.iterdir()), "temporary left behind"
    return err


def _edit_weights(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)


def test_truncated_safetensors(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[: len(data) // 2])
    _convert_fails(capsys, src, tmp_path / "out", WEIGHTS, "unreadable safetensors")


def test_missing_tensor(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    _edit_weights(src, lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"))
    _convert_fails(capsys, src, tmp_path / "out", "missing tensor", "transformer_blocks.1.attn.to_k.kernel")


def test_unexpected_tensor(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    _edit_weights(src, lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    _convert_fails(capsys, src, tmp_path / "out", "unexpected tensor", "'extra.weight'")


def test_wrong_shape(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    _edit_weights(src, lambda t: t.__setitem__("context_embedder.weight", torch.zeros(24, 13)))
    _convert_fails(capsys, src, tmp_path / "out", "'context_embedder.weight'", "(13, 24)", "(12, 24)")


def test_non_finite_weights_are_refused_unless_allowed(tiny_sd3, tmp_path, capsys):
    """NaN or inf in a weight: conversion stops naming the tensor (a model with them samples NaN);
    ``--allow-nonfinite`` converts it anyway. Loading the directory in memory refuses it too."""
    src, _ = tiny_sd3

    def poison(t):
        t["transformer_blocks.0.ff.net.2.weight"][1, 2] = float("nan")
        t["proj_out.bias"][0] = float("inf")

    _edit_weights(src, poison)
    err = _convert_fails(capsys, src, tmp_path / "out", "non-finite", "--allow-nonfinite")
    assert "'proj_out.bias'" in err or "'transformer_blocks.0.ff.net.2.weight'" in err
    with pytest.raises(sf.ConversionError, match="non-finite"):
        sf.load(src)
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q", "--allow-nonfinite"]) == 0
    model = sf.load(tmp_path / "out")
    assert np.isnan(np.asarray(model.module.transformer_blocks[0].ff.net[2].kernel[...])).sum() == 1
    assert sf.load(src, allow_nonfinite=True) is not None


def test_weights_that_overflow_the_cast_or_are_not_floats(tiny_sd3, tmp_path, capsys):
    """Found by a user's pass: a weight past float16's range became inf in a float16 conversion
    (the check ran before the cast) and the model sampled NaN; integer and bool weights were
    kept as they were; a numpy dtype such as int8 was written as the checkpoint's dtype and the
    result could not be loaded."""
    src, _ = tiny_sd3
    _edit_weights(src, lambda t: t.__setitem__("proj_out.weight", t["proj_out.weight"] * 1e9))
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q", "--dtype", "float16"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists(), err
    for needle in ("'proj_out.weight'", "once cast to float16", "Convert to bfloat16 or float32 instead"):
        assert needle in err, err
    assert sf.load(src, dtype="bfloat16") is not None  # bfloat16 holds it
    for dtype in (np.int8, np.float64, jnp.float8_e4m3fn, "int8", 3):
        with pytest.raises(sf.ConversionError, match="unsupported dtype"):
            sf.convert(src, tmp_path / "out", dtype=dtype)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="astype: .* is not a dtype models compute in"):
        sf.load(src).astype(np.int8)
    assert sf.load(src, dtype=jnp.bfloat16).dtype == jnp.bfloat16  # a numpy spelling of a supported one
    _edit_weights(src, lambda t: t.__setitem__("proj_out.bias", t["proj_out.bias"].to(torch.int32)))
    _convert_fails(capsys, src, tmp_path / "out", "'proj_out.bias' is int32", "floating-point weight")
    _edit_weights(src, lambda t: t.update({k: v.double() for k, v in t.items()}))
    out = sf.convert(src, tmp_path / "f64")  # float64 is written as float32, what JAX computes in
    assert json.loads((out / "config.json").read_text())["streamflow_jax"]["dtype"] == "float32"
    assert sf.load(out).dtype == jnp.float32


def test_destination_under_a_file_or_in_new_directories(tiny_sd3, tmp_path, capsys):
    """A destination whose parent is a file is named as such (mkdir said "File exists"); the
    directories a failed conversion made for its destination go with it."""
    src, _ = tiny_sd3
    (tmp_path / "afile").write_text("x")
    assert cli(["convert", str(src), str(tmp_path / "afile" / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'afile'} is a file, not a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["afile", src.name])
    _edit_weights(src, lambda t: t["proj_out.bias"].__setitem__(0, float("nan")))
    assert cli(["convert", str(src), str(tmp_path / "new" / "deeper" / "out"), "-q"]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["afile", src.name])


def test_unknown_config_field(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "use_magic": True}))
    _convert_fails(capsys, src, tmp_path / "out", "config.json", "unknown config field 'use_magic'")


@pytest.mark.parametrize("key,value,message", [
    ("num_layers", 4.5, "num_layers must be an integer (a count or a size: at least 1), got 4.5"),
    ("num_layers", "4", 'num_layers must be an integer (a count or a size: at least 1), got "4"'),
    ("num_layers", True, "num_layers must be an integer (a count or a size: at least 1), got true"),
    ("num_layers", None, "num_layers must be an integer (a count or a size: at least 1), got null"),
    ("attention_head_dim", 32.0, "attention_head_dim must be an integer (a count or a size: at least 1), got 32.0"),
    ("joint_attention_dim", -5, "joint_attention_dim must be an integer (a count or a size: at least 1), got -5"),
    ("pos_embed_max_size", 8.5, "pos_embed_max_size must be an integer or null (a count or a size: at least 1)"),
    ("dual_attention_layers", "x", "dual_attention_layers must be a list of integers (at least 0), got \"x\""),
    ("qk_norm", 3, "qk_norm must be a string or null, got 3"),
])
def test_config_value_of_the_wrong_type(tiny_sd3, tmp_path, capsys, key, value, message):
    """A config value of the wrong type is refused naming the file and the key (it used to fail
    inside the model's construction with a traceback about shapes), by convert and by load;
    a converted checkpoint's config.json edited the same way is refused by load too."""
    src, _ = tiny_sd3
    assert cli(["convert", str(src), str(tmp_path / "good"), "-q"]) == 0
    for directory in (src, tmp_path / "good"):
        cfg = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**cfg, key: value}))
    _convert_fails(capsys, src, tmp_path / "out", "config.json", message)
    for directory in (src, tmp_path / "good"):
        with pytest.raises(sf.ConversionError, match=re.escape(message)):
            sf.load(directory)


def test_tensors_that_do_not_fit_name_the_config_fields_left_to_defaults(tiny_sd3, tmp_path, capsys):
    """A config.json without num_layers takes diffusers' default (as diffusers does); the tensors
    then do not fit, and the message says which fields were defaulted, the likely reason."""
    src, _ = tiny_sd3
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_layers"]
    (src / "config.json").write_text(json.dumps(cfg))
    _convert_fails(capsys, src, tmp_path / "out", "the config asks for 18 blocks in transformer_blocks, and the file "
                   "holds 2", "(the config does not set num_layers=18: defaults were used)")
    # a typo's count is refused before the model is built (100000 layers took minutes to build)
    (src / "config.json").write_text(json.dumps({**cfg, "num_layers": 100000}))
    _convert_fails(capsys, src, tmp_path / "out", "the config asks for 100000 blocks in transformer_blocks, and the "
                   "file holds 2")


@pytest.mark.parametrize("field,value,message", [
    ("layers_per_block", 100000, "the config asks for 100000 blocks in down_blocks.0.resnets, and the file holds 2"),
    ("transformer_layers_per_block", 5000, "the config asks for 5000 blocks in down_blocks.0.attentions.0.transformer_"
                                           "blocks, and the file holds 1")])
def test_a_unet_asking_for_more_blocks_than_its_file_holds(tmp_path, capsys, field, value, message):
    """A UNet's typo (layers_per_block 100000) is refused before the model is built, naming the
    block list, as the transformers' are (it built for minutes, then listed missing tensors)."""
    import diffusers
    from conftest import UNETS, randomize

    randomize(diffusers.UNet2DConditionModel(**UNETS["sd15"]), 0).save_pretrained(tmp_path / "unet")
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**cfg, field: value}))
    _convert_fails(capsys, tmp_path / "unet", tmp_path / "out", message)


def test_unsupported_config_value(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "qk_norm": "layer_norm"}))
    _convert_fails(capsys, src, tmp_path / "out", "unsupported: qk_norm='layer_norm'")


def test_unsupported_class(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet3DConditionModel"}))
    _convert_fails(capsys, src, tmp_path / "out", "unsupported model class 'UNet3DConditionModel'")


def test_nonexistent_path(tmp_path, capsys):
    _convert_fails(capsys, tmp_path / "nope", tmp_path / "out", "nope", "no such file or directory")


def test_not_a_diffusers_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _convert_fails(capsys, tmp_path / "empty", tmp_path / "out", "not a diffusers directory")


def test_existing_output_is_not_overwritten(tiny_sd3, tmp_path, capsys):
    src, _ = tiny_sd3
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q"]) == 1
    assert "out: already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_empty_output_directory_is_written(tiny_sd3, tmp_path, monkeypatch, capsys):
    """An empty directory made beforehand is written into, replaced in one rename; a conversion
    that fails while writing leaves it as it was, empty; a link to one is refused, saying so."""
    import orbax.checkpoint as ocp

    src, _ = tiny_sd3
    (tmp_path / "out").mkdir()
    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        assert cli(["convert", str(src), str(tmp_path / "out"), "-q"]) == 1
    assert "out: could not be written (disk full)" in capsys.readouterr().err
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sd3_tiny"]  # no partial left
    (tmp_path / "link").symlink_to(tmp_path / "out")
    assert cli(["convert", str(src), str(tmp_path / "link"), "-q"]) == 1
    assert "link: already exists (a link: only an empty directory is written into)" in capsys.readouterr().err
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q"]) == 0
    assert sf.load(tmp_path / "out").class_name == "SD3Transformer2DModel"
    # a mount point cannot be renamed over: said first (it failed after converting, with EBUSY)
    assert cli(["convert", str(src), "/proc", "-q"]) == 1
    assert "/proc: a mount point, which cannot be replaced by a rename" in capsys.readouterr().err


def test_failure_while_writing_leaves_nothing(tiny_sd3, tmp_path, monkeypatch):
    """An error after the temporary directory exists (here: in orbax) removes it."""
    import orbax.checkpoint as ocp

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(sf.ConversionError, match=re.escape(f"{tmp_path / 'out'}: could not be written (disk full)")):
        sf.convert(tiny_sd3[0], tmp_path / "out", progress=False)  # the OSError named no path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd3_tiny"]


def test_sharded_checkpoint_and_pipeline_dir(tmp_path):
    """A sharded transformer inside a pipeline directory converts to the same velocity."""
    pipe = tmp_path / "pipe"
    ref = make_sd3(tmp_path / "single", seed=2)
    ref.save_pretrained(pipe / "transformer", max_shard_size="40KB")
    assert (pipe / "transformer" / f"{WEIGHTS}.index.json").is_file()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                      "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    sf.convert(pipe, tmp_path / "out", progress=False)
    model = sf.load(tmp_path / "out")
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8)
    ref_v = torch_velocity(ref, x, t, cond)
    assert np.max(np.abs(np.asarray(model.velocity(x, t, cond)) - ref_v)) <= 1e-4 * np.max(np.abs(ref_v))


def test_bad_shard_index(tiny_sd3, tmp_path, capsys):
    src, model = tiny_sd3
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    index = sharded / f"{WEIGHTS}.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    # found by a user's pass: a tensor in two shards took the last one's value, whatever the index said
    shards = sorted(set(data["weight_map"].values()))
    key = next(k for k, v in data["weight_map"].items() if v == shards[0])
    second = load_file(sharded / shards[1])
    save_file({**second, key: load_file(sharded / shards[0])[key] + 1}, sharded / shards[1])
    _convert_fails(capsys, sharded, tmp_path / "out", f"tensor {key!r} is in both {shards[0]} and {shards[1]}")
    save_file(second, sharded / shards[1])
    index.write_text(json.dumps({**data, "weight_map": {**data["weight_map"], key: shards[1]}}))
    _convert_fails(capsys, sharded, tmp_path / "out", f"weight_map puts {key!r} in {shards[1]}, and it is in {shards[0]}")
    (sharded / first).unlink()
    _convert_fails(capsys, sharded, tmp_path / "out", first, "does not exist")


# measured rel. errors of the velocity against diffusers' float32: bf16 1.6e-2 (8-bit mantissa:
# 10x would be looser than the 5e-2 this had, so it stays), fp16 2.0e-3
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 5e-2), ("float16", 2e-2)])
def test_half_precision_conversion(tiny_sd3, tmp_path, dtype, tol):
    src, ref = tiny_sd3
    assert cli(["convert", str(src), str(tmp_path / "out"), "--dtype", dtype, "-q"]) == 0
    model = sf.load(tmp_path / "out")
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree_util.tree_leaves(model.state))
    x, t, cond = sd3_inputs(VARIANTS["sd3"], 2, 8, 8)
    v = np.asarray(model.velocity(x, t, cond))
    assert v.dtype == np.float32  # returned in the input's dtype
    ref_v = torch_velocity(ref, x, t, cond)
    assert np.max(np.abs(v - ref_v)) <= tol * np.max(np.abs(ref_v))


def test_bf16_checkpoint_is_read_bit_exact(tmp_path):
    """A checkpoint stored in bfloat16 (as Flux and SD3.5 ship) reads without torch, every
    parameter bit for bit the ``state_dict()`` of the model in bfloat16 (in our layout); as
    float32 it is exactly those values widened."""
    from flax import nnx

    from streamflow_jax.converters import plan_source
    from streamflow_jax.converters.common import map_tensor
    from streamflow_jax.models import flat_params

    ref = make_sd3(tmp_path / "f32", seed=3).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    model = sf.load(tmp_path / "bf16")
    assert model.dtype == jnp.bfloat16
    ours, _, _ = flat_params(nnx.to_pure_dict(model.state))
    origin = plan_source(tmp_path / "bf16")[0].origin  # parameter name -> diffusers key
    state = ref.state_dict()
    assert set(origin.values()) == set(state) and set(origin) == set(ours)
    for name, key in origin.items():
        want = map_tensor(key, state[key].view(torch.int16).numpy(), ours[name].shape, name.rpartition(".")[2])
        got = np.asarray(ours[name])
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(got.view(np.int16), want, err_msg=name)
    widened = sf.load(tmp_path / "bf16", dtype="float32")
    assert widened.dtype == jnp.float32
    for a, b in zip(jax.tree_util.tree_leaves(widened.state), jax.tree_util.tree_leaves(model.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32))


def test_shard_index_without_weight_map(tiny_sd3, tmp_path, capsys):
    _, model = tiny_sd3
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    index = sharded / f"{WEIGHTS}.index.json"
    (index).write_text(json.dumps({"metadata": {"total_size": 1}}))
    _convert_fails(capsys, sharded, tmp_path / "out", index.name, "missing 'weight_map'")
    index.write_text(json.dumps({"weight_map": 5}))
    _convert_fails(capsys, sharded, tmp_path / "out", index.name, "'weight_map' must map tensor names to shard")


def test_shard_index_disagrees_with_shards(tiny_sd3, tmp_path, capsys):
    """The index lists a key no shard holds (and misses one a shard holds): refused, naming them."""
    _, model = tiny_sd3
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    index = sharded / f"{WEIGHTS}.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"].pop("context_embedder.weight")
    data["weight_map"]["context_embedder.kernel"] = shard
    index.write_text(json.dumps(data))
    _convert_fails(capsys, sharded, tmp_path / "out", index.name, "weight_map disagrees with the shards",
                   "'context_embedder.kernel'", "'context_embedder.weight'")
