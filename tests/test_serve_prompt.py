"""A prompt pipeline behind `streamflow-jax serve` (a tiny PeRFlow SD1.5 directory): text to
image and image to image through the openai client equal the pipeline's own calls, and the
realtime stream switches prompts without compiling."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import signal
import time

import numpy as np
import pytest
from conftest import ServerProcess, make_perflow_pipeline

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402

PROMPT = "a photo of the cat"


@pytest.fixture(scope="module")
def perflow(tmp_path_factory):
    return make_perflow_pipeline(tmp_path_factory.mktemp("perflow") / "pipe")


@pytest.fixture(scope="module")
def server(perflow):
    server = ServerProcess([str(perflow), "--slots", "2", "--streams", "1", "--max-steps", "100", "--max-streams", "2"])
    yield server
    server.stop()


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), np.int16)


def test_prompt_pipeline_served_equals_the_pipeline(server, perflow):
    import streamflow_jax as sf

    pipe = sf.Pipeline.from_diffusers(perflow)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert httpx.get(server.url + "/health").json()["size"] == "16x16"
    out = client.images.generate(prompt=PROMPT, size="16x16",
                                 extra_body={"seed": 3, "steps": 2, "guidance_scale": 2.0, "negative_prompt": "dog"})
    want = np.asarray(pipe([PROMPT], steps=2, seed=3, guidance_scale=2.0, negative_prompt="dog", progress=False)[0],
                      np.int16)
    got = _image(out.data[0].b64_json)
    assert got.shape == want.shape == (16, 16, 3) and np.abs(got - want).max() <= 1

    photo = np.random.default_rng(0).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray((photo * 255).round().astype(np.uint8)).save(buf, format="PNG")
    edit = client.images.edit(image=("p.png", buf.getvalue(), "image/png"), prompt=PROMPT,
                              extra_body={"seed": 3, "steps": 2, "strength": 0.5, "guidance_scale": 2.0,
                                          "negative_prompt": "dog"})
    # image to image through the server equals the pipeline on the digits model (test_serve); here:
    # the autoencoder's encoder runs and the result is not the text-to-image one of the same seed
    edited = _image(edit.data[0].b64_json)
    assert edited.shape == (16, 16, 3) and np.abs(edited - got).max() > 2
    with pytest.raises(openai.BadRequestError, match="size 512x512 cannot be made here"):
        client.images.generate(prompt=PROMPT, size="512x512")
    with pytest.raises(openai.BadRequestError, match=r"steps must be in \[1, 100\]"):
        client.images.generate(prompt=PROMPT, extra_body={"steps": 101})


def test_realtime_prompt_switch_compiles_nothing(server):
    from websockets.sync.client import connect

    from test_serve import metric

    compiles = metric(server.url, "streamflow_compilations_total")
    with connect(server.url.replace("http://", "ws://") + "/v1/stream", open_timeout=60) as ws:
        frame = io.BytesIO()
        Image.new("RGB", (32, 24), (90, 160, 30)).save(frame, format="JPEG")
        for i, prompt in enumerate(["a photo", "the cat on a string", "a photo"]):
            ws.send(json.dumps({"prompt": prompt, "strength": 0.75, "steps": 4, "guidance_scale": 1.5 + i}))
            ws.send(frame.getvalue())
            head = json.loads(ws.recv(60))
            assert head["frame"] == i and "error" not in head
            out = Image.open(io.BytesIO(ws.recv(60)))
            assert out.format == "JPEG" and out.size == (16, 16)
    assert metric(server.url, "streamflow_compilations_total") == compiles


def test_realtime_streams_past_the_limit_are_told_to_retry(server):
    """--max-streams 2: a third stream is accepted and closed at once with 1013 and the reason;
    once one of the two ends, a new one is served."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from test_serve import metric

    ws_url = server.url.replace("http://", "ws://") + "/v1/stream"
    first, second = connect(ws_url, open_timeout=60), connect(ws_url, open_timeout=60)
    try:
        deadline = time.time() + 10
        while metric(server.url, "streamflow_realtime_streams") < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert metric(server.url, "streamflow_realtime_streams") == 2
        with connect(ws_url, open_timeout=60) as third:
            with pytest.raises(ConnectionClosed) as closed:
                third.recv(10)
        assert closed.value.rcvd.code == 1013 and "2 realtime streams open" in closed.value.rcvd.reason
    finally:
        first.close()
    deadline = time.time() + 10
    while metric(server.url, "streamflow_realtime_streams") > 1 and time.time() < deadline:
        time.sleep(0.02)
    with connect(ws_url, open_timeout=60) as again:  # room again: configured, it answers
        again.send(json.dumps({"prompt": "x", "steps": 1, "strength": 2.0}))
        assert json.loads(again.recv(30))["param"] == "strength"
    second.close()


def test_second_signal_exits_at_once(server):
    """Last in this module (it ends the module's server): the first SIGINT drains, a second one
    while requests are still running exits at once, with status 128 + SIGINT."""
    from test_serve import metric

    # 30 images x 100 steps on 2 slots: many seconds (at 8 steps the first request could finish
    # between the two signals on a fast machine, and answer 200)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        work = [pool.submit(httpx.post, server.url + "/v1/images/generations", timeout=120,
                            json={"prompt": PROMPT, "n": 10, "steps": 100}) for _ in range(3)]
        # all three admitted (a request still on its way when the first SIGINT lands gets a 503 answer)
        deadline = time.time() + 60
        while metric(server.url, "streamflow_requests_in_progress", endpoint="generations") < 3:
            assert not any(w.done() for w in work), [w.result().text[:300] for w in work if w.done()]
            assert time.time() < deadline, "the three requests were not admitted within 60 s"
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGINT)
        deadline = time.time() + 10  # the first one handled (two pending SIGINTs may be taken as one)
        while "draining" not in server.log:
            assert time.time() < deadline, server.log[-2000:]
            time.sleep(0.05)
        t0 = time.time()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(10) == 128 + signal.SIGINT
        assert time.time() - t0 < 5
        for w in work:
            with pytest.raises(httpx.HTTPError):
                w.result()
    assert "draining" in server.log and "second SIGINT, exiting now" in server.log
