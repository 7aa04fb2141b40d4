"""Generation pipelines: conditioning -> ``sample`` -> images.

``DigitsPipeline`` runs the embedded default model (``assets/digits``): a class-conditional
``SD3Transformer2DModel`` trained by ``scripts/train_digits.py`` on scikit-learn's digits.
``Pipeline`` runs SD1.5-family rectified flows (PeRFlow, InstaFlow) from prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.converters.common import ConversionError
from streamflow_jax.models import decode_latents
from streamflow_jax.sampling import sample

DIGITS_DIR = Path(__file__).resolve().parent / "assets" / "digits"
NULL_CLASS = 10


class DigitsPipeline:
    """Class label (0-9) -> 16x16 grey digit, with classifier-free guidance against the null class.

    Attributes:
        model: the converted ``FlowModel``.
        conditioning: ``encoder_hidden_states`` ``[11, 1, J]`` and ``pooled_projections``
            ``[11, P]``, one row per class, row 10 the null class.
        shift: the scheduler's time shift (from ``scheduler/scheduler_config.json``).
    """

    def __init__(self, model, conditioning: dict[str, np.ndarray], shift: float = 1.0):
        self.model = model
        self.conditioning = {k: jnp.asarray(v) for k, v in conditioning.items()}
        self.shift = shift

    @classmethod
    def from_dir(cls, path=DIGITS_DIR, dtype=None) -> DigitsPipeline:
        """Loads (converting in memory) a digits pipeline directory; the embedded one by default."""
        path = Path(path)
        cond_file = path / "conditioning.safetensors"
        if not cond_file.is_file():
            raise ConversionError(f"{path}: no conditioning.safetensors (not a digits pipeline directory)")
        model = load(path, dtype=dtype)
        sched_file = path / "scheduler" / "scheduler_config.json"
        shift = json.loads(sched_file.read_text()).get("shift", 1.0) if sched_file.is_file() else 1.0
        return cls(model, load_file(cond_file), shift)

    def cond(self, labels) -> dict[str, jax.Array]:
        """Conditioning dict for ``[B]`` integer labels (10 = unconditional)."""
        labels = jnp.asarray(labels, jnp.int32)
        return {k: v[labels] for k, v in self.conditioning.items()}

    def __call__(self, labels, *, steps: int = 16, guidance_scale: float | None = 3.0, seed: int = 0,
                 backend: str = "xla") -> np.ndarray:
        """Generates one digit per label.

        Args:
            labels: ``[B]`` classes 0-9.
            steps: Euler steps on the scheduler's flow-match grid.
            guidance_scale: classifier-free guidance scale (scalar or ``[B]``); ``None`` for none.
            seed: PRNG seed of the starting noise.

        Returns:
            ``[B, 16, 16]`` float32 images in [0, 1].
        """
        labels = _check_labels(labels)
        noise = self.noise(len(labels), seed)
        grid = schedules.flow_match(steps, shift=self.shift)
        uncond = self.cond(np.full(len(labels), NULL_CLASS)) if guidance_scale is not None else None
        x = sample(self.model, noise, grid, self.cond(labels), guidance_scale=guidance_scale, uncond=uncond,
                   backend=backend)
        return to_images(x)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.sample_size, c.sample_size, c.in_channels)

    def noise(self, n: int, seed: int) -> jax.Array:
        """The ``[n, 16, 16, 1]`` starting noise that ``__call__`` uses for ``seed``."""
        return jax.random.normal(jax.random.key(seed), (n, *self.latent_shape), jnp.float32)

    def stream(self, labels, *, steps: int = 16, guidance_scale: float | None = 3.0, seed: int = 0,
               slots_per_stream: int = 4, streams: int = 1, backend: str = "xla") -> np.ndarray:
        """The same images as ``__call__``, made by a ``StreamEngine`` (one request per label)."""
        from streamflow_jax.stream import StreamEngine

        labels = _check_labels(labels)
        shapes = {k: tuple(v.shape[1:]) for k, v in self.conditioning.items()}
        engine = StreamEngine(self.model, self.latent_shape, shapes, slots_per_stream=slots_per_stream,
                              streams=streams, guidance=guidance_scale is not None,
                              postprocess=lambda x: to_images(x[None])[0], backend=backend)
        noise = np.asarray(self.noise(len(labels), seed))
        null = self.cond(np.array([NULL_CLASS]))
        ids = []
        for i, label in enumerate(labels):
            cond = {k: v[0] for k, v in self.cond(np.array([label])).items()}
            extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale,
                                                       "uncond": {k: v[0] for k, v in null.items()}}
            ids.append(engine.submit(cond, steps=steps, shift=self.shift, noise=noise[i], **extra))
        engine.run()
        return np.stack([engine.result(i) for i in ids])


@jax.jit
def _encode_text(text_encoder, ids):  # [B, 77] -> [B, 77, D], CLIP's last hidden state
    return text_encoder.module(ids)["last_hidden_state"]


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels must be a non-empty 1-D array of classes 0-9, got {labels!r}")
    return labels


def to_uint8(images) -> np.ndarray:
    """Decoder output about [-1, 1] -> uint8 pixels (as diffusers' image processor rounds)."""
    images = np.asarray(images, np.float32)
    return (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def to_images(x) -> np.ndarray:
    """Latents ``[B, 16, 16, 1]`` in [-1, 1] (pixel space) -> ``[B, 16, 16]`` images in [0, 1]."""
    return np.clip((np.asarray(x[..., 0], np.float32) + 1) / 2, 0, 1)


def image_grid(images: np.ndarray, rows: int, scale: int = 4, gap: int = 2):
    """``[rows*cols, h, w]`` images in [0, 1] -> one PIL image, tiles upscaled nearest-neighbour."""
    from PIL import Image

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


class Pipeline:
    """Prompt -> image for the SD1.5 family run as a rectified flow (PeRFlow, InstaFlow).

    CLIP text encoder -> ``sample`` over the PeRFlow grid with the UNet as a per-element
    velocity field (optional classifier-free guidance) -> VAE or TAESD decode -> PIL images.

    Attributes:
        model: the UNet ``FlowModel`` with its ``PeRFlowAdapter``.
        text_encoder, decoder: ``FlowModel`` s (CLIP; ``AutoencoderKL`` or ``AutoencoderTiny``).
        tokenizer: ``CLIPTokenizer``.
        num_windows: PeRFlow's K.
    """

    def __init__(self, model, text_encoder, tokenizer, decoder, *, num_windows: int = 4, vae_scale: int = 8):
        self.model, self.text_encoder, self.tokenizer, self.decoder = model, text_encoder, tokenizer, decoder
        self.num_windows, self.vae_scale = num_windows, vae_scale

    @classmethod
    def from_diffusers(cls, path, *, taesd=None, dtype=None) -> Pipeline:
        """A diffusers pipeline directory, or one converted by ``sf.convert``.

        Args:
            path: holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
                ``scheduler/scheduler_config.json`` (whose ``prediction_type`` is
                ``diff_eps``, ``ddim_eps`` or ``velocity``; ``num_time_windows`` defaults to 4).
            taesd: a TAESD (``AutoencoderTiny``) directory to decode with instead of the VAE.
        """
        from streamflow_jax.models.perflow import PeRFlowAdapter
        from streamflow_jax.tokenizer import CLIPTokenizer

        path = Path(path)
        sched_file = path / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise ConversionError(f"{sched_file}: missing (the pipeline's scheduler says how to read the UNet)")
        sched = json.loads(sched_file.read_text())
        prediction = sched.get("prediction_type")
        if prediction not in ("diff_eps", "ddim_eps", "velocity"):
            raise ConversionError(
                f"{sched_file}: prediction_type={prediction!r} ({sched.get('_class_name')}) is not a rectified flow; "
                "supported: diff_eps, ddim_eps (PeRFlow), velocity (InstaFlow)")
        windows = int(sched.get("num_time_windows", 4))
        unet = load(path, dtype=dtype, component="unet").with_adapter(PeRFlowAdapter(prediction, windows))
        text = load(path, dtype=dtype, component="text_encoder")
        decoder = load(taesd, dtype=dtype) if taesd is not None else load(path, dtype=dtype, component="vae")
        if decoder.class_name not in ("AutoencoderKL", "AutoencoderTiny"):
            raise ConversionError(f"{taesd or path / 'vae'}: {decoder.class_name} is not a VAE/TAESD")
        blocks = (decoder.config.block_out_channels if decoder.class_name == "AutoencoderKL"
                  else decoder.config.decoder_block_out_channels)
        return cls(unet, text, CLIPTokenizer.from_dir(path / "tokenizer"), decoder, num_windows=windows,
                   vae_scale=2 ** (len(blocks) - 1))

    def encode_prompt(self, prompts) -> dict[str, jax.Array]:
        """Prompts -> ``{"encoder_hidden_states": [B, 77, D]}`` (CLIP's last hidden state)."""
        return {"encoder_hidden_states": _encode_text(self.text_encoder, self.tokenizer(prompts))}

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        c = self.model.config
        h = c.sample_size if height is None else height // self.vae_scale
        w = c.sample_size if width is None else width // self.vae_scale
        for side, px in ((h, height), (w, width)):
            if px is not None and px % self.vae_scale:
                raise ValueError(f"image size {px} is not a multiple of {self.vae_scale}")
        return (h, w, c.in_channels)

    def decode(self, latents) -> np.ndarray:
        """``[B, h, w, C]`` latents -> ``[B, H, W, 3]`` uint8 images."""
        return to_uint8(decode_latents(self.decoder, latents))

    def __call__(self, prompts, *, steps: int = 4, guidance_scale=None, negative_prompt: str = "", seed: int = 0,
                 height: int | None = None, width: int | None = None, noise=None, backend: str = "xla"):
        """Generates one image per prompt.

        Args:
            prompts: a string or a non-empty list of strings.
            steps: Euler steps on the PeRFlow grid (at least one per window).
            guidance_scale: ``None`` (no CFG), a scalar, or one per prompt.
            negative_prompt: the unconditional prompt of CFG.
            seed / noise: the starting latents, ``jax.random.normal(key(seed))`` or ``[B, h, w, C]``.
            height, width: image size in pixels (default: the UNet's sample size x 8).

        Returns:
            A list of PIL images.
        """
        from PIL import Image

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        b = len(prompts)
        shape = self.latent_shape(height, width)
        if noise is None:
            noise = jax.random.normal(jax.random.key(seed), (b, *shape), jnp.float32)
        elif tuple(np.shape(noise)) != (b, *shape):
            raise ValueError(f"noise has shape {np.shape(noise)}, expected {(b, *shape)}")
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([negative_prompt] * b) if guidance_scale is not None else None
        grid = schedules.perflow(steps, self.num_windows)
        latents = sample(self.model, noise, grid, cond, guidance_scale=guidance_scale, uncond=uncond, backend=backend)
        return [Image.fromarray(img) for img in self.decode(latents)]


class PromptStream:
    """The stream engine behind a ``Pipeline``: one request per prompt, each with its own seed,
    step count and guidance, advanced together one batched UNet call per tick and decoded as
    they finish.

    Args:
        pipe: the ``Pipeline``.
        slots_per_stream, streams: the engine's N and stream count (batch = N * streams).
        guidance: run classifier-free guidance on every slot (requests give their scale).
        height, width: image size in pixels (default: the UNet's).
    """

    def __init__(self, pipe: Pipeline, *, slots_per_stream: int = 4, streams: int = 1, guidance: bool = False,
                 height: int | None = None, width: int | None = None, backend: str = "xla"):
        from streamflow_jax.stream import StreamEngine

        self.pipe = pipe
        self.latent_shape = pipe.latent_shape(height, width)
        shape = (pipe.tokenizer.max_length, pipe.text_encoder.config.hidden_size)
        self.engine = StreamEngine(pipe.model, self.latent_shape, {"encoder_hidden_states": shape},
                                   slots_per_stream=slots_per_stream, streams=streams, guidance=guidance,
                                   decoder=pipe.decoder, postprocess=to_uint8, backend=backend)

    def submit(self, prompt: str, *, steps: int = 4, seed: int = 0, noise=None, guidance_scale: float | None = None,
               negative_prompt: str = "") -> int:
        """Queues one prompt; returns its id. A bad request gets its error as its result."""
        if not isinstance(prompt, str):
            return self.engine.reject(f"prompt must be a string, got {type(prompt).__name__}")
        try:
            grid = schedules.perflow(steps, self.pipe.num_windows)
        except ValueError as e:
            return self.engine.reject(e)
        cond = {k: v[0] for k, v in self.pipe.encode_prompt([prompt]).items()}
        extra = {}
        if guidance_scale is not None:
            extra = {"guidance_scale": guidance_scale,
                     "uncond": {k: v[0] for k, v in self.pipe.encode_prompt([negative_prompt]).items()}}
        return self.engine.submit(cond, grid=grid, seed=None if noise is not None else seed, noise=noise, **extra)

    def run(self) -> dict:
        """Runs until every request is done; returns id -> PIL image or ``RequestError``."""
        from PIL import Image

        results = self.engine.run()
        return {rid: r if isinstance(r, Exception) else Image.fromarray(r) for rid, r in results.items()}
