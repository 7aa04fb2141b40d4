"""Converted checkpoints: ``sf.save``, ``sf.load(dtype=...)`` of a converted directory, the ways
``load`` refuses a damaged one, and what pipeline conversion does with odd components."""

from __future__ import annotations

import json
import re
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_sd3

import streamflow_jax as sf
from streamflow_jax import checkpoint
from streamflow_jax.cli import main as cli


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny SD3 model, converted once; tests that damage it work on a copy."""
    root = tmp_path_factory.mktemp("ckpt")
    make_sd3(root / "src", seed=5)
    sf.convert(root / "src", root / "conv", progress=False)
    return root / "conv"


def damaged_copy(converted, tmp_path):
    dst = tmp_path / "conv"
    shutil.copytree(converted, dst)
    return dst


def leaves(model):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(model.state)]


def test_save_then_load_is_the_same_model(converted, tmp_path):
    model = sf.load(converted)
    out = sf.save(model, tmp_path / "saved", source="test")
    assert out == (tmp_path / "saved").absolute()
    again = sf.load(out)
    assert again.class_name == model.class_name and again.config == model.config
    assert again.fingerprint() == model.fingerprint()  # every parameter, bit for bit
    meta = json.loads((out / "config.json").read_text())[checkpoint.META_KEY]
    assert meta["source"] == "test" and meta["dtype"] == "float32"
    with pytest.raises(sf.ConversionError, match="already exists"):
        sf.save(model, out)


def test_converted_and_diffusers_models_share_compiled_programs(converted):
    """The same model loaded from its diffusers directory and from its converted one: weights
    placed alike, so one compiled velocity program serves both (a second load compiles nothing)."""
    from conftest import SD3_TINY, sd3_inputs

    from streamflow_jax.models import flow

    x, t, cond = sd3_inputs(SD3_TINY, 2, 8, 8, seed=3)
    models = [sf.load(converted.parent / "src"), sf.load(converted)]
    before = flow._velocity._cache_size()
    outs = [np.asarray(m.velocity(x, t, cond)) for m in models]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert flow._velocity._cache_size() - before <= 1  # 2 when one set of weights was placed otherwise


def test_models_of_one_config_share_a_structure_not_weights(converted, tmp_path):
    """Loading builds a config's module once (abstract_split remembers it); every load fills a
    state of its own: two models of one config, from other weights, keep their own."""
    from streamflow_jax.models import abstract_split

    make_sd3(tmp_path / "other", seed=6)
    first, other = sf.load(converted), sf.load(tmp_path / "other")
    again = sf.load(converted)
    assert first.graphdef is other.graphdef is again.graphdef
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    src = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "other")
    np.testing.assert_array_equal(np.asarray(other.state["pos_embed"]["proj"]["bias"][...]),
                                  src.pos_embed.proj.bias.detach().numpy())
    _, state = abstract_split(first.family, first.config)  # what the next load starts from
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(state))


def test_save_keeps_half_precision(converted, tmp_path):
    half = sf.load(converted, dtype="bfloat16")
    sf.save(half, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())[checkpoint.META_KEY]["dtype"] == "bfloat16"
    again = sf.load(tmp_path / "bf16")
    assert again.dtype == jnp.bfloat16 and again.fingerprint() == half.fingerprint()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_converted_with_dtype(converted, dtype):
    """``load(dtype=...)`` of a converted directory: every parameter cast exactly as numpy casts
    (round to nearest); what that does to the velocity is test_convert's half-precision test."""
    f32 = sf.load(converted)
    cast = sf.load(converted, dtype=dtype)
    assert cast.dtype == jnp.dtype(dtype) and cast.config == f32.config
    for a, b in zip(leaves(cast), leaves(f32)):
        assert a.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(a, b.astype(jnp.dtype(dtype)))


def test_load_refuses_a_missing_params_dir(converted, tmp_path):
    conv = damaged_copy(converted, tmp_path)
    shutil.rmtree(conv / "params")
    with pytest.raises(sf.ConversionError, match=r"params: missing \(incomplete converted checkpoint\)"):
        sf.load(conv)


