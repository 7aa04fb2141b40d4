"""Prompt -> image for the SD1.5 family run as a rectified flow: PeRFlow and InstaFlow.

CLIP text encoder -> ``sample`` over the PeRFlow grid with the UNet as a per-element velocity
field (``models.perflow.PeRFlowAdapter``, built from the scheduler record; optional
classifier-free guidance) -> VAE or TAESD.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.pipelines.base import PromptPipeline, component_loras, register
from streamflow_jax.pipelines.images import load_autoencoder
from streamflow_jax.pipelines.text import clip_last_hidden_state
from streamflow_jax.tokenizer import CLIPTokenizer


@register("StableDiffusionPipeline")
class PeRFlowPipeline(PromptPipeline):
    """PeRFlow (``diff_eps``, ``ddim_eps``) and InstaFlow-style (``velocity``) SD1.5 pipelines.

    Attributes:
        model: the UNet ``FlowModel`` with its ``PeRFlowAdapter``.
        text_encoder, decoder: ``FlowModel`` s (CLIP; ``AutoencoderKL`` or ``AutoencoderTiny``).
        tokenizer: ``CLIPTokenizer``.
        scheduler: the ``schedules.Scheduler`` record (prediction type, windows, betas).
    """

    model_classes = ("UNet2DConditionModel",)
    default_steps = 4

    def __init__(self, model, text_encoder, tokenizer, decoder, scheduler: schedules.Scheduler):
        self.check_model(model)
        self.model, self.text_encoder, self.tokenizer, self.decoder = model, text_encoder, tokenizer, decoder
        self.scheduler = scheduler
        self.text_len = tokenizer.max_length

    @classmethod
    def load(cls, path, *, taesd=None, dtype=None, prediction_type: str | None = None,
             num_time_windows: int | None = None, mesh=None, strategy: str = "fsdp",
             variant: str | None = None, loras=None) -> PeRFlowPipeline:
        """A diffusers pipeline directory, or one converted by ``sf.convert``.

        Args:
            path: holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
                ``scheduler/scheduler_config.json`` (whose ``prediction_type`` is
                ``diff_eps``, ``ddim_eps`` or ``velocity``; ``num_time_windows`` defaults to 4).
            taesd: a TAESD (``AutoencoderTiny``) directory to decode with instead of the VAE.
            dtype: cast every component's weights.
            mesh, strategy: place every component's weights on a mesh (``sf.make_mesh``), the
                text encoder's included; batches then split over its ``data`` axis.
            variant: ``*.{variant}.safetensors`` weights (``"fp16"``) for each component that has
                them, as diffusers' ``from_pretrained(variant=)`` (``checkpoint.component_variant``).
            loras: LoRA files merged into the components their keys name (see
                ``Pipeline.from_diffusers``), or ``checkpoint.loras_by_component``'s mapping.
            prediction_type, num_time_windows: override the scheduler config's, as PeRFlow's
                own instructions do on a directory that ships its base model's scheduler
                (``PeRFlowScheduler.from_config(config, prediction_type="diff_eps",
                num_time_windows=4)``). Only the config's betas (``beta_start``, ``beta_end``,
                ``beta_schedule``) are read then: nothing else of another scheduler applies.
        """
        path = Path(path)
        scheduler = cls.perflow_scheduler(path, prediction_type, num_time_windows)
        opts = dict(dtype=dtype, mesh=mesh, strategy=strategy, variant=variant,
                    loras=component_loras(path, loras))
        unet = load(path, component="unet", scheduler=scheduler, **opts)
        text = load(path, component="text_encoder", **opts)
        pipe = cls(unet, text, CLIPTokenizer.from_dir(path / "tokenizer"), load_autoencoder(path, taesd, for_model=unet, **opts),
                   scheduler)
        pipe.mesh = mesh
        return pipe

    @staticmethod
    def perflow_scheduler(path: Path, prediction_type: str | None, num_time_windows: int | None) -> schedules.Scheduler:
        """The pipeline's scheduler record with the override, which must be a PeRFlow/InstaFlow one."""
        scheduler = schedules.read_scheduler(path, prediction_type=prediction_type, num_time_windows=num_time_windows)
        if not scheduler.perflow:
            raise ValueError(f"{path / schedules.SCHEDULER_FILE}: {scheduler.class_name} has no PeRFlow/InstaFlow "
                             "prediction_type for a UNet")
        return scheduler

    @property
    def num_windows(self) -> int:
        return self.scheduler.num_time_windows

    def model_text_len(self, text_len: int | None = None) -> int:
        if text_len not in (None, self.text_len):
            raise ValueError(f"this pipeline's CLIP text is {self.text_len} tokens; max_sequence_length does not apply")
        return self.text_len

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``{"encoder_hidden_states": [B, 77, D]}`` (CLIP's last hidden state)."""
        self.model_text_len(text_len)  # refuses another length
        return {"encoder_hidden_states": clip_last_hidden_state(self.text_encoder, self.tokenizer(prompts))}

    def schedule(self, steps: int, latent_shape=None) -> np.ndarray:
        return self.scheduler.perflow_grid(steps)
