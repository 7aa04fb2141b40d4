"""Weights and batches over many devices with ``jax.sharding``: ``sf.shard(model, mesh, strategy)``.

A mesh has two named axes, ``("data", "model")``: batches (and the stream engine's slots) are
split over ``data``; weights are placed by a strategy:

- ``"replicate"``: every device holds every weight;
- ``"fsdp"``: each weight's largest axis that divides by all the mesh's devices is split over
  all of them (``("data", "model")``); XLA gathers a layer's weights where they are used;
- ``"tensor"``: Megatron-style over ``model``: attention q/k/v and the first MLP layer by their
  outputs (heads, hidden units), the attention output and the second MLP layer by their
  inputs, every other weight matrix (modulation, embedders, projections) by its output
  features, convolutions by output channels; vectors stay replicated.

The tensor strategy reads the logical axis names each family declares on its weights (its
``Family.logical_axes``: ``standard_logical_axes`` unless a family says otherwise) through one table,
``TENSOR_RULES``, mapping logical axes to mesh axes (as maxdiffusion's logical axis rules). A
``heads`` axis (attention q/k/v outputs, the output projection's inputs) is split only when the
attention's head count divides ``model`` (``attention_heads``): a width that divides while its heads
do not would cut heads across devices.

An axis that does not divide its mesh axis falls back to replication, never an error: ``shard``
says so in one ``UserWarning`` (how many weights, a few of them), as ``shard_batch`` does for a
batch that does not divide ``data``; each situation is told once per process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from streamflow_jax.errors import check_count
from streamflow_jax.models import FlowModel, flat_params
from streamflow_jax.models.family import standard_logical_axes

STRATEGIES = ("replicate", "fsdp", "tensor")
MESH_AXES = ("data", "model")
# logical axis -> mesh axis, for the "tensor" strategy (None: not split)
TENSOR_RULES = {"heads": "model", "mlp": "model", "out": "model", "embed": None, "vocab": None}
_WARNED: set = set()  # the replication warnings already given (shard's, shard_batch's), by situation


def make_mesh(devices: Sequence | int | None = None, *, data: int | None = None, model: int | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: all; an int: the first N).

    Args:
        data, model: the axes' sizes (default: all devices on ``data``, 1 on ``model``; give
            one and the other is what is left).
    """
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        devices = check_count("devices", devices)
        if devices > jax.device_count():
            hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts makes N "
                    "host devices)" if jax.default_backend() == "cpu" else "")
            raise ValueError(f"{devices} devices asked for, {jax.device_count()} present{hint}")
        devices = jax.devices()[:devices]
    elif not isinstance(devices, Sequence | np.ndarray) or isinstance(devices, str):
        raise ValueError(f"devices must be a count or a sequence of devices, got {devices!r}")
    devices = list(np.asarray(devices, dtype=object).ravel())  # a [data, model] array of them too
    n = len(devices)
    if n == 0:
        raise ValueError("devices is empty")
    if not all(isinstance(d, jax.Device) for d in devices):
        bad = next(d for d in devices if not isinstance(d, jax.Device))
        raise ValueError(f"devices must be jax devices (jax.devices()) or a count, got {bad!r} among them")
    if len(set(devices)) != n:
        raise ValueError("devices lists a device more than once")
    for name, size in (("data", data), ("model", model)):
        if size is not None:
            check_count(name, size)
    if data is None and model is None:
        data, model = n, 1
    elif data is None or model is None:
        given, size = ("model", model) if data is None else ("data", data)
        if n % size:
            raise ValueError(f"{given}={size} does not divide the {n} devices given")
        data, model = (n // model, model) if data is None else (data, n // data)
    if data * model != n:
        raise ValueError(f"a mesh of data={data} x model={model} devices does not fit the {n} devices given")
    return Mesh(np.asarray(devices).reshape(data, model), MESH_AXES)


def attention_heads(model) -> dict[str, int]:
    """The head count of every attention module of ``model`` (a ``FlowModel`` or an NNX module,
    abstract or not), by the module's dotted path: every module with an int ``heads``
    (``layers.Attention``, CLIP's and T5's), whose q/k/v outputs are split into that many heads."""
    module = model.module if isinstance(model, FlowModel) else model
    return {".".join(str(k) for k in path): node.heads for path, node in nnx.iter_graph(module)
            if isinstance(node, nnx.Module) and isinstance(getattr(node, "heads", None), int)}


def _heads_of(path: str, heads: Mapping[str, int] | None) -> int | None:
    """The head count of the attention module holding the weight ``path`` (None: none known)."""
    if not heads:
        return None
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        found = heads.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def _place(path: str, shape: tuple[int, ...], mesh: Mesh, strategy: str, logical_axes=None, dtype=None,
           heads: int | None = None) -> tuple[PartitionSpec, str | None]:
    """``partition_spec``'s spec, and why the strategy's split of the weight fell back to
    replication (None: it did not): ``"3 heads"``, ``"shape (37, 8)"``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if strategy == "replicate" or not shape:
        return PartitionSpec(), None
    if strategy == "fsdp":
        n = mesh.size
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if n > 1 and shape[axis] % n == 0:
                spec = [None] * len(shape)
                spec[axis] = MESH_AXES
                return PartitionSpec(*spec), None
        return PartitionSpec(), f"shape {tuple(shape)}" if n > 1 else None
    axes_of = logical_axes or standard_logical_axes
    if dtype is not None and "float8" in str(dtype) and path.endswith(".weight") and len(shape) >= 2:
        kernel = axes_of(path[: -len("weight")] + "kernel", (*shape[:-2], shape[-1], shape[-2]))
        names = (*kernel[:-2], kernel[-1], kernel[-2])
    else:
        names = axes_of(path, tuple(shape))
    spec, used, why = [], set(), None
    for dim, name in zip(shape, names):
        axis = TENSOR_RULES.get(name) if name else None
        if axis is None or axis in used:
            spec.append(None)  # not split
        elif dim % mesh.shape[axis] or (name == "heads" and heads is not None and heads % mesh.shape[axis]):
            spec.append(None)  # replicated along this axis: the width, or the heads it holds, does not divide
            why = f"{heads} heads" if dim % mesh.shape[axis] == 0 else f"shape {tuple(shape)}"
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec), (why if not used else None)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh, strategy: str, logical_axes=None,
                   dtype=None, heads: int | None = None) -> PartitionSpec:
    """Where one weight goes: its ``PartitionSpec`` on ``mesh`` under ``strategy``. ``dtype``: an
    FP8 linear's ``weight`` (``[out, in]``, ``sf.quantize``'s) is placed as its float kernel
    (``[in, out]``) would be, transposed: split by heads or hidden units under ``tensor``, not
    by its inputs as a table's would. ``heads``: the head count of the attention the weight
    belongs to (``attention_heads``); under ``tensor`` its ``heads`` axis is split only when
    the heads divide ``model`` too (None: not known, the width alone decides)."""
    return _place(path, shape, mesh, strategy, logical_axes, dtype, heads)[0]


def _weight_placement(model, mesh: Mesh, strategy: str) -> tuple[dict[str, NamedSharding], dict[str, str]]:
    """``weight_shardings``, and the weights whose split fell back to replication (name -> why)."""
    flat, _, _ = flat_params(nnx.to_pure_dict(model.state))
    axes = model.family.logical_axes
    heads = attention_heads(model) if strategy == "tensor" else None
    shardings, replicated = {}, {}
    for name, a in flat.items():
        spec, why = _place(name, tuple(a.shape), mesh, strategy, axes, a.dtype, _heads_of(name, heads))
        shardings[name] = NamedSharding(mesh, spec)
        if why is not None:
            replicated[name] = why
    return shardings, replicated


def weight_shardings(model, mesh: Mesh, strategy: str) -> dict[str, NamedSharding]:
    """Each parameter's ``NamedSharding`` (parameters by their dotted names)."""
    return _weight_placement(model, mesh, strategy)[0]


