"""What every pipeline shares: the ``Pipeline`` factory, prompt -> image sampling, images out.

``Pipeline.from_diffusers(path, **kwargs)`` picks the pipeline class from the directory's
``model_index.json`` ``_class_name`` (as diffusers' ``DiffusionPipeline`` does) and passes the
keyword arguments through. A prompt pipeline (``PromptPipeline``) says how prompts become
conditioning and which time grid it samples; tokenizing, noise, sampling and decoding are here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from streamflow_jax import backends, schedules
from streamflow_jax.errors import ConversionError, RequestError
from streamflow_jax.models import decode_latents, encode_latents
from streamflow_jax.sharding import shard_batch
from streamflow_jax.stream import StreamEngine

DEFAULT_STRENGTH = 0.6  # diffusers' img2img default

OUTPUT_TYPES = ("pil", "np", "latent")


# Text encoders, jitted once per process with the weights as arguments (the encoder is a pytree)
@jax.jit
def clip_last_hidden_state(encoder, ids):  # [B, 77] -> [B, 77, D], after the final LayerNorm
    return encoder.module(ids)["last_hidden_state"]


@jax.jit
def clip_pooled(encoder, ids):  # [B, 77] -> [B, D], the EOS position's final state
    return encoder.module(ids)["pooler_output"]


@jax.jit
def clip_penultimate_and_projection(encoder, ids):  # [B, 77] -> [B, 77, D], [B, E] (SD3)
    out = encoder.module(ids)
    return out["hidden_states"][-2], out["text_embeds"]


@jax.jit
def t5_last_hidden_state(encoder, ids):  # [B, L] -> [B, L, D]
    return encoder.module(ids)["last_hidden_state"]
PIPELINES: dict[str, type] = {}  # model_index.json _class_name -> pipeline class


def register(*class_names: str):
    """Class decorator: the pipeline class that ``Pipeline.from_diffusers`` picks for these names."""

    def wrap(cls):
        for name in class_names:
            PIPELINES[name] = cls
        return cls

    return wrap


def read_scheduler_config(path: Path) -> dict:
    sched_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise ConversionError(f"{sched_file}: missing (the pipeline's scheduler says how to sample it)")
    try:
        return json.loads(sched_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{sched_file}: not valid JSON ({e})") from None


class Pipeline:
    """Base class and factory of the pipelines."""

    @classmethod
    def from_diffusers(cls, path, **kwargs) -> Pipeline:
        """A diffusers pipeline directory, or one converted by ``sf.convert``.

        On ``Pipeline`` itself, the class comes from ``model_index.json``'s ``_class_name``
        (``StableDiffusionPipeline`` -> ``PeRFlowPipeline``, ...); on a subclass, that class.
        Keyword arguments (``taesd``, ``dtype``, ...) go to the class's ``load``.
        """
        path = Path(path)
        if cls is Pipeline:
            index = path / "model_index.json"
            if not index.is_file():
                raise ConversionError(f"{path}: no model_index.json (not a diffusers pipeline directory)")
            try:
                name = json.loads(index.read_text()).get("_class_name")
            except json.JSONDecodeError as e:
                raise ConversionError(f"{index}: not valid JSON ({e})") from None
            if name not in PIPELINES:
                raise ConversionError(f"{index}: unsupported pipeline class {name!r} "
                                      f"(supported: {', '.join(sorted(PIPELINES))})")
            cls = PIPELINES[name]
        return cls.load(path, **kwargs)

    @classmethod
    def load(cls, path, **kwargs) -> Pipeline:
        raise NotImplementedError(f"{cls.__name__} does not load from a directory")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def to_float_images(images) -> np.ndarray:
    """Decoder output about [-1, 1] -> float32 images in [0, 1]."""
    return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1)


def to_uint8(images) -> np.ndarray:
    """Decoder output about [-1, 1] -> uint8 pixels (as diffusers' image processor rounds)."""
    return (to_float_images(images) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, scale: int = 4, gap: int = 2) -> Image.Image:
    """``[rows*cols, h, w]`` images in [0, 1] -> one PIL image, tiles upscaled nearest-neighbour."""
    n, h, w = images.shape
    cols = n // rows
    tile_w, tile_h = w * scale, h * scale
    canvas = Image.new("L", (cols * (tile_w + gap) + gap, rows * (tile_h + gap) + gap), color=40)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        tile = Image.fromarray(pixels[i], mode="L").resize((tile_w, tile_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (gap + c * (tile_w + gap), gap + r * (tile_h + gap)))
    return canvas


def images_to_array(image, channels: int | None = 3) -> np.ndarray:
    """PIL image(s) or an array ``[B, H, W, C]`` / ``[H, W, C]`` (floats in [0, 1], or uint8)
    -> float32 ``[B, H, W, C]`` in [0, 1]."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image):
        mode = "L" if channels == 1 else "RGB"
        image = np.stack([np.asarray(im.convert(mode)) for im in image])
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255
    arr = arr.astype(np.float32)
    if channels == 1 and arr.ndim in (2, 3) and (arr.ndim == 2 or arr.shape[-1] != 1):
        arr = arr[..., None]  # [(B,) H, W] grey
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or (channels is not None and arr.shape[-1] != channels):
        raise ValueError(f"image has shape {arr.shape}; expected [B, H, W, {channels}] (or PIL images)")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ValueError("image values must lie in [0, 1] (floats) or be uint8")
    return arr


def img2img_start(model, x0, noise, grid, strength):
    """Image-to-image: the ``[S'+1, B]`` tail of ``grid`` that ``strength`` keeps (one per
    element when ``strength`` is one per element) and ``x0`` noised to its first time."""
    b = x0.shape[0]
    strengths = np.broadcast_to(np.asarray(DEFAULT_STRENGTH if strength is None else strength, np.float32), (b,))
    grids = schedules.stack([schedules.truncate(grid, s) for s in strengths])  # [S'+1, B]
    return model.noise_to(jnp.asarray(x0), jnp.asarray(noise), grids[0]), grids


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} not in {OUTPUT_TYPES}")


# ---------------------------------------------------------------------------------------------
# Prompt pipelines
# ---------------------------------------------------------------------------------------------


def check_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    return prompts


class PromptPipeline(Pipeline):
    """Prompt -> image: encode the prompts, sample the velocity model, decode.

    A subclass sets ``model`` (the velocity ``FlowModel``), ``decoder`` (VAE or TAESD) and
    ``text_len`` (the conditioning's text length), and implements ``encode`` (prompts ->
    conditioning), ``schedule`` (steps -> time grid) and the defaults below.

    Attributes:
        default_steps: Euler steps when ``steps`` is not given.
        default_guidance: guidance scale when not given (None: no guidance).
        embedded_guidance: the guidance scale is a model input (``cond["guidance"]``, Flux-dev)
            instead of classifier-free guidance.
    """

    default_steps = 4
    default_guidance: float | None = None
    embedded_guidance = False

    model: Any
    decoder: Any
    text_len: int
    mesh: Any = None  # set by load(mesh=...): batches are split over its data axis

    # -- what a family's pipeline provides -----------------------------------------------------

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> conditioning ``{name: [B, ...]}`` (without any guidance entry), the text
        ``text_len`` tokens long where the pipeline allows (``max_sequence_length``)."""
        raise NotImplementedError

    def schedule(self, steps: int, latent_shape: tuple[int, int, int]) -> np.ndarray:
        """The ``[S+1]`` time grid for ``steps`` at this latent size."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel."""
        return self.decoder.scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(h, w, C)`` of the latent of an image of ``height x width`` pixels (default: the model's)."""
        sides = []
        for name, px in (("height", height), ("width", width)):
            step = self.vae_scale * self.model.latent_multiple
            if px is not None and (px < step or px % step):
                raise ValueError(f"image {name} {px} is not a multiple of {step}")
            sides.append(None if px is None else px // self.vae_scale)
        return self.model.latent_shape(*sides)

    def model_text_len(self, text_len: int | None = None) -> int:
        """The conditioning's text length for an encoder length ``text_len`` (default: the
        pipeline's); SD3 puts 77 CLIP tokens before it."""
        if text_len is not None and int(text_len) < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {text_len}")
        return self.text_len if text_len is None else int(text_len)

    def resolve_guidance(self, guidance_scale):
        """The guidance scale a call runs with: ``None`` gives the pipeline's default; a scalar
        <= 1 turns classifier-free guidance off (``None``), as diffusers' rule (CFG only above
        1); a model's own guidance input (Flux-dev) is taken as given."""
        if guidance_scale is None:
            return self.default_guidance
        if not self.embedded_guidance and np.ndim(guidance_scale) == 0 and float(guidance_scale) <= 1:
            return None
        return guidance_scale

    def cond_shapes(self, text_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-request conditioning shapes (the stream engine's ``cond_shapes``)."""
        return self.model.cond_shapes(self.model_text_len(text_len))

    def conditioning(self, prompts: list[str], guidance_scale=None, negative_prompt="", text_len=None
                     ) -> tuple[dict, dict | None, Any]:
        """``(cond, uncond, cfg_scale)`` for ``sample``: embedded guidance goes into ``cond``."""
        b = len(prompts)
        cond = self.encode(prompts, text_len)
        if self.embedded_guidance:
            if guidance_scale is None:
                raise ValueError("this model takes a guidance scale as an input: give guidance_scale")
            g = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (b,))
            return {**cond, "guidance": g}, None, None
        if guidance_scale is None:
            return cond, None, None
        negative = [negative_prompt] * b if isinstance(negative_prompt, str) else check_prompts(negative_prompt)
        if len(negative) != b:
            raise ValueError(f"{len(negative)} negative prompts for {b} prompts")
        return cond, self.encode(negative, text_len), guidance_scale

    def noise(self, n: int, shape: tuple[int, int, int], seed: int = 0, noise=None) -> jax.Array:
        """``[n, h, w, C]`` starting latents: ``jax.random.normal(key(seed))`` or ``noise`` checked."""
        if noise is None:
            return jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float32)
        if tuple(np.shape(noise)) != (n, *shape):
            raise ValueError(f"noise has shape {np.shape(noise)}, expected {(n, *shape)}")
        return jnp.asarray(noise, jnp.float32)

    def encode_image(self, image, batch: int) -> jax.Array:
        """Images (PIL or ``[B, H, W, 3]`` in [0, 1]) -> ``[B, h, w, C]`` latents as the model sees
        them (the decoder's encoder with its scale and shift); one image serves every prompt."""
        arr = images_to_array(image, 3)
        if arr.shape[0] not in (1, batch):
            raise ValueError(f"{arr.shape[0]} images for {batch} prompts")
        self.latent_shape(arr.shape[1], arr.shape[2])  # the size must suit the model
        if not hasattr(self.decoder.module, "encode_latents"):
            raise ValueError(f"{self.decoder.class_name} has no encoder for image-to-image")
        latents = encode_latents(self.decoder, jnp.asarray(arr) * 2 - 1)
        return jnp.broadcast_to(latents, (batch, *latents.shape[1:]))

    def decode(self, latents) -> np.ndarray:
        """``[B, h, w, C]`` latents -> ``[B, H, W, 3]`` uint8 images."""
        return to_uint8(decode_latents(self.decoder, latents))

    def output(self, latents, output_type: str):
        """The sampler's latents as ``output_type``: PIL images, float ``[B, H, W, 3]`` in [0, 1],
        or the latents themselves (NHWC)."""
        if output_type == "latent":
            return np.asarray(latents)
        images = decode_latents(self.decoder, latents)
        if output_type == "np":
            return to_float_images(images)
        return [Image.fromarray(img) for img in to_uint8(images)]

    def __call__(self, prompts, *, steps: int | None = None, guidance_scale=None, negative_prompt="",
                 seed: int = 0, noise=None, height: int | None = None, width: int | None = None,
                 max_sequence_length: int | None = None, image=None, strength=None, backend: str = "xla",
                 output_type: str = "pil"):
        """Generates one image per prompt.

        Args:
            prompts: a string or a non-empty list of strings.
            steps: Euler steps (default: the pipeline's).
            guidance_scale: a scalar or one per prompt; classifier-free guidance against
                ``negative_prompt``, or the model's guidance input (Flux-dev). None: the
                pipeline's default; a scalar <= 1 turns classifier-free guidance off, as in diffusers.
            negative_prompt: the unconditional prompt of classifier-free guidance (one, or one
                per prompt).
            seed / noise: the starting latents, ``jax.random.normal(key(seed))`` or ``[B, h, w, C]``.
            height, width: image size in pixels (default: the given noise's, else the model's).
            max_sequence_length: T5 tokens (Flux, SD3; default: the pipeline's); longer
                prompts are truncated with a warning.
            image, strength: image-to-image: start from these images (PIL or ``[B, H, W, 3]``
                in [0, 1]; one for all prompts or one each), encoded and noised to where
                ``strength`` (in (0, 1], default 0.6; a scalar or one per prompt) cuts the
                grid, as diffusers' img2img pipelines do. The size comes from the image.
            backend: ``"xla"``, ``"onnxruntime"`` or ``"tensorrt"`` for the velocity model.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float ``[B, H, W, 3]`` in
                [0, 1]) or ``"latent"`` (the sampler's ``[B, h, w, C]`` output, before decoding).
        """
        check_output_type(output_type)
        prompts = check_prompts(prompts)
        steps = self.default_steps if steps is None else int(steps)
        guidance_scale = self.resolve_guidance(guidance_scale)
        x0 = None
        if image is not None:
            x0 = self.encode_image(image, len(prompts))
            shape = tuple(x0.shape[1:])
            if (height or width) and self.latent_shape(height, width) != shape:
                raise ValueError(f"height/width {height}x{width} differ from the image's size")
        elif strength is not None:
            raise ValueError("strength is for image-to-image: give image too")
        elif noise is not None and height is None and width is None and np.ndim(noise) == 4:
            shape = self.model.latent_shape(*np.shape(noise)[1:3])  # the size the given latents have
        else:
            shape = self.latent_shape(height, width)
        x = self.noise(len(prompts), shape, seed, noise)
        grid = self.schedule(steps, shape)
        if x0 is not None:
            x, grid = img2img_start(self.model, x0, x, grid, strength)
        cond, uncond, cfg = self.conditioning(prompts, guidance_scale, negative_prompt, max_sequence_length)
        if self.mesh is not None:  # the batch over the mesh's data axis (where it divides)
            x, cond, uncond = shard_batch((x, cond, uncond), self.mesh)
        latents = backends.sample(self.model, x, grid, cond, guidance_scale=cfg, uncond=uncond, backend=backend)
        return self.output(latents, output_type)


class PromptStream:
    """The stream engine behind a prompt pipeline: one request per prompt, each with its own
    seed, step count and guidance, advanced together one batched model call per tick and
    decoded as they finish.

    Args:
        pipe: a ``PromptPipeline``.
        slots_per_stream, streams: the engine's N and stream count (batch = N * streams).
        guidance: run classifier-free guidance on every slot (requests give their scale). A
            model with embedded guidance (Flux-dev) takes each request's scale as an input
            instead, whatever this says.
        height, width: image size in pixels (default: the model's).
        output_type: ``"pil"``, ``"np"`` or ``"latent"``, as the pipeline's.
        max_sequence_length: T5 tokens for every request (Flux, SD3; default: the pipeline's).
    """

    def __init__(self, pipe: PromptPipeline, *, slots_per_stream: int = 4, streams: int = 1, guidance: bool = False,
                 height: int | None = None, width: int | None = None, backend: str = "xla",
                 output_type: str = "pil", max_sequence_length: int | None = None):
        check_output_type(output_type)
        self.pipe, self.output_type, self.text_len = pipe, output_type, max_sequence_length
        self.latent_shape = pipe.latent_shape(height, width)
        self.guided = bool(guidance) and not pipe.embedded_guidance
        post = {"pil": to_uint8, "np": to_float_images, "latent": None}[output_type]
        self.engine = StreamEngine(pipe.model, self.latent_shape, pipe.cond_shapes(max_sequence_length),
                                   slots_per_stream=slots_per_stream, streams=streams, guidance=self.guided,
                                   decoder=None if output_type == "latent" else pipe.decoder, postprocess=post,
                                   backend=backend, mesh=pipe.mesh)

    def submit(self, prompt: str, *, steps: int | None = None, seed: int = 0, noise=None,
               guidance_scale: float | None = None, negative_prompt: str = "", image=None,
               strength: float | None = None) -> int:
        """Queues one prompt; returns its id. A bad request gets its error as its result.

        ``image`` (one PIL image or ``[H, W, 3]`` in [0, 1]) and ``strength``: image-to-image,
        the image encoded here, before admission, and noised on the device at admission."""
        if not isinstance(prompt, str):
            return self.engine.reject(f"prompt must be a string, got {type(prompt).__name__}")
        takes_scale = self.guided or self.pipe.embedded_guidance
        try:
            steps = self.pipe.default_steps if steps is None else steps
            grid = self.pipe.schedule(int(steps), self.latent_shape)
            if takes_scale and guidance_scale is None:
                guidance_scale = self.pipe.default_guidance
                if guidance_scale is None:
                    raise RequestError("this stream takes a guidance scale: give guidance_scale")
            cond, uncond, cfg = self.pipe.conditioning([prompt], guidance_scale if takes_scale else None,
                                                       negative_prompt, self.text_len)
            init = None
            if image is not None:
                init = self.pipe.encode_image(image, 1)[0]
                if tuple(init.shape) != self.latent_shape:
                    raise RequestError(f"image gives latents {tuple(init.shape)}, the stream runs {self.latent_shape}")
        except (ValueError, TypeError) as e:
            return self.engine.reject(e)
        first = lambda d: None if d is None else {k: v[0] for k, v in d.items()}  # noqa: E731
        # a scale given to a stream without CFG goes to the engine, which refuses it by name
        extra = {"guidance_scale": cfg, "uncond": first(uncond)} if self.guided else (
            {} if takes_scale or guidance_scale is None else {"guidance_scale": guidance_scale})
        return self.engine.submit(first(cond), grid=grid, seed=None if noise is not None else seed, noise=noise,
                                  init=init, strength=strength, **extra)

    def run(self) -> dict:
        """Runs until every request is done; returns id -> output (as ``output_type``) or ``RequestError``."""
        results = self.engine.run()
        if self.output_type != "pil":
            return dict(results)
        return {rid: r if isinstance(r, Exception) else Image.fromarray(r) for rid, r in results.items()}
