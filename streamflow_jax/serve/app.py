"""The ASGI app: OpenAI's images API on the stream engine, health, metrics, the realtime stream, the page.

``create_app(model)`` returns a Starlette app; any ASGI server runs it (``streamflow-jax serve``
runs it under uvicorn; ``--replicas`` runs one per Ray Serve replica). Its lifespan starts the
device thread, which compiles (``/health`` is 503 until then; requests that arrive meanwhile
wait in the queue) and then owns the engine; at shutdown the thread finishes what is in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import math
import os
import secrets
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from streamflow_jax.errors import RequestError
from streamflow_jax.pipelines.images import read_image
from streamflow_jax.serve import api
from streamflow_jax.serve.api import REPLICA_HEADER, APIError, EditFields, GenerationFields
from streamflow_jax.serve.metrics import CONTENT_TYPE, Metrics
from streamflow_jax.serve.models import Served, load_served
from streamflow_jax.serve.worker import DeviceWorker, Job, QueueFull, request_error_message

log = logging.getLogger("streamflow_jax.serve")
STATIC = Path(__file__).resolve().parent / "static"
MAX_IMAGE_PIXELS = 4096 * 4096  # uploads and frames larger than this are refused before decoding
# what uploads may be: raster formats Pillow decodes itself (EPS would run Ghostscript on the
# client's PostScript, where it is installed; PDF, XBM, SVG... are not images to redraw)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclasses.dataclass
class Options:
    """What a server allows; the CLI's flags.

    Attributes:
        max_queue: images that may wait for a slot; beyond it, 429 with ``Retry-After``.
        max_n: images per request (``n``).
        max_steps: steps per request (at most ``schedules.MAX_STEPS``).
        timeout: seconds a request may take, queue included (its deadline); then 503, and its
            slots are freed.
        frames_in_flight: frames of one realtime stream in the engine at once; newer frames wait
            (one at a time: the newest replaces an older waiting one, which is dropped).
        max_streams: realtime streams open at once; one more is accepted and closed at once
            with code 1013 (try again later) and the reason.
        replica: the name every response carries in ``x-streamflow-replica``.
    """

    max_queue: int = 64
    max_n: int = api.MAX_N
    max_steps: int = api.MAX_STEPS
    timeout: float = 120.0
    frames_in_flight: int = 4
    max_streams: int = 16
    replica: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self):
        for name in ("max_queue", "max_n", "max_steps", "frames_in_flight", "max_streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'max_queue' else 1}, got {value!r}")
        if not (isinstance(self.timeout, int | float) and 0 < self.timeout < float("inf")):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


def warm_up(served: Served, max_n: int = api.MAX_N) -> None:
    """Compiles what serving runs: text to image and image to image at the served size, and the
    starting noise of requests of 2 to ``max_n`` images (made from one seed, see ``Job``)."""
    from streamflow_jax.sampling import seeded_noise

    w, h = served.size
    grey = np.full((h, w) if served.channels == 1 else (h, w, 3), 0.5, np.float32)
    t0 = time.perf_counter()
    served.stream.warm_up(served.warm_prompt, image=grey)
    for n in range(2, max_n + 1):
        seeded_noise(0, (n, *served.stream.latent_shape)).block_until_ready()
    log.info("compiled in %.1f s", time.perf_counter() - t0)


class ServerState:
    """Everything a handler needs: the served model, its device thread, metrics, options."""

    def __init__(self, served: Served, options: Options, warm_up: bool = True):
        self.served, self.options = served, options
        self.metrics = Metrics(options.replica)
        self.metrics.info.labels(options.replica, served.name).set(1)
        self.worker = DeviceWorker(served.stream, max_queue=options.max_queue,
                                   warm_up=self._warm_up if warm_up else None, on_tick=self.metrics.observe)
        self.metrics.watch(self.worker)
        self.metrics.ready.set_function(lambda: float(self.ready))
        self.draining = False
        self.streams_open = 0  # realtime streams (WebSockets) being served
        # a request's images are queued all or none: more than the slots and the queue hold
        # could never be taken (a 429 to retry forever), so n is bounded by them too
        self.max_n = min(options.max_n, options.max_queue + self.worker.num_slots)
        self.metrics.realtime_streams.set_function(lambda: self.streams_open)

    @property
    def ready(self) -> bool:
        return self.worker.ready.is_set() and self.worker.failed is None and not self.draining

    def _warm_up(self, stream) -> None:
        warm_up(self.served, self.max_n)

    # -- images in and out ---------------------------------------------------------------------

    def fit(self, image: Image.Image) -> Image.Image:
        """An uploaded image or frame made the served size: centre-cropped to its aspect, resized."""
        w, h = self.served.size
        image = image.convert("L" if self.served.channels == 1 else "RGB")
        iw, ih = image.size
        if iw * h != ih * w:  # crop to the target aspect first
            if iw * h > ih * w:
                cw = ih * w // h
                image = image.crop(((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih))
            else:
                ch = iw * h // w
                image = image.crop((0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch))
        return image.resize((w, h), Image.Resampling.BILINEAR) if image.size != (w, h) else image

    def jobs(self, kwargs: dict, n: int, seed: int | None) -> list[Job]:
        seed = secrets.randbelow(2**32) if seed is None else seed
        if n == 1:
            return [Job({**kwargs, "seed": seed})]
        return [Job(dict(kwargs), noise_of=(seed, n, i)) for i in range(n)]

    def deadline(self) -> float:
        """A request's deadline (``loop.time()`` units), taken as its handler starts: one for the
        whole request, its body's arrival and its wait for images together."""
        return asyncio.get_running_loop().time() + self.options.timeout

    async def run(self, request: Request | None, jobs: list[Job], endpoint: str,
                  deadline: float | None = None) -> list:
        """Submits the jobs and waits for their images, the request's deadline (default: from
        now) and its client."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", headers={"Retry-After": "5"})
        try:
            futures = self.worker.submit(jobs)
        except QueueFull:
            rate = self.metrics.busy_rate()
            retry = 5 if rate is None else max(1, min(60, math.ceil(self.worker.waiting / rate)))
            self.metrics.requests.labels(endpoint, "rejected").inc()
            raise APIError(429, f"the queue is full ({self.worker.waiting} images waiting for a slot); retry in "
                                f"{retry} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error", headers={"Retry-After": "5"}) from None
        loop = asyncio.get_running_loop()
        wait_s = max(0.0, (deadline or self.deadline()) - loop.time())
        gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        watch = asyncio.ensure_future(_client_gone(request)) if request is not None else None
        try:
            with self.metrics.in_progress.labels(endpoint).track_inprogress():
                done, _ = await asyncio.wait({gathered} | ({watch} if watch else set()),
                                             timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watch is not None:
                watch.cancel()
        if gathered in done:
            try:
                return gathered.result()
            except RequestError as e:
                self.metrics.requests.labels(endpoint, "bad_request").inc()
                raise APIError(400, request_error_message(e)) from None
        self.worker.cancel(jobs)
        gathered.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gathered
        if watch is not None and watch in done:
            self.metrics.requests.labels(endpoint, "cancelled").inc()
            raise _ClientGone()
        self.metrics.requests.labels(endpoint, "timeout").inc()
        raise APIError(503, f"the request did not finish within its deadline of {self.options.timeout:g} s",
                       type="server_error", code="timeout", headers={"Retry-After": "5"})


class _ClientGone(Exception):
    """The client disconnected; nobody reads the response."""


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


async def _read_body(request: Request, limit: int, deadline: float, timeout: float) -> bytes:
    """The body, at most ``limit`` bytes (else 413), arrived by ``deadline`` (``loop.time()``;
    else 408, naming the request's ``timeout``: a client that sends part of a body and stalls
    held its connection for ever); a client gone meanwhile raises ``ClientDisconnect`` (see
    ``_guarded``)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the body is larger than {limit} bytes", type="invalid_request_error")
    chunks, size = [], 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the body did not arrive within {timeout:g} s (the request's deadline)",
                       code="timeout", headers={"Connection": "close"}) from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001  Starlette's own cache: form() parses these bytes
    return body


