"""The embedded default model: class label (0-9) -> 16x16 grey digit.

``assets/digits`` is a class-conditional ``SD3Transformer2DModel`` trained by
``scripts/train_digits.py`` on scikit-learn's digits, in pixel space (no VAE).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from streamflow_jax import backends, schedules
from streamflow_jax.backends.cache import enable_compilation_cache
from streamflow_jax.checkpoint import load
from streamflow_jax.errors import ConversionError
from streamflow_jax.pipelines.base import Pipeline, img2img_start, negative_prompt_problem, register
from streamflow_jax.pipelines.images import images_to_array
from streamflow_jax.sampling import Guidance, check_seed, per_element_rule, seeded_noise
from streamflow_jax.sharding import shard_batch
from streamflow_jax.stream import StreamEngine

DIGITS_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"
NULL_CLASS = 10
DEFAULT_STEPS, DEFAULT_GUIDANCE = 16, 3.0


def to_images(x) -> np.ndarray:
    """Latents ``[B, 16, 16, 1]`` in [-1, 1] (pixel space) -> ``[B, 16, 16]`` images in [0, 1]."""
    return np.clip((np.asarray(x[..., 0], np.float32) + 1) / 2, 0, 1)


def prompt_label(prompt: str) -> int:
    """The class a text names: ``"0"``-``"9"`` (spaces around allowed), ``""`` the null class
    (the server's prompts and negative prompts, ``generate --negative-prompt``)."""
    text = prompt.strip() if isinstance(prompt, str) else None
    if text == "":
        return NULL_CLASS
    if text is None or len(text) != 1 or text not in "0123456789":
        raise ValueError(f"the digits model takes one digit, \"0\" to \"9\", as a prompt; got {prompt!r}")
    return int(text)


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) \
            or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels must be a non-empty 1-D array of classes 0-9, got {labels!r}")
    return labels


