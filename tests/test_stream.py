"""The stream engine: same images as sequential sampling, nothing lost, bad requests fail alone."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import VARIANTS, compiles, sd3_inputs

import streamflow_jax as sf
from streamflow_jax.stream import RequestError, StreamEngine

CFG = VARIANTS["sd3"]
SHAPES = {"encoder_hidden_states": (7, CFG["joint_attention_dim"]), "pooled_projections": (CFG["pooled_projection_dim"],)}


@pytest.fixture
def model(tiny_sd3):
    return sf.load(tiny_sd3[0])


def _requests(n, seed=0):
    x, _, cond = sd3_inputs(CFG, n, 8, 8, seed=seed)
    return x, [{k: v[i] for k, v in cond.items()} for i in range(n)]


def test_stream_equals_sequential_sample(model):
    """Each request's result equals sf.sample on that request alone (mixed step counts)."""
    x, conds = _requests(6)
    steps = [2, 5, 3, 4, 2, 6]
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=3, streams=1)
    ids = [engine.submit(c, steps=s, shift=3.0, noise=x[i]) for i, (c, s) in enumerate(zip(conds, steps))]
    engine.run()
    for i, rid in enumerate(ids):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(steps[i], shift=3.0),
                          {k: v[None] for k, v in conds[i].items()})
        np.testing.assert_allclose(engine.result(rid), np.asarray(alone)[0], rtol=1e-5, atol=1e-5)


def test_requests_of_different_schedules_each_follow_diffusers(model, tiny_sd3):
    """StreamFlow's premise: one engine advances requests of different schedules side by side
    (3 steps at shift 1, 5 at shift 6, a custom grid, 1 step), each request's result the one
    diffusers' FlowMatchEulerDiscreteScheduler loop gives alone with that schedule."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, ref = tiny_sd3
    x, conds = _requests(4, seed=5)
    schedules = [dict(steps=3, shift=1.0), dict(steps=5, shift=6.0), dict(sigmas=[1.0, 0.8, 0.45, 0.2]),
                 dict(steps=1, shift=3.0)]
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, streams=2)
    ids = []
    for i, sch in enumerate(schedules):
        if "sigmas" in sch:
            ids.append(engine.submit(conds[i], grid=np.array([*sch["sigmas"], 0.0], np.float32), noise=x[i]))
        else:
            ids.append(engine.submit(conds[i], steps=sch["steps"], shift=sch["shift"], noise=x[i]))
    engine.run()
    for i, sch in enumerate(schedules):
        sched = FlowMatchEulerDiscreteScheduler(shift=sch.get("shift", 1.0))
        if "sigmas" in sch:
            sched.set_timesteps(sigmas=sch["sigmas"])
        else:
            sched.set_timesteps(sch["steps"])
        lat = torch.from_numpy(x[i : i + 1]).permute(0, 3, 1, 2)
        cond = {k: torch.from_numpy(np.asarray(v)[None]) for k, v in conds[i].items()}
        with torch.no_grad():
            for t in sched.timesteps:
                v = ref(hidden_states=lat, timestep=t.expand(1), **cond).sample
                lat = sched.step(v, t, lat).prev_sample
        want = lat.permute(0, 2, 3, 1).numpy()[0]
        got = np.asarray(engine.result(ids[i]))
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5, (sch, np.abs(got - want).max())


def test_stream_with_guidance_equals_sequential(model):
    x, conds = _requests(4, seed=1)
    _, unconds = _requests(4, seed=2)
    scales = [1.5, 3.0, 6.0, 2.0]
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, streams=2, guidance=True)
    ids = [engine.submit(conds[i], steps=3, noise=x[i], guidance_scale=scales[i], uncond=unconds[i]) for i in range(4)]
    # the one guidance rule: no scale, or one <= 1, is no guidance, even in a guided engine
    plain = [engine.submit(conds[0], steps=3, noise=x[0]), engine.submit(conds[1], steps=3, noise=x[1],
                                                                         guidance_scale=0.5, uncond=unconds[1])]
    engine.run()
    for i, rid in enumerate(ids):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(3, shift=1.0),
                          {k: v[None] for k, v in conds[i].items()}, guidance_scale=scales[i],
                          uncond={k: v[None] for k, v in unconds[i].items()})
        np.testing.assert_allclose(engine.result(rid), np.asarray(alone)[0], rtol=1e-4, atol=1e-4)
    for i, rid in enumerate(plain):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(3, shift=1.0),
                          {k: v[None] for k, v in conds[i].items()})
        np.testing.assert_allclose(engine.result(rid), np.asarray(alone)[0], rtol=1e-4, atol=1e-4)


def test_pipelined_ticks(model):
    """N slots, N-step requests, one admitted per tick: after N-1 warm-up ticks one finishes per tick."""
    _, conds = _requests(8)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=4)
    for i, c in enumerate(conds):
        engine.submit(c, steps=4, seed=i)
    finished_per_tick = []
    while engine.pending:
        finished_per_tick.append(len(engine.tick()))
    assert finished_per_tick[:3] == [0, 0, 0] and finished_per_tick[3:8] == [1, 1, 1, 1, 1]
    assert sum(finished_per_tick) == 8


def test_engines_pin_their_models_and_share_compiled_ticks(model, tiny_sd3):
    """The compiled ticks take the model as ``Pinned`` leaves (no NNX flattening per call): it
    gives the model back leaf for leaf, a second engine on an equal model (loaded again) shares
    the structure key and compiles nothing new, and its results equal sf.sample's."""
    import jax

    from streamflow_jax.stream import Pinned

    pinned = Pinned.of(model)
    back = jax.tree_util.tree_leaves(pinned.model())
    assert all(a is b for a, b in zip(back, jax.tree_util.tree_leaves(model)))
    x, conds = _requests(2)

    def run_engine(m):
        engine = StreamEngine(m, (8, 8, 4), SHAPES, slots_per_stream=2)
        ids = [engine.submit(c, steps=3, noise=x[i]) for i, c in enumerate(conds)]
        engine.run()
        return engine, [engine.result(rid) for rid in ids]

    first, _ = run_engine(model)
    seen = []
    listener = lambda event, duration, **kw: seen.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second, results = run_engine(sf.load(tiny_sd3[0]))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert second._pinned_velocity.key == first._pinned_velocity.key == pinned.key
    assert "/jax/core/compile/backend_compile_duration" not in seen
    for i, c in enumerate(conds):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(3, shift=1.0), {k: v[None] for k, v in c.items()})
        np.testing.assert_allclose(results[i], np.asarray(alone)[0], rtol=1e-5, atol=1e-5)


