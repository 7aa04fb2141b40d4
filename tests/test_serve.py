"""`streamflow-jax serve` on the embedded digits model: the real server on a loopback port, real
clients (httpx, the official openai client, websockets). One server for the module (conftest's
``digits_server``); the shutdown tests start their own."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import signal
import time

import numpy as np
import pytest
from conftest import ServerProcess

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from PIL import Image  # noqa: E402

REPLICA = "x-streamflow-replica"


_METRICS_CLIENT: list = []


def metric(url: str, name: str, **labels) -> float:
    """One sample of the server's /metrics (0 when absent). One client for every read: a new
    one each time (``httpx.get``) costs about 45 ms on a loaded 2-core machine, enough to miss
    the windows the tests below poll in."""
    from prometheus_client.parser import text_string_to_metric_families

    if not _METRICS_CLIENT:
        _METRICS_CLIENT.append(httpx.Client(timeout=30))
    for family in text_string_to_metric_families(_METRICS_CLIENT[0].get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_running(url: str, request, timeout: float = 60) -> None:
    """Waits until the engine holds a request (``request``: the future of the one sent), failing
    with its answer if it ended first, or after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not metric(url, "streamflow_slots_occupied"):
        assert not request.done(), request.result().text[:500]
        assert time.time() < deadline, f"no request running after {timeout} s"
        time.sleep(0.01)


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def digit_png(label: int = 3) -> bytes:
    from streamflow_jax.pipelines import DigitsPipeline

    img = DigitsPipeline.load()(np.array([label]), steps=8, seed=42, progress=False)[0]
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def url(digits_server):
    return digits_server.url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pipe():
    from streamflow_jax.pipelines import DigitsPipeline

    return DigitsPipeline.load()


def test_health_metrics_models_and_replica_header(url):
    r = httpx.get(url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "digits"
    assert r.json()["ticks_per_call"] == 1 and r.json()["slots"] > 0
    replica = r.headers[REPLICA]
    assert replica and r.json()["replica"] == replica
    m = httpx.get(url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("streamflow_requests_total", "streamflow_requests_in_progress", "streamflow_queue_depth", "streamflow_slots_occupied",
                 "streamflow_images_per_second", "streamflow_request_latency_seconds_bucket",
                 "streamflow_compilations_total", "streamflow_engine_ticks_total", "streamflow_ready 1.0"):
        assert name in m.text, name
    assert metric(url, "streamflow_slots") == 8
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "digits"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    for r in (m, page, httpx.get(url + "/static/app.js"), httpx.get(url + "/nowhere"),
              httpx.post(url + "/v1/images/generations", content=b"{")):
        assert r.headers[REPLICA] == replica, r.url


def test_openai_client_generate_equals_the_pipeline(client, pipe, url):
    """n images of one request are the pipeline's batch call with that seed (same noise rows);
    nothing compiles once the server is up."""
    compiles = metric(url, "streamflow_compilations_total")
    out = client.images.generate(prompt="3", n=3, extra_body={"seed": 5, "steps": 8, "guidance_scale": 3.0})
    assert len(out.data) == 3 and out.created > 0
    got = np.stack([png(d.b64_json) for d in out.data]).astype(np.float32) / 255
    want = pipe(np.array([3, 3, 3]), steps=8, guidance_scale=3.0, seed=5, progress=False)
    assert got.shape == (3, 16, 16)
    np.testing.assert_allclose(got, want, atol=1 / 255 + 1e-6)
    # model may name the served model; quality, style and user are accepted and ignored
    one = client.images.generate(prompt="7", model="digits", quality="standard", style="vivid", user="me",
                                 response_format="b64_json", size="16x16", extra_body={"seed": 1, "steps": 8})
    want = pipe(np.array([7]), steps=8, seed=1, progress=False)
    np.testing.assert_allclose(png(one.data[0].b64_json) / 255, want[0], atol=1 / 255 + 1e-6)
    assert metric(url, "streamflow_compilations_total") == compiles


def test_openai_client_edit_is_image_to_image(client, pipe):
    source = digit_png(3)
    out = client.images.edit(image=("three.png", source, "image/png"), prompt="8",
                             extra_body={"strength": 0.6, "seed": 2, "steps": 8})
    got = png(out.data[0].b64_json) / 255
    image = np.asarray(Image.open(io.BytesIO(source)), np.float32) / 255
    want = pipe(np.array([8]), steps=8, seed=2, image=image[None], strength=0.6, progress=False)
    np.testing.assert_allclose(got, want[0], atol=1 / 255 + 1e-6)
    # a larger RGB JPEG is made the served size (grey, centre crop, resize)
    big = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 200, 200)).save(big, format="JPEG")
    out = client.images.edit(image=("big.jpg", big.getvalue(), "image/jpeg"), prompt="1", n=2,
                             extra_body={"output_format": "jpeg"})
    assert len(out.data) == 2
    assert Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).format == "JPEG"


