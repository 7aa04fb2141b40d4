"""FP8 weights for the transformers: ``quantize(model, "fp8")``.

A quantized model is a ``FlowModel`` of the same family whose chosen ``Linear`` layers became
``Fp8Linear``: the weight is stored as ``float8_e4m3fn`` (``[out, in]``, one byte a parameter)
with one float32 scale per tensor, and each product quantizes its input per tensor on the fly
(``ops.fp8_matmul``): one dot of two e4m3 operands, scaled after. On Hopper (and Ada) XLA
compiles each into one FP8 GEMM (a Triton GEMM fusion or cuBLASLt's, as its autotuner picks);
elsewhere it runs upcast, with the same numbers. Everything else
(attention, norms, convolutions, embedders, the final projection) keeps its dtype.

Why per tensor, with power-of-two scales:

- Scalar scales factor out of the dot, into one multiply of its output (an FP8 GEMM's alpha
  or epilogue); a per-channel activation scale would not.
- It is the common FP8 inference recipe (TransformerEngine's, torchao's default granularity).
- A power of two divides and multiplies exactly, so the bf16 copy of a scale is the scale.

Which linears, per family (its ``Family.fp8_linears``):

- ``sd3``, ``flux``: every linear inside the transformer blocks (attention projections, MLPs,
  modulation). They hold nearly all of the FLOPs and bytes: 96% of SD3-medium's bf16 weight
  bytes, 98% of SD3.5-large's, 99.4% of Flux-dev's (whose bytes fall to 0.50x of bf16).
- ``unet``: the linears of the UNet's transformer blocks (attention and GEGLU MLP), not the
  convolutions, the time embedding or the ResNets' time projections (28% of SD1.5's weight
  bytes; its bytes fall to 0.86x); whether FP8 wins there at SD1.5's widths (320-1280) is
  measured on the GPU (``benchmarks/fp8_gpu.py``).
- Kept in the compute dtype everywhere: the input embedders (``x_embedder``, ``pos_embed``,
  ``context_embedder``, the time/text MLPs: under 1% of the work, and they read raw encoder
  outputs and timestep features with the widest ranges), and the final ``norm_out`` /
  ``proj_out``, which write the velocity with no later layer to absorb an error, and whose
  kernel dtype the models read as their compute dtype.

Limits:

- Activations are scaled per tensor. By default ("dynamic") the scale comes from each call's
  input, so an element's result depends (slightly) on what shares its batch (the stream
  engine's batches differ from ``sf.sample``'s). ``calibrate`` measures the scales once
  ("static": ``Fp8Linear.input_scale``): results become batch-independent, and the model
  exports as ONNX QuantizeLinear / DequantizeLinear, which TensorRT builds (compute capability
  8.9 and later); a dynamic model's export is refused by TensorRT (``TENSORRT_REFUSAL``).
- LoRAs go in first: ``apply_loras`` refuses a quantized model (a delta merged into e4m3
  weights would land in their scaled units); ``convert(..., loras=, quantize="fp8")`` merges
  them before quantizing.
- ``FlowModel.astype`` casts the other floating parameters and leaves the e4m3 weights FP8.
- ``sf.save`` writes a quantized model (e4m3 weights, one byte each, and the list of FP8
  layers in ``config.json``); ``sf.load`` restores it quantized.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamflow_jax import ops
from streamflow_jax.errors import is_real_number
from streamflow_jax.models.flow import FlowModel
from streamflow_jax.models.layers import Attention, Linear, set_at, sum_of_parts

MODES = ("fp8",)
TENSORRT_REFUSAL = ("FP8 models with dynamic activation scales do not build as TensorRT engines: their activations "
                    "are quantized with scales computed per call, and TensorRT's FP8 (Q/DQ) takes scales fixed at "
                    "build time; calibrate them first (sf.calibrate, or convert --quantize fp8 --calibrate PROMPTS), "
                    "or run them with backend xla (FP8 GEMMs on Hopper and Ada) or onnxruntime")


class Fp8Linear(nnx.Module):
    """``x @ (weight * weight_scale).T + bias`` with e4m3 weights, in ``x``'s dtype.

    Attributes:
        weight: ``[out, in]`` ``float8_e4m3fn`` (PyTorch's orientation: K minor, as FP8 GEMMs
            take their second operand).
        weight_scale: float32 scalar, a power of two.
        bias: ``[out]`` in the original dtype, or None.
        input_scale: float32 scalar, a power of two: the input's static scale (``calibrate``
            sets it), or None: the scale is computed from each call's input.
        calibration: static; while ``calibrate`` runs, ``(run id, layer name)``: each call
            reports its input's largest magnitude to the host.
    """

    def __init__(self, weight: jax.Array, weight_scale: jax.Array, bias: jax.Array | None,
                 input_scale: jax.Array | None = None):
        self.weight = nnx.Param(weight)
        self.weight_scale = nnx.Param(weight_scale)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.input_scale = nnx.Param(input_scale) if input_scale is not None else None
        self.calibration = None

    @classmethod
    def from_linear(cls, linear: Linear) -> Fp8Linear:
        weight, scale = _quantize_kernel(linear.kernel[...])
        return cls(weight, scale, linear.bias[...] if linear.bias is not None else None)

    def __call__(self, x, input_scale=None):  # [..., in] -> [..., out]
        """``input_scale``: a scale to use instead of this layer's static one (``layers.project``
        passes one shared by layers of the same input)."""
        if self.calibration is not None:
            report_amax(*self.calibration, x)
        if input_scale is None and self.input_scale is not None:
            input_scale = self.input_scale[...]
        y = ops.fp8_matmul(x, self.weight[...], self.weight_scale[...], input_scale)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)

    def of_parts(self, parts):  # [..., in_i] each -> [..., out]: self(concatenate(parts, -1))
        """One FP8 product per part with its columns of the weight, summed
        (``layers.linear_of_concat``): the parts quantized with the concatenation's scale (the
        static one, or one from the largest magnitude of all of them), so each e4m3 operand is
        the slice of the concatenation's."""
        if self.calibration is not None:
            for x in parts:
                report_amax(*self.calibration, x)
        if self.input_scale is not None:
            scale = self.input_scale[...]
        else:
            scale = ops.fp8_scale(functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in parts]))
        weight, weight_scale = self.weight[...], self.weight_scale[...]
        y = sum_of_parts(parts, lambda x, cols: ops.fp8_matmul(x, weight[:, cols], weight_scale, scale))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


