"""``PromptStream``: a prompt pipeline run through the stream engine, one request per prompt.

Prompts are encoded just in time: a request waits here, as text, until the engine has room to
admit it; then the prompts of all the requests one tick admits (and their negative prompts)
are encoded in one batched call, and each text's embedding is kept in a small LRU cache, since
realtime clients resend the same prompt with every frame. Each result is handed over once
(``run`` and ``pop_results`` return what finished since the last call, then forget it).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import warnings
from typing import Any

import numpy as np
from PIL import Image

from streamflow_jax import schedules
from streamflow_jax.errors import RequestError
from streamflow_jax.pipelines.base import PromptPipeline
from streamflow_jax.pipelines.images import check_output_type, to_float_images, to_uint8
from streamflow_jax.sampling import Guidance, check_seed
from streamflow_jax.stream import StreamEngine, bucket

DEFAULT_CACHE_SIZE = 64  # prompt embeddings kept (SD3: 333 x 4096 float32 = 5.5 MB each)


class EmbeddingCache:
    """Text -> its conditioning rows (host arrays, no batch axis), least recently used dropped."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {size!r}")
        self.size = size
        self._rows: collections.OrderedDict[str, dict[str, np.ndarray]] = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, text: str) -> dict[str, np.ndarray] | None:
        rows = self._rows.get(text)
        if rows is None:
            self.misses += 1
            return None
        self.hits += 1
        self._rows.move_to_end(text)
        return rows

    def put(self, text: str, rows: dict[str, np.ndarray]) -> None:
        if self.size == 0:
            return
        self._rows[text] = rows
        self._rows.move_to_end(text)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def __contains__(self, text: str) -> bool:
        return text in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()


@dataclasses.dataclass
class _Waiting:
    """A request waiting, as text, for room in the engine."""

    id: int
    prompt: str
    negative: str
    guidance: Guidance
    grid: np.ndarray  # [S+1]
    seed: int | None
    noise: Any
    image: Any
    strength: float | None


