"""``PromptStream``: a prompt pipeline run through the stream engine, one request per prompt."""

from __future__ import annotations

import numpy as np
from PIL import Image

from streamflow_jax import schedules
from streamflow_jax.errors import RequestError
from streamflow_jax.pipelines.base import PromptPipeline
from streamflow_jax.pipelines.images import check_output_type, to_float_images, to_uint8
from streamflow_jax.sampling import check_seed
from streamflow_jax.stream import StreamEngine


class PromptStream:
    """The stream engine behind a prompt pipeline: one request per prompt, each with its own
    seed, step count and guidance, advanced together one batched model call per tick and
    decoded as they finish.

    Args:
        pipe: a ``PromptPipeline``.
        slots_per_stream, streams: the engine's N and stream count (batch = N * streams).
        guidance: give every slot an unconditional branch, so that requests may ask for
            classifier-free guidance (each with its own scale; a request without CFG then runs
            its conditional velocity exactly). A model with embedded guidance (Flux-dev) takes
            each request's scale as an input instead, whatever this says.
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
        self.guided = bool(guidance) and pipe.guidance_mode == "cfg"
        post = {"pil": to_uint8, "np": to_float_images, "latent": None}[output_type]
        self.engine = StreamEngine(pipe.model, self.latent_shape, pipe.cond_shapes(max_sequence_length),
                                   slots_per_stream=slots_per_stream, streams=streams, guidance=self.guided,
                                   decoder=None if output_type == "latent" else pipe.decoder, postprocess=post,
                                   backend=backend, mesh=pipe.mesh)

    def submit(self, prompt: str, *, steps: int | None = None, seed: int = 0, noise=None,
               guidance_scale: float | None = None, negative_prompt: str = "", image=None,
               strength: float | None = None) -> int:
        """Queues one prompt; returns its id. A bad request gets its error as its result.

        ``guidance_scale`` means what it means to the pipeline (``resolve_guidance``: None is
        the pipeline's default). ``image`` (one PIL image or ``[H, W, 3]`` in [0, 1]) and
        ``strength``: image-to-image, the image encoded here, before admission, and noised on
        the device at admission."""
        if not isinstance(prompt, str):
            return self.engine.reject(f"prompt must be a string, got {type(prompt).__name__}")
        try:
            steps = schedules.check_steps(self.pipe.default_steps if steps is None else steps)
            if noise is None:
                seed = check_seed(seed)
            guidance = self.pipe.resolve_guidance(guidance_scale)
            if guidance.cfg and not self.guided:
                raise RequestError(f"guidance_scale {guidance.scale} asks for classifier-free guidance, and this "
                                   "stream runs without it (PromptStream(..., guidance=True))")
            if np.ndim(guidance.scale):
                raise RequestError("a request takes one guidance scale, not one per element")
            grid = self.pipe.schedule(steps, self.latent_shape)
            cond, uncond, cfg = self.pipe.conditioning([prompt], guidance, negative_prompt, self.text_len)
            init = None
            if image is not None:
                init = self.pipe.encode_image(image, 1)[0]
                if tuple(init.shape) != self.latent_shape:
                    raise RequestError(f"image gives latents {tuple(init.shape)}, the stream runs {self.latent_shape}")
        except (ValueError, TypeError) as e:
            return self.engine.reject(e)
        first = lambda d: None if d is None else {k: v[0] for k, v in d.items()}  # noqa: E731
        return self.engine.submit(first(cond), grid=grid, seed=None if noise is not None else seed, noise=noise,
                                  init=init, strength=strength, guidance_scale=cfg, uncond=first(uncond))

    def run(self) -> dict:
        """Runs until every request is done; returns id -> output (as ``output_type``) or ``RequestError``."""
        results = self.engine.run()
        if self.output_type != "pil":
            return dict(results)
        return {rid: r if isinstance(r, Exception) else Image.fromarray(r) for rid, r in results.items()}
