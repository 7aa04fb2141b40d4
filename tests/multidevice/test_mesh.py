"""On 8 host devices: sf.shard's strategies split the weights as promised, and sampling, the
pipelines and the stream engine on a mesh equal one device (fp32, 1e-5).

These run in their own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(tests/test_sharding.py starts it); in a one-device process they skip."""

from __future__ import annotations

import re
import warnings

import diffusers
import jax
import numpy as np
import pytest
from conftest import SDXL_UNET, UNETS, VARIANTS, make_perflow_pipeline, randomize, sd3_inputs, sdxl_added_inputs

import streamflow_jax as sf
from streamflow_jax import sharding
from streamflow_jax.sharding import bytes_per_device, shard_batch

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: run through tests/test_sharding.py")

SD3_WIDE = dict(VARIANTS["sd3"], num_attention_heads=4, attention_head_dim=16, caption_projection_dim=64,
                joint_attention_dim=32, pooled_projection_dim=32)
FLUX_WIDE = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
UNET_WIDE = dict(UNETS["sd15"], block_out_channels=(64, 128), norm_num_groups=16, attention_head_dim=4)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _fp8_equal(got, want, flips: int = 2):
    """An FP8 model's output on a mesh against one device's, batch element by element: equal
    to float32 rounding, except for at most ``flips`` elements, which may differ by e4m3
    rounding flips (each within 5%). A mesh sums in another order: an fp32 difference of 1e-7
    can move a value across an e4m3 rounding boundary (on one device, the input scaled by
    1 + 1e-6 moves 2 of these 8 elements by up to 1e-2). A scale taken per shard instead of
    over the whole tensor would move every element."""
    rows = [_rel(g, w) for g, w in zip(np.asarray(got), np.asarray(want), strict=True)]
    assert max(rows) <= 5e-2, rows
    assert sum(r > 1e-5 for r in rows) <= flips, rows


@pytest.fixture
def untold(monkeypatch):
    """No replication warning given yet in this process (each is given once per situation)."""
    monkeypatch.setattr(sharding, "_WARNED", set())


def _told(record, start: str) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith(start)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    randomize(diffusers.SD3Transformer2DModel(**SD3_WIDE), 0, std=0.1).save_pretrained(root / "sd3")
    randomize(diffusers.FluxTransformer2DModel(**FLUX_WIDE), 1, std=0.1).save_pretrained(root / "flux")
    randomize(diffusers.UNet2DConditionModel(**UNET_WIDE), 2, std=0.1).save_pretrained(root / "unet")
    return {k: root / k for k in ("sd3", "flux", "unet")}


@pytest.mark.parametrize("name", ["sd3", "flux", "unet"])
def test_strategies_split_the_weights(models, name):
    model = sf.load(models[name])
    total = bytes_per_device(model, sf.make_mesh(1), "replicate")
    tensor = bytes_per_device(model, sf.make_mesh(data=2, model=4), "tensor") / total
    fsdp = bytes_per_device(model, sf.make_mesh(data=8, model=1), "fsdp") / total
    assert tensor <= 0.30 and fsdp <= 0.15, (tensor, fsdp)
    # and the real placement agrees with the computed one
    mesh = sf.make_mesh(data=2, model=4)
    sharded = sf.shard(model, mesh, "tensor")
    on_device = {}
    for leaf in jax.tree_util.tree_leaves(sharded.state):
        for s in leaf.addressable_shards:
            on_device[s.device] = on_device.get(s.device, 0) + s.data.nbytes
    assert max(on_device.values()) == bytes_per_device(model, mesh, "tensor")


