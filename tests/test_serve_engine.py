"""What serving needs from the stream engine and PromptStream (no server): results handed over
once and forgotten, cancellation that frees slots, warm-up that compiles everything, prompts of
one tick encoded in one batched call with an LRU cache. On the digits model (fast)."""

from __future__ import annotations

import numpy as np
import pytest

from streamflow_jax.errors import RequestError
from streamflow_jax.pipelines import DigitsPipeline, PromptStream
from streamflow_jax.pipelines.stream import EmbeddingCache
from streamflow_jax.stream import StreamEngine


@pytest.fixture(scope="module")
def pipe():
    return DigitsPipeline.load()


@pytest.fixture(scope="module")
def prompts(pipe):
    pytest.importorskip("starlette")
    from streamflow_jax.serve.models import DigitsPrompts

    return DigitsPrompts(pipe)


def _engine(pipe, **kw):
    shapes = {k: tuple(v.shape[1:]) for k, v in pipe.conditioning.items()}
    return StreamEngine(pipe.model, pipe.latent_shape, shapes, **kw)


def _cond(pipe, label):
    return {k: np.asarray(v)[label] for k, v in pipe.conditioning.items()}


def test_pop_results_hands_over_once_and_forgets(pipe):
    engine = _engine(pipe, slots_per_stream=2)
    ids = [engine.submit(_cond(pipe, i), steps=3, seed=i) for i in range(5)]
    bad = engine.submit(_cond(pipe, 0), steps=3, seed=-1)
    got = {}
    while engine.pending:
        engine.tick()
        got.update(engine.pop_results())
        assert not engine.results  # nothing kept once delivered
    got.update(engine.pop_results(wait=True))
    assert sorted(got) == sorted(ids + [bad]) and isinstance(got[bad], RequestError)
    assert engine.pop_results(wait=True) == {} and engine.results == {}
    # batch use keeps its meaning: run() returns, and result() reads, everything not popped
    again = [engine.submit(_cond(pipe, i), steps=2, seed=i) for i in range(3)]
    assert sorted(engine.run()) == again and engine.result(again[0]).shape == (16, 16, 1)


def test_cancel_frees_the_slot(pipe):
    engine = _engine(pipe, slots_per_stream=2, admit_per_tick=2)
    long = [engine.submit(_cond(pipe, i), steps=50, seed=i) for i in range(2)]
    queued = engine.submit(_cond(pipe, 2), steps=2, seed=2)
    engine.tick()
    assert engine.scheduler.requests.count(None) == 0 and engine.room == 0
    assert engine.cancel(long[0]) and engine.cancel(queued) and not engine.cancel(12345)
    assert engine.scheduler.requests.count(None) == 1 and engine.room == 1 and engine.pending == 1
    late = engine.submit(_cond(pipe, 3), steps=2, seed=3)  # takes the freed slot at once
    engine.tick()
    engine.tick()
    out = engine.pop_results(wait=True)
    assert late in out and not isinstance(out[late], Exception)
    for rid in (long[0], queued):
        with pytest.raises(RequestError, match="cancelled"):
            raise out[rid]
    assert engine.cancel(long[1]) and engine.pending == 0


def test_warm_up_compiles_every_tick_program(pipe):
    jax = pytest.importorskip("jax")
    compiled = []
    listener = lambda event, duration, **kw: (  # noqa: E731
        compiled.append(kw.get("fun_name")) if event.endswith("backend_compile_duration") else None)
    engine = _engine(pipe, slots_per_stream=2, streams=2, guidance=True)
    engine.warm_up()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        null = _cond(pipe, 10)
        rng = np.random.default_rng(0)
        for i in range(24):  # every occupancy, finishing counts, image to image
            init = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32) if i % 5 == 0 else None
            engine.submit(_cond(pipe, i % 10), steps=int(rng.integers(1, 9)), seed=i, guidance_scale=3.0,
                          uncond=null, init=init, strength=0.5 if init is not None else None)
        engine.run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []


