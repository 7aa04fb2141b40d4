"""Prompt -> image for SDXL run as a rectified flow: PeRFlow-SDXL (``hansyan/perflow-sdxl-base``
and kin), as diffusers' ``StableDiffusionXLPipeline`` with PeRFlow's scheduler swapped in.

Two CLIP text encoders: the penultimate hidden states of both side by side (CLIP-L's 768 and
CLIP-G's 1280 -> the UNet's 2048), and CLIP-G's projected pooled output as ``text_embeds``; the
micro-conditioning ``time_ids`` (original size, crop top-left, target size, in pixels) as
diffusers computes them; an empty negative prompt is zeros (``force_zeros_for_empty_prompt``).
The UNet becomes a per-element velocity field through its ``PeRFlowAdapter`` (from the scheduler
record, with the same override as SD1.5's for a directory that ships its base model's
``EulerDiscreteScheduler``) -> ``sample`` -> the SDXL VAE (or a TAESDXL).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.errors import ConfigError
from streamflow_jax.pipelines.base import PromptPipeline, component_loras, register
from streamflow_jax.pipelines.images import load_autoencoder
from streamflow_jax.pipelines.perflow import PeRFlowPipeline
from streamflow_jax.pipelines.text import clip_penultimate, clip_penultimate_and_projection
from streamflow_jax.tokenizer import CLIPTokenizer


def _pair(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, list | tuple) else None
    least = 0 if name == "crops_coords_top_left" else 1  # sizes are positive, a crop's corner may be 0
    if pair is None or len(pair) != 2 or not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
                                                 and v >= least for v in pair):
        raise ValueError(f"{name} must be a pair of integers >= {least} (height, width) / (top, left), got {value!r}")
    return int(pair[0]), int(pair[1])


@register("StableDiffusionXLPipeline")
class PeRFlowSDXLPipeline(PeRFlowPipeline):
    """PeRFlow (``ddim_eps``, ``diff_eps``) and InstaFlow-style (``velocity``) SDXL pipelines: the
    SD1.5 PeRFlow pipeline's schedule and CLIP length, with SDXL's two encoders and time ids.

    Attributes:
        model: the SDXL UNet ``FlowModel`` with its ``PeRFlowAdapter``.
        clip_l, clip_g: ``(text encoder, tokenizer)``: ``CLIPTextModel`` and
            ``CLIPTextModelWithProjection`` with ``tokenizer_2`` (its own pad token).
        decoder: the VAE (or a tiny autoencoder given instead).
        scheduler: the ``schedules.Scheduler`` record (prediction type, windows, betas).
        force_zeros_for_empty_prompt: an empty negative prompt is zeros (text and pooled;
            ``model_index.json``'s setting, True when it says nothing): the default negative prompt
            "" gives what diffusers gives without a negative prompt. An empty positive prompt is
            encoded, as diffusers does.
        original_size, crops_coords_top_left, target_size: the micro-conditioning, in pixels
            (``(height, width)``, ``(top, left)``); None: the image's size, and (0, 0).
    """

    def __init__(self, model, clip_l, clip_g, decoder, scheduler: schedules.Scheduler, *,
                 force_zeros_for_empty_prompt: bool = True, original_size=None, crops_coords_top_left=None,
                 target_size=None):
        self.check_model(model)
        shapes = model.cond_shapes(1)
        if "time_ids" not in shapes:
            raise ConfigError(f"{type(self).__name__} runs an SDXL UNet (addition_embed_type='text_time'); this one "
                              f"takes only {', '.join(shapes)}")
        self.model, self.clip_l, self.clip_g, self.decoder = model, clip_l, clip_g, decoder
        self.scheduler = scheduler
        self.text_len = clip_l[1].max_length
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.original_size = _pair(original_size, "original_size")
        self.crops_coords_top_left = _pair(crops_coords_top_left, "crops_coords_top_left")
        self.target_size = _pair(target_size, "target_size")

    @classmethod
    def load(cls, path, *, taesd=None, dtype=None, prediction_type: str | None = None,
             num_time_windows: int | None = None, mesh=None, strategy: str = "fsdp",
             variant: str | None = None, loras=None, **micro_conditioning) -> PeRFlowSDXLPipeline:
        """A diffusers ``StableDiffusionXLPipeline`` directory, or one converted by ``sf.convert``.

        Args:
            path: holds ``unet/``, ``vae/``, ``text_encoder/`` + ``tokenizer/`` (CLIP-L),
                ``text_encoder_2/`` + ``tokenizer_2/`` (CLIP-G with its projection) and
                ``scheduler/scheduler_config.json``.
            taesd: a tiny autoencoder directory (TAESDXL) to decode with instead of the VAE.
            dtype: cast every component's weights.
            prediction_type, num_time_windows: override the scheduler config's, as PeRFlow's
                instructions do on its SDXL checkpoints, which ship SDXL's
                ``EulerDiscreteScheduler`` (``prediction_type="ddim_eps"``, 4 windows).
            mesh, strategy: place every component's weights on a mesh (``sf.make_mesh``).
            variant: ``*.{variant}.safetensors`` weights (``"fp16"``) for each component that has
                them, as diffusers' ``from_pretrained(variant=)`` (``checkpoint.component_variant``).
            loras: LoRA files merged into the components their keys name (see
                ``Pipeline.from_diffusers``), or ``checkpoint.loras_by_component``'s mapping.
            micro_conditioning: ``original_size``, ``crops_coords_top_left``, ``target_size``
                (see the class).
        """
        path = Path(path)
        scheduler = cls.perflow_scheduler(path, prediction_type, num_time_windows)
        index = json.loads((path / "model_index.json").read_text())
        opts = dict(dtype=dtype, mesh=mesh, strategy=strategy, variant=variant,
                    loras=component_loras(path, loras))
        unet = load(path, component="unet", scheduler=scheduler, **opts)
        clip = lambda n: (load(path, component=f"text_encoder{n}", **opts),  # noqa: E731
                          CLIPTokenizer.from_dir(path / f"tokenizer{n}"))
        pipe = cls(unet, clip(""), clip("_2"), load_autoencoder(path, taesd, for_model=unet, **opts), scheduler,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True), **micro_conditioning)
        pipe.mesh = mesh
        return pipe

    @property
    def zero_empty_negative(self) -> bool:
        return self.force_zeros_for_empty_prompt

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``encoder_hidden_states`` ``[B, 77, D_l + D_g]`` (both CLIPs' penultimate
        states), ``text_embeds`` ``[B, P]`` (CLIP-G's projection) and ``time_ids`` ``[B, 6]`` of
        the default image size (``conditioning`` puts those of the sampled size). An empty
        negative prompt becomes zeros later (``zero_empty_negative``), not here."""
        self.model_text_len(text_len)  # refuses another length
        (enc_l, tok_l), (enc_g, tok_g) = self.clip_l, self.clip_g
        seq_g, pooled = clip_penultimate_and_projection(enc_g, tok_g(prompts))
        states = jnp.concatenate([clip_penultimate(enc_l, tok_l(prompts)).astype(seq_g.dtype), seq_g], axis=-1)
        ids = jnp.broadcast_to(jnp.asarray(self.image_conditioning()["time_ids"]), (len(prompts), 6))
        return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": ids}

    def image_conditioning(self, latent_shape: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
        """``time_ids`` ``[6]`` float32: original size, crop top-left, target size, as diffusers'
        ``_get_add_time_ids`` (sizes default to the image's, in pixels)."""
        h, w = (latent_shape or self.model.latent_shape())[:2]
        image = (h * self.vae_scale, w * self.vae_scale)
        ids = (self.original_size or image) + (self.crops_coords_top_left or (0, 0)) + (self.target_size or image)
        return {"time_ids": np.asarray(ids, np.float32)}

    def __call__(self, prompts=None, *, original_size=None, crops_coords_top_left=None, target_size=None, **kwargs):
        """``PromptPipeline.__call__`` (same arguments), and SDXL's micro-conditioning for this
        call: ``original_size``, ``crops_coords_top_left``, ``target_size`` (see the class)."""
        pipe = self
        given = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size)
        if any(v is not None for v in given.values()):
            pipe = copy.copy(self)  # the same components, this call's settings
            for name, value in given.items():
                if value is not None:
                    setattr(pipe, name, _pair(value, name))
        return PromptPipeline.__call__(pipe, prompts, **kwargs)