class PromptStream:
    """The stream engine behind a prompt pipeline: one request per prompt, each with its own
    seed, step count and guidance, advanced together one batched model call per tick and
    decoded as they finish.

    Args:
        pipe: a ``PromptPipeline`` (or an object with its interface: ``encode``, ``schedule``,
            ``latent_shape``, ``cond_shapes``, ``resolve_guidance``, ``encode_image``...).
        slots_per_stream, streams: the engine's N and stream count (batch = N * streams).
        guidance: give every slot an unconditional branch, so that requests may ask for
            classifier-free guidance (each with its own scale; a request without CFG then runs
            its conditional velocity exactly). A model with embedded guidance (Flux-dev) takes
            each request's scale as an input instead, whatever this says. Default: as the
            pipeline's default scale asks (SD3's 7.0 does; PeRFlow, Flux and SDXL have none).
        height, width: image size in pixels (default: the model's).
        output_type: ``"pil"``, ``"np"`` or ``"latent"``, as the pipeline's.
        max_sequence_length: T5 tokens for every request (Flux, SD3; default: the pipeline's).
        cache_size: prompt embeddings kept (least recently used dropped; 0: none).
        admit_per_tick, min_batch: the engine's (default: one request per stream per tick).
        ticks_per_call: the engine's (``StreamEngine``: K ticks planned ahead and run as one
            compiled call; default ``$STREAMFLOW_JAX_TICKS_PER_CALL``, else 1).
    """

    def __init__(self, pipe: PromptPipeline, *, slots_per_stream: int = 4, streams: int = 1, guidance: bool | None = None,
                 height: int | None = None, width: int | None = None, backend: str = "xla",
                 output_type: str = "pil", max_sequence_length: int | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE, admit_per_tick: int | None = None,
                 min_batch: int | None = None, ticks_per_call: int | None = None):
        check_output_type(output_type)
        getattr(pipe, "check_export", lambda backend: None)(backend)
        self.pipe, self.output_type, self.text_len = pipe, output_type, max_sequence_length
        self.latent_shape = pipe.latent_shape(height, width)
        # conditioning of the stream's image size rather than the text (SDXL's time ids), both branches
        sized = getattr(pipe, "image_conditioning", lambda shape: {})(self.latent_shape)
        self._sized = {k: np.asarray(v) for k, v in sized.items()}
        if guidance is None:  # as the pipeline's default scale asks (SD3: 7.0, CFG; the others: none)
            guidance = pipe.resolve_guidance(None).cfg
        self.guided = bool(guidance) and pipe.guidance_mode == "cfg"
        self.cache = EmbeddingCache(cache_size)
        post = {"pil": to_uint8, "np": to_float_images, "latent": None}[output_type]
        self.engine = StreamEngine(pipe.model, self.latent_shape, pipe.cond_shapes(max_sequence_length),
                                   slots_per_stream=slots_per_stream, streams=streams, guidance=self.guided,
                                   decoder=None if output_type == "latent" else pipe.decoder, postprocess=post,
                                   backend=backend, mesh=pipe.mesh, admit_per_tick=admit_per_tick,
                                   min_batch=min_batch, ticks_per_call=ticks_per_call)
        self._ids = itertools.count()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._engine_ids: dict[int, int] = {}  # engine request id -> ours
        self._results: dict[int, Any] = {}  # errors found before the engine saw the request
        self.encode_calls = 0  # batched text-encoder calls made (one per tick that admits new text)

    # -- requests ------------------------------------------------------------------------------

    def submit(self, prompt: str, *, steps: int | None = None, seed: int = 0, noise=None,
               guidance_scale: float | None = None, negative_prompt: str = "", image=None,
               strength: float | None = None) -> int:
        """Queues one prompt; returns its id. A bad request gets its error as its result.

        ``guidance_scale`` means what it means to the pipeline (``resolve_guidance``: None is
        the pipeline's default). ``noise``: the ``[h, w, C]`` starting latent instead of
        ``seed``'s. ``image`` (one PIL image or ``[H, W, 3]`` in [0, 1]) and ``strength``:
        image-to-image, the image encoded when the request is admitted and noised on the device.
        The prompt is encoded when the engine has room for the request (see the module)."""
        rid = next(self._ids)
        try:
            for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
                if not isinstance(text, str):
                    raise ValueError(f"{what} must be a string, got {type(text).__name__}")
            steps = schedules.check_steps(self.pipe.default_steps if steps is None else steps)
            if noise is None:
                seed = check_seed(seed)
            guidance = self.pipe.resolve_guidance(guidance_scale)
            if np.ndim(guidance.scale):
                raise ValueError("a request takes one guidance scale, not one per element")
            problem = getattr(self.pipe, "negative_prompt_problem", None)  # an adapter may have none
            if problem is not None and (why := problem(negative_prompt, guidance)) is not None:
                warnings.warn(f"request {rid}: {why}", UserWarning, stacklevel=2)
            if guidance.cfg and not self.guided:
                raise ValueError(f"guidance_scale {guidance.scale} asks for classifier-free guidance, and this "
                                 "stream runs without it (PromptStream(..., guidance=True))")
            grid = self.pipe.schedule(steps, self.latent_shape)
        except (ValueError, TypeError) as e:
            self._results[rid] = e if isinstance(e, RequestError) else RequestError(f"request {rid}: {e}")
            return rid
        self._waiting.append(_Waiting(rid, prompt, negative_prompt, guidance, grid,
                                      None if noise is not None else seed, noise, image, strength))
        return rid

    def cancel(self, rid: int) -> bool:
        """Withdraws a waiting or running request (its slot is freed); its result is a
        ``RequestError`` saying so. False when it is not pending."""
        for w in self._waiting:
            if w.id == rid:
                self._waiting.remove(w)
                self._results[rid] = RequestError(f"request {rid}: cancelled")
                return True
        erid = next((e for e, r in self._engine_ids.items() if r == rid), None)
        return erid is not None and self.engine.cancel(erid)

    # -- running -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting here or in the engine."""
        return len(self._waiting) + self.engine.pending

    def tick(self) -> None:
        """Moves as many waiting requests into the engine as its next tick admits (their prompts
        encoded in one batched call), then ticks the engine."""
        self._feed(self.engine.room)
        self.engine.tick()

    def run(self) -> dict:
        """Runs until every request is done; returns id -> output (as ``output_type``) or
        ``RequestError`` for every request that finished since the last ``run`` or
        ``pop_results`` (each result is handed over once)."""
        while self._waiting:
            self.tick()
        self.engine.run()  # the rest is the engine's
        return self.pop_results(wait=True)

    def pop_results(self, wait: bool = False) -> dict:
        """Hands over the results that are ready (id -> output or ``RequestError``) and forgets
        them. ``wait``: first wait for outputs still being copied to the host."""
        out, self._results = self._results, {}
        for erid, r in self.engine.pop_results(wait=wait).items():
            rid = self._engine_ids.pop(erid)
            if isinstance(r, RequestError) and str(r).startswith(f"request {erid}:"):  # the id the caller holds
                r = RequestError(f"request {rid}:" + str(r)[len(f"request {erid}:"):])
            out[rid] = r if isinstance(r, Exception) or self.output_type != "pil" else _to_pil(r)
        return out

    def warm_up(self, prompt: str, image=None) -> None:
        """Compiles what serving runs, before any user waits for it: the text encoders at every
        batch size a tick encodes, the engine's programs (``StreamEngine.warm_up``), and the image
        encoder when ``image`` is given (image to image); the warm-up's embeddings are forgotten."""
        # the prompts and negative prompts of one engine call (ticks_per_call ticks)
        texts = 2 * self.engine.scheduler.admit_per_tick * self.engine.ticks_per_call
        size = 1
        while True:
            self.pipe.encode([prompt] * size, self.text_len)
            if size >= bucket(texts, 1 << 30):
                break
            size *= 2
        if image is not None:
            self.pipe.encode_image(image, 1)
        self.engine.warm_up(image_to_image=image is not None)

    # -- admission -----------------------------------------------------------------------------

    def _feed(self, room: int) -> None:
        batch = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if not batch:
            return
        texts = list(dict.fromkeys(t for w in batch for t in ((w.prompt, w.negative) if w.guidance.cfg else (w.prompt,))
                                   if t not in self.cache))
        failed = self._encode(texts)
        for w in batch:
            try:
                bad = next((t for t in (w.prompt, w.negative) if t in failed), None)
                if bad is not None:
                    raise RequestError(f"request {w.id}: {failed[bad]}")
                self._submit(w)
            except Exception as e:  # noqa: BLE001 (one request's failure, whatever it is, is its own)
                self._results[w.id] = e if isinstance(e, RequestError) else RequestError(f"request {w.id}: {e}")

    def _encode(self, texts: list[str]) -> dict[str, str]:
        """Encodes these texts in one call (padded to a power of two, few compiled sizes) into
        the cache; returns text -> why, for texts the encoder refused (then encoded one by one,
        so that one bad text fails alone)."""
        if not texts:
            return {}
        padded = texts + [texts[-1]] * (bucket(len(texts), 1 << 30) - len(texts))
        self.encode_calls += 1
        try:
            self._store(texts, self.pipe.encode(padded, self.text_len))
            return {}
        except Exception as e:  # noqa: BLE001 (said per request, below; the stream goes on)
            if len(texts) == 1:
                return {texts[0]: f"encoding the prompt failed ({type(e).__name__}: {e})"}
        failed = {}
        for t in texts:
            try:
                self._store([t], self.pipe.encode([t], self.text_len))
            except Exception as e:  # noqa: BLE001
                failed[t] = f"encoding the prompt failed ({type(e).__name__}: {e})"
        return failed

    def _store(self, texts: list[str], cond: dict) -> None:
        host = {k: np.asarray(v) for k, v in cond.items()}
        for i, t in enumerate(texts):
            self.cache.put(t, {k: v[i] for k, v in host.items()})

    def _rows(self, text: str) -> dict[str, np.ndarray]:
        rows = self.cache.get(text)
        if rows is None:  # evicted by this very batch (a cache smaller than a tick's texts)
            rows = {k: np.asarray(v)[0] for k, v in self.pipe.encode([text], self.text_len).items()}
        return rows

    def _submit(self, w: _Waiting) -> None:
        cond, uncond, cfg = {**self._rows(w.prompt), **self._sized}, None, None
        if w.guidance.kind == "embedded":
            cond = {**cond, "guidance": np.float32(w.guidance.scale)}
        elif w.guidance.cfg:
            rows = self._rows(w.negative)
            if w.negative == "" and getattr(self.pipe, "zero_empty_negative", False):  # SDXL (digits: no such rule)
                zeroed = self.pipe.zeroed_if_empty([""], {k: v[None] for k, v in rows.items()})
                rows = {k: np.asarray(v)[0] for k, v in zeroed.items()}
            uncond, cfg = {**rows, **self._sized}, w.guidance.scale
        init = None
        if w.image is not None:
            init = np.asarray(self.pipe.encode_image(w.image, 1))[0]  # host: the engine takes it there
            if tuple(init.shape) != self.latent_shape:
                size = w.image.size if isinstance(w.image, Image.Image) else tuple(np.shape(w.image)[1::-1])  # (W, H)
                raise RequestError(f"request {w.id}: the image is {size[0]}x{size[1]} pixels (latents "
                                   f"{tuple(init.shape)}), and this stream runs latents {self.latent_shape}: resize "
                                   "the image, or make the stream with its height= and width=")
        elif w.strength is not None:
            raise RequestError(f"request {w.id}: strength is for image-to-image: give image too")
        erid = self.engine.submit(cond, grid=w.grid, seed=w.seed, noise=w.noise, init=init, strength=w.strength,
                                  guidance_scale=cfg, uncond=uncond)
        self._engine_ids[erid] = w.id


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """uint8 ``[H, W, 3]`` (or one channel, grey) -> a PIL image."""
    return Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