def test_load_refuses_parameters_that_do_not_match(converted, tmp_path):
    conv = damaged_copy(converted, tmp_path)
    index_file = conv / "params" / "parts.json"
    index = json.loads(index_file.read_text())
    names = next(iter(index["parts"].values()))
    dropped = names.pop(0)
    index_file.write_text(json.dumps(index))
    with pytest.raises(sf.ConversionError, match=rf"parameters do not match the model \(differing keys \['{dropped}'\]"):
        sf.load(conv)


def test_load_refuses_bad_config_json(converted, tmp_path):
    conv = damaged_copy(converted, tmp_path)
    (conv / "config.json").write_text('{"_class_name": "SD3Transformer2DModel",')
    with pytest.raises(sf.ConversionError, match=r"config.json: not valid JSON"):
        sf.load(conv)


def test_load_refuses_an_unknown_class(converted, tmp_path):
    conv = damaged_copy(converted, tmp_path)
    raw = json.loads((conv / "config.json").read_text())
    (conv / "config.json").write_text(json.dumps({**raw, "_class_name": "UNet3DConditionModel"}))
    with pytest.raises(sf.ConversionError, match="UNet3DConditionModel"):
        sf.load(conv)
    # found by a user's pass: a list raised "unhashable type", a string for our record "no attribute get"
    (conv / "config.json").write_text(json.dumps({**raw, "_class_name": ["SD3Transformer2DModel"]}))
    with pytest.raises(sf.ConversionError, match=r"unsupported model class \['SD3Transformer2DModel'\]"):
        sf.load(conv)
    for record in ("x", None, [1]):
        (conv / "config.json").write_text(json.dumps({**raw, "streamflow_jax": record}))
        with pytest.raises(sf.ConversionError, match="streamflow_jax must be an object"):
            sf.load(conv)


def test_load_refuses_variant_or_delta_on_a_converted_dir(converted, tmp_path):
    with pytest.raises(sf.ConversionError, match="already converted"):
        sf.load(converted, variant="fp16")
    with pytest.raises(sf.ConversionError, match="already converted; variant, delta and config apply"):
        sf.load(converted, config={"num_layers": 5})  # was ignored
    with pytest.raises(sf.ConversionError, match="delta_variant='x' picks a file of delta=, and no delta is given"):
        sf.convert(tmp_path / "nowhere", tmp_path / "out", delta_variant="x")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Pipeline directories with odd components
# ---------------------------------------------------------------------------------------------


def odd_pipeline(root):
    """A supported transformer beside: a .bin-only component, weights without a config, an
    unsupported class, a scheduler (configuration only) and a large root-level file."""
    make_sd3(root / "transformer", seed=6)
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)
                            ).save_pretrained(root / "vae_bin", safe_serialization=False)  # pickle only
    (root / "no_config").mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, root / "no_config" / "diffusion_pytorch_model.safetensors")
    make_sd3(root / "unsupported", seed=7)
    raw = json.loads((root / "unsupported" / "config.json").read_text())
    (root / "unsupported" / "config.json").write_text(json.dumps({**raw, "_class_name": "UNet3DConditionModel"}))
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "big.bin").write_bytes(b"\0" * 4096)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae_bin": ["diffusers", "AutoencoderKL"], "no_config": ["diffusers", "X"],
        "unsupported": ["diffusers", "UNet3DConditionModel"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "absent": ["diffusers", "Y"]}))
    return root


def test_pipeline_conversion_records_each_odd_component(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "ROOT_FILE_LIMIT", 1024)  # big.bin (4 KiB) is over it
    src = odd_pipeline(tmp_path / "pipe")
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q"]) == 0
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["converted"] == {"transformer": "SD3Transformer2DModel"}
    assert record["copied"] == ["scheduler"]
    assert record["skipped"] == {
        "absent": "not present",
        "no_config": "no config.json",
        "unsupported": "unsupported class UNet3DConditionModel",
        "vae_bin": "only .bin (pickle) weights; safetensors needed",
        "big.bin": "root-level file over 1 KiB",
    }
    assert (tmp_path / "out" / "model_index.json").is_file() and not (tmp_path / "out" / "big.bin").exists()
    out = capsys.readouterr().out
    assert "skipped   vae_bin: only .bin (pickle) weights" in out and "skipped   big.bin: root-level file" in out
    assert sf.load(tmp_path / "out").class_name == "SD3Transformer2DModel"


