"""What a server serves: a model directory (or the embedded digits model) loaded behind a
``PromptStream``, whatever the pipeline class.

Prompt pipelines (PeRFlow/InstaFlow SD1.5, SD3/SD3.5, Flux, and any class ``Pipeline.from_diffusers``
picks from ``model_index.json``) are served as they are. The digits model takes class labels, not
text: ``DigitsPrompts`` gives it the interface ``PromptStream`` drives, with a prompt that is one
digit, ``"0"`` to ``"9"`` (the empty prompt is the null class, the unconditional branch of CFG).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from streamflow_jax.pipelines import DIGITS_DIR, DigitsPipeline, Pipeline, PromptStream
from streamflow_jax.pipelines.images import images_to_array
from streamflow_jax.pipelines.base import negative_prompt_problem
from streamflow_jax.pipelines.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS, prompt_label



class DigitsPrompts:
    """The embedded digits model (``DigitsPipeline``) as a prompt pipeline: prompt ``"3"`` is
    class 3, ``""`` the null class; 16x16 grey images in pixel space (no autoencoder)."""

    default_steps = DEFAULT_STEPS
    guidance_mode = "cfg"
    decoder = None
    vae_scale = 1
    text_len = 1

    def __init__(self, pipe: DigitsPipeline):
        self.pipe, self.model, self.mesh = pipe, pipe.model, pipe.mesh
        self.table = {k: np.asarray(v) for k, v in pipe.conditioning.items()}

    label = staticmethod(prompt_label)

    def resolve_guidance(self, guidance_scale=None):
        return self.pipe.resolve_guidance(guidance_scale)

    def negative_prompt_problem(self, negative_prompt, guidance) -> str | None:
        return negative_prompt_problem(negative_prompt, guidance, default=DEFAULT_GUIDANCE, name="the digits model")

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        shape = self.pipe.latent_shape
        if (height or shape[0]) != shape[0] or (width or shape[1]) != shape[1]:
            raise ValueError(f"the digits model makes {shape[1]}x{shape[0]} images only, not {width}x{height}")
        return shape

    def cond_shapes(self, text_len=None) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[1:]) for k, v in self.table.items()}

    def schedule(self, steps: int, latent_shape) -> np.ndarray:
        return self.pipe.scheduler.flow_match_grid(steps)

    def encode(self, prompts: list[str], text_len=None) -> dict[str, np.ndarray]:
        labels = [self.label(p) for p in prompts]
        return {k: v[labels] for k, v in self.table.items()}

    def encode_image(self, image, batch: int):
        """Grey images (PIL, converted to grey, or ``[B, 16, 16]`` in [0, 1]) -> pixel-space latents in [-1, 1]."""
        arr = images_to_array(image, 1)
        if arr.shape[1:] != self.pipe.latent_shape:
            raise ValueError(f"image has shape {arr.shape[1:3]}, the digits model takes 16x16")
        return jnp.broadcast_to(jnp.asarray(arr) * 2 - 1, (batch, *arr.shape[1:]))


@dataclasses.dataclass
class Served:
    """A loaded model, ready to serve."""

    stream: PromptStream
    name: str  # the model id the API answers to
    size: tuple[int, int]  # (width, height) of every image, in pixels
    channels: int  # 1 (grey, the digits model) or 3
    warm_prompt: str  # a prompt the model accepts, for warming up

    @property
    def is_digits(self) -> bool:
        return isinstance(self.stream.pipe, DigitsPrompts)

    def check_prompt(self, prompt: str, what: str = "prompt") -> None:
        """Refuses a prompt the model cannot take (the digits model: one digit)."""
        if self.is_digits:
            try:
                DigitsPrompts.label(prompt)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``"WxH"`` -> (width, height); None or ``"auto"`` -> None."""
    if size is None or size == "auto":
        return None
    parts = size.lower().split("x") if isinstance(size, str) else []
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and 0 < len(p) <= 5 and p[0] != "0" for p in parts):
        raise ValueError(f"size must be WIDTHxHEIGHT in pixels, e.g. \"512x512\", got {size!r}")
    return int(parts[0]), int(parts[1])


def load_served(model=None, *, slots_per_stream: int = 4, streams: int = 2, backend: str = "xla", size=None,
                dtype=None, taesd=None, prediction_type=None, num_time_windows=None, variant=None, loras=None,
                mesh=None, strategy: str = "fsdp", quantize: str | None = None, cache_size: int | None = None,
                export=None, ticks_per_call: int | None = None) -> Served:
    """Loads MODEL (a digits directory, the embedded one when None; or any prompt pipeline
    directory, diffusers or converted) behind a guided ``PromptStream`` of ``slots_per_stream x
    streams`` slots, images of ``size`` (``"WxH"``; default the model's). ``export``: an export
    directory of its velocity model that ``backend`` runs (``Pipeline.use_export``).
    ``ticks_per_call``: the engine's (default ``$STREAMFLOW_JAX_TICKS_PER_CALL``, else 1)."""
    wh = parse_size(size)
    width, height = wh if wh else (None, None)
    extra = {"ticks_per_call": ticks_per_call} | ({} if cache_size is None else {"cache_size": cache_size})
    if model is None or (Path(model) / "conditioning.safetensors").is_file():
        pipe = DigitsPipeline.load(model or DIGITS_DIR, dtype=dtype, mesh=mesh, strategy=strategy)
        if quantize:
            from streamflow_jax.quantization import quantized as _quantize

            pipe.model = _quantize(pipe.model, quantize)
        if export is not None:
            pipe.use_export(export, backend)
        for flag, value in (("taesd", taesd), ("prediction_type", prediction_type), ("windows", num_time_windows),
                            ("variant", variant), ("lora", loras or None)):
            if value is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for prompt pipelines, not the digits model")
        prompts = DigitsPrompts(pipe)
        stream = PromptStream(prompts, slots_per_stream=slots_per_stream, streams=streams, guidance=True,
                              height=height, width=width, backend=backend, **extra)
        h, w, _ = stream.latent_shape
        return Served(stream, "digits" if model is None else Path(model).name, (w, h), 1, "0")
    kwargs = {"dtype": dtype}
    for name, value in (("taesd", taesd), ("prediction_type", prediction_type), ("num_time_windows", num_time_windows),
                        ("variant", variant), ("loras", loras or None)):
        if value is not None:
            kwargs[name] = value
    pipe = Pipeline.from_diffusers(model, mesh=mesh, strategy=strategy, **kwargs)
    if quantize:
        from streamflow_jax.quantization import quantized as _quantize

        pipe.model = _quantize(pipe.model, quantize)
    if export is not None:
        pipe.use_export(export, backend)
    stream = PromptStream(pipe, slots_per_stream=slots_per_stream, streams=streams, guidance=True, height=height,
                          width=width, backend=backend, **extra)
    h, w, _ = stream.latent_shape
    scale = pipe.vae_scale
    return Served(stream, Path(model).name, (w * scale, h * scale), 3, "a photo")