def test_openai_client_errors_are_its_own_exception_types(client):
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        client.images.generate(prompt="3", n=0)
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not supported"):
        client.images.generate(prompt="3", response_format="url")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.images.generate(prompt="3", model="dall-e-3")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="3", extra_body={"steps": 101})
    assert e.value.body["param"] == "steps" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(image=("a.png", digit_png(), "image/png"), mask=("m.png", digit_png(), "image/png"),
                           prompt="3")


def _bad_requests():
    gen = "/v1/images/generations"
    j = lambda body: ("POST", gen, {"content": json.dumps(body).encode(),  # noqa: E731
                                    "headers": {"content-type": "application/json"}})
    raw = lambda text: ("POST", gen, {"content": text.encode() if isinstance(text, str) else text})  # noqa: E731
    edit = lambda files, data: ("POST", "/v1/images/edits", {"files": files, "data": data})  # noqa: E731
    good_png = ("d.png", _png_bytes(), "image/png")
    return {
        "not json": (raw("prompt=3"), 400), "empty body": (raw(""), 400), "json array": (j([1, 2]), 400),
        "json string": (j("3"), 400), "NaN": (raw('{"prompt": "3", "guidance_scale": NaN}'), 400),
        "Infinity": (raw('{"prompt": "3", "guidance_scale": Infinity}'), 400),
        "-Infinity": (raw('{"prompt": "3", "seed": -Infinity}'), 400),
        "1e400 (inf)": (raw('{"prompt": "3", "guidance_scale": 1e400}'), 400),
        "guidance 1e308 (inf in float32)": (j({"prompt": "3", "guidance_scale": 1e308}), 400),
        "guidance -1e39": (j({"prompt": "3", "guidance_scale": -1e39}), 400),
        "invalid utf-8": (raw(b'{"prompt": "\xff"}'), 400), "deep nesting": (raw("[" * 100000 + "]" * 100000), 400),
        "unknown field": (j({"prompt": "3", "temperature": 1}), 400), "missing prompt": (j({"n": 1}), 400),
        "prompt not a string": (j({"prompt": 3}), 400), "prompt not a digit": (j({"prompt": "cat"}), 400),
        "prompt too long": (j({"prompt": "3" * 5000}), 400), "n string": (j({"prompt": "3", "n": "2"}), 400),
        "n bool": (j({"prompt": "3", "n": True}), 400), "n float": (j({"prompt": "3", "n": 1.5}), 400),
        "n 0": (j({"prompt": "3", "n": 0}), 400), "n 11": (j({"prompt": "3", "n": 11}), 400),
        "n huge": (j({"prompt": "3", "n": 10**30}), 400), "steps 0": (j({"prompt": "3", "steps": 0}), 400),
        "steps 101": (j({"prompt": "3", "steps": 101}), 400), "steps -5": (j({"prompt": "3", "steps": -5}), 400),
        "seed -1": (j({"prompt": "3", "seed": -1}), 400), "seed 2**32": (j({"prompt": "3", "seed": 2**32}), 400),
        "guidance string": (j({"prompt": "3", "guidance_scale": "nan"}), 400),
        "guidance list": (j({"prompt": "3", "guidance_scale": [1, 2]}), 400),
        "size 17x16": (j({"prompt": "3", "size": "17x16"}), 400),
        "size 1024x1024": (j({"prompt": "3", "size": "1024x1024"}), 400),
        "size junk": (j({"prompt": "3", "size": "big"}), 400), "size 0x0": (j({"prompt": "3", "size": "0x0"}), 400),
        "response_format url": (j({"prompt": "3", "response_format": "url"}), 400),
        "response_format junk": (j({"prompt": "3", "response_format": "gif"}), 400),
        "output_format svg": (j({"prompt": "3", "output_format": "svg"}), 400),
        "negative prompt not a digit": (j({"prompt": "3", "negative_prompt": "blurry"}), 400),
        "negative prompt without guidance": (j({"prompt": "3", "negative_prompt": "5", "guidance_scale": 1}), 400),
        "strength on generations": (j({"prompt": "3", "strength": 0.5}), 400),
        "other model": (j({"prompt": "3", "model": "gpt-image-1"}), 404),
        "body over 1 MiB": (j({"prompt": "3", "user": "x" * (1 << 20)}), 413),
        "GET generations": (("GET", gen, {}), 405), "unknown route": (("POST", "/v1/images/variations", {}), 404),
        "the stream over plain HTTP": (("GET", "/v1/stream", {}), 426),
        "edits as json": (("POST", "/v1/images/edits", {"json": {"prompt": "3"}}), 400),
        "edits without image": (edit({"other": good_png}, {"prompt": "3"}), 400),
        "edits image as text": (("POST", "/v1/images/edits", {"files": {"x": ("", b"", "text/plain")},
                                                              "data": {"prompt": "3", "image": "abc"}}), 400),
        "edits garbage image": (edit({"image": ("d.png", b"not an image", "image/png")}, {"prompt": "3"}), 400),
        "edits truncated png": (edit({"image": ("d.png", _png_bytes()[:40], "image/png")}, {"prompt": "3"}), 400),
        "edits two images": (("POST", "/v1/images/edits", {"files": [("image", good_png), ("image", good_png)],
                                                           "data": {"prompt": "3"}}), 400),
        "edits mask": (edit({"image": good_png, "mask": good_png}, {"prompt": "3"}), 400),
        "edits strength 0": (edit({"image": good_png}, {"prompt": "3", "strength": "0"}), 400),
        "edits strength 2": (edit({"image": good_png}, {"prompt": "3", "strength": "2"}), 400),
        "edits strength nan": (edit({"image": good_png}, {"prompt": "3", "strength": "nan"}), 400),
        "edits strength inf": (edit({"image": good_png}, {"prompt": "3", "strength": "inf"}), 400),
        "edits guidance 1e308": (edit({"image": good_png}, {"prompt": "3", "guidance_scale": "1e308"}), 400),
        "edits n abc": (edit({"image": good_png}, {"prompt": "3", "n": "abc"}), 400),
        "edits unknown field": (edit({"image": good_png}, {"prompt": "3", "color": "red"}), 400),
        "edits broken multipart": (("POST", "/v1/images/edits", {
            "content": b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n3",
            "headers": {"content-type": "multipart/form-data; boundary=xyz"}}), 400),
        "edits huge declared length": (("RAW", "/v1/images/edits", {
            "head": b"content-type: multipart/form-data; boundary=x\r\ncontent-length: 1099511627776"}), 413),
        # found by a fuzzing pass: bodies JSON would not take, numbers no form should, a media type
        # that only starts right, a format Pillow hands to Ghostscript, a strength that keeps no step
        "json with a byte-order mark": (raw(b'\xef\xbb\xbf{"prompt": "3"}'), 400),
        "json in utf-16": (raw('{"prompt": "3"}'.encode("utf-16")), 400),
        "a 5000-digit n": (raw('{"prompt": "3", "n": ' + "9" * 5000 + "}"), 400),
        "a 4000-digit n": (raw('{"prompt": "3", "n": ' + "9" * 4000 + "}"), 400),
        "20000 unknown fields": (j({**{f"k{i}": 0 for i in range(20000)}, "prompt": "3"}), 400),
        "edits steps 1_0": (edit({"image": good_png}, {"prompt": "3", "steps": "1_0"}), 400),
        "edits n +3": (edit({"image": good_png}, {"prompt": "3", "n": "+3"}), 400),
        "edits seed 1.0": (edit({"image": good_png}, {"prompt": "3", "seed": "1.0"}), 400),
        "edits strength keeps no step": (edit({"image": good_png}, {"prompt": "3", "strength": "1e-300",
                                                                    "steps": "2"}), 400),
        "edits multipart/form-dataX": (("POST", "/v1/images/edits", {
            "content": b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n3\r\n--x--\r\n",
            "headers": {"content-type": "multipart/form-dataX; boundary=x"}}), 400),
        "edits EPS image": (edit({"image": ("a.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                            "application/postscript")}, {"prompt": "3"}), 400),
        # malformed HTTP framing: uvicorn's HTTP parser rejects it before the app sees a request;
        # the server's protocol answers it in the same JSON shape (serve.server.json_400_protocol)
        "generations non-numeric length": (("RAW", gen, {"head": b"content-length: 12abc"}), 400),
    }


def _raw(url: str, path: str, head: bytes) -> httpx.Response:
    """A request no client library sends: headers as given, one byte of body, then the answer."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + head + b"\r\nconnection: close\r\n\r\nx")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    fields = dict(line.decode().split(": ", 1) for line in headers.split(b"\r\n") if b": " in line)
    return httpx.Response(int(status_line.split()[1]), headers=fields, content=body)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_are_4xx_in_openai_shape_and_the_server_keeps_serving(url, digits_server):
    replica = httpx.get(url + "/health").headers[REPLICA]
    for name, ((method, path, kwargs), status) in _bad_requests().items():
        r = _raw(url, path, **kwargs) if method == "RAW" else httpx.request(method, url + path, timeout=30, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        assert r.headers[REPLICA] == replica, name
    assert metric(url, "streamflow_requests_total", endpoint="generations", outcome="bad_request") >= 30
    assert metric(url, "streamflow_malformed_http_requests_total") >= 1  # the framing 400s, before any endpoint
    # what the answers say: JSON's words, no Python internals, no 4000-digit echo, the parameter
    said = {}
    for name, ((method, path, kwargs), _) in _bad_requests().items():
        if method != "RAW" and name in ("json with a byte-order mark", "a 5000-digit n", "a 4000-digit n",
                                        "edits steps 1_0", "edits strength keeps no step", "edits EPS image",
                                        "edits garbage image", "json string"):
            said[name] = httpx.request(method, url + path, timeout=30, **kwargs).json()["error"]
    assert said["a 5000-digit n"]["message"] == "the body holds a number of more than 4300 digits"
    assert len(said["a 4000-digit n"]["message"]) < 200 and said["a 4000-digit n"]["param"] == "n"
    assert said["edits steps 1_0"] == {"message": "steps: must be an integer written in digits (got '1_0')",
                                       "type": "invalid_request_error", "param": "steps", "code": None}
    assert said["edits strength keeps no step"]["param"] == "strength"
    assert "keeps no step of 2" in said["edits strength keeps no step"]["message"]
    assert said["edits EPS image"]["message"] == "image: not an image (PNG, JPEG, WEBP, GIF, BMP, TIFF) Pillow can read"
    assert "BytesIO" not in said["edits garbage image"]["message"]
    assert said["json string"]["message"] == "the body must be a JSON object, got a string"
    # a client gone while sending its body: counted as cancelled, not a 500 with two tracebacks in the log
    import socket
    from urllib.parse import urlsplit

    cancelled = metric(url, "streamflow_requests_total", endpoint="generations", outcome="cancelled")
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as gone:
        gone.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)
    deadline = time.time() + 10
    while metric(url, "streamflow_requests_total", endpoint="generations", outcome="cancelled") == cancelled:
        assert time.time() < deadline, "the client that left was not counted"
        time.sleep(0.05)
    ok = httpx.post(url + "/v1/images/generations", json={"prompt": "5", "steps": 4}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    assert "Traceback" not in digits_server.log and " 500" not in digits_server.log


def test_concurrent_requests_share_ticks(url):
    """Continuous batching across HTTP requests: 8 concurrent requests of 8 steps take far fewer
    ticks than 64 (each tick steps every occupied slot)."""
    import threading

    ticks0 = metric(url, "streamflow_engine_ticks_total")
    together = threading.Barrier(8)  # sent together: a client made per thread spread them over ~0.3 s

    def post(i, http):
        together.wait(30)
        return http.post(url + "/v1/images/generations", timeout=60, json={"prompt": str(i), "steps": 8, "seed": i})

    with httpx.Client(limits=httpx.Limits(max_connections=8)) as http, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(post, range(8), [http] * 8))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    ticks = metric(url, "streamflow_engine_ticks_total") - ticks0
    assert 8 <= ticks < 40, ticks  # one after another: 64 ticks and more
    assert metric(url, "streamflow_slots_occupied") == 0 and metric(url, "streamflow_queue_depth") == 0
    assert metric(url, "streamflow_requests_in_progress", endpoint="generations") == 0


def test_a_server_running_three_ticks_a_call(pipe):
    """``streamflow-jax serve --ticks-per-call 3`` (over ``STREAMFLOW_JAX_TICKS_PER_CALL=5``: the
    flag wins): the real server, a real client. Its warm-up compiled every scan (nothing
    compiles while serving), concurrent requests give the pipeline's images, a bad request is
    still a 400, and the server keeps serving."""
    server = ServerProcess(["--slots", "2", "--streams", "1", "--ticks-per-call", "3"],
                           env={"STREAMFLOW_JAX_TICKS_PER_CALL": "5"})
    try:
        url = server.url
        assert httpx.get(url + "/health").json()["ticks_per_call"] == 3
        compiles = metric(url, "streamflow_compilations_total")
        with httpx.Client(timeout=60) as http, concurrent.futures.ThreadPoolExecutor(3) as pool:
            rs = list(pool.map(lambda i: http.post(url + "/v1/images/generations",
                                                   json={"prompt": str(i), "n": 2, "steps": 4, "seed": i}),
                               range(3)))
            bad = http.post(url + "/v1/images/generations", json={"prompt": "x"})
            again = http.post(url + "/v1/images/generations", json={"prompt": "5", "steps": 4, "seed": 9})
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        for i, r in enumerate(rs):
            got = np.stack([png(d["b64_json"]) for d in r.json()["data"]]).astype(np.float32) / 255
            want = pipe(np.array([i, i]), steps=4, seed=i, progress=False)
            np.testing.assert_allclose(got, want, atol=1 / 255 + 1e-6)
        assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]
        assert again.status_code == 200
        assert metric(url, "streamflow_compilations_total") == compiles
        assert metric(url, "streamflow_engine_ticks_total") >= 4
    finally:
        server.stop()


def test_queue_full_is_429_with_retry_after(url, client):
    """4 waiting + 8 slots: a second n=10 request while the first runs finds no room."""
    body = {"prompt": "2", "n": 10, "steps": 100}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + "/v1/images/generations", json=body, timeout=120)
        wait_running(url, first)
        second = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.images.generate(prompt="2", n=10)
        assert first.result().status_code == 200
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert metric(url, "streamflow_requests_total", endpoint="generations", outcome="rejected") >= 2


def test_retry_after_rate_leaves_idle_time_out(monkeypatch):
    """The rate a 429's Retry-After divides by is images per second of the engine's working
    time, as last measured: after an idle spell, the wall-clock rate over the last 10 s is 0
    until images come out (Retry-After said 60 for a queue that drained in 4 s)."""
    import types

    from streamflow_jax.serve import metrics as metrics_module

    now = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    m = metrics_module.Metrics("r")
    worker = types.SimpleNamespace(images_done=0, occupied=0, waiting=0, num_slots=4)
    m._worker = worker
    assert m.busy_rate() is None  # nothing measured yet: the server says 5 s
    m.observe(worker)  # the last round before an idle spell
    now[0] += 30.0
    worker.occupied, worker.waiting = 4, 20
    m.observe(worker)  # the first round of the burst: the idle time before it is not work
    for _ in range(40):  # 4 s of rounds of 0.1 s, an image each
        now[0] += 0.1
        worker.images_done += 1
        m.observe(worker)
    assert m.busy_rate() == pytest.approx(10.0, rel=0.05)
    now[0] += 0.1  # the round that empties the engine
    worker.images_done += 1
    worker.occupied, worker.waiting = 0, 0
    m.observe(worker)
    now[0] += 30.0  # idle again, then a new burst: its first rounds make no image yet
    worker.occupied, worker.waiting = 4, 20
    m.observe(worker)
    now[0] += 0.1
    m.observe(worker)
    assert m.rate() < 0.2  # the wall-clock window (the gauge): about nothing
    assert m.busy_rate() == pytest.approx(10.0, rel=0.05)  # the last rate measured at work stands


def test_n_beyond_slots_and_queue_is_400_not_429():
    """A request's images queue all or none: with 1 slot and a queue of 2, n=4 could never be
    taken, so it is a 400 naming n (a 429 would have it retry forever); n=3 fits."""
    from starlette.testclient import TestClient

    from streamflow_jax.serve import create_app

    app = create_app(slots_per_stream=1, streams=1, max_queue=2, max_steps=4)
    with TestClient(app) as tc:
        r = tc.post("/v1/images/generations", json={"prompt": "3", "n": 4, "steps": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "[1, 3]" in r.json()["error"]["message"]
        r = tc.post("/v1/images/generations", json={"prompt": "3", "n": 3, "steps": 2})
        assert r.status_code == 200 and len(r.json()["data"]) == 3, r.text


def test_a_client_that_disconnects_frees_its_slots(url):
    """A request whose client goes away is cancelled: its slots and queue places are freed long
    before its 10 images x 100 steps would have finished."""
    import socket
    from urllib.parse import urlsplit

    ticks0 = metric(url, "streamflow_engine_ticks_total")
    body = json.dumps({"prompt": "4", "n": 10, "steps": 100}).encode()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as client:
        client.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 60
        while not metric(url, "streamflow_slots_occupied"):  # the client leaves once its request runs
            assert time.time() < deadline, "the request never ran"
            time.sleep(0.01)
    deadline = time.time() + 10
    while time.time() < deadline and metric(url, "streamflow_requests_total", endpoint="generations",
                                            outcome="cancelled") < 1:
        time.sleep(0.05)
    assert metric(url, "streamflow_requests_total", endpoint="generations", outcome="cancelled") >= 1
    deadline = time.time() + 10
    while metric(url, "streamflow_slots_occupied") or metric(url, "streamflow_queue_depth"):
        assert time.time() < deadline, "the cancelled request's slots or queue places were not freed"
        time.sleep(0.05)
    # all 10 images would take about 205 ticks (8 slots, admitted 2 per tick, then the last 2)
    assert metric(url, "streamflow_engine_ticks_total") - ticks0 < 150
    assert httpx.post(url + "/v1/images/generations", json={"prompt": "4"}, timeout=60).status_code == 200


# ---------------------------------------------------------------------------------------------
# Realtime: WS /v1/stream
# ---------------------------------------------------------------------------------------------


def _frame(value: int, fmt: str = "PNG", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format=fmt)
    return buf.getvalue()


def test_realtime_stream(url):
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://") + "/v1/stream"
    compiles0 = metric(url, "streamflow_compilations_total")
    with connect(ws_url, open_timeout=30) as ws:
        assert ws.response.headers[REPLICA]
        ws.send(_frame(10))  # before any configuration: an error, and frame 0 is spent
        assert json.loads(ws.recv(30)) == {"frame": 0, "error": "frame 0: send a JSON configuration "
                                                                  "({\"prompt\": ...}) before the frames"}
        ws.send(json.dumps({"prompt": "cat"}))
        assert "digit" in json.loads(ws.recv(30))["error"]
        ws.send(json.dumps({"prompt": "3", "strength": 0.6, "steps": 8, "seed": 1, "extra": 1}))
        assert "unknown field 'extra'" in json.loads(ws.recv(30))["error"]
        ws.send("{" + ",".join(f'"k{i}": 0' for i in range(20000)) + "}")  # refused unread, at once
        assert json.loads(ws.recv(30))["error"] == "the configuration is longer than 100096 characters"
        ws.send(json.dumps({"prompt": "3", "negative_prompt": "\U0001f600" * 4000}))  # escaped: 48k characters
        assert json.loads(ws.recv(30))["param"] == "negative_prompt"  # read: refused for what it says, not its size
        ws.send("[1]")
        assert json.loads(ws.recv(30))["error"] == "the configuration must be a JSON object, got an array"
        ws.send(json.dumps({"prompt": "3", "strength": 1e-300, "steps": 8}))  # refused here, not at every frame
        assert json.loads(ws.recv(30)) == {"error": "strength 1e-300 keeps no step of 8; raise it or the step count",
                                           "param": "strength"}
        ws.send(json.dumps({"prompt": "3", "negative_prompt": "5", "guidance_scale": 1.0}))
        assert "negative prompt '5' is ignored: classifier-free guidance is off" in json.loads(ws.recv(30))["error"]
        ws.send(json.dumps({"prompt": "3", "strength": 0.6, "steps": 8, "seed": 1}))
        ws.send(_frame(100))
        head = json.loads(ws.recv(30))
        assert head["frame"] == 1 and head["dropped"] == 0 and head["latency_ms"] > 0
        out = Image.open(io.BytesIO(ws.recv(30)))
        assert out.format == "PNG" and out.size == (16, 16)
        ws.send(b"garbage bytes")
        assert json.loads(ws.recv(30)) == {"frame": 2, "error": "frame 2: not a PNG or JPEG image"}
        ws.send(_frame(200, "JPEG")[:50] + b"\0" * 20)  # a JPEG header, then nonsense
        assert json.loads(ws.recv(30))["frame"] == 3
        ws.send(b"\x89PNG\r\n\x1a\n" + bytes(16 << 20))  # past the app's frame limit, under the socket's
        assert json.loads(ws.recv(30)) == {"frame": 4, "error": f"frame 4: larger than {16 << 20} bytes"}
        ws.send(json.dumps({"prompt": "8", "strength": 0.5, "steps": 8}))  # switch prompts: nothing compiles
        ws.send(_frame(200, "JPEG"))
        head = json.loads(ws.recv(30))
        assert head["frame"] == 5
        assert Image.open(io.BytesIO(ws.recv(30))).format == "JPEG"
        assert metric(url, "streamflow_compilations_total") == compiles0

        # a burst faster than the engine: older waiting frames are dropped, the newest is processed
        n0, burst = 6, 40
        for i in range(burst):
            ws.send(_frame(i * 5))
        processed, last, dropped = [], None, 0
        while last != n0 + burst - 1:
            head = json.loads(ws.recv(60))
            assert "error" not in head, head
            processed.append(head["frame"])
            last, dropped = head["frame"], head["dropped"]
            ws.recv(30)
        assert processed == sorted(processed) and dropped > 0
        assert len(processed) + dropped == burst
    assert metric(url, "streamflow_stream_frames_total", outcome="dropped") >= dropped
    # only a message over the socket's 32 MiB closes the stream, with 1009 (message too big)
    from websockets.exceptions import ConnectionClosed

    with connect(ws_url, open_timeout=30, max_size=None) as ws:
        ws.send(b"\0" * ((32 << 20) + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(30)
    assert closed.value.rcvd.code == 1009
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # and the server serves on


# ---------------------------------------------------------------------------------------------
# Deadlines and shutdown: servers of their own
# ---------------------------------------------------------------------------------------------


def _until_closed(sock) -> bytes:
    """Everything the server sends before it closes the connection (a response may come in
    several segments: its headers, then its body)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_deadline_then_sigterm_drains_and_exits_0():
    server = ServerProcess(["--slots", "2", "--streams", "1", "--max-queue", "100", "--timeout", "2"])
    try:
        url = server.url
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(httpx.post, url + "/v1/images/generations", timeout=60,
                                json={"prompt": "1", "n": 10, "steps": 100}) for _ in range(3)]
            codes = sorted(f.result().status_code for f in slow)
        assert 503 in codes, codes  # past the deadline (2 s): 503, its slots freed
        late = next(f.result() for f in slow if f.result().status_code == 503)
        assert "deadline" in late.json()["error"]["message"] and late.headers["retry-after"]
        assert metric(url, "streamflow_requests_total", endpoint="generations", outcome="timeout") >= 1
        deadline = time.time() + 10
        while metric(url, "streamflow_slots_occupied") and time.time() < deadline:
            time.sleep(0.1)
        assert metric(url, "streamflow_slots_occupied") == 0

        # a body that stalls half-way is answered 408 at the deadline, not held open for ever
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as stalled:
            stalled.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            answer = _until_closed(stalled)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within 2 s" in answer
        # so is a connection that sends nothing, or part of its headers (uvicorn waits for ever)
        for sent in (b"", b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"):
            t0 = time.time()
            with socket.create_connection((parts.hostname, parts.port), timeout=30) as stalled:
                stalled.sendall(sent)
                answer = _until_closed(stalled)
            assert answer.startswith(b"HTTP/1.1 408") and b"no request arrived within 2 s" in answer, answer[:300]
            assert time.time() - t0 < 10
        # a WebSocket (the connection's protocol changed) and a keep-alive connection in use are left alone
        from websockets.sync.client import connect

        with connect(url.replace("http://", "ws://") + "/v1/stream", open_timeout=30) as ws:
            time.sleep(5)
            ws.send(json.dumps({"prompt": "3", "steps": 2}))
            ws.send(_frame(100))
            assert json.loads(ws.recv(30))["frame"] == 0
            ws.recv(30)
        with httpx.Client(timeout=30) as keep:
            for _ in range(4):  # 4 s in all, each quiet spell well under the 2 s
                assert keep.get(url + "/health").status_code == 200
                time.sleep(1.0)
            # a request longer than the period (here one that meets its deadline), then the next one at
            # once on the same connection: it was closed by the watchdog's next look, the response just sent
            heavy = {"prompt": "1", "n": 10, "steps": 100}
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                busy = [pool.submit(httpx.post, url + "/v1/images/generations", json=heavy, timeout=60)
                        for _ in range(4)]
                wait_running(url, busy[0])
                t0 = time.time()
                late = keep.post(url + "/v1/images/generations", json=heavy)
                assert late.status_code in (200, 503) and time.time() - t0 > 2  # longer than the period
                time.sleep(1.5)  # quiet for less than the period since that response (the old watchdog's next
                assert keep.get(url + "/health").status_code == 200  # look fell in here 3 times in 4)
                [f.result() for f in busy]
        # headers trickling in a byte at a time count for nothing: closed at the period all the same
        t0 = time.time()
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as trickle:
            answer = b""
            for byte in b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 40:
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    break
                trickle.settimeout(0.1)
                try:
                    answer += trickle.recv(65536)
                except TimeoutError:
                    continue
                if answer:
                    break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.time() - t0 < 8

        # in flight when SIGTERM arrives: finished and answered, then exit 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            work = pool.submit(httpx.post, url + "/v1/images/generations", timeout=60,
                               json={"prompt": "6", "steps": 40})
            wait_running(url, work)
            server.proc.send_signal(signal.SIGTERM)
            r = work.result()
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
        assert server.proc.wait(60) == 0
        assert "draining" in server.log and "Traceback" not in server.log
    finally:
        server.stop()


def test_serve_runs_a_prebuilt_export(tmp_path, capsys):
    """``streamflow-jax serve --backend onnxruntime --export DIR``, a real server and client: the
    engine's batched velocity calls run the export given (nothing exported on demand), and a
    request's image is the pipeline's batch call with its seed (XLA, itself diffusers' within
    2e-5: test_digits); an export too small for the engine's rows is refused in one line."""
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    from streamflow_jax.cli import main as cli
    from streamflow_jax.pipelines import DIGITS_DIR, DigitsPipeline

    export = tmp_path / "e"
    assert cli(["export", str(DIGITS_DIR), str(export), "--batch", "1:4:4", "-q"]) == 0  # 2 slots, guided
    cache = tmp_path / "cache"
    server = ServerProcess(["--backend", "onnxruntime", "--export", str(export), "--slots", "2", "--streams", "1"],
                           env={"STREAMFLOW_JAX_CACHE": str(cache)})
    try:
        r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "7", "steps": 3, "seed": 3}, timeout=60)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))), np.int16)
    finally:
        assert server.stop() == 0
    assert not (cache / "exports").exists()  # the export given ran
    want = (DigitsPipeline.load()([7], steps=3, seed=3)[0] * 255).round()
    assert np.abs(got - want).max() <= 1
    capsys.readouterr()
    assert cli(["serve", "--backend", "onnxruntime", "--export", str(export), "--slots", "2", "--streams", "2",
                "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "B=8 is outside the exported profile [1, 4]" in err and "4 slots, twice for guidance, 8 rows" in err, err
    assert err.count("\n") == 1, err
