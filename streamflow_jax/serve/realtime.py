"""``WS /v1/stream``: realtime image-to-image, StreamDiffusion-style.

Protocol (client -> server):
- a text message is a JSON configuration ``{prompt, strength, steps, guidance_scale, seed,
  negative_prompt}`` (``prompt`` required); it applies to the frames after it and may be
  resent at any time (switching prompts compiles nothing: the engine's programs do not depend
  on the prompt);
- a binary message is one frame, a PNG or JPEG image (any size: centre-cropped and resized to
  the served size). Every binary message is a frame, numbered from 0, bad ones included.

Server -> client, for each frame it processes: a text message ``{"frame": n, "dropped": k,
"latency_ms": ms}`` then the result as one binary message, an image in the frame's format at
the served size. ``dropped`` counts the frames of this stream dropped so far. A frame that cannot
be used (undecodable, or sent before any configuration) gets ``{"frame": n, "error": ...}``, and
the stream goes on; so does a bad configuration (``{"error": ...}``, the previous one stays).

A server takes ``max_streams`` streams at once; one more is accepted and closed at once with
code 1013 (try again later) and the reason. Frames ride the engine's slots like any other
request, ``frames_in_flight`` of them at once per stream. A frame that arrives while they are
all busy waits; a newer one replaces it (the newest wins, the older is dropped), and a result
older than one already sent is dropped too.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

from PIL import Image
from starlette.websockets import WebSocket, WebSocketDisconnect

from streamflow_jax.errors import RequestError
from streamflow_jax.serve import api
from streamflow_jax.serve.api import REPLICA_HEADER, APIError, StreamConfig
from streamflow_jax.serve.worker import Job, request_error_message

FORMATS = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
MAX_FRAME_BYTES = 16 << 20
# a configuration's text: two prompts of api.MAX_PROMPT_CHARS as json.dumps writes them at worst
# (each character outside the BMP escaped to 12: "\ud83d\ude00"), and room for the rest
MAX_CONFIG_CHARS = 2 * 12 * api.MAX_PROMPT_CHARS + 4096


def frame_format(data: bytes) -> str | None:
    return next((fmt for magic, fmt in FORMATS.items() if data.startswith(magic)), None)


def _prepare(state, data: bytes) -> Image.Image:
    from streamflow_jax.serve.app import open_image

    return state.fit(open_image(data, "frame"))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def parse_config(state, text: str) -> dict:
    """A configuration message -> ``PromptStream.submit``'s arguments (less the image)."""
    what = "the configuration"
    if len(text) > MAX_CONFIG_CHARS:  # refused before parsing: a message may be megabytes
        raise APIError(400, f"{what} is longer than {MAX_CONFIG_CHARS} characters")
    fields = api.validate(StreamConfig, api.parse_json(text, what), strict=True, what=what)
    served, opts = state.served, state.options
    api.check_range("steps", fields.steps, 1, opts.max_steps)
    api.check_strength(fields.strength, served, fields.steps)
    seed = 0 if fields.seed is None else fields.seed
    api.check_range("seed", seed, 0, 2**32 - 1)
    for what in ("prompt", "negative_prompt"):
        value = getattr(fields, what)
        if value is not None:
            if len(value) > api.MAX_PROMPT_CHARS:
                raise APIError(400, f"{what} is longer than {api.MAX_PROMPT_CHARS} characters", param=what)
            try:
                served.check_prompt(value, what)
            except ValueError as e:
                raise APIError(400, str(e), param=what) from None
    try:
        guidance = served.stream.pipe.resolve_guidance(fields.guidance_scale)
    except ValueError as e:
        raise APIError(400, str(e), param="guidance_scale") from None
    api.check_negative_prompt(served, fields.negative_prompt, guidance)
    kwargs = {"prompt": fields.prompt, "steps": fields.steps, "guidance_scale": fields.guidance_scale,
              "seed": seed, "strength": fields.strength}
    if fields.negative_prompt is not None:
        kwargs["negative_prompt"] = fields.negative_prompt
    return kwargs


