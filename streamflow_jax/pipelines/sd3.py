"""Prompt -> image for Stable Diffusion 3 and 3.5, as diffusers' ``StableDiffusion3Pipeline``.

Three text encoders: CLIP-L and CLIP-G (their penultimate hidden states side by side, zero-padded
to T5's width, and their projected pooled outputs concatenated) and T5 (its sequence after the
77 CLIP tokens; zeros when the pipeline has no ``text_encoder_3``, as diffusers does).
Classifier-free guidance against a negative prompt, SD3's flow-match grid, the 16-channel VAE
with its scale and shift.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.converters.common import read_json
from streamflow_jax.pipelines.base import PromptPipeline, component_loras, check_text_len, register
from streamflow_jax.pipelines.images import load_autoencoder
from streamflow_jax.pipelines.text import T5Tokenizers, clip_penultimate_and_projection, t5_last_hidden_state
from streamflow_jax.tokenizer import CLIPTokenizer


def _uses_t5(path: Path) -> bool:
    """Whether an SD3 pipeline directory runs T5: as its ``model_index.json`` says (diffusers':
    ``[null, null]`` for a pipeline without it; ``Pipeline.from_diffusers`` refuses one that
    names T5 and lacks its directory); without an entry, whether the directory is there."""
    index = path / "model_index.json"
    named = read_json(index).get("text_encoder_3") if index.is_file() else None
    if isinstance(named, list) and len(named) == 2:
        return named != [None, None]
    return (path / "text_encoder_3").is_dir()


@register("StableDiffusion3Pipeline")
class SD3Pipeline(PromptPipeline):
    """SD3 / SD3.5 prompt -> image.

    Attributes:
        model: the ``SD3Transformer2DModel`` ``FlowModel``.
        clip_l, clip_g: ``(text encoder, tokenizer)`` of CLIP-L and CLIP-G.
        t5: ``(text encoder, T5Tokenizers)`` or None (zeros in its place).
        decoder: the VAE (or a tiny autoencoder given instead).
        scheduler: the ``schedules.Scheduler`` record (its shift).
    """

    model_classes = ("SD3Transformer2DModel",)
    default_steps = 28
    default_guidance = 7.0

    def __init__(self, model, clip_l, clip_g, t5, decoder, scheduler: schedules.Scheduler, *,
                 max_sequence_length: int | None = None):
        self.check_model(model)
        self.model, self.clip_l, self.clip_g, self.t5, self.decoder = model, clip_l, clip_g, t5, decoder
        self.scheduler = scheduler
        default = model.family.text_len(model.config) - model.family.text_prefix
        self.text_len = check_text_len(max_sequence_length) or default

    @classmethod
    def load(cls, path, *, dtype=None, taesd=None, max_sequence_length: int | None = None, mesh=None,
             strategy: str = "fsdp", variant: str | None = None, loras=None) -> SD3Pipeline:
        """A diffusers SD3/SD3.5 pipeline directory (or one converted by ``sf.convert``):
        ``transformer/``, ``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` +
        ``tokenizer_2/`` (CLIP-G), optionally ``text_encoder_3/`` + ``tokenizer_3/`` (T5),
        ``vae/``, ``scheduler/``.

        Args:
            dtype: cast every component's weights.
            taesd: a tiny autoencoder directory (16-channel, e.g. TAESD3) instead of the VAE.
            max_sequence_length: T5 tokens (default 256, as diffusers).
            mesh, strategy: place every component's weights on a mesh (``sf.make_mesh``), the
                text encoders' included; batches split over ``data``.
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
        clip = lambda n: (load(path, component=f"text_encoder{n}", **opts),  # noqa: E731
                          CLIPTokenizer.from_dir(path / f"tokenizer{n}"))
        t5 = None
        if _uses_t5(path):
            t5 = (load(path, component="text_encoder_3", **opts), T5Tokenizers(path / "tokenizer_3"))
        pipe = cls(model, clip(""), clip("_2"), t5, load_autoencoder(path, taesd, for_model=model, **opts), scheduler,
                   max_sequence_length=max_sequence_length)
        pipe.mesh = mesh
        return pipe

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``encoder_hidden_states`` ``[B, 77 + L, J]`` and ``pooled_projections``
        ``[B, E_l + E_g]``."""
        length = self.model_text_len(text_len) - self.model.family.text_prefix
        width = self.model.cond_shapes(1)["encoder_hidden_states"][1]
        seqs, pooled = zip(*(clip_penultimate_and_projection(enc, tok(prompts)) for enc, tok in (self.clip_l,
                                                                                                  self.clip_g)))
        clip = jnp.concatenate(seqs, axis=-1)  # [B, 77, D_l + D_g]
        if clip.shape[-1] > width:
            raise ValueError(f"CLIP widths {clip.shape[-1]} exceed the transformer's text width {width}")
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        if self.t5 is None:
            t5 = jnp.zeros((len(prompts), length, width), clip.dtype)
        else:
            encoder, tokenizers = self.t5
            t5 = t5_last_hidden_state(encoder, tokenizers(length)(prompts)).astype(clip.dtype)
        return {"encoder_hidden_states": jnp.concatenate([clip, t5], axis=1),
                "pooled_projections": jnp.concatenate(pooled, axis=-1)}

    def schedule(self, steps: int, latent_shape) -> np.ndarray:
        return self.scheduler.flow_match_grid(steps, self.image_seq_len(latent_shape))
