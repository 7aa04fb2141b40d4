"""The device thread: the one thread that owns a ``PromptStream`` (its engine, its device buffers).

Request handlers run on the event loop (or any thread): they hand ``Job``s to ``submit`` and
await the futures it returns. The thread takes new jobs and cancellations from its inbox
between two ticks, ticks the stream while anything is pending (waiting for the device before
each tick, so that new requests join at the next step boundary instead of behind queued
ticks), and resolves each job's future when its result is handed over. Results are taken with
``pop_results``: nothing is kept once delivered.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np

from streamflow_jax.errors import RequestError
from streamflow_jax.pipelines import PromptStream
from streamflow_jax.sampling import seeded_noise

log = logging.getLogger("streamflow_jax.serve")


class QueueFull(Exception):
    """The bounded queue has no room: the caller answers 429."""


@dataclasses.dataclass(eq=False)
class Job:
    """One image to make: ``PromptStream.submit``'s keyword arguments, and a future for its result.

    ``noise_of``: ``(seed, n, i)``, the starting latent is row ``i`` of ``seeded_noise(seed, n
    latents)``, so that ``n`` images of one request equal the pipeline's batch call with that
    seed (made on the device thread)."""

    kwargs: dict[str, Any]
    noise_of: tuple[int, int, int] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    rid: int | None = None


class DeviceWorker:
    """Owns ``stream`` on a thread of its own; ``submit`` and ``cancel`` are safe from any thread.

    Args:
        stream: the ``PromptStream`` to run.
        max_queue: images that may wait for a slot; ``submit`` raises ``QueueFull`` beyond it.
        warm_up: called on the thread before anything else (it compiles); ``ready`` is set after.
        on_tick: called on the thread after each round (metrics).
    """

    def __init__(self, stream: PromptStream, *, max_queue: int = 64, warm_up=None, on_tick=None):
        self.stream, self.max_queue = stream, int(max_queue)
        self.num_slots = stream.engine.num_slots
        self._warm_up, self._on_tick = warm_up, on_tick
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque[Job] = collections.deque()
        self._cancels: collections.deque[Job] = collections.deque()
        self._jobs: dict[int, Job] = {}  # stream request id -> job (device thread only)
        self.outstanding = 0  # jobs submitted and not yet resolved
        self.occupied = 0  # slots holding a request after the last tick
        self.images_done = 0
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="streamflow-device", daemon=True)

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Images waiting for a slot (submitted, not yet admitted)."""
        return max(0, self.outstanding - self.occupied)

    def submit(self, jobs: list[Job], force: bool = False) -> list[concurrent.futures.Future]:
        """Queues the jobs (all or none); raises ``QueueFull`` when more than ``max_queue`` images
        would wait for a slot (unless ``force``: a realtime stream, bounded by its own frames in
        flight), ``RuntimeError`` once the worker is stopping."""
        with self._lock:
            if self._stop or self.failed is not None:
                raise RuntimeError("the server is shutting down" if self._stop else "the device thread stopped")
            if not force and self.outstanding + len(jobs) > self.max_queue + self.num_slots:
                raise QueueFull()
            self.outstanding += len(jobs)
            self._inbox.extend(jobs)
            self._wake.notify()
        return [j.future for j in jobs]

    def cancel(self, jobs: list[Job]) -> None:
        """Withdraws jobs whose client went away: their slots are freed at the next tick."""
        with self._lock:
            for job in jobs:
                if not job.future.done():
                    job.cancelled = True
                    self._cancels.append(job)
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Stops after every outstanding job is resolved (a drain); waits up to ``timeout``."""
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the device thread ---------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self._warm_up is not None:
                self._warm_up(self.stream)
            self.ready.set()
            self._loop()
        except BaseException as e:  # a bug or a device failure: fail every waiting request, say so once
            log.exception("the device thread stopped")
            self.failed = e
            with self._lock:
                jobs = list(self._inbox) + list(self._jobs.values())
                self._inbox.clear()
                self._jobs.clear()
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(RuntimeError(f"the device thread stopped: {e}"))
            self.ready.set()

    def _loop(self) -> None:
        stream = self.stream
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or stream.pending or self._jobs or self._stop):
                    self._wake.wait(timeout=1.0)
                inbox, self._inbox = self._inbox, collections.deque()
                cancels, self._cancels = self._cancels, collections.deque()
                stop = self._stop
            self._take(inbox, cancels)
            if stream.pending:
                stream.engine.wait()  # the previous tick has run: this one starts at once
                stream.tick()
            elif self._jobs:  # only outputs on their way to the host
                stream.engine.wait()
            self._deliver(stream.pop_results(wait=not stream.pending))
            if self._on_tick is not None:
                self._on_tick(self)
            if stop and not self._jobs and not stream.pending:
                with self._lock:
                    if not self._inbox:
                        return

    def _take(self, inbox, cancels) -> None:
        noises: dict[tuple[int, int], np.ndarray] = {}
        for job in inbox:
            if job.cancelled:
                self._resolve(job, None)
                continue
            kwargs = dict(job.kwargs)
            if job.noise_of is not None:
                seed, n, i = job.noise_of
                if (seed, n) not in noises:
                    noises[(seed, n)] = np.asarray(seeded_noise(seed, (n, *self.stream.latent_shape)))
                kwargs["noise"] = noises[(seed, n)][i]
            job.rid = self.stream.submit(**kwargs)
            self._jobs[job.rid] = job
        for job in cancels:
            if job.rid is not None and job.rid in self._jobs:
                self.stream.cancel(job.rid)

    def _deliver(self, results: dict) -> None:
        """Answers the finished jobs, after the gauges count them out: a client answered reads
        neither a slot nor a queue place its request held."""
        done = [(job, out) for job, out in ((self._jobs.pop(rid, None), out) for rid, out in results.items())
                if job is not None]
        with self._lock:
            self.outstanding -= len(done)
        self.occupied = sum(r is not None for r in self.stream.engine.scheduler.requests)
        for job, out in done:
            self._resolve(job, out, counted=True)

    def _resolve(self, job: Job, out, counted: bool = False) -> None:
        if not counted:
            with self._lock:
                self.outstanding -= 1
        if isinstance(out, Exception) or out is None:
            if out is not None and not job.cancelled:
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by its waiter
                    job.future.set_exception(out)
            return
        self.images_done += 1
        if not job.cancelled:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_result(out)


def request_error_message(e: BaseException) -> str:
    """A ``RequestError``'s message without the engine's ``request N:`` prefix (ids mean nothing to a client)."""
    text = str(e)
    if isinstance(e, RequestError) and text.startswith("request "):
        head, _, rest = text.partition(": ")
        if head[len("request "):].isdigit():
            return rest
    return text


def now() -> float:
    return time.perf_counter()