@register("StreamflowDigits")
class DigitsPipeline(Pipeline):
    """Class label (0-9) -> 16x16 grey digit, with classifier-free guidance against the null class.

    Attributes:
        model: the converted ``FlowModel``.
        conditioning: ``encoder_hidden_states`` ``[11, 1, J]`` and ``pooled_projections``
            ``[11, E]``, one row per class, row 10 the null class.
        scheduler: the ``schedules.Scheduler`` record (``scheduler/scheduler_config.json``).
    """

    def __init__(self, model, conditioning: dict[str, np.ndarray], scheduler: schedules.Scheduler | None = None,
                 mesh=None):
        self.model = model
        self.conditioning = {k: jnp.asarray(v) for k, v in conditioning.items()}
        self.scheduler = scheduler or schedules.Scheduler()
        self.mesh = mesh

    @classmethod
    def load(cls, path=DIGITS_DIR, dtype=None, *, mesh=None, strategy: str = "fsdp") -> DigitsPipeline:
        """Loads (converting in memory) a digits pipeline directory; the embedded one by default.
        With ``mesh``, the weights are placed by ``strategy`` and batches split over ``data``."""
        enable_compilation_cache()
        path = Path(path)
        cond_file = path / "conditioning.safetensors"
        if not cond_file.is_file():
            raise ConversionError(f"{path}: no conditioning.safetensors (not a digits pipeline directory)")
        model = load(path, dtype=dtype, mesh=mesh, strategy=strategy)
        scheduler = schedules.read_scheduler(path) if (path / schedules.SCHEDULER_FILE).is_file() else None
        return cls(model, load_file(cond_file), scheduler, mesh)

    @staticmethod
    def resolve_guidance(guidance_scale=None) -> Guidance:
        """The guidance rule (``sampling.Guidance.resolve``): None is 3.0, a scale <= 1 is none."""
        return Guidance.resolve(guidance_scale, mode="cfg", default=DEFAULT_GUIDANCE)

    def cond(self, labels) -> dict[str, jax.Array]:
        """Conditioning dict for ``[B]`` integer labels (10 = unconditional)."""
        labels = jnp.asarray(labels, jnp.int32)
        return {k: v[labels] for k, v in self.conditioning.items()}

    def negative(self, negative_label, n: int) -> np.ndarray:
        """``[n]`` classes of the unconditional branch: the null class (``negative_label`` None),
        or a class 0-9 (one for all, or one each) that guidance steers away from, as a negative
        prompt does (the server's digits negative prompt ``"3"``)."""
        if negative_label is None:
            return np.full(n, NULL_CLASS)
        given = np.atleast_1d(np.asarray(negative_label))
        if given.ndim != 1:
            raise ValueError(f"negative_label must be a class 0-9 (one, or one per label), got {negative_label!r}")
        if given.shape not in ((1,), (n,)):
            raise ValueError(f"{given.size} negative labels for {n} labels")
        try:
            return np.broadcast_to(_check_labels(given), (n,))
        except ValueError:
            raise ValueError(f"negative_label must be a class 0-9 (one, or one per label), got {negative_label!r}") \
                from None

    @staticmethod
    def _warn_unread_negative(negative_label, guidance: Guidance) -> None:
        """A negative label where guidance is off is not read: a warning, as the prompt pipelines
        give for a negative prompt (the CLI refuses it)."""
        if negative_label is None:
            return
        texts = [str(v) for v in np.ravel(negative_label)]
        problem = negative_prompt_problem(texts if len(texts) > 1 else texts[0], guidance,
                                          default=DEFAULT_GUIDANCE, name="the digits model")
        if problem is not None:
            warnings.warn(problem.replace("negative prompt", "negative label", 1), UserWarning, stacklevel=3)

    def __call__(self, labels, *, steps: int = DEFAULT_STEPS, guidance_scale: float | None = None, seed: int = 0,
                 image=None, strength=None, negative_label=None, backend: str = "xla",
                 progress: bool = True) -> np.ndarray:
        """Generates one digit per label.

        Args:
            labels: ``[B]`` classes 0-9.
            steps: Euler steps on the scheduler's flow-match grid.
            guidance_scale: classifier-free guidance scale (scalar or ``[B]``); None: 3.0; a
                scalar <= 1: no guidance (the one rule, ``sampling.Guidance.resolve``).
            seed: PRNG seed of the starting noise, in [0, 2**32).
            image, strength: image-to-image: redraw these 16x16 grey images (``[B, 16, 16]`` or
                one for all, in [0, 1], or PIL images or paths) as the labels' digits, ``strength`` in (0, 1]
                (default 0.6) of the way from the image to noise.
            negative_label: guidance's unconditional class instead of the null class: a class
                0-9 (one, or one per label) to steer away from (``negative``).
            backend: a backend name (``backends.BACKENDS``).
            progress: a progress bar over the steps of runs longer than 2 s.

        Returns:
            ``[B, 16, 16]`` float32 images in [0, 1].
        """
        backends.check_backend(backend)
        self.check_export(backend)
        labels = _check_labels(labels)
        guidance = self.resolve_guidance(guidance_scale)
        self._warn_unread_negative(negative_label, guidance)
        noise = self.noise(len(labels), seed)
        grid = self.scheduler.flow_match_grid(schedules.check_steps(steps))
        if np.shape(guidance.scale) not in ((), (len(labels),)):
            raise ValueError(f"{np.shape(guidance.scale)[0]} guidance scales for {len(labels)} labels")
        negative = self.negative(negative_label, len(labels))
        x0, strengths = self._image_start(image, strength, len(labels))
        if x0 is not None:
            noise, grid = img2img_start(self.model, x0, noise, grid, strengths)
        cond, uncond, scale = self.cond(labels), None, guidance.cfg_scale
        if guidance.cfg:
            uncond, scale = per_element_rule(cond, self.cond(negative), scale)
        if self.mesh is not None:
            noise, cond, uncond = shard_batch((noise, cond, uncond), self.mesh)
        x = backends.sample(self.model, noise, grid, cond, guidance_scale=scale, uncond=uncond,
                            backend=backend, progress=progress)
        return to_images(x)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape()

    def _image_start(self, image, strength, n: int):
        """Image-to-image: ``([n, 16, 16, 1]`` images in [-1, 1] (pixel space), n strengths), or
        ``(None, None)`` without an image."""
        if image is None:
            if strength is not None:
                raise ValueError("strength is for image-to-image: give image too")
            return None, None
        arr = images_to_array(image, 1)
        if arr.shape[1:] != self.latent_shape or arr.shape[0] not in (1, n):
            counts = "1" if n == 1 else f"1 or {n}"
            raise ValueError(f"image has shape {arr.shape[:-1]} (grey, one channel); the model takes [{counts}, 16, 16] "
                             "grey images (one for every label, or one each)")
        given = schedules.DEFAULT_STRENGTH if strength is None else strength
        return np.broadcast_to(arr * 2 - 1, (n, *self.latent_shape)), schedules.strength_values(given, n)

    def noise(self, n: int, seed: int) -> jax.Array:
        """The ``[n, 16, 16, 1]`` starting noise that ``__call__`` uses for ``seed``."""
        return seeded_noise(seed, (n, *self.latent_shape))

    def stream(self, labels, *, steps: int = DEFAULT_STEPS, guidance_scale: float | None = None, seed: int = 0,
               slots_per_stream: int = 4, streams: int = 1, backend: str = "xla", image=None,
               strength=None, negative_label=None, ticks_per_call: int | None = None) -> np.ndarray:
        """The same images as ``__call__``, made by a ``StreamEngine`` (one request per label;
        ``image``, ``strength`` and ``negative_label`` as ``__call__``'s: each request noised on
        the device; ``ticks_per_call``: the engine's, K ticks a compiled call)."""
        self.check_export(backend)
        labels = _check_labels(labels)
        negative = self.negative(negative_label, len(labels))
        init, strengths = self._image_start(image, strength, len(labels))
        guidance = self.resolve_guidance(guidance_scale)
        self._warn_unread_negative(negative_label, guidance)
        if np.ndim(guidance.scale):
            raise ValueError("the stream takes one guidance scale for all labels")
        shapes = {k: tuple(v.shape[1:]) for k, v in self.conditioning.items()}
        engine = StreamEngine(self.model, self.latent_shape, shapes, slots_per_stream=slots_per_stream,
                              streams=streams, guidance=guidance.cfg,
                              postprocess=lambda x: to_images(x[None])[0], backend=backend, mesh=self.mesh,
                              ticks_per_call=ticks_per_call)
        noise = np.asarray(self.noise(len(labels), check_seed(seed)))
        grid = self.scheduler.flow_match_grid(schedules.check_steps(steps))
        table = {k: np.asarray(v) for k, v in self.conditioning.items()}
        extra = lambda i: {"guidance_scale": guidance.scale,  # noqa: E731
                           "uncond": {k: v[negative[i]] for k, v in table.items()}} if guidance.cfg else {}
        ids = [engine.submit({k: v[label] for k, v in table.items()}, grid=grid, noise=noise[i], **extra(i),
                             **({} if init is None else {"init": init[i], "strength": strengths[i]}))
               for i, label in enumerate(labels)]
        engine.run()
        return np.stack([engine.result(i) for i in ids])
