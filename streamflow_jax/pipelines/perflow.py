"""Prompt -> image for the SD1.5 family run as a rectified flow: PeRFlow and InstaFlow.

CLIP text encoder -> ``sample`` over the PeRFlow grid with the UNet as a per-element velocity
field (``models.perflow.PeRFlowAdapter``; optional classifier-free guidance) -> VAE or TAESD.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from streamflow_jax import schedules
from streamflow_jax.checkpoint import load
from streamflow_jax.errors import ConversionError
from streamflow_jax.models.perflow import PREDICTIONS, PeRFlowAdapter
from streamflow_jax.pipelines.base import PromptPipeline, clip_last_hidden_state, read_scheduler_config, register
from streamflow_jax.tokenizer import CLIPTokenizer


def load_decoder(path: Path, taesd, **opts):
    """The pipeline's ``vae/``, or a TAESD directory given instead (``opts``: ``load``'s)."""
    decoder = load(taesd, **opts) if taesd is not None else load(path, component="vae", **opts)
    if decoder.family.kind != "decoder":
        raise ConversionError(f"{taesd or path / 'vae'}: {decoder.class_name} is not a VAE/TAESD")
    return decoder


@register("StableDiffusionPipeline")
class PeRFlowPipeline(PromptPipeline):
    """PeRFlow (``diff_eps``, ``ddim_eps``) and InstaFlow-style (``velocity``) SD1.5 pipelines.

    Attributes:
        model: the UNet ``FlowModel`` with its ``PeRFlowAdapter``.
        text_encoder, decoder: ``FlowModel`` s (CLIP; ``AutoencoderKL`` or ``AutoencoderTiny``).
        tokenizer: ``CLIPTokenizer``.
        num_windows: PeRFlow's K.
    """

    default_steps = 4

    def __init__(self, model, text_encoder, tokenizer, decoder, *, num_windows: int = 4):
        self.model, self.text_encoder, self.tokenizer, self.decoder = model, text_encoder, tokenizer, decoder
        self.num_windows = num_windows
        self.text_len = tokenizer.max_length

    @classmethod
    def load(cls, path, *, taesd=None, dtype=None, prediction_type: str | None = None,
             num_time_windows: int | None = None, mesh=None, strategy: str = "fsdp") -> PeRFlowPipeline:
        """A diffusers pipeline directory, or one converted by ``sf.convert``.

        Args:
            path: holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
                ``scheduler/scheduler_config.json`` (whose ``prediction_type`` is
                ``diff_eps``, ``ddim_eps`` or ``velocity``; ``num_time_windows`` defaults to 4).
            taesd: a TAESD (``AutoencoderTiny``) directory to decode with instead of the VAE.
            dtype: cast every component's weights.
            mesh, strategy: place every component's weights on a mesh (``sf.make_mesh``), the
                text encoder's included; batches then split over its ``data`` axis.
            prediction_type, num_time_windows: override the scheduler config's, as PeRFlow's
                own instructions do on a directory that ships its base model's scheduler
                (``PeRFlowScheduler.from_config(config, prediction_type="diff_eps",
                num_time_windows=4)``). Only the config's betas (``beta_start``, ``beta_end``,
                ``beta_schedule``) are read then: nothing else of another scheduler applies.
        """
        path = Path(path)
        sched = read_scheduler_config(path)
        prediction = prediction_type or sched.get("prediction_type")
        if prediction not in PREDICTIONS:
            raise ConversionError(
                f"{path / 'scheduler' / 'scheduler_config.json'}: prediction_type={prediction!r} "
                f"({sched.get('_class_name')}) is not a rectified flow; supported: diff_eps, ddim_eps (PeRFlow), "
                "velocity (InstaFlow). For a PeRFlow UNet shipped with its base model's scheduler, give it: "
                "Pipeline.from_diffusers(path, prediction_type='diff_eps', num_time_windows=4), or "
                "generate --prediction-type diff_eps --windows 4")
        windows = int(num_time_windows if num_time_windows is not None else sched.get("num_time_windows", 4))
        try:
            adapter = PeRFlowAdapter(prediction, windows, beta_start=float(sched.get("beta_start", 0.00085)),
                                     beta_end=float(sched.get("beta_end", 0.012)),
                                     beta_schedule=sched.get("beta_schedule", "scaled_linear"))
        except ValueError as e:
            raise ConversionError(f"{path / 'scheduler' / 'scheduler_config.json'}: {e}") from None
        opts = dict(dtype=dtype, mesh=mesh, strategy=strategy)
        unet = load(path, component="unet", **opts).with_adapter(adapter)
        text = load(path, component="text_encoder", **opts)
        pipe = cls(unet, text, CLIPTokenizer.from_dir(path / "tokenizer"), load_decoder(path, taesd, **opts),
                   num_windows=windows)
        pipe.mesh = mesh
        return pipe

    def model_text_len(self, text_len: int | None = None) -> int:
        if text_len not in (None, self.text_len):
            raise ValueError(f"this pipeline's CLIP text is {self.text_len} tokens; max_sequence_length does not apply")
        return self.text_len

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``{"encoder_hidden_states": [B, 77, D]}`` (CLIP's last hidden state)."""
        self.model_text_len(text_len)  # refuses another length
        return {"encoder_hidden_states": clip_last_hidden_state(self.text_encoder, self.tokenizer(prompts))}

    def encode_prompt(self, prompts) -> dict[str, jax.Array]:
        """``encode`` for one prompt or a list."""
        return self.encode([prompts] if isinstance(prompts, str) else list(prompts))

    def schedule(self, steps: int, latent_shape=None) -> np.ndarray:
        return schedules.perflow(steps, self.num_windows)