def open_image(data: bytes, what: str) -> Image.Image:
    """Decodes an uploaded image (one of ``UPLOAD_FORMATS``), refusing what is too large to decode."""
    try:
        return read_image(data, what, MAX_IMAGE_PIXELS, formats=UPLOAD_FORMATS)
    except ValueError as e:
        raise APIError(400, str(e), param=what) from None


def _state(request) -> ServerState:
    return request.app.state.server


def _respond(state: ServerState, images: list, fmt: str, endpoint: str, t0: float) -> JSONResponse:
    data = [{"b64_json": base64.b64encode(encode_image(im, api.OUTPUT_FORMATS[fmt])).decode()} for im in images]
    state.metrics.requests.labels(endpoint, "ok").inc()
    state.metrics.images.inc(len(images))
    state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    return JSONResponse({"created": int(time.time()), "data": data})


async def _guarded(request: Request, endpoint: str, handler):
    """Runs a handler: ``APIError`` -> its 4xx/5xx answer (counted), a gone client -> nothing
    (499, counted as cancelled; gone while sending its body too, which was logged as a 500)."""
    state = _state(request)
    try:
        return await handler(request, state)
    except APIError as e:
        if e.status < 500 and e.status != 429:
            state.metrics.requests.labels(endpoint, "bad_request").inc()
        return e.response()
    except ClientDisconnect:
        state.metrics.requests.labels(endpoint, "cancelled").inc()
        return Response(status_code=499)
    except _ClientGone:
        return Response(status_code=499)