@jax.jit
def _quantize_kernel(kernel):  # [in, out] -> [out, in] e4m3, scalar float32 scale
    kernel = kernel.astype(jnp.float32)
    scale = ops.fp8_scale(jnp.max(jnp.abs(kernel)))
    return ops.quantize_fp8(kernel.T, scale), scale


def quantize(model: FlowModel, mode: str = "fp8", *, include: str | None = None) -> FlowModel:
    """The same model with its chosen linear layers' weights in FP8.

    Args:
        model: a ``FlowModel`` (float32 or bfloat16; the other parameters keep their dtype).
        mode: ``"fp8"`` (e4m3 weights with a per-tensor scale; activations quantized per
            tensor when the model runs).
        include: a regular expression over the dotted module paths (``transformer_blocks.3.
            attn.to_q``) choosing the linears, instead of the family's ``Family.fp8_linears``
            (required for families without one).

    Returns:
        A ``FlowModel`` of the same class, config and adapter: usable by ``sf.sample`` (inside
        ``jax.jit`` too) and the stream engine.

    Raises:
        ValueError: an unknown mode, a family without a rule (and no ``include``), or nothing
            to quantize (for example a model quantized already).
    """
    if mode not in MODES:
        raise ValueError(f"unsupported quantization mode {mode!r} (supported: {', '.join(MODES)})")
    if not isinstance(model, FlowModel):
        raise ValueError(f"quantize takes a FlowModel (sf.load(...)), got {type(model).__name__}")
    if model.scanned:  # per-block scales, layers chosen by their checkpoint names
        return model.unrolled_edit(lambda m: quantize(m, mode, include=include))
    if include is not None and not isinstance(include, str):
        raise ValueError(f"include must be a regular expression (a string), got {include!r}")
    family = model.family.name
    pattern = include if include is not None else model.family.fp8_linears
    if pattern is None:
        raise ValueError(f"no FP8 rule for the {family} family (its Family.fp8_linears is None); "
                         "choose the linears in Python: sf.quantize(model, 'fp8', include=REGEX)")
    module = model.module
    targets = _chosen_linears(module, pattern)
    kept = [".".join(map(str, path)) for path, _ in targets if ".".join(map(str, path)) in model.family.float_linears]
    if kept:
        raise ValueError(f"include={pattern!r} picks {', '.join(kept)}, which stays in the compute dtype "
                         f"({model.class_name} reads its dtype from it); narrow the expression")
    if not targets:
        raise ValueError(f"no linear layer of this {family} model matches {pattern!r} "
                         "(is it quantized already?)")
    for path, linear in targets:
        set_at(module, path, Fp8Linear.from_linear(linear))
    graphdef, state = nnx.split(module)
    return model._replace(graphdef=graphdef, state=state)


