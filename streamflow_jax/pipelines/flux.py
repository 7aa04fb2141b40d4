"""Prompt -> image for Flux.1 (dev and schnell), as diffusers' ``FluxPipeline``.

CLIP-L's pooled output and T5's sequence (padded to ``max_sequence_length``, no mask) condition
the transformer; dev takes the guidance scale as an input (guidance-distilled: no
classifier-free guidance), schnell takes none. The time grid is the Flux pipeline's
``linspace(1, 1/S, S)`` under the resolution-dependent shift of its scheduler record (dev) or
the static one (schnell: none). Latents are unpacked NHWC throughout; the transformer packs.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.pipelines.base import PromptPipeline, component_loras, check_text_len, register
from streamflow_jax.pipelines.images import load_autoencoder
from streamflow_jax.pipelines.text import T5Tokenizers, clip_pooled, t5_last_hidden_state
from streamflow_jax.tokenizer import CLIPTokenizer


@register("FluxPipeline")
class FluxPipeline(PromptPipeline):
    """Flux.1 prompt -> image.

    Attributes:
        model: the transformer ``FlowModel``.
        text_encoder, tokenizer: CLIP-L (its pooled output).
        text_encoder_2, t5_tokenizers: T5 (its sequence) and its tokenizers per length.
        decoder: the 16-channel VAE (or a TAESD-style decoder given instead).
        scheduler: the ``schedules.Scheduler`` record (shift settings).
    """

    model_classes = ("FluxTransformer2DModel",)
    cfg_mode = "none"  # diffusers ignores guidance_scale for a model without a guidance input (schnell)

    def __init__(self, model, text_encoder, tokenizer, text_encoder_2, t5_tokenizers: T5Tokenizers, decoder,
                 scheduler: schedules.Scheduler, *, max_sequence_length: int | None = None):
        self.check_model(model)
        self.model, self.text_encoder, self.tokenizer = model, text_encoder, tokenizer
        self.text_encoder_2, self.t5_tokenizers, self.decoder = text_encoder_2, t5_tokenizers, decoder
        self.scheduler = scheduler
        dev = self.guidance_mode == "embedded"
        # dev: 28 steps, guidance 3.5, 512 T5 tokens; schnell (no guidance embedding): 4 steps, 256
        self.default_steps = 28 if dev else 4
        self.default_guidance = 3.5 if dev else None
        self.text_len = check_text_len(max_sequence_length) or model.family.text_len(model.config)

    @classmethod
    def load(cls, path, *, dtype=None, taesd=None, max_sequence_length: int | None = None, mesh=None,
             strategy: str = "fsdp", variant: str | None = None, loras=None) -> FluxPipeline:
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
            variant: ``*.{variant}.safetensors`` weights (``"fp16"``) for each component that has
                them, as diffusers' ``from_pretrained(variant=)`` (``checkpoint.component_variant``).
            loras: LoRA files merged into the components their keys name (see
                ``Pipeline.from_diffusers``), or ``checkpoint.loras_by_component``'s mapping.
        """
        path = Path(path)
        scheduler = schedules.read_scheduler(path)
        opts = dict(dtype=dtype, mesh=mesh, strategy=strategy, variant=variant,
                    loras=component_loras(path, loras))
        model = load(path, component="transformer", **opts)
        pipe = cls(model, load(path, component="text_encoder", **opts), CLIPTokenizer.from_dir(path / "tokenizer"),
                   load(path, component="text_encoder_2", **opts), T5Tokenizers(path / "tokenizer_2"),
                   load_autoencoder(path, taesd, for_model=model, **opts), scheduler, max_sequence_length=max_sequence_length)
        pipe.mesh = mesh
        return pipe

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``encoder_hidden_states`` ``[B, L, J]`` (T5, no mask) and
        ``pooled_projections`` ``[B, E]`` (CLIP-L's pooled output)."""
        length = self.model_text_len(text_len)
        return {"encoder_hidden_states": t5_last_hidden_state(self.text_encoder_2, self.t5_tokenizers(length)(prompts)),
                "pooled_projections": clip_pooled(self.text_encoder, self.tokenizer(prompts))}

    def schedule(self, steps: int, latent_shape) -> np.ndarray:
        return self.scheduler.flux_grid(steps, self.image_seq_len(latent_shape))
