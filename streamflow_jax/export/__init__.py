"""Export of model graphs: specs (shapes, profiles), ONNX via jax2onnx, TensorRT's op table."""

from streamflow_jax.export.onnx import ExportedGraph, ExportError, export_onnx, load_export
from streamflow_jax.export.spec import (
    ExportSpec,
    Range,
    TensorSpec,
    autoencoder_spec,
    export_spec,
    text_encoder_spec,
    velocity_spec,
)

__all__ = ["ExportError", "ExportSpec", "ExportedGraph", "Range", "TensorSpec", "autoencoder_spec", "export_onnx",
           "export_spec", "load_export", "text_encoder_spec", "velocity_spec"]
