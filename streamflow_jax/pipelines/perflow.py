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


def load_decoder(path: Path, taesd, dtype):
    """The pipeline's ``vae/``, or a TAESD directory given instead."""
    decoder = load(taesd, dtype=dtype) if taesd is not None else load(path, dtype=dtype, component="vae")
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
    def load(cls, path, *, taesd=None, dtype=None) -> PeRFlowPipeline:
        """A diffusers pipeline directory, or one converted by ``sf.convert``.

        Args:
            path: holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
                ``scheduler/scheduler_config.json`` (whose ``prediction_type`` is
                ``diff_eps``, ``ddim_eps`` or ``velocity``; ``num_time_windows`` defaults to 4).
            taesd: a TAESD (``AutoencoderTiny``) directory to decode with instead of the VAE.
            dtype: cast every component's weights.
        """
        path = Path(path)
        sched = read_scheduler_config(path)
        prediction = sched.get("prediction_type")
        if prediction not in PREDICTIONS:
            raise ConversionError(
                f"{path / 'scheduler' / 'scheduler_config.json'}: prediction_type={prediction!r} "
                f"({sched.get('_class_name')}) is not a rectified flow; supported: diff_eps, ddim_eps (PeRFlow), "
                "velocity (InstaFlow)")
        windows = int(sched.get("num_time_windows", 4))
        unet = load(path, dtype=dtype, component="unet").with_adapter(PeRFlowAdapter(prediction, windows))
        text = load(path, dtype=dtype, component="text_encoder")
        return cls(unet, text, CLIPTokenizer.from_dir(path / "tokenizer"), load_decoder(path, taesd, dtype),
                   num_windows=windows)

    def encode(self, prompts: list[str], text_len: int | None = None) -> dict[str, jax.Array]:
        """Prompts -> ``{"encoder_hidden_states": [B, 77, D]}`` (CLIP's last hidden state)."""
        if text_len not in (None, self.text_len):
            raise ValueError(f"this pipeline's CLIP text is {self.text_len} tokens; max_sequence_length does not apply")
        return {"encoder_hidden_states": clip_last_hidden_state(self.text_encoder, self.tokenizer(prompts))}

    def encode_prompt(self, prompts) -> dict[str, jax.Array]:
        """``encode`` for one prompt or a list."""
        return self.encode([prompts] if isinstance(prompts, str) else list(prompts))

    def schedule(self, steps: int, latent_shape=None) -> np.ndarray:
        return schedules.perflow(steps, self.num_windows)