def test_fifty_mixed_requests_none_lost(model):
    x, conds = _requests(50, seed=3)
    rng = np.random.default_rng(0)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=4, streams=2)
    ids = [engine.submit(conds[i], steps=int(rng.integers(1, 7)), seed=int(rng.integers(1 << 30)))
           for i in range(50)]
    results = engine.run()
    assert sorted(results) == sorted(ids) and len(set(ids)) == 50
    assert all(r.shape == (8, 8, 4) and np.isfinite(r).all() for r in results.values())
    assert engine.pending == 0


def test_a_failing_postprocess_fails_its_request_alone(model):
    """A postprocess that raises on one output: that request's result is the error, the others
    finishing in the same tick get theirs (they were dropped and their ids never answered)."""
    x, conds = _requests(4, seed=2)
    calls = []

    def postprocess(out):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return out * 2

    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=4, admit_per_tick=4, postprocess=postprocess)
    ids = [engine.submit(conds[i], steps=2, noise=x[i]) for i in range(4)]
    results = engine.run()
    assert sorted(results) == ids and engine.pending == 0
    failed = [rid for rid in ids if isinstance(results[rid], RequestError)]
    assert len(failed) == 1 and str(results[failed[0]]) == f"request {failed[0]}: postprocess failed (RuntimeError: boom)"
    for i, rid in enumerate(ids):
        if rid not in failed:
            want = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(2, shift=1.0),
                             {k: v[None] for k, v in conds[i].items()})[0]
            np.testing.assert_allclose(results[rid], 2 * np.asarray(want), rtol=1e-4, atol=1e-5)


