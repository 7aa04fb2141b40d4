"""What TensorRT's ONNX parser accepts, kept as data, and a check of exported graphs against it.

Source: onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 ("supports operators in the
inclusive range of opset 9 to opset 24"), the operators marked "Y" and their listed types.
Restrictions in that table's last column that matter to us are noted beside the entry.
Update this table (and ``SOURCE``) when targeting a newer TensorRT.

This is the check for datacenter TensorRT, which cannot be installed where this project is
built and tested. TensorRT-RTX's own parser and builder run on every exported graph in the
tests (``backends/tensorrt.py``, ``tests/test_tensorrt.py``); its parser is a different
release of onnx-tensorrt, so passing it does not prove datacenter TensorRT accepts a graph.
"""

from __future__ import annotations

SOURCE = "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 (opset 9-24)"
OPSET_RANGE = (9, 24)

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)

SUPPORTED: dict[str, tuple[str, ...]] = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": ("BOOL",), "ArgMax": _FI, "ArgMin": _FI,
    "Asin": _F, "Asinh": _F, "Atan": _F, "Atanh": _F, "Attention": _F, "AveragePool": _F,
    "BatchNormalization": _F, "Cast": _FIB + ("UINT8",), "CastLike": _FIB + ("UINT8",), "Ceil": _F, "Celu": _F,
    "Clip": _F, "Concat": _FIB, "Constant": _FIB, "ConstantOfShape": _FIB, "Conv": _F, "ConvTranspose": _F,
    "Cos": _F, "Cosh": _F, "CumSum": _F, "DepthToSpace": _FI, "Div": _FI, "Dropout": _F, "Einsum": _F, "Elu": _F,
    "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB, "Flatten": _FIB, "Floor": _F,
    "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Gelu": _FI, "Gemm": _F, "GlobalAveragePool": _F,
    "GlobalLpPool": _F, "GlobalMaxPool": _F, "Greater": _FI, "GreaterOrEqual": _FI, "GroupNormalization": _F,
    "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB, "If": _FIB, "InstanceNormalization": _F,
    "IsInf": _F, "IsNaN": _FI, "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI,
    "Log": _F, "LogSoftmax": _F, "Loop": _FIB, "LRN": _F, "LpNormalization": _F, "LpPool": _F, "MatMul": _F,
    "Max": _FI, "MaxPool": _F, "Mean": _FI, "MeanVarianceNormalization": _F, "Min": _FI, "Mish": ("FP32", "FP16"),
    "Mod": _FI, "Mul": _FI, "Neg": _FI, "Not": ("BOOL",), "OneHot": _FIB, "Or": ("BOOL",), "Pad": _FI,
    "Pow": _FI, "PRelu": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI,
    "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI,  # axes: initializer
    "ReduceMin": _FI, "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI,
    "Reshape": _FIB, "Resize": _F, "ReverseSequence": _FIB, "RMSNormalization": _F, "Round": _F, "Scan": _F,
    "ScatterElements": _FI, "ScatterND": _FI, "Selu": _F, "Shape": _FIB, "Shrink": _FI, "Sigmoid": _F,
    "Sign": _FI, "Sin": _F, "Sinh": _F, "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F,
    "Softsign": _F, "SpaceToDepth": _FI, "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI,
    "Tan": _F, "Tanh": _F, "Tile": _FIB, "TopK": _FI, "Transpose": _FIB, "Trilu": _FIB, "Unsqueeze": _FIB,
    "Where": _FIB, "Xor": ("BOOL",),
}

# Inputs that are parameters, not data: the table's types do not apply to them; the parser
# takes them as build-time integer constants (an initializer or a Constant node's output).
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {"CumSum": (1,)}
# Comparisons: the table's types are their inputs'; their output is BOOL by definition.
BOOL_OUTPUTS = frozenset({"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsInf", "IsNaN"})

# ONNX TensorProto elem_type -> the table's type names
_ELEM_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16"}


def tensorrt_problems(model) -> list[str]:
    """Everything in an ``onnx.ModelProto`` that TensorRT's ONNX parser would reject.

    Checks the opset, each node's operator, and the element type of every typed value the
    node touches (graph inputs/outputs, initializers, inferred intermediates). Returns
    human-readable problems; an empty list means the graph is within the table.
    """
    import onnx

    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} outside TensorRT's {OPSET_RANGE}")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    constants = {i.name for i in inferred.graph.initializer}
    constants |= {o for n in inferred.graph.node if n.op_type == "Constant" for o in n.output}
    for node in inferred.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name!r}: custom domain {node.domain!r}")
            continue
        allowed = SUPPORTED.get(node.op_type)
        if allowed is None:
            problems.append(f"node {node.name!r}: operator {node.op_type} is not supported")
            continue
        params = PARAMETER_INPUTS.get(node.op_type, ())
        for i in params:
            name = node.input[i] if i < len(node.input) else ""
            if name and (name not in constants or _ELEM_TYPES.get(types.get(name)) not in ("INT32", "INT64")):
                problems.append(f"node {node.name!r} ({node.op_type}): input {i} {name!r} must be an integer constant")
        names = list(node.input) + ([] if node.op_type in BOOL_OUTPUTS else list(node.output))
        for i, name in enumerate(names):
            if not name or name not in types or (i < len(node.input) and i in params):
                continue
            t = _ELEM_TYPES.get(types[name], f"elem_type {types[name]}")
            if t not in allowed and node.op_type not in ("Shape", "Size"):
                problems.append(f"node {node.name!r} ({node.op_type}): {name!r} is {t}, supported {allowed}")
    return problems