def _chosen_linears(module, pattern: str) -> list[tuple[tuple, Linear]]:
    """``(path, layer)`` of ``module``'s linear layers whose dotted path ``pattern`` matches."""
    try:
        chosen = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"include={pattern!r} is not a regular expression ({e})") from None
    return [(path, node) for path, node in nnx.iter_graph(module)
            if isinstance(node, Linear) and path and chosen.search(".".join(map(str, path)))]


def fp8_layer_names(module, pattern: str) -> list[str]:
    """The dotted paths of ``module``'s linear layers that ``pattern`` picks (``quantize``'s rule)."""
    return [".".join(map(str, path)) for path, _ in _chosen_linears(module, pattern)]


def quantize_kernel(kernel) -> tuple[np.ndarray, np.ndarray]:
    """A ``Linear`` kernel ``[in, out]`` as an ``Fp8Linear``'s ``(weight [out, in] e4m3, scale)``,
    on the host (``convert(..., quantize="fp8")`` writes these, part by part)."""
    weight, scale = _quantize_kernel(jnp.asarray(kernel))
    return np.asarray(weight), np.asarray(scale)


def quantized_layers(model: FlowModel) -> list[str]:
    """The dotted paths of ``model``'s FP8 layers (``transformer_blocks.0.attn.to_q``), in order."""
    return [name for name, _ in _fp8_nodes(model.module)]


def is_quantized(model: FlowModel) -> bool:
    """Whether any layer of ``model`` holds FP8 weights (``quantize`` made it)."""
    return any(isinstance(node, Fp8Linear) for _, node in nnx.iter_graph(model.module))


def quantized_structure(model: FlowModel, mode: str, layers: list[str], activation_scales: str = "dynamic",
                        attention_scales: str | None = None) -> FlowModel:
    """``model`` (abstract: ``jax.ShapeDtypeStruct`` leaves) with exactly ``layers`` made FP8,
    abstract too: the structure a saved quantized model is restored into (``sf.load``);
    ``activation_scales="static"``: with calibrated input scales (``calibrate``);
    ``attention_scales="static"``: every attention with its q/k/v scales too."""
    if mode not in MODES:
        raise ValueError(f"unsupported quantization mode {mode!r} (supported: {', '.join(MODES)})")
    pattern = "^(?:" + "|".join(re.escape(name) for name in layers) + ")$"

    def build(m):
        linears = {".".join(map(str, path)) for path, node in nnx.iter_graph(m.module) if isinstance(node, Linear)}
        missing = sorted(set(layers) - linears)
        if missing:
            raise ValueError(f"no linear layer named {missing[0]!r} in this {m.family.name} model")
        q = quantize(m, mode, include=pattern)
        if activation_scales == "static":
            q = _with_layers(q, lambda name, layer: _rebuilt(layer, jnp.ones((), jnp.float32)))
        if attention_scales == "static":
            q = _with_attentions(q, lambda name, node: setattr(node, "qkv_scale", nnx.Param(jnp.ones(3, jnp.float32))))
        return q

    if activation_scales not in ("static", "dynamic"):
        raise ValueError(f"activation_scales must be 'static' or 'dynamic', got {activation_scales!r}")
    if attention_scales not in (None, "static"):
        raise ValueError(f"attention_scales must be 'static' or absent, got {attention_scales!r}")
    return jax.eval_shape(build, model)


def quantized(model: FlowModel, mode: str = "fp8") -> FlowModel:
    """``model`` quantized, or as it is when it holds FP8 layers already (a checkpoint written
    by ``convert(..., quantize="fp8")`` or ``sf.save``): what ``--quantize`` does."""
    if mode not in MODES:
        raise ValueError(f"unsupported quantization mode {mode!r} (supported: {', '.join(MODES)})")
    return model if is_quantized(model) else quantize(model, mode)


def activation_scales(model: FlowModel) -> str | None:
    """``"static"`` when every FP8 layer of ``model`` has a calibrated input scale
    (``calibrate``), ``"dynamic"`` when none has, None for a model without FP8 layers."""
    layers = _fp8_nodes(model.module)
    if not layers:
        return None
    static = {layer.input_scale is not None for _, layer in layers}
    if len(static) > 1:
        raise ValueError("some FP8 layers have calibrated input scales and some do not; calibrate the model again")
    return "static" if static.pop() else "dynamic"