def test_pipeline_without_a_supported_component(tmp_path, capsys):
    src = odd_pipeline(tmp_path / "pipe")
    shutil.rmtree(src / "transformer")
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "transformer": [None, None]}))
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "no supported component" in err and "only .bin (pickle) weights" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # nothing left behind


def test_pipeline_missing_a_component_it_names(tmp_path, capsys):
    """A component ``model_index.json`` names and the directory lacks (an incomplete download:
    SD3 without ``text_encoder_3/`` sampled with zeros for T5) is refused, before anything is
    written; one it does not use (a safety checker) may be absent."""
    src = odd_pipeline(tmp_path / "pipe")
    shutil.rmtree(src / "transformer")
    assert cli(["convert", str(src), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"model_index.json names transformer (SD3Transformer2DModel) and {src / 'transformer'} does not exist " \
           "(an incomplete download? a pipeline without it lists it as [null, null])" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_bad_arguments_around_a_model_name_themselves(converted):
    """Found by a user's pass: ``component=`` on a model directory (not a pipeline) returned the
    model whatever it named; ``make_mesh`` made empty meshes or divided by zero; an export spec
    took any dtype, a negative text length or a latent scale of 0 and failed after tracing."""
    from streamflow_jax.export import velocity_spec

    with pytest.raises(sf.ConversionError, match="not a pipeline directory .* component='vae' names nothing"):
        sf.load(converted, component="vae")
    with pytest.raises(ValueError, match=re.escape("unknown strategy 'fdsp' (choose from replicate, fsdp, tensor)")):
        sf.load(converted, strategy="fdsp")  # ignored without a mesh, and a restore failure with one
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        sf.load(converted, mesh=sf.make_mesh(1), strategy="bogus")
    for kwargs, message in [({"devices": 0}, "devices must be an integer >= 1, got 0"),
                            ({"devices": -1}, "devices must be an integer >= 1, got -1"),
                            ({"devices": 1.0}, "devices must be a count or a sequence of devices"),
                            ({"devices": 1, "data": 0}, "data must be an integer >= 1, got 0"),
                            ({"devices": 1, "model": 0}, "model must be an integer >= 1, got 0"),
                            ({"devices": 1, "data": 2}, "data=2 does not divide the 1 devices given"),
                            ({"devices": [jax.devices()[0]] * 2}, "devices lists a device more than once"),
                            ({"devices": [0, 1]}, "devices must be jax devices (jax.devices()) or a count, got 0"),
                            ({"devices": 1, "data": 1, "model": 2}, "a mesh of data=1 x model=2 devices does not fit")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sf.make_mesh(**kwargs)
    model = sf.load(converted)
    for kwargs, message in [({"dtype": "float7"}, "export dtype 'float7': choose from float32, float16, bfloat16"),
                            ({"dtype": "int32"}, "export dtype 'int32'"),
                            ({"text_len": -3}, "text_len must be an integer >= 1, got -3"),
                            ({"resolution": 16, "latent_scale": 0}, "latent_scale must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            velocity_spec(model, **kwargs)


def test_none_for_a_model_or_a_mesh_is_named(converted, tmp_path):
    """``sf.save``, ``sf.quantize``, ``sf.shard`` given None raised AttributeError from inside."""
    model = sf.load(converted)
    with pytest.raises(ValueError, match="save takes a FlowModel .*got NoneType"):
        sf.save(None, tmp_path / "x")
    with pytest.raises(ValueError, match="quantize takes a FlowModel .*got NoneType"):
        sf.quantize(None)
    with pytest.raises(ValueError, match="shard takes a FlowModel .*got NoneType"):
        sf.shard(None, sf.make_mesh(1))
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh .*got NoneType"):
        sf.shard(model, None)
    assert not (tmp_path / "x").exists()
