"""Generation pipelines: conditioning -> ``sample`` -> images.

``Pipeline.from_diffusers(path)`` picks the class from ``model_index.json``:

- ``StableDiffusionPipeline`` -> ``PeRFlowPipeline`` (PeRFlow / InstaFlow SD1.5, prompts);
- ``StableDiffusionXLPipeline`` -> ``PeRFlowSDXLPipeline`` (PeRFlow-SDXL);
- ``FluxPipeline`` -> ``FluxPipeline`` (Flux.1 dev and schnell);
- ``StableDiffusion3Pipeline`` -> ``SD3Pipeline`` (SD3, SD3.5);
- ``StreamflowDigits`` -> ``DigitsPipeline`` (the embedded default model, class labels).

Modules by concern: ``base`` (the factory, ``PromptPipeline``), ``text`` (text encoders, T5's
tokenizers), ``images`` (the autoencoder, image conversions), ``stream`` (``PromptStream``: a
prompt pipeline through the stream engine), then one module per pipeline class (digits, perflow,
sdxl, sd3, flux).
"""

from streamflow_jax.pipelines.base import PIPELINES, Pipeline, PromptPipeline, pipeline_class
from streamflow_jax.pipelines.digits import DIGITS_DIR, NULL_CLASS, DigitsPipeline, to_images
from streamflow_jax.pipelines.flux import FluxPipeline
from streamflow_jax.pipelines.images import image_grid, load_autoencoder, to_float_images, to_uint8
from streamflow_jax.pipelines.perflow import PeRFlowPipeline
from streamflow_jax.pipelines.sd3 import SD3Pipeline
from streamflow_jax.pipelines.sdxl import PeRFlowSDXLPipeline
from streamflow_jax.pipelines.stream import PromptStream

__all__ = ["DIGITS_DIR", "NULL_CLASS", "PIPELINES", "DigitsPipeline", "FluxPipeline", "PeRFlowPipeline",
           "PeRFlowSDXLPipeline", "Pipeline", "PromptPipeline", "PromptStream", "SD3Pipeline", "image_grid",
           "load_autoencoder", "pipeline_class", "to_float_images", "to_images", "to_uint8"]