def _nodes(module, kind: type) -> list[tuple[tuple, nnx.Module]]:
    """``(path, node)`` of ``module``'s nodes of ``kind``, listed before any is edited."""
    return [(path, node) for path, node in nnx.iter_graph(module) if isinstance(node, kind)]


def _fp8_nodes(module) -> list[tuple[str, Fp8Linear]]:
    return [(_name(path), node) for path, node in _nodes(module, Fp8Linear)]


def _edited(model: FlowModel, kind: type, edit: Callable[[nnx.Module, tuple, nnx.Module], None]) -> FlowModel:
    """A copy of ``model`` with ``edit(module, path, node)`` applied to each node of ``kind``."""
    module = nnx.clone(model.module)
    for path, node in _nodes(module, kind):
        edit(module, path, node)
    graphdef, state = nnx.split(module)
    return model._replace(graphdef=graphdef, state=state)


def _with_layers(model: FlowModel, make: Callable[[str, Fp8Linear], Fp8Linear]) -> FlowModel:
    """A copy of ``model`` whose each FP8 layer is ``make(name, layer)``."""
    return _edited(model, Fp8Linear, lambda module, path, layer: set_at(module, path, make(_name(path), layer)))


def _with_attentions(model: FlowModel, set_node: Callable[[str, Attention], None]) -> FlowModel:
    """A copy of ``model`` with ``set_node(name, attention)`` applied to each attention."""
    return _edited(model, Attention, lambda module, path, node: set_node(_name(path), node))


def _name(path: tuple) -> str:
    return ".".join(map(str, path))


def _rebuilt(layer: Fp8Linear, input_scale) -> Fp8Linear:
    return Fp8Linear(layer.weight[...], layer.weight_scale[...], None if layer.bias is None else layer.bias[...],
                     input_scale)


# calibration runs in progress: run id -> {layer name: largest input magnitude seen}
_RUNS: dict[int, dict[str, float]] = {}
_RUNS_LOCK = threading.Lock()
_RUN_IDS = itertools.count()


def _record(run: int, name: str, amax) -> None:
    """Host side of a calibrating ``Fp8Linear`` (``jax.debug.callback``; any thread)."""
    value = float(np.max(np.asarray(amax, np.float32)))
    with _RUNS_LOCK:
        seen = _RUNS.get(run)
        if seen is not None:  # NaN kept: max() would drop it or not depending on the order
            before = seen.get(name, 0.0)
            seen[name] = math.nan if math.isnan(value) or math.isnan(before) else max(value, before)


def report_amax(run: int, name: str, x) -> None:
    """A calibrating layer's report of ``x``'s largest magnitude (traced; recorded on the host
    under ``name`` for calibration run ``run``)."""
    if ops.is_exporting():
        raise ValueError("calibration measures the model as XLA runs it: call it with backend xla "
                         "(not onnxruntime or tensorrt, which export it)")
    amax = jax.lax.reduce_max(jnp.abs(x).astype(jnp.float32), tuple(range(x.ndim)))
    jax.debug.callback(functools.partial(_record, run, name), amax)


def record_attention(calibration: tuple[int, str], q, k, v) -> None:
    """A calibrating ``Attention``'s report of its queries', keys' and values' largest
    magnitudes (under ``name.q``, ``name.k``, ``name.v``)."""
    run, name = calibration
    for part, a in zip("qkv", (q, k, v)):
        report_amax(run, f"{name}.{part}", a)


def attention_scales(model: FlowModel) -> str | None:
    """``"static"`` when every attention of ``model`` has calibrated FP8 scales for its queries,
    keys and values (``calibrate(..., attention=True)``), else None (FP8 attention, where it
    runs, scales each call's own)."""
    nodes = _nodes(model.module, Attention)
    return "static" if nodes and all(node.qkv_scale is not None for _, node in nodes) else None


def check_headroom(headroom: float) -> float:
    """``calibrate``'s ``headroom``, or a ValueError: a number from 1 to ``MAX_HEADROOM`` (past
    that the measured magnitudes land in e4m3's lowest binades, or underflow: a model that
    runs and is far off, with nothing said)."""
    if not is_real_number(headroom) or not 1 <= float(headroom) <= MAX_HEADROOM:
        raise ValueError(f"headroom must be a number from 1 to {MAX_HEADROOM}, got {headroom!r}")
    return float(headroom)