def test_invalid_requests_fail_alone(model):
    x, conds = _requests(3, seed=4)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2)
    good = [engine.submit(conds[0], steps=2, seed=0), engine.submit(conds[1], steps=3, seed=1)]
    bad_size = engine.submit(conds[2], steps=2, noise=np.zeros((6, 8, 4), np.float32))
    bad_cond = engine.submit({"encoder_hidden_states": np.zeros((9, 12), np.float32),
                              "pooled_projections": conds[2]["pooled_projections"]}, steps=2, seed=2)
    missing = engine.submit({}, steps=2, seed=3)
    no_steps = engine.submit(conds[2], seed=4)
    cfg_on_plain = engine.submit(conds[2], steps=2, seed=5, guidance_scale=2.0, uncond=conds[0])
    bad_seed = engine.submit(conds[2], steps=2, seed=-1)
    nan_scale = engine.submit(conds[2], steps=2, seed=7, guidance_scale=float("nan"))
    float_steps = engine.submit(conds[2], steps=2.7, seed=9)  # int() made these 2, 3 and 1 steps
    str_steps = engine.submit(conds[2], steps="3", seed=9)
    bool_steps = engine.submit(conds[2], steps=True, seed=9)
    long_grid = engine.submit(conds[2], grid=np.linspace(1, 0, 1002), seed=9)
    both = engine.submit(conds[2], steps=3, grid=np.linspace(1, 0, 3), seed=9)
    complex_noise = engine.submit(conds[2], steps=2, noise=np.ones((8, 8, 4)) + 1j)  # lost its imaginary part
    bool_cond = engine.submit({**conds[2], "pooled_projections": np.ones(SHAPES["pooled_projections"], bool)},
                              steps=2, seed=9)
    str_strength = engine.submit(conds[2], steps=4, seed=9, init=np.zeros((8, 8, 4)), strength="0.5")  # taken
    many_strengths = engine.submit(conds[2], steps=4, seed=9, init=np.zeros((8, 8, 4)), strength=[0.5, 0.6])
    good.append(engine.submit(conds[2], steps=1, seed=6))
    good.append(engine.submit(conds[2], steps=1, seed=8, guidance_scale=1.0))  # <= 1: no guidance, the one rule
    results = engine.run()
    assert len(results) == 20
    for rid in good:
        assert engine.result(rid).shape == (8, 8, 4)
    for rid, msg in [(bad_size, r"latent shape \(6, 8, 4\)"), (bad_cond, r"cond\['encoder_hidden_states'\] has shape \(9, 12\)"),
                     (missing, "cond keys"), (no_steps, "give steps or grid"),
                     (cfg_on_plain, "asks for classifier-free guidance, and this engine runs without it"),
                     (bad_seed, r"seed -1 outside \[0, 2\*\*32\)"), (nan_scale, "guidance_scale nan is not finite"),
                     (float_steps, "steps must be an integer, got 2.7"), (str_steps, "steps must be an integer, got '3'"),
                     (bool_steps, "steps must be an integer, got True"), (long_grid, "grid has 1001 steps; at most 1000"),
                     (both, "give steps or grid, not both"),
                     (complex_noise, "noise must be real floating-point numbers, got an array of complex128"),
                     (bool_cond, r"cond\['pooled_projections'\] must be real numbers, got an array of bool"),
                     (str_strength, r"strength must be a number in \(0, 1\], got '0.5'"),
                     (many_strengths, r"strength must be one number in \(0, 1\] here, got shape \(2,\)")]:
        with pytest.raises(RequestError, match=msg):
            engine.result(rid)


def test_stream_onnxruntime_equals_xla(model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("jax2onnx")

    x, conds = _requests(4, seed=5)
    outs = {}
    for backend in ("xla", "onnxruntime"):
        engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, backend=backend)
        ids = [engine.submit(conds[i], steps=2 + i, noise=x[i]) for i in range(4)]
        engine.run()
        outs[backend] = np.stack([engine.result(r) for r in ids])
    np.testing.assert_allclose(outs["onnxruntime"], outs["xla"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("admit,tick,k", [(1, "split", 1), (5, "split", 1), (5, "fused", 1), (1, "split", 3)])
def test_decoder_runs_inside_the_tick(model, tmp_path, admit, tick, k):
    """Finished slots decoded on the device during the tick equal decoding the sequential result;
    admit=5 makes all five finish on one tick (a padded decode batch); fused: one program a tick;
    k=3: three ticks a call (a scan decoding inside it; 7 ticks: two scans, then one tick)."""
    import diffusers
    from conftest import VAES, randomize

    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1).save_pretrained(tmp_path / "vae")
    vae = sf.load(tmp_path / "vae")
    x, conds = _requests(5, seed=6)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=5, decoder=vae, admit_per_tick=admit,
                          tick=tick, ticks_per_call=k)
    ids = [engine.submit(conds[i], steps=3, noise=x[i]) for i in range(5)]
    engine.run()
    for i, rid in enumerate(ids):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(3, shift=1.0),
                          {k: v[None] for k, v in conds[i].items()})
        want = np.asarray(vae.module.decode_latents(alone))[0]
        assert engine.result(rid).shape == want.shape == (16, 16, 3)
        np.testing.assert_allclose(engine.result(rid), want, rtol=1e-4, atol=1e-4)


