"""Generation pipelines: conditioning -> ``sample`` -> images.

``Pipeline.from_diffusers(path)`` picks the class from ``model_index.json``:

- ``StableDiffusionPipeline`` -> ``PeRFlowPipeline`` (PeRFlow / InstaFlow SD1.5, prompts);
- ``FluxPipeline`` -> ``FluxPipeline`` (Flux.1 dev and schnell);
- ``StableDiffusion3Pipeline`` -> ``SD3Pipeline`` (SD3, SD3.5);
- ``StreamflowDigits`` -> ``DigitsPipeline`` (the embedded default model, class labels).

``PromptStream`` runs a prompt pipeline through the stream engine.
"""

from streamflow_jax.pipelines.base import (
    PIPELINES,
    Pipeline,
    PromptPipeline,
    PromptStream,
    image_grid,
    to_float_images,
    to_uint8,
)
from streamflow_jax.pipelines.digits import DIGITS_DIR, NULL_CLASS, DigitsPipeline, to_images
from streamflow_jax.pipelines.flux import FluxPipeline
from streamflow_jax.pipelines.perflow import PeRFlowPipeline
from streamflow_jax.pipelines.sd3 import SD3Pipeline

__all__ = ["DIGITS_DIR", "NULL_CLASS", "PIPELINES", "DigitsPipeline", "FluxPipeline", "PeRFlowPipeline", "Pipeline",
           "PromptPipeline", "PromptStream", "SD3Pipeline", "image_grid", "to_float_images", "to_images", "to_uint8"]
