"""Prometheus metrics of one server (one registry per app, so that apps in one process do not clash).

Compilations are counted process-wide from JAX's monitoring events (``jax.monitoring``): every
program compiled, or loaded from the persistent compilation cache, is one.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("ok", "bad_request", "rejected", "timeout", "cancelled")  # rejected: 429; timeout: past the deadline
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)

_compiles = {"programs": 0, "seconds": 0.0, "cache_hits": 0}
_compiles_lock = threading.Lock()
_listening = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        with _compiles_lock:
            _compiles["programs"] += 1
            _compiles["seconds"] += duration


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        with _compiles_lock:
            _compiles["cache_hits"] += 1


def listen_to_compilations() -> None:
    """Registers the process-wide JAX listeners once."""
    global _listening
    if not _listening:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True


def compilations() -> int:
    return _compiles["programs"]


class _CompileCollector:
    def collect(self):
        with _compiles_lock:
            c = dict(_compiles)
        yield CounterMetricFamily("streamflow_compilations", "XLA programs compiled (or loaded from the persistent "
                                  "compilation cache) in this process", value=c["programs"])
        yield CounterMetricFamily("streamflow_compilation_seconds", "seconds spent compiling", value=c["seconds"])
        yield CounterMetricFamily("streamflow_compilation_cache_hits", "programs loaded from the persistent "
                                  "compilation cache", value=c["cache_hits"])


class _EngineCollector:
    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        engine = self.worker.stream.engine
        yield CounterMetricFamily("streamflow_engine_ticks", "engine ticks (one batched step of the occupied "
                                  "slots each)", value=engine.ticks)
        cache = self.worker.stream.cache
        yield CounterMetricFamily("streamflow_prompt_cache_hits", "prompts found in the embedding cache",
                                  value=cache.hits)
        yield CounterMetricFamily("streamflow_prompt_encode_calls", "batched text-encoder calls",
                                  value=self.worker.stream.encode_calls)


class Metrics:
    """The server's metrics; ``worker`` gauges are read when scraped."""

    def __init__(self, replica: str):
        listen_to_compilations()
        self.registry = r = CollectorRegistry()
        r.register(_CompileCollector())
        self.requests = Counter("streamflow_requests", "requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=r)
        self.images = Counter("streamflow_images", "images generated", registry=r)
        self.malformed = Counter("streamflow_malformed_http_requests", "requests whose HTTP framing the server's "
                                 "parser rejected (400 before any endpoint)", registry=r)
        self.latency = Histogram("streamflow_request_latency_seconds", "time from request to response (successes)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.frames = Counter("streamflow_stream_frames", "realtime frames by outcome", ["outcome"], registry=r)
        self.frame_latency = Histogram("streamflow_stream_frame_latency_seconds", "realtime frame in to result out",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("streamflow_requests_in_progress", "requests admitted to the engine and not yet "
                                 "answered", ["endpoint"], registry=r)
        self.queue_depth = Gauge("streamflow_queue_depth", "images waiting for a slot", registry=r)
        self.slots_occupied = Gauge("streamflow_slots_occupied", "engine slots holding a request", registry=r)
        self.slots = Gauge("streamflow_slots", "engine slots", registry=r)
        self.realtime_streams = Gauge("streamflow_realtime_streams", "realtime streams (WebSockets) open",
                                      registry=r)
        self.images_per_second = Gauge("streamflow_images_per_second", "images finished per second over the last "
                                       "10 seconds", registry=r)
        self.ready = Gauge("streamflow_ready", "1 when compiled and serving, 0 while compiling or draining",
                           registry=r)
        self.info = Gauge("streamflow_replica_info", "the replica serving", ["replica", "model"], registry=r)
        for endpoint in ("generations", "edits"):  # every series exists from the start
            self.latency.labels(endpoint)
            self.in_progress.labels(endpoint)
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)
        for outcome in ("processed", "dropped", "bad"):
            self.frames.labels(outcome)
        self._done = collections.deque()  # (time, images_done, busy seconds) samples
        self._busy = 0.0  # seconds of rounds that had work in them
        self._last_round: tuple[float, bool] | None = None  # (time, had work) of the last round
        self._busy_rate: float | None = None  # the last images per busy second measured
        self.replica = replica

    def watch(self, worker) -> None:
        self.slots.set(worker.num_slots)
        self.registry.register(_EngineCollector(worker))
        self.queue_depth.set_function(lambda: worker.waiting)
        self.slots_occupied.set_function(lambda: worker.occupied)
        self.images_per_second.set_function(self.rate)
        self._worker = worker

    def observe(self, worker) -> None:
        """Called by the device thread after each round: samples the images done (twice a second)
        and the time spent working (a round that follows one with work in it)."""
        now = time.monotonic()
        if self._last_round is not None and self._last_round[1]:
            self._busy += now - self._last_round[0]
        self._last_round = (now, worker.occupied > 0 or worker.waiting > 0)
        if not self._done or now - self._done[-1][0] >= 0.5:
            self._done.append((now, worker.images_done, self._busy))
            while len(self._done) > 2 and now - self._done[0][0] > 10:
                self._done.popleft()
            t0, d0, b0 = self._done[0]
            if self._busy - b0 > 0.1 and worker.images_done > d0:
                self._busy_rate = (worker.images_done - d0) / (self._busy - b0)

    def rate(self) -> float:
        """Images per second over the last 10 s (0 when idle)."""
        if not self._done:
            return 0.0
        now, done = time.monotonic(), self._worker.images_done
        t0, d0, _ = self._done[0]
        return (done - d0) / (now - t0) if now - t0 > 0.1 else 0.0

    def busy_rate(self) -> float | None:
        """Images per second of the engine's working time, as last measured (None before any
        image): what a queue drains at once it is busy, idle time left out (the wall-clock rate
        after an idle spell is near 0, and a 429's Retry-After said 60 s for a queue that
        drained in 4)."""
        return self._busy_rate

    def text(self) -> bytes:
        return generate_latest(self.registry)