def test_engine_runs_convolutions_in_the_layout_switched_to(model, tmp_path, monkeypatch):
    """$STREAMFLOW_JAX_CONV_LAYOUT=ohwi: the engine runs its own copies of the model and the
    decoder with [out, kh, kw, in] kernels (the caller's models keep theirs), and the images
    equal sequential sampling decoded by the model as converted."""
    import diffusers
    from conftest import VAES, randomize

    from streamflow_jax.models.layers import Conv2d

    def layouts(m):
        from flax import nnx

        return {node.layout for _, node in nnx.iter_graph(m.module) if isinstance(node, Conv2d)}

    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1).save_pretrained(tmp_path / "vae")
    vae = sf.load(tmp_path / "vae")
    monkeypatch.setenv("STREAMFLOW_JAX_CONV_LAYOUT", "ohwi")
    x, conds = _requests(3, seed=7)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=3, decoder=vae, admit_per_tick=3)
    assert layouts(engine._decoder) == layouts(engine._velocity_model) == {"OHWI"}  # SD3's patch embedding too
    assert layouts(vae) == layouts(model) == {"HWIO"}
    ids = [engine.submit(conds[i], steps=2, noise=x[i]) for i in range(3)]
    engine.run()
    for i, rid in enumerate(ids):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(2, shift=1.0),
                          {k: v[None] for k, v in conds[i].items()})
        np.testing.assert_allclose(engine.result(rid), np.asarray(vae.module.decode_latents(alone))[0],
                                   rtol=1e-4, atol=1e-4)


def test_fused_tick_warms_up_and_equals_the_split_tick(tiny_sd3, tmp_path, monkeypatch):
    """One program per tick ($STREAMFLOW_JAX_TICK=fused): warm_up compiles every variant a run
    meets (guided and plain requests, one and two finishing on a tick), and the results are the
    three-program tick's (the decoder in a fused tick: test_decoder_runs_inside_the_tick). The
    model comes from a converted directory, as `serve` often loads one (its weights once
    restored as committed arrays made the run compile again after the warm-up)."""
    sf.convert(tiny_sd3[0], tmp_path / "converted", progress=False)
    model = sf.load(tmp_path / "converted")

    x, conds = _requests(6, seed=9)
    _, unconds = _requests(6, seed=10)
    rng = np.random.default_rng(0)
    reqs = [dict(cond=conds[i], steps=int(rng.integers(1, 5)), noise=x[i] if i % 2 else None,
                 seed=None if i % 2 else i, guidance_scale=2.5 if i % 3 else None,
                 uncond=unconds[i] if i % 3 else None) for i in range(6)]
    out = {}
    for tick in ("split", "fused"):
        monkeypatch.setenv("STREAMFLOW_JAX_TICK", tick)
        engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, guidance=True, min_batch=2)
        assert engine.tick_mode == tick
        if tick == "fused":
            engine.warm_up(image_to_image=False)
        with compiles() as compiled:
            ids = [engine.submit(**r) for r in reqs]
            engine.run()
        assert compiled == [] or tick == "split"
        out[tick] = np.stack([engine.result(i) for i in ids])
    assert np.isfinite(out["split"]).all()
    np.testing.assert_allclose(out["fused"], out["split"], rtol=1e-5, atol=1e-5)


