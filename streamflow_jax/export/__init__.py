"""Export of velocity graphs: specs (shapes, profiles), ONNX via jax2onnx, TensorRT's op table."""

from streamflow_jax.export.onnx import ExportedGraph, ExportError, export_onnx, load_export
from streamflow_jax.export.spec import ExportSpec, Range, TensorSpec, velocity_spec

__all__ = ["ExportError", "ExportSpec", "ExportedGraph", "Range", "TensorSpec", "export_onnx", "load_export",
           "velocity_spec"]