class RealtimeSession:
    """One WebSocket stream: frames in, results out, newest wins."""

    def __init__(self, ws: WebSocket, state):
        self.ws, self.state = ws, state
        self.config: dict | None = None
        self.frames = 0  # frames received (the next frame's number)
        self.dropped = 0
        self.last_sent = -1
        self.waiting: tuple[int, bytes, str, float] | None = None  # (frame, data, format, time in)
        self.in_flight: dict[asyncio.Future, tuple[int, str, float, Job]] = {}

    async def run(self) -> None:
        receive = asyncio.ensure_future(self.ws.receive())
        try:
            while True:
                done, _ = await asyncio.wait({receive, *self.in_flight}, return_when=asyncio.FIRST_COMPLETED)
                # in frame order: results finished by the same tick come back as a set, and the
                # newer sent first dropped the older (half the time, with --streams 2)
                for fut in sorted((f for f in done if f is not receive), key=lambda f: self.in_flight[f][0]):
                    await self._result(fut)
                if receive in done:
                    message = receive.result()
                    if message["type"] == "websocket.disconnect":
                        return
                    if message.get("text") is not None:
                        await self._configure(message["text"])
                    elif message.get("bytes") is not None:
                        await self._frame(message["bytes"])
                    receive = asyncio.ensure_future(self.ws.receive())
                await self._submit_waiting()
        except (WebSocketDisconnect, RuntimeError):  # the client went away mid-send
            return
        finally:
            receive.cancel()
            jobs = [job for *_, job in self.in_flight.values()]
            if jobs:
                self.state.worker.cancel(jobs)
            for fut in self.in_flight:
                fut.cancel()

    async def _send(self, message: dict) -> None:
        await self.ws.send_text(json.dumps(message))

    async def _configure(self, text: str) -> None:
        try:
            self.config = parse_config(self.state, text)
        except APIError as e:
            await self._send({"error": e.message, "param": e.param})

    async def _frame(self, data: bytes) -> None:
        n, t_in = self.frames, time.perf_counter()
        self.frames += 1
        fmt = frame_format(data)
        if self.config is None:
            return await self._bad(n, "send a JSON configuration ({\"prompt\": ...}) before the frames")
        if fmt is None:
            return await self._bad(n, "not a PNG or JPEG image")
        if len(data) > MAX_FRAME_BYTES:
            return await self._bad(n, f"larger than {MAX_FRAME_BYTES} bytes")
        if self.waiting is not None:  # the newest wins: the frame that was waiting is dropped
            self.dropped += 1
            self.state.metrics.frames.labels("dropped").inc()
        self.waiting = (n, data, fmt, t_in)

    async def _bad(self, n: int, why: str) -> None:
        self.state.metrics.frames.labels("bad").inc()
        await self._send({"frame": n, "error": f"frame {n}: {why}"})

    async def _submit_waiting(self) -> None:
        if self.waiting is None or len(self.in_flight) >= self.state.options.frames_in_flight:
            return
        n, data, fmt, t_in = self.waiting
        self.waiting = None
        try:
            image = await asyncio.to_thread(_prepare, self.state, data)
        except APIError as e:
            return await self._bad(n, e.message.removeprefix("frame: "))
        job = Job({**self.config, "image": image})
        (future,) = self.state.worker.submit([job], force=True)
        self.in_flight[asyncio.wrap_future(future)] = (n, fmt, t_in, job)

    async def _result(self, fut: asyncio.Future) -> None:
        n, fmt, t_in, _ = self.in_flight.pop(fut)
        try:
            image = fut.result()
        except RequestError as e:
            return await self._bad(n, request_error_message(e))
        if n < self.last_sent:  # a newer frame's result went out first
            self.dropped += 1
            self.state.metrics.frames.labels("dropped").inc()
            return
        latency = time.perf_counter() - t_in
        self.last_sent = n
        data = await asyncio.to_thread(_encode, image, fmt)
        self.state.metrics.frames.labels("processed").inc()
        self.state.metrics.frame_latency.observe(latency)
        await self._send({"frame": n, "dropped": self.dropped, "latency_ms": round(latency * 1000, 2)})
        await self.ws.send_bytes(data)


async def stream_endpoint(ws: WebSocket) -> None:
    state = ws.app.state.server
    # accepted before any refusal, so that the client reads why and which replica refused
    await ws.accept(headers=[(REPLICA_HEADER.encode(), state.options.replica.encode())])
    if state.draining:
        await ws.close(code=1012, reason="this server is draining (shutting down); connect again, to another replica")
        return
    if state.streams_open >= state.options.max_streams:
        await ws.close(code=1013, reason=f"{state.streams_open} realtime streams open, the most this server takes; "
                                         "try again later")
        return
    state.streams_open += 1
    try:
        await RealtimeSession(ws, state).run()
    finally:
        state.streams_open -= 1