def test_ticks_per_call_run_the_same_ticks_as_one_scan(model, monkeypatch):
    """$STREAMFLOW_JAX_TICKS_PER_CALL=3: the engine plans three ticks ahead and runs them as one
    compiled scan; guided and plain requests, seeds and noise, image to image, step counts 1-4,
    two streams (one compiled batch size, to keep the compiles few): the same ticks finish the same requests in the same order with the results of
    one call a tick, warm_up compiles every scan and single tick a run meets, and a run's last
    ticks (fewer than three) run one call each."""
    x, conds = _requests(9, seed=11)
    _, unconds = _requests(9, seed=12)
    rng = np.random.default_rng(1)
    reqs = [dict(cond=conds[i], steps=int(rng.integers(1, 5)), noise=x[i] if i % 2 else None,
                 seed=None if i % 2 else i, guidance_scale=2.0 if i % 3 else None,
                 uncond=unconds[i] if i % 3 else None, init=x[(i + 4) % 9] if i % 4 == 1 else None)
            for i in range(9)]
    out, order, ticks, calls = {}, {}, {}, {}
    for k in (1, 3):
        monkeypatch.setenv("STREAMFLOW_JAX_TICKS_PER_CALL", str(k))
        engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, streams=2, guidance=True, min_batch=4)
        assert engine.ticks_per_call == k
        engine.warm_up()
        with compiles() as compiled:
            ids = [engine.submit(**r) for r in reqs]
            order[k], calls[k] = [], 0
            while engine.pending:
                order[k] += engine.tick()
                calls[k] += 1
            engine.run()
        assert compiled == []
        out[k], ticks[k] = np.stack([engine.result(i) for i in ids]), engine.ticks
    assert np.isfinite(out[1]).all() and sorted(order[1]) == list(range(9))
    assert order[3] == order[1] and ticks[3] == ticks[1]
    assert calls[3] == ticks[1] // 3 + ticks[1] % 3  # the scans, then the last ticks one call each
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, streams=2, guidance=True, min_batch=4,
                          ticks_per_call=3)
    for r in reqs:
        engine.submit(**r)
    engine.run(max_ticks=4)  # a scan of three, then one tick: max_ticks counts ticks, not calls
    assert engine.ticks == 4 and engine.pending
    np.testing.assert_allclose(out[3], out[1], rtol=1e-5, atol=1e-5)


def test_ticks_per_call_is_checked_and_room_looks_that_far_ahead(model, monkeypatch):
    from streamflow_jax.stream import Request, SlotScheduler

    for given in ("four", "0", "65", "-2", "2.5"):
        monkeypatch.setenv("STREAMFLOW_JAX_TICKS_PER_CALL", given)
        with pytest.raises(ValueError, match=re.escape(f"$STREAMFLOW_JAX_TICKS_PER_CALL={given!r}: expected an "
                                                       "integer from 1 to 64")):
            StreamEngine(model, (8, 8, 4), SHAPES)
    monkeypatch.setenv("STREAMFLOW_JAX_TICKS_PER_CALL", " 8 ")
    assert StreamEngine(model, (8, 8, 4), SHAPES).ticks_per_call == 8
    assert StreamEngine(model, (8, 8, 4), SHAPES, ticks_per_call=2).ticks_per_call == 2  # the argument wins
    for given in (0, True, 2.0, "x"):
        with pytest.raises(ValueError, match=re.escape(f"ticks_per_call={given!r}: expected an integer")):
            StreamEngine(model, (8, 8, 4), SHAPES, ticks_per_call=given)
    with pytest.raises(ValueError, match=re.escape("ticks_per_call=2: K ticks a call are a compiled scan, the xla "
                                                   "backend's; backend 'onnxruntime' runs one tick a call")):
        StreamEngine(model, (8, 8, 4), SHAPES, backend="onnxruntime", ticks_per_call=2)  # refused, not ignored

    def req(steps):
        return Request(0, np.linspace(1, 0, steps + 1).astype(np.float32), {}, None, 0.0, 0, None)

    sched = SlotScheduler(num_slots=2, admit_per_tick=1)
    assert (sched.room(1), sched.room(3)) == (1, 2)  # two free slots, one admission a tick
    sched.requests, sched.steps = [req(3), req(5)], [2, 0]  # one step to go, and five
    assert (sched.room(1), sched.room(2), sched.room(3)) == (0, 1, 1)  # the first frees its slot after a tick
    sched.queue.append(req(1))  # queued, one step: admitted on the second tick, done on it
    assert (sched.room(2), sched.room(3)) == (0, 1)