def test_tensor_splits_attention_only_by_whole_heads(tmp_path, untold):
    """Flux with 3 heads of 16 on a 2 x 4 mesh: the attention width (48) divides model=4, its 3
    heads do not. Split by width, each device would hold a head and a third: the attention
    weights stay whole (with a warning naming the heads) while the MLPs still split, the
    computed bytes per device are the real ones, and the velocity is one device's."""
    randomize(diffusers.FluxTransformer2DModel(**dict(FLUX_WIDE, num_attention_heads=3)), 3, std=0.1).save_pretrained(
        tmp_path / "flux")
    model = sf.load(tmp_path / "flux")
    mesh = sf.make_mesh(data=2, model=4)
    with pytest.warns(UserWarning, match=r"shard: \d+ of \d+ weights of this FluxTransformer2DModel are replicated "
                      r"on every device instead of split by strategy 'tensor'.*\(3 heads\)"):
        sharded = sf.shard(model, mesh, "tensor")
    whole, split = jax.sharding.PartitionSpec(None, None), jax.sharding.PartitionSpec(None, "model")
    joint, single = sharded.state["transformer_blocks"][0], sharded.state["single_transformer_blocks"][0]
    for attn in (joint["attn"], single["attn"]):
        for name in ("to_q", "to_k", "to_v"):
            assert attn[name]["kernel"][...].sharding.spec == whole, name
    for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert joint["attn"][name]["kernel"][...].sharding.spec == whole, name
    assert joint["attn"]["to_out"][0]["kernel"][...].sharding.spec == whole
    assert joint["ff"]["net"][0]["proj"]["kernel"][...].sharding.spec == split
    assert single["proj_mlp"]["kernel"][...].sharding.spec == split
    assert _largest_device_bytes(sharded) == bytes_per_device(model, mesh, "tensor")
    # the estimate of a model with its blocks scanned is of the placement shard() makes (it unrolls them)
    assert bytes_per_device(model.with_scanned_blocks(True), mesh, "tensor") == _largest_device_bytes(sharded)
    sf.convert(tmp_path / "flux", tmp_path / "converted")  # restored straight into its shards: the same rule
    sharding._WARNED.clear()
    with pytest.warns(UserWarning, match=r"shard: \d+ of \d+ weights of this FluxTransformer2DModel .*\(3 heads\)"):
        loaded = sf.load(tmp_path / "converted", mesh=mesh, strategy="tensor")
    assert loaded.state["transformer_blocks"][0]["attn"]["to_q"]["kernel"][...].sharding.spec == whole
    assert loaded.state["single_transformer_blocks"][0]["proj_mlp"]["kernel"][...].sharding.spec == split
    from test_flux import flux_inputs

    x, t, cond = flux_inputs(4, 8, 8)
    rng = np.random.default_rng(2)
    cond = {"encoder_hidden_states": rng.standard_normal((4, 5, 32)).astype(np.float32),
            "pooled_projections": rng.standard_normal((4, 32)).astype(np.float32), "guidance": cond["guidance"]}
    want = model.velocity(x, t, cond)
    assert _rel(sharded.velocity(*shard_batch((x,), mesh), t, shard_batch(cond, mesh)), want) <= 1e-5


def test_uneven_mesh_and_batch_are_told_once(models, untold):
    """3 devices: the weights no axis of which divides 3 stay whole, and a batch of 4 is
    replicated: each said in one warning (not one per weight or per array), once per
    situation (a pipeline's next call, a stream engine's next tick say nothing)."""
    model = sf.load(models["sd3"])
    mesh = sf.make_mesh(3)
    with pytest.warns(UserWarning, match="shard:") as record:
        sharded = sf.shard(model, mesh, "fsdp")
    [told] = _told(record, "shard:")
    weights = jax.tree_util.tree_leaves(sharded.state)
    whole = [w for w in weights if w.ndim and w.sharding.is_fully_replicated]  # counted from the real placement
    assert 0 < len(whole) < len(weights)
    assert re.match(rf"shard: {len(whole)} of {len(weights)} weights of this SD3Transformer2DModel are replicated on "
                    r"every device instead of split by strategy 'fsdp': none of their axes divides the mesh's 3 "
                    r"devices; e\.g\. \S+ \(shape \(", told), told
    x, t, cond = sd3_inputs(SD3_WIDE, 4, 8, 8, seed=6)
    with pytest.warns(UserWarning, match="batch ") as record:
        x_on, cond_on = shard_batch((x, cond), mesh)
    assert _told(record, "batch ") == ["batch 4 does not divide the mesh's data axis of 3: the batch is replicated, "
                                       "every device computes all of it"]
    assert [w.filename for w in record if str(w.message).startswith("batch ")] == [__file__]  # shard_batch's caller
    assert x_on.sharding.is_fully_replicated and len(x_on.sharding.device_set) == 3
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        sf.shard(model, mesh, "fsdp")
        shard_batch((x, cond), mesh)
    assert not _told(again, "shard:") and not _told(again, "batch ")
    assert _rel(sharded.velocity(x_on, t, cond_on), model.velocity(x, t, cond)) <= 1e-5