async def generations(request: Request):
    async def handle(request, state: ServerState):
        t0 = time.perf_counter()
        deadline = state.deadline()
        body = await _read_body(request, api.MAX_JSON_BYTES, deadline, state.options.timeout)
        fields = api.validate(GenerationFields, api.parse_json(body), strict=True)
        kwargs = api.check_common(fields, served=state.served, max_n=state.max_n,
                                  max_steps=state.options.max_steps)
        images = await state.run(request, state.jobs(kwargs, fields.n or 1, fields.seed), "generations", deadline)
        return await asyncio.to_thread(_respond, state, images, fields.output_format or "png", "generations", t0)

    return await _guarded(request, "generations", handle)


async def edits(request: Request):
    async def handle(request, state: ServerState):
        t0 = time.perf_counter()
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise APIError(400, "/v1/images/edits takes multipart/form-data (fields image, prompt, ...)")
        deadline = state.deadline()
        await _read_body(request, api.MAX_UPLOAD_BYTES, deadline, state.options.timeout)
        try:
            form = await request.form(max_files=4, max_fields=64)
        except HTTPException as e:
            raise APIError(400, f"the multipart body cannot be read: {e.detail}") from None
        fields, files = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files[key] = value
            elif key in fields:
                raise APIError(400, f"field {key!r} given twice", param=key)
            else:
                fields[key] = value
        for key in files:
            if key not in ("image", "image[]"):
                raise APIError(400, f"{key}: not supported (this server redraws one whole image: no mask)"
                               if key == "mask" else f"unknown file field {key!r} (give the image as 'image')",
                               param=key)
        if len(files) != 1 or len(form.getlist(next(iter(files)))) != 1:
            raise APIError(400, "give exactly one image file, as 'image'", param="image")
        for key in ("image", "image[]", "mask"):
            if key in fields:
                raise APIError(400, f"{key} must be a file part", param=key)
        parsed = api.validate(EditFields, api.form_values(EditFields, fields), strict=True)
        kwargs = api.check_common(parsed, served=state.served, max_n=state.max_n,
                                  max_steps=state.options.max_steps)
        api.check_strength(parsed.strength, state.served, parsed.steps)
        upload = next(iter(files.values()))
        image = state.fit(await asyncio.to_thread(open_image, await upload.read(), "image"))
        kwargs.update(image=image, strength=parsed.strength)
        images = await state.run(request, state.jobs(kwargs, parsed.n or 1, parsed.seed), "edits", deadline)
        return await asyncio.to_thread(_respond, state, images, parsed.output_format or "png", "edits", t0)

    return await _guarded(request, "edits", handle)


