"""Prompt -> image for Flux.1 (dev and schnell), as diffusers' ``FluxPipeline``.

CLIP-L's pooled output and T5's sequence (padded to ``max_sequence_length``, no mask) condition
the transformer; dev takes the guidance scale as an input (guidance-distilled: no
classifier-free guidance), schnell takes none. The time grid is the Flux pipeline's
``linspace(1, 1/S, S)`` under the resolution-dependent shift of its scheduler config (dev) or
the static one (schnell: none). Latents are unpacked NHWC throughout; the transformer packs.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.errors import ConversionError
from streamflow_jax.pipelines.base import (
    PromptPipeline,
    clip_pooled,
    read_scheduler_config,
    register,
    t5_last_hidden_state,
)
from streamflow_jax.pipelines.perflow import load_decoder
from streamflow_jax.tokenizer import CLIPTokenizer, T5Tokenizer

SHIFT_FIELDS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
_MU_ARGS = {"base_image_seq_len": "base_seq_len", "max_image_seq_len": "max_seq_len", "base_shift": "base_shift",
            "max_shift": "max_shift"}


def flow_grid(steps: int, image_seq_len: int, scheduler: dict) -> np.ndarray:
    """The Flux pipeline's ``[S+1]`` grid for a scheduler config: ``linspace(1, 1/S, S)`` with
    the exponential resolution shift (``use_dynamic_shifting``) or the static ``shift``, then 0."""
    if scheduler.get("use_dynamic_shifting", False):
        kwargs = {_MU_ARGS[k]: scheduler[k] for k in SHIFT_FIELDS if k in scheduler}
        return schedules.flux(steps, image_seq_len, **kwargs)
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    shift = float(scheduler.get("shift", 1.0))
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.append(sigmas.astype(np.float32), np.float32(0.0))


@register("FluxPipeline")
class FluxPipeline(PromptPipeline):
    """Flux.1 prompt -> image.

    Attributes:
        model: the transformer ``FlowModel``.
        text_encoder, tokenizer: CLIP-L (its pooled output).
        text_encoder_2, tokenizer_dir: T5 (its sequence) and its tokenizer's directory.
        decoder: the 16-channel VAE (or a TAESD-style decoder given instead).
        scheduler: the scheduler config (shift settings).
    """

    def __init__(self, model, text_encoder, tokenizer, text_encoder_2, tokenizer_dir, decoder, scheduler: dict,
                 *, max_sequence_length: int | None = None):
        self.model, self.text_encoder, self.tokenizer = model, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_dir, self.decoder = text_encoder_2, Path(tokenizer_dir), decoder
        self.scheduler = dict(scheduler)
        self._t5: dict[int, T5Tokenizer] = {}
        self.embedded_guidance = "guidance" in model.cond_shapes(1)
        # dev: 28 steps, guidance 3.5, 512 T5 tokens; schnell (no guidance embedding): 4 steps, 256
        self.default_steps = 28 if self.embedded_guidance else 4
        self.default_guidance = 3.5 if self.embedded_guidance else None
        self.text_len = int(max_sequence_length or (512 if self.embedded_guidance else 256))

    @classmethod
    def load(cls, path, *, dtype=None, taesd=None, max_sequence_length: int | None = None, mesh=None,
             strategy: str = "fsdp") -> FluxPipeline:
        """A diffusers Flux pipeline directory (or one converted by ``sf.convert``): ``transformer/``,
        ``text_encoder/`` (CLIP-L), ``tokenizer/``, ``text_encoder_2/`` (T5), ``tokenizer_2/``,
        ``vae/``, ``scheduler/``.

        Args:
            dtype: cast every component's weights (T5 runs in bf16 or fp32; fp16 upcasts its
                residual stream, see ``models.t5``).
            taesd: a tiny autoencoder directory to decode with instead of the VAE.
            max_sequence_length: T5 tokens (default 512 for dev, 256 for schnell).
            mesh, strategy: place every component's weights on a mesh (``sf.make_mesh``), T5's
                included (where single-device memory runs out first); batches split over ``data``.
        """
        path = Path(path)
        scheduler = read_scheduler_config(path)
        opts = dict(dtype=dtype, mesh=mesh, strategy=strategy)
        model = load(path, component="transformer", **opts)
        if model.family.name != "flux":
            raise ConversionError(f"{path / 'transformer'}: {model.class_name} is not a Flux transformer")
        pipe = cls(model, load(path, component="text_encoder", **opts), CLIPTokenizer.from_dir(path / "tokenizer"),
                   load(path, component="text_encoder_2", **opts), path / "tokenizer_2",
                   load_decoder(path, taesd, **opts), scheduler, max_sequence_length=max_sequence_length)
        pipe.mesh = mesh
        return pipe

    def t5_tokenizer(self, max_length: int) -> T5Tokenizer:
        """The T5 tokenizer for ``max_length`` tokens (one per length, made once)."""
        if max_length not in self._t5:
            self._t5[max_length] = T5Tokenizer.from_dir(self.tokenizer_dir, max_length=max_length)
        return self._t5[max_length]

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``encoder_hidden_states`` ``[B, L, J]`` (T5, no mask) and
        ``pooled_projections`` ``[B, E]`` (CLIP-L's pooled output)."""
        length = self.model_text_len(text_len)
        return {"encoder_hidden_states": t5_last_hidden_state(self.text_encoder_2, self.t5_tokenizer(length)(prompts)),
                "pooled_projections": clip_pooled(self.text_encoder, self.tokenizer(prompts))}

    def conditioning(self, prompts, guidance_scale=None, negative_prompt="", text_len=None):
        """dev: the guidance scale is the model's input; schnell: none (a scale is ignored, as
        diffusers ignores it); Flux is never sampled with classifier-free guidance here."""
        if not self.embedded_guidance:
            guidance_scale = None
        return super().conditioning(prompts, guidance_scale, negative_prompt, text_len)

    def schedule(self, steps: int, latent_shape) -> np.ndarray:
        h, w, _ = latent_shape
        return flow_grid(steps, math.prod((h // 2, w // 2)), self.scheduler)