@pytest.mark.parametrize("strategy,data,mdl", [("fsdp", 8, 1), ("tensor", 2, 4), ("replicate", 4, 2)])
def test_sampling_on_a_mesh_equals_one_device(models, strategy, data, mdl):
    model = sf.load(models["sd3"])
    x, _, cond = sd3_inputs(SD3_WIDE, 8, 8, 8, seed=1)
    _, _, uncond = sd3_inputs(SD3_WIDE, 8, 8, 8, seed=2)
    grid = sf.schedules.flow_match(3)
    want = sf.sample(model, x, grid, cond, guidance_scale=3.0, uncond=uncond)
    mesh = sf.make_mesh(data=data, model=mdl)
    sharded = sf.shard(model, mesh, strategy)
    got = sf.sample(sharded, *shard_batch((x,), mesh), grid, shard_batch(cond, mesh), guidance_scale=3.0,
                    uncond=shard_batch(uncond, mesh))
    assert got.sharding.spec[0] == ("data" if data > 1 else None)
    assert _rel(got, want) <= 1e-5


def test_sdxl_unet_on_a_mesh_equals_one_device(tmp_path):
    """The SDXL UNet (added text_embeds and time_ids conditions, PeRFlow ddim_eps velocity):
    its weights split over a 2 x 4 tensor mesh, and sampling a batch of 8 with CFG on it equals
    one device (the strategies themselves are checked on SD3, Flux and the SD1.5 UNet above)."""
    from streamflow_jax.models.perflow import PeRFlowAdapter
    from streamflow_jax.sharding import bytes_per_device

    randomize(diffusers.UNet2DConditionModel(**SDXL_UNET), 7, std=0.1).save_pretrained(tmp_path / "unet")
    model = sf.load(tmp_path / "unet").with_adapter(PeRFlowAdapter("ddim_eps", 4))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 8, 8, 4)).astype(np.float32)
    conds = []
    for seed in (5, 6):
        text_embeds, time_ids = sdxl_added_inputs(8, seed=seed)
        states = rng.standard_normal((8, 5, SDXL_UNET["cross_attention_dim"])).astype(np.float32)
        conds.append({"encoder_hidden_states": states, "text_embeds": text_embeds, "time_ids": time_ids})
    grid = sf.schedules.perflow(4)
    want = sf.sample(model, x, grid, conds[0], guidance_scale=2.0, uncond=conds[1])
    mesh = sf.make_mesh(data=2, model=4)
    total = bytes_per_device(model, sf.make_mesh(1), "replicate")
    assert bytes_per_device(model, mesh, "tensor") / total <= 0.3
    sharded = sf.shard(model, mesh, "tensor")
    got = sf.sample(sharded, *shard_batch((x,), mesh), grid, shard_batch(conds[0], mesh), guidance_scale=2.0,
                    uncond=shard_batch(conds[1], mesh))
    assert got.sharding.spec[0] == "data"
    assert _rel(got, want) <= 1e-5