async def health(request: Request):
    state = _state(request)
    body = {"model": state.served.name, "replica": state.options.replica}
    if state.worker.failed is not None:
        return JSONResponse({**body, "status": "failed", "error": str(state.worker.failed)}, status_code=503)
    if state.draining:
        return JSONResponse({**body, "status": "draining"}, status_code=503)
    if not state.worker.ready.is_set():
        return JSONResponse({**body, "status": "compiling"}, status_code=503)
    return JSONResponse({**body, "status": "ok", "slots": state.worker.num_slots,
                         "ticks_per_call": state.served.stream.engine.ticks_per_call,
                         "size": f"{state.served.size[0]}x{state.served.size[1]}"})


async def metrics(request: Request):
    return Response(_state(request).metrics.text(), media_type=CONTENT_TYPE)


async def models(request: Request):
    name = _state(request).served.name
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                     "owned_by": "streamflow-jax"}]})


async def stream_over_http(request: Request):
    """``/v1/stream`` is a WebSocket: a plain HTTP request there is told so (426), not 404."""
    return api.error_response(426, "/v1/stream is a WebSocket endpoint: connect with a WebSocket client "
                                   "(ws://HOST:PORT/v1/stream)", headers={"Upgrade": "websocket", "Connection": "Upgrade"})


async def index(request: Request):
    return FileResponse(STATIC / "index.html")


async def _http_error(request, exc: HTTPException):
    messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return api.error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                              headers=getattr(exc, "headers", None))


async def _server_error(request, exc: Exception):
    log.error("unexpected error on %s", request.url.path, exc_info=exc)
    state = request.app.state.server
    return api.error_response(500, "internal server error", type="server_error",
                              headers={REPLICA_HEADER: state.options.replica})


class ReplicaHeader:
    """Pure ASGI middleware: every HTTP response names the replica that made it."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != self.header[0]]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def create_app(model=None, *, served: Served | None = None, slots_per_stream: int = 4, streams: int = 2,
               backend: str = "xla", size: str | None = None, dtype=None, taesd=None, prediction_type=None,
               num_time_windows=None, variant=None, loras=None, mesh=None, strategy: str = "fsdp",
               quantize: str | None = None, export=None, ticks_per_call: int | None = None, warm_up: bool = True,
               on_ready=None, **options) -> Starlette:
    """The server as an ASGI app.

    Args:
        model: a digits directory (the embedded model when None) or a prompt pipeline directory
            (diffusers or converted: PeRFlow/InstaFlow SD1.5, SD3/SD3.5, Flux, any class
            ``Pipeline.from_diffusers`` knows); loaded here, compiled when the app starts.
        served: an already loaded ``Served`` instead of ``model``.
        slots_per_stream, streams: the engine's slots (batch = slots_per_stream x streams;
            ``streams`` requests join per step).
        backend, size (``"WxH"``), dtype, taesd, prediction_type, num_time_windows, variant,
            loras, mesh, strategy, quantize, export, ticks_per_call: how the model is loaded and
            run (as the CLI's flags).
        warm_up: compile everything before reporting ready (``/health`` 503 until then).
        on_ready: called (on the device thread) once the app is ready.
        **options: ``Options`` fields: max_queue, max_n, max_steps, timeout, frames_in_flight,
            max_streams, replica.
    """
    opts = Options(**options)
    if served is None:
        served = load_served(model, slots_per_stream=slots_per_stream, streams=streams, backend=backend, size=size,
                             dtype=dtype, taesd=taesd, prediction_type=prediction_type,
                             num_time_windows=num_time_windows, variant=variant, loras=loras, mesh=mesh,
                             strategy=strategy, quantize=quantize, export=export, ticks_per_call=ticks_per_call)
    state = ServerState(served, opts, warm_up=warm_up)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        if on_ready is not None:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, lambda: (state.worker.ready.wait(), on_ready(state)))
        yield
        state.draining = True
        await asyncio.to_thread(state.worker.stop)

    from streamflow_jax.serve.realtime import stream_endpoint

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        WebSocketRoute("/v1/stream", stream_endpoint),
        Route("/v1/stream", stream_over_http, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(ReplicaHeader, replica=opts.replica)],
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.server = state
    return app


__all__ = ["Options", "ServerState", "create_app"]