def test_tick_without_graphs_compiles_apart_and_equals_the_default(model, monkeypatch):
    """$STREAMFLOW_JAX_TICK_GRAPHS=off (``graphs=``): the tick's programs are compiled with XLA's
    CUDA graphs off for them alone (a compile option; only GPUs have graphs, so on this CPU the
    numbers are the default's), warm_up covers them, and the switch is checked."""
    from streamflow_jax import stream

    x, conds = _requests(4, seed=3)
    reqs = [dict(cond=conds[i], steps=2 + i % 2, noise=x[i]) for i in range(4)]
    out = {}
    for graphs in ("on", "off"):
        monkeypatch.setenv(stream.TICK_GRAPHS_ENV, graphs.upper())
        engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, min_batch=2)
        assert engine.tick_graphs is (graphs == "on")
        engine.warm_up(image_to_image=False)
        with compiles() as compiled:
            ids = [engine.submit(**r) for r in reqs]
            engine.run()
        assert compiled == []
        out[graphs] = np.stack([engine.result(i) for i in ids])
    np.testing.assert_array_equal(out["off"], out["on"])
    assert stream._programs(False) is not stream._programs(True)  # compiled apart, each shared
    assert stream._programs(False) is stream._programs(False)
    assert StreamEngine(model, (8, 8, 4), SHAPES, graphs=False).tick_graphs is False
    monkeypatch.setenv(stream.TICK_GRAPHS_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"\$STREAMFLOW_JAX_TICK_GRAPHS='sometimes': expected auto, on or off"):
        StreamEngine(model, (8, 8, 4), SHAPES)
    with pytest.raises(ValueError, match=r"graphs='no': expected True, False, 'auto', 'on' or 'off'"):
        StreamEngine(model, (8, 8, 4), SHAPES, graphs="no")
    with pytest.raises(ValueError, match=r"graphs=1: expected"):  # named as given, not a spelling of it
        StreamEngine(model, (8, 8, 4), SHAPES, graphs=1)
    assert stream.tick_graphs(np.False_) is False and stream.tick_graphs(" Off ") is False


def test_thousand_mixed_requests_bad_ones_fail_alone(model):
    """1,000 requests, about a third invalid in each way the issue names (non-finite guidance,
    conditioning or noise) and a few more: every request yields exactly one result or one
    RequestError at submit, and every good one a finite latent."""
    x, conds = _requests(8, seed=7)
    _, unconds = _requests(8, seed=8)
    rng = np.random.default_rng(0)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=8, streams=2, guidance=True)
    kinds = ["good", "nan_guidance", "inf_guidance", "nan_cond", "inf_uncond", "nan_noise", "bad_grid"]
    expected = {}
    for i in range(1000):
        kind = kinds[0] if rng.random() < 0.65 else kinds[int(rng.integers(1, len(kinds)))]
        c, u = dict(conds[i % 8]), dict(unconds[i % 8])
        args = dict(steps=int(rng.integers(1, 4)), guidance_scale=float(rng.uniform(1, 5)), cond=c, uncond=u,
                    seed=i)
        if kind == "nan_guidance":
            args["guidance_scale"] = float("nan")
        elif kind == "inf_guidance":
            args["guidance_scale"] = float("-inf")
        elif kind == "nan_cond":
            args["cond"] = {**c, "pooled_projections": np.where(np.arange(10) == 3, np.nan, c["pooled_projections"])}
        elif kind == "inf_uncond":
            args["uncond"] = {**u, "encoder_hidden_states": np.full_like(u["encoder_hidden_states"], np.inf)}
        elif kind == "nan_noise":
            args.pop("seed")
            args["noise"] = np.where(x[i % 8] > 1, np.nan, x[i % 8])
        elif kind == "bad_grid":
            args.pop("steps")
            args["grid"] = np.array([0.2, 0.7, 0.0], np.float32)
        expected[engine.submit(args.pop("cond"), **args)] = kind
    assert all(isinstance(engine.results.get(r), RequestError) for r, k in expected.items() if k != "good")
    results = engine.run()
    assert sorted(results) == sorted(expected) and engine.pending == 0
    messages = {"nan_guidance": "guidance_scale nan is not finite", "inf_guidance": "guidance_scale -inf",
                "nan_cond": "cond['pooled_projections'] has non-finite", "inf_uncond": "uncond['encoder_hidden_states']",
                "nan_noise": "noise has non-finite", "bad_grid": "grid must run down"}
    for rid, kind in expected.items():
        if kind == "good":
            assert results[rid].shape == (8, 8, 4) and np.isfinite(results[rid]).all()
        else:
            with pytest.raises(RequestError, match=re.escape(messages[kind])):
                engine.result(rid)
    assert sum(k == "good" for k in expected.values()) > 500 and len(set(expected.values())) == len(kinds)