def _warn_once(key, message: str, stacklevel: int) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def check_mesh(mesh) -> Mesh:
    """A mesh the strategies place weights on: a ``jax.sharding.Mesh`` with the axes
    ``("data", "model")`` (``make_mesh``'s), or a ValueError."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (sf.make_mesh(...)), got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}; the strategies place weights on {MESH_AXES} "
                         "(sf.make_mesh(devices, data=..., model=...))")
    return mesh


def shard(model: FlowModel, mesh: Mesh, strategy: str = "fsdp") -> FlowModel:
    """The same model with its weights placed on ``mesh`` by ``strategy`` (see the module doc).

    The result is a ``FlowModel`` like any other: ``velocity``, ``sf.sample``, the pipelines and
    the stream engine run it as one SPMD program over the mesh.
    """
    if not isinstance(model, FlowModel):
        raise ValueError(f"shard takes a FlowModel (sf.load(...)), got {type(model).__name__}")
    check_mesh(mesh)
    if model.scanned:  # the strategies place the blocks' weights by their names and shapes
        return model.unrolled_edit(lambda m: shard(m, mesh, strategy))
    flat, treedef, names = flat_params(nnx.to_pure_dict(model.state))
    shardings, replicated = _weight_placement(model, mesh, strategy)
    warn_replicated(model.class_name, mesh, strategy, replicated, len(names), stacklevel=3)
    leaves = [jax.device_put(flat[n], shardings[n]) for n in names]
    state = jax.tree_util.tree_map(lambda x: x, model.state)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    return model._replace(state=state)


def warn_replicated(class_name: str, mesh: Mesh, strategy: str, replicated: Mapping[str, str], total: int,
                    stacklevel: int = 2) -> None:
    """One ``UserWarning`` (once per situation) for the weights a strategy left whole on every
    device (``replicated``: name -> why), of ``total``; nothing when there are none."""
    if not replicated:
        return
    where = (f"none of their axes divides the mesh's {mesh.size} devices" if strategy == "fsdp" else
             f"the axis split over the mesh's model axis of {mesh.shape['model']} does not divide (or, in "
             "attention, the head count does not)")
    examples = ", ".join(f"{n} ({why})" for n, why in list(replicated.items())[:3])
    _warn_once(("shard", class_name, strategy, mesh.shape["data"], mesh.shape["model"], len(replicated)),
               f"shard: {len(replicated)} of {total} weights of this {class_name} are replicated on every device "
               f"instead of split by strategy {strategy!r}: {where}; e.g. {examples}", stacklevel=stacklevel)


def placement(mesh: Mesh, strategy: str, logical_axes=None, heads: Mapping[str, int] | None = None):
    """``(name, abstract array) -> NamedSharding``: ``checkpoint.load``'s ``sharding`` hook, so
    that each weight is restored straight into its shards. ``heads``: the model's
    ``attention_heads`` (of its abstract module); without them a ``heads`` axis is split by its width.
    The function's ``replicated`` dict collects the weights left whole, and why (``warn_replicated``)."""
    def place(name: str, abstract) -> NamedSharding:
        spec, why = _place(name, tuple(abstract.shape), mesh, strategy, logical_axes, abstract.dtype,
                           _heads_of(name, heads))
        if why is not None:
            place.replicated[name] = why
        return NamedSharding(mesh, spec)

    place.replicated = {}
    return place