def test_tick_mode_is_checked(pipe, monkeypatch):
    with pytest.raises(ValueError, match="tick='one': expected one of split, fused"):
        _engine(pipe, tick="one")
    monkeypatch.setenv("STREAMFLOW_JAX_TICK", "Fused ")
    assert _engine(pipe).tick_mode == "fused"
    monkeypatch.setenv("STREAMFLOW_JAX_TICK", "threaded")
    with pytest.raises(ValueError, match=r"\$STREAMFLOW_JAX_TICK='threaded'"):
        _engine(pipe)


def test_prompt_stream_batches_a_ticks_prompts_and_caches_them(pipe, prompts):
    stream = PromptStream(prompts, slots_per_stream=4, streams=2, guidance=True)
    calls = []
    original = prompts.encode
    prompts.encode = lambda texts, text_len=None: calls.append(list(texts)) or original(texts, text_len)
    try:
        ids = [stream.submit(str(d), steps=4, seed=d, guidance_scale=3.0) for d in (1, 2, 1, 3)]
        stream.tick()  # admits 2 (one per stream): "1", "2" and the negative "" in one call, padded to 4
        assert calls == [["1", "", "2", "2"]]
        stream.tick()  # "1" is cached; "3" is new
        assert calls[1] == ["3"] and stream.cache.hits >= 2
        first = stream.run()
        assert sorted(first) == ids and stream.run() == {}  # each result handed over once
        # the same prompts again: no encoder call at all
        n_calls = len(calls)
        again = [stream.submit(str(d), steps=4, seed=d, guidance_scale=3.0) for d in (1, 2, 3)]
        out = stream.run()
        assert len(calls) == n_calls and sorted(out) == again
        np.testing.assert_array_equal(np.asarray(out[again[0]]), np.asarray(first[ids[0]]))
        # a bad prompt fails alone, the good one in the same batch goes on
        good, bad = stream.submit("4", steps=2, seed=0), stream.submit("cat", steps=2, seed=0)
        out = stream.run()
        assert not isinstance(out[good], Exception) and "one digit" in str(out[bad])
        # cancel a waiting request
        rid = stream.submit("5", steps=2)
        assert stream.cancel(rid) and "cancelled" in str(stream.run()[rid])
    finally:
        prompts.encode = original


def test_embedding_cache_is_lru():
    cache = EmbeddingCache(2)
    for t in "abc":
        cache.put(t, {"x": np.zeros(1)})
    assert "a" not in cache and len(cache) == 2
    cache.get("b")
    cache.put("d", {"x": np.zeros(1)})
    assert "b" in cache and "c" not in cache
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_create_app_runs_in_process_and_mounted():
    """The importable ASGI app in a user's own app: mounted under a prefix, its lifespan handed
    to the outer app. /health is 503 ("compiling") until that lifespan has run and compiled."""
    pytest.importorskip("starlette")
    import base64
    import io
    import time

    from PIL import Image
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from streamflow_jax.serve import create_app

    app = create_app(slots_per_stream=2, streams=1, replica="in-process")
    outer = Starlette(routes=[Mount("/sf", app)], lifespan=app.router.lifespan_context)
    early = TestClient(outer).get("/sf/health")  # no lifespan yet: nothing compiled
    assert early.status_code == 503 and early.json()["status"] == "compiling"
    with TestClient(outer) as client:
        deadline = time.time() + 120
        while (health := client.get("/sf/health")).status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert health.json()["status"] == "ok", health.text
        r = client.post("/sf/v1/images/generations", json={"prompt": "7", "n": 2, "steps": 4, "seed": 3})
        assert r.status_code == 200 and r.headers["x-streamflow-replica"] == "in-process"
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
        assert [im.format for im in images] == ["PNG", "PNG"] and images[0].size == (16, 16)
        bad = client.post("/sf/v1/images/generations", json={"prompt": "7", "steps": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"
        # a realtime stream opened while draining: accepted with the replica's name, then closed
        # with 1012 and the reason
        from starlette.websockets import WebSocketDisconnect

        app.state.server.draining = True
        with client.websocket_connect("/sf/v1/stream") as ws:
            assert dict(ws.extra_headers)[b"x-streamflow-replica"] == b"in-process"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert closed.value.code == 1012 and "draining" in closed.value.reason
        assert client.get("/sf/health").json()["status"] == "draining"
        app.state.server.draining = False