def test_guided_onnxruntime_engine_with_a_decoder_max_ticks_and_reject(model, tmp_path):
    """ONNX Runtime behind a guided engine with a (XLA) decoder equals the XLA engine; run stops
    at max_ticks with requests still pending; reject records an error under its own id."""
    pytest.importorskip("onnxruntime")
    import diffusers
    from conftest import VAES, randomize

    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1).save_pretrained(tmp_path / "vae")
    vae = sf.load(tmp_path / "vae")
    x, conds = _requests(3, seed=9)
    _, unconds = _requests(3, seed=10)
    outs = {}
    for backend in ("xla", "onnxruntime"):
        engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, guidance=True, decoder=vae,
                              backend=backend)
        ids = [engine.submit(conds[i], steps=2 + i, noise=x[i], guidance_scale=2.0 + i, uncond=unconds[i])
               for i in range(3)]
        rejected = engine.reject("prompt failed to encode")
        engine.run(max_ticks=2)
        assert engine.pending > 0 and len(engine.results) < 4  # stopped early
        engine.run()
        outs[backend] = np.stack([engine.result(r) for r in ids])
        with pytest.raises(RequestError, match="prompt failed to encode"):
            engine.result(rejected)
    assert outs["xla"].shape == (3, 16, 16, 3)
    np.testing.assert_allclose(outs["onnxruntime"], outs["xla"], rtol=1e-4, atol=1e-4)


