"""jax2onnx lowerings of the FP8 primitives ``ops.fp8_matmul`` binds while exporting.

- ``streamflow_fp8_dequantize`` (an e4m3 weight and its scale) -> ``DequantizeLinear``: the
  weight stays a FLOAT8E4M3FN initializer (one byte a parameter in the ONNX file too).
- ``streamflow_fp8_qdq`` (an activation and its static scale) -> ``QuantizeLinear`` with an
  e4m3 zero point (saturating, round to nearest even: what ``ops.quantize_fp8`` does) ->
  ``DequantizeLinear``.

This is the graph TensorRT's explicit quantization takes: it fuses each Q/DQ pair around a
MatMul into one FP8 GEMM, with the scales as build-time constants. ONNX's Q/DQ take their scale
in the input's (or output's) float type; the scales are powers of two, so the cast is exact.

Imported by ``export.onnx`` when an FP8 model exports (registering them needs jax2onnx).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from jax2onnx.converter.ir_builder import _dtype_to_ir
from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from streamflow_jax.ops import FP8, FP8_DEQUANTIZE, FP8_QDQ


def _ir_dtype(ctx, dtype) -> ir.DataType:
    return _dtype_to_ir(np.dtype(dtype), ctx.builder.enable_double_precision)


def _scale(ctx, var, dtype: ir.DataType) -> ir.Value:
    scale = ctx.get_value_for_var(var, name_hint=ctx.fresh_name("fp8_scale"))
    if getattr(getattr(scale, "type", None), "dtype", None) == dtype:
        return scale
    out = ctx.builder.Cast(scale, _outputs=[ctx.fresh_name("fp8_scale")], to=int(dtype.value))
    out.type = ir.TensorType(dtype)
    _stamp_type_and_shape(out, ())
    return out


def _bind(ctx, value: ir.Value, var, dtype: ir.DataType) -> None:
    value.type = ir.TensorType(dtype)
    _stamp_type_and_shape(value, tuple(var.aval.shape))
    _ensure_value_metadata(ctx, value)
    ctx.bind_value_for_var(var, value)


@register_primitive(jaxpr_primitive=FP8_QDQ, since="0.2", context="primitives.streamflow_jax",
                    component="fp8_qdq", testcases=[])
class Fp8QDQPlugin(PrimitiveLeafPlugin):
    def lower(self, ctx, eqn) -> None:
        x_var, scale_var = eqn.invars
        dtype = _ir_dtype(ctx, x_var.aval.dtype)
        x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("fp8_x"))
        scale = _scale(ctx, scale_var, dtype)
        q = ctx.builder.QuantizeLinear(x, scale, _zero(ctx), _outputs=[ctx.fresh_name("fp8_q")])
        q.type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
        _stamp_type_and_shape(q, tuple(x_var.aval.shape))
        _bind(ctx, ctx.builder.DequantizeLinear(q, scale, _outputs=[ctx.fresh_name("fp8_dq")]),
              eqn.outvars[0], dtype)


def _zero(ctx) -> ir.Value:
    zero = ir.Value(name=ctx.fresh_name("fp8_zero"), type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                    shape=ir.Shape(()), const_value=ir.tensor(np.zeros((), FP8)))
    ctx.builder.initializers.append(zero)
    return zero


@register_primitive(jaxpr_primitive=FP8_DEQUANTIZE, since="0.2", context="primitives.streamflow_jax",
                    component="fp8_dequantize", testcases=[])
class Fp8DequantizePlugin(PrimitiveLeafPlugin):
    def lower(self, ctx, eqn) -> None:
        q_var, scale_var = eqn.invars
        dtype = _ir_dtype(ctx, eqn.params["dtype"])
        q = ctx.get_value_for_var(q_var, name_hint=ctx.fresh_name("fp8_weight"))
        _bind(ctx, ctx.builder.DequantizeLinear(q, _scale(ctx, scale_var, dtype),
                                                _outputs=[ctx.fresh_name("fp8_weight_dq")]),
              eqn.outvars[0], dtype)