def batch_sharding(mesh: Mesh, ndim: int, batch: int) -> NamedSharding:
    """A batch's placement: its leading axis over ``data`` when it divides, else replicated (with
    a ``UserWarning``, once per batch size and data axis)."""
    data = mesh.shape["data"]
    if ndim and data > 1 and batch % data:
        _warn_once(("batch", batch, data), f"batch {batch} does not divide the mesh's data axis of {data}: the batch "
                   "is replicated, every device computes all of it", stacklevel=3)  # shard_batch's caller
    spec = PartitionSpec("data", *([None] * (ndim - 1))) if data > 1 and batch % data == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)


def shard_batch(tree, mesh: Mesh):
    """Places every array of ``tree`` (``[B, ...]``) with its batch over ``data``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    placed = []
    for a in leaves:  # a loop, not a map: batch_sharding's warning names shard_batch's caller
        placed.append(jax.device_put(a, batch_sharding(mesh, np.ndim(a), np.shape(a)[0] if np.ndim(a) else 1)))
    return jax.tree_util.tree_unflatten(treedef, placed)


def bytes_per_device(model_or_state, mesh: Mesh, strategy: str, logical_axes=None,
                     heads: Mapping[str, int] | None = None) -> int:
    """The largest number of weight bytes any device of ``mesh`` holds under ``strategy``
    (from shapes alone: abstract arrays from ``jax.eval_shape`` will do). A ``FlowModel``'s
    ``attention_heads`` and logical axes are its own; with a bare state, give ``heads`` (see
    ``placement``)."""
    if isinstance(model_or_state, FlowModel):
        if model_or_state.scanned:  # placed as shard() places it: by the unrolled blocks' names and shapes
            model_or_state = model_or_state.with_scanned_blocks(False)
        state, logical_axes = model_or_state.state, logical_axes or model_or_state.family.logical_axes
        heads = attention_heads(model_or_state) if heads is None and strategy == "tensor" else heads
    else:
        state = model_or_state
    flat, _, _ = flat_params(nnx.to_pure_dict(state))
    total = 0
    for name, a in flat.items():
        sharding = NamedSharding(mesh, partition_spec(name, tuple(a.shape), mesh, strategy, logical_axes, a.dtype,
                                                      _heads_of(name, heads)))
        total += math.prod(sharding.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
    return total