MAX_HEADROOM = 256


def calibrate(model: FlowModel, run: Callable[[FlowModel], object], *, headroom: float = 1.0,
              attention: bool = False) -> FlowModel:
    """``model`` (quantized, ``quantize``) with static activation scales measured by ``run``.

    ``run`` gets a copy of the model that reports, at every call of each FP8 layer, the largest
    magnitude of that layer's input; it should call it (``sf.sample``, a pipeline, the stream
    engine) on inputs like the ones the model will see: a few prompts, the step counts and
    guidance used in practice, through backend ``xla``. Each layer's scale is then the power of
    two that brings ``headroom`` times the largest magnitude seen into e4m3's ``(224, 448]``
    (inputs beyond ``448 * scale`` saturate later).

    Why: with static scales each element's result no longer depends on what shares its batch
    (the stream engine's results equal ``sf.sample``'s), no pass over the input finds its
    largest magnitude before each product, and the model exports to TensorRT (ONNX
    QuantizeLinear / DequantizeLinear, TensorRT's explicit FP8 quantization).

    Args:
        model: a quantized ``FlowModel`` (dynamic or calibrated already: measured anew).
        run: called once with the calibrating model; its return value is ignored.
        headroom: a factor from 1 to ``MAX_HEADROOM`` (256) on the measured magnitudes (1: the
            measured range fills e4m3, up to a power of two).
        attention: also measure each attention's queries, keys and values (after their norms
            and rotary embedding), and keep their static scales for FP8 attention
            (``$STREAMFLOW_JAX_ATTENTION=fp8``): no reduction over each before the kernel, and
            a result that no longer depends on the batch. Other attention runs ignore them.

    Returns:
        The model with each FP8 layer's ``input_scale`` set (it saves, loads and exports with
        them).

    Raises:
        ValueError: ``model`` has no FP8 layer, ``headroom < 1``, or ``run`` did not call
            some FP8 layer (through XLA; the layer is named).
    """
    if not is_quantized(model):
        raise ValueError("calibrate takes a quantized model: sf.quantize(model, 'fp8') first")
    if not callable(run):
        raise ValueError(f"run must be a function that calls the model it is given, got {type(run).__name__}")
    if model.scanned:  # each layer reports under its own name: ``run`` gets the blocks unrolled
        return model.unrolled_edit(lambda m: calibrate(m, run, headroom=headroom, attention=attention))
    check_headroom(headroom)
    run_id = next(_RUN_IDS)

    def recording(name, layer):
        out = _rebuilt(layer, None)  # measured as the dynamic model runs
        out.calibration = (run_id, name)
        return out

    def recording_attention(name, node):
        node.qkv_scale, node.calibration = None, (run_id, name)

    calibrating = _with_layers(model, recording)
    if attention:
        calibrating = _with_attentions(calibrating, recording_attention)
    with _RUNS_LOCK:
        _RUNS[run_id] = {}
    try:
        run(calibrating)
        jax.effects_barrier()
    finally:
        with _RUNS_LOCK:
            seen = _RUNS.pop(run_id)
    names = quantized_layers(model)
    if attention:
        attentions = [_name(path) for path, _ in _nodes(model.module, Attention)]
        names = names + [f"{name}.{part}" for name in attentions for part in "qkv"]
    missing = [name for name in names if name not in seen]
    if missing:
        raise ValueError(f"calibration saw no call of {len(missing)} of the {len(names)} FP8 layers"
                         f"{' and attention inputs' if attention else ''} "
                         f"({missing[0]!r} first): run must call the model it is given, through backend xla")
    bad = [name for name in names if not math.isfinite(seen[name])]
    if bad:
        raise ValueError(f"calibration saw non-finite inputs (NaN or inf) at {len(bad)} FP8 layer(s) ({bad[0]!r} "
                         "first): the model diverged on the calibration inputs")
    calibrated = _with_layers(model, lambda name, layer: _rebuilt(
        layer, ops.fp8_scale(jnp.float32(seen[name] * headroom))))
    if attention:
        def set_scales(name, node):
            node.qkv_scale = nnx.Param(jnp.stack([ops.fp8_scale(jnp.float32(seen[f"{name}.{part}"] * headroom))
                                                  for part in "qkv"]))
        calibrated = _with_attentions(calibrated, set_scales)
    return calibrated


def parameter_bytes(model: FlowModel) -> int:
    """Bytes of the model's parameters (works on abstract models too: ``jax.eval_shape``)."""
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(model.state))