def test_engine_shapes_the_model_cannot_take_are_refused_at_construction(model):
    """A latent or conditioning shape the model cannot take fails when the engine is made,
    naming it, not inside the first tick's compiled step (a JAX shape error there)."""
    with pytest.raises(ValueError, match=r"latent_shape \(8, 8, 16\): SD3Transformer2DModel takes \(H, W, 4\)"):
        StreamEngine(model, (8, 8, 16), SHAPES)
    with pytest.raises(ValueError, match="latent height 9 is not a positive multiple of 2"):
        StreamEngine(model, (9, 8, 4), SHAPES)
    with pytest.raises(ValueError, match=r"cond_shapes names \['encoder_hidden_states'\]; SD3Transformer2DModel takes "
                                         r"\['encoder_hidden_states', 'pooled_projections'\]"):
        StreamEngine(model, (8, 8, 4), {"encoder_hidden_states": SHAPES["encoder_hidden_states"]})
    with pytest.raises(ValueError, match=r"cond_shapes\['encoder_hidden_states'\] is \(7, 99\)"):
        StreamEngine(model, (8, 8, 4), {**SHAPES, "encoder_hidden_states": (7, 99)})
    StreamEngine(model, (8, 8, 4), {**SHAPES, "encoder_hidden_states": (11, CFG["joint_attention_dim"])})  # any length
    # truncated, clamped or taken for a model before (a user's pass found each)
    for args, kwargs, message in [
        ((model, (8.5, 8, 4), SHAPES), {}, "latent_shape[0] must be an integer >= 1, got 8.5"),
        ((model, (8, 8, 4), {**SHAPES, "pooled_projections": 32}), {}, "cond_shapes['pooled_projections'] must be"),
        ((model, (8, 8, 4), None), {}, "cond_shapes must be a dict"),
        ((None, (8, 8, 4), SHAPES), {}, "model must be a velocity model"),
        ((model, (8, 8, 4), SHAPES), {"admit_per_tick": 1.5}, "admit_per_tick must be an integer >= 1, got 1.5"),
        ((model, (8, 8, 4), SHAPES), {"min_batch": -5}, "min_batch must be an integer >= 1, got -5"),
        ((model, (8, 8, 4), SHAPES), {"min_batch": 100}, "min_batch must be in [1, 4] (the slots), got 100"),
        ((model, (8, 8, 4), {0: (3,)}), {}, "cond_shapes must be a dict of per-request shapes by input name"),
        ((model, (8, 8, 4), SHAPES), {"decoder": model}, "decoder must be a VAE or TAESD model"),
        ((model, (8, 8, 4), SHAPES), {"decoder": "vae"}, "decoder must be a VAE or TAESD model (sf.load(...)), got str"),
        ((model, (8, 8, 4), SHAPES), {"postprocess": 3}, "postprocess must be callable, got int"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            StreamEngine(*args, **kwargs)


def test_a_decoder_of_other_latents_is_refused_at_construction(model, tmp_path):
    """A 16-channel (SD3) VAE on an engine of 4-channel latents: refused naming both, not a
    shape error inside the first finishing tick's compiled decode after requests have run."""
    import diffusers
    from conftest import VAES, randomize

    randomize(diffusers.AutoencoderKL(**VAES["sd3"]), 0, std=0.1).save_pretrained(tmp_path / "vae16")
    with pytest.raises(ValueError, match=re.escape("decoder: this AutoencoderKL takes 16-channel latents, and the "
                                                   "engine's are (8, 8, 4) (4 channels)")):
        StreamEngine(model, (8, 8, 4), SHAPES, decoder=sf.load(tmp_path / "vae16"))


def test_warm_up_with_ticks_per_call_compiles_one_scan_per_batch_pair(model):
    """Every tick of a scan admits (padding rows when nothing) and gathers an output (a padding
    row when nothing finishes), so the scans differ only by active and finishing batch: with 4
    slots (active batches 1, 2, 4) warm_up compiles six scans, not 27 (as many again for each
    admission kind and for finishing nothing: a server's warm-up was dozens of model-sized
    compiles); a run afterwards, filling and draining, compiles nothing, and its images equal
    one call a tick's."""
    from streamflow_jax.stream import _programs

    x, conds = _requests(6, seed=21)
    reqs = [dict(cond=conds[i], steps=2 + i % 3, noise=x[i], init=x[(i + 1) % 6] if i == 3 else None)
            for i in range(6)]
    out = {}
    for k in (1, 5):
        engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=4, ticks_per_call=k)
        scans = _programs(True).ticks
        before = scans._cache_size()
        engine.warm_up()
        if k == 5:
            assert scans._cache_size() - before == 6
        with compiles() as compiled:
            ids = [engine.submit(**r) for r in reqs[:2]]
            engine.tick()  # a scan of five while the slots fill
            ids += [engine.submit(**r) for r in reqs[2:]]
            engine.run()
        assert compiled == []
        out[k] = np.stack([engine.result(i) for i in ids])
    np.testing.assert_allclose(out[5], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_a_failed_device_call_fails_its_requests_and_the_engine_runs_on(model, k):
    """A tick whose device call raises (a real XLA runtime error: a host callback inside the
    step, or inside the scan of three ticks, raising): the requests in its slots and those it
    admitted get the error as their result (nothing is lost, nothing hangs), the error reaches
    the caller, and the queued requests then run on fresh buffers (the failed call's donated
    ones are gone) to the same results as sf.sample alone."""
    import jax
    import jax.numpy as jnp

    from streamflow_jax import stream

    failing = {"now": False}

    def check(t):
        if failing["now"]:
            raise RuntimeError("the device went away")
        return np.zeros((), np.float32)

    def step(m, s, a, t, tn):  # stream._step, then the callback
        out = stream._step(m, s, a, t, tn)
        z = jax.pure_callback(check, jax.ShapeDtypeStruct((), jnp.float32), t[0])
        return {**out, "x": out["x"] + z}

    def ticks(*args):  # stream._ticks, then the callback
        state, out = stream._ticks(*args)
        z = jax.pure_callback(check, jax.ShapeDtypeStruct((), jnp.float32), state["x"].sum())
        return {**state, "x": state["x"] + z}, out

    x, conds = _requests(5, seed=31)
    engine = StreamEngine(model, (8, 8, 4), SHAPES, slots_per_stream=2, ticks_per_call=k)
    engine._programs = engine._programs._replace(step=jax.jit(step, donate_argnums=(1,)),
                                                 ticks=jax.jit(ticks, donate_argnums=(3,)))
    first = [engine.submit(conds[i], steps=6, noise=x[i]) for i in range(2)]
    engine.tick()  # admits the first (one admission a tick; k=3: both, in a scan)
    later = [engine.submit(conds[i], steps=3, noise=x[i]) for i in range(2, 5)]
    failing["now"] = True
    with pytest.raises(Exception, match="the device went away"):
        engine.tick()  # k=1: admits the second; both slots then held past the call
    failing["now"] = False
    for rid in first:
        with pytest.raises(RequestError, match=rf"request {rid}: the engine's tick failed \(.*Error"):
            engine.result(rid)
    assert engine.pending == len(later)  # queued, untouched
    engine.run()
    for i, rid in zip(range(2, 5), later):
        alone = sf.sample(model, x[i : i + 1], sf.schedules.flow_match(3, shift=1.0),
                          {n: v[None] for n, v in conds[i].items()})
        np.testing.assert_allclose(engine.result(rid), np.asarray(alone)[0], rtol=1e-5, atol=1e-5)