def test_quantized_model_saved_then_loaded_onto_a_mesh(models, tmp_path):
    """An FP8 SD3 saved by sf.save, loaded straight onto a 2 x 4 tensor mesh: the velocity of
    the quantized model on one device (per-tensor activation scales reduce across devices)."""
    from streamflow_jax.quantization import quantize

    q = quantize(sf.load(models["sd3"]), "fp8")
    sf.save(q, tmp_path / "q")
    mesh = sf.make_mesh(data=2, model=4)
    loaded = sf.load(tmp_path / "q", mesh=mesh, strategy="tensor")
    # placed as the float kernels are, transposed: q/k/v split by heads (their outputs), to_out by its
    # inputs; the FP8 [out, in] weights were split by their inputs as tables are, and sf.shard of the
    # quantized model the same way, where quantizing a sharded model split them by outputs
    block = loaded.state["transformer_blocks"][0]["attn"]
    assert block["to_q"]["weight"][...].sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert block["to_out"][0]["weight"][...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    reshard = sf.shard(q, mesh, "tensor").state["transformer_blocks"][0]["attn"]["to_q"]["weight"][...]
    assert reshard.sharding.spec == jax.sharding.PartitionSpec("model", None)
    x, t, cond = sd3_inputs(SD3_WIDE, 8, 8, 8, seed=4)
    want = q.velocity(x, t, cond)
    got = loaded.velocity(*shard_batch((x,), mesh), t, shard_batch(cond, mesh))
    _fp8_equal(got, want)  # measured: 7 elements to 2e-7, one flipped (1.8e-2)
    # calibrated on the mesh: the scales one device measures (each layer reports its whole
    # input's range), and a calibrated model saved and loaded onto the mesh gives its velocity
    from flax import nnx

    from streamflow_jax.quantization import Fp8Linear

    def scales(m):
        return {p: float(n.input_scale[...]) for p, n in nnx.iter_graph(m.module) if isinstance(n, Fp8Linear)}

    one = sf.calibrate(q, lambda m: m.velocity(x, t, cond))
    on_mesh = sf.calibrate(loaded, lambda m: m.velocity(*shard_batch((x,), mesh), t, shard_batch(cond, mesh)))
    assert scales(on_mesh) == scales(one) and len(scales(one)) > 10
    sf.save(one, tmp_path / "c")
    loaded = sf.load(tmp_path / "c", mesh=mesh, strategy="tensor")
    got = loaded.velocity(*shard_batch((x,), mesh), t, shard_batch(cond, mesh))
    _fp8_equal(got, one.velocity(x, t, cond))


def _largest_device_bytes(model) -> int:
    on_device = {}
    for leaf in jax.tree_util.tree_leaves(model.state):
        for s in leaf.addressable_shards:
            on_device[s.device] = on_device.get(s.device, 0) + s.data.nbytes
    return max(on_device.values())


def test_load_straight_onto_a_mesh(models, tmp_path, monkeypatch):
    sf.convert(models["flux"], tmp_path / "flux", progress=False)
    mesh = sf.make_mesh(data=2, model=4)
    model = sf.load(tmp_path / "flux", mesh=mesh, strategy="tensor")
    q = model.state["transformer_blocks"][0]["attn"]["to_q"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert q.addressable_shards[0].data.shape == (64, 16)
    from test_flux import flux_inputs

    x, t, cond = flux_inputs(4, 8, 8)
    cond = {"encoder_hidden_states": np.random.default_rng(0).standard_normal((4, 5, 32)).astype(np.float32),
            "pooled_projections": np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32),
            "guidance": cond["guidance"]}
    want = sf.load(models["flux"]).velocity(x, t, cond)
    assert _rel(model.velocity(x, t, cond), want) <= 1e-5
    # with the blocks scanned (loaded onto the mesh, then stacked): the stacked weights keep
    # their blocks' placement, each device holds what it held, the velocity is the same
    monkeypatch.setenv("STREAMFLOW_JAX_SCAN_BLOCKS", "on")
    scanned = sf.load(tmp_path / "flux", mesh=mesh, strategy="tensor")
    assert scanned.scanned
    stacked = scanned.state["transformer_blocks"][0]["stack"]["attn"]["to_q"]["kernel"][...]
    assert stacked.shape == (2, 64, 64) and stacked.addressable_shards[0].data.shape == (2, 64, 16)
    assert _largest_device_bytes(scanned) == _largest_device_bytes(model)
    assert _rel(scanned.velocity(x, t, cond), want) <= 1e-5


def test_stream_engine_over_a_mesh_equals_one_device(models):
    model = sf.load(models["sd3"])
    x, _, cond = sd3_inputs(SD3_WIDE, 10, 8, 8, seed=3)
    shapes = {k: v.shape[1:] for k, v in cond.items()}
    outs = []
    mesh = sf.make_mesh(data=4, model=2)
    for mesh, per_call in ((None, 1), (mesh, 1), (mesh, 3)):  # 3 ticks a call: a scan of ticks over the mesh
        m = model if mesh is None else sf.shard(model, mesh, "tensor")
        engine = sf.StreamEngine(m, (8, 8, 4), shapes, slots_per_stream=4, streams=2, mesh=mesh,
                                 ticks_per_call=per_call)
        ids = [engine.submit({k: v[i] for k, v in cond.items()}, steps=2 + i % 3, noise=x[i]) for i in range(10)]
        engine.run()
        outs.append(np.stack([engine.result(r) for r in ids]))
    assert _rel(outs[1], outs[0]) <= 1e-5 and _rel(outs[2], outs[0]) <= 1e-5


def test_stream_engine_refuses_a_model_on_other_devices(models):
    """A model sharded onto other devices than the engine's mesh failed at the first tick with
    JAX's "incompatible devices"; the engine says so when it is made, with the fix. A model
    on the mesh, or not committed to any device (sf.load's), is taken."""
    model = sf.load(models["sd3"])
    shapes = {k: v.shape[1:] for k, v in sd3_inputs(SD3_WIDE, 1, 8, 8)[2].items()}
    first, last = jax.devices()[:4], jax.devices()[4:]
    mesh = sf.make_mesh(last)
    for elsewhere, devices in ((sf.shard(model, sf.make_mesh(first), "fsdp"), first),
                               (jax.device_put(model, last[0]), last[:1])):
        with pytest.raises(ValueError, match=re.escape(
                f"the model's weights are on devices {[d.id for d in devices]} but the mesh has "
                f"{[d.id for d in last]}: shard the model onto this mesh (sf.shard(model, mesh) or "
                "sf.load(..., mesh=mesh)) or pass the mesh it was loaded with")):
            sf.StreamEngine(elsewhere, (8, 8, 4), shapes, slots_per_stream=4, mesh=mesh)
    x, _, cond = sd3_inputs(SD3_WIDE, 1, 8, 8, seed=7)
    grid = sf.schedules.flow_match(2)
    want = sf.sample(model, x, grid, cond)[0]
    for taken in (sf.shard(model, mesh, "fsdp"), model):
        engine = sf.StreamEngine(taken, (8, 8, 4), shapes, slots_per_stream=4, mesh=mesh)
        rid = engine.submit({k: v[0] for k, v in cond.items()}, grid=grid, noise=x[0])
        engine.run()
        assert _rel(engine.result(rid), want) <= 1e-5


def test_pipeline_with_a_mesh(tmp_path):
    root = make_perflow_pipeline(tmp_path / "p")
    mesh = sf.make_mesh(data=4, model=2)
    pipe = sf.Pipeline.from_diffusers(root, mesh=mesh, strategy="tensor")
    layer = pipe.text_encoder.state["text_model"]["encoder"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    # fc1's 37 hidden units do not divide by 2: replicated, not an error
    assert layer["mlp"]["fc1"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, None)
    noise = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
    prompts = ["a cat", "a dog", "the cat", "string"]
    got = pipe(prompts, noise=noise, guidance_scale=2.0, output_type="latent")
    want = sf.Pipeline.from_diffusers(root)(prompts, noise=noise, guidance_scale=2.0, output_type="latent")
    assert _rel(got, want) <= 1e-5


def test_cli_devices_and_strategy(tmp_path, capsys):
    import json

    from streamflow_jax.cli import main as cli

    assert cli(["bench", "--devices", "8", "--strategy", "tensor", "--batch", "8", "--steps", "2",
                "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["devices"] == 8 and row["strategy"] == "tensor"
    assert cli(["generate", "--devices", "8", "--strategy", "fsdp", "--per-digit", "1", "--steps", "4",
                "--out", str(tmp_path / "d.png")]) == 0
    assert "digit accuracy" in capsys.readouterr().out


def test_digits_stream_runs_its_engine_on_the_pipeline_mesh():
    """``DigitsPipeline.stream`` (``generate --stream --devices N``) put its engine on one device
    whatever the pipeline's mesh; on the mesh it gives the one-device images."""
    from streamflow_jax.pipelines import DigitsPipeline

    labels = np.arange(8)
    want = DigitsPipeline.load().stream(labels, steps=4, slots_per_stream=4)
    on_mesh = DigitsPipeline.load(mesh=sf.make_mesh(4, data=4, model=1))
    assert _rel(on_mesh.stream(labels, steps=4, slots_per_stream=4), want) <= 1e-5
    with pytest.raises(ValueError, match="6 slots do not split over the mesh's 4 data devices"):
        on_mesh.stream(labels, steps=4, slots_per_stream=6)
