"""Clean-up of jax2onnx's graphs for TensorRT's ONNX parser and builder.

Each rewrite keeps the graph's meaning (ONNX Runtime's results are unchanged; the export
parity tests check it) and removes something TensorRT warns about:

- **Reshape ``allowzero=1``.** ONNX's Reshape reads a 0 in its shape as "copy the input's
  size" unless ``allowzero=1``. jax2onnx writes ``lax.reshape``, whose sizes are literal, with
  the default, and mostly with shapes computed at run time (``Concat`` of ``Shape``/``Gather``
  pieces over the dynamic axes). TensorRT's parser turns such a Reshape into an
  ``IShuffleLayer`` with ``zeroIsPlaceholder=true`` and a run-time shape, on which datacenter
  TensorRT warns "IShuffleLayer with zeroIsPlaceHolder=true has reshape dimension at position
  N that might or might not be zero" (it must then resolve the size at run time). With
  ``allowzero=1`` the shuffle takes its sizes literally. A Reshape is only changed when no
  constant piece of its shape (an initializer or ``Constant``, directly or inside the
  ``Concat`` that assembles the shape) holds a 0, the one way a converter could mean
  "copy". A computed piece is a dimension value; it is 0 only for an empty axis, where
  ``lax.reshape``'s literal meaning is again ``allowzero=1``'s.
- **Reshape to a scalar becomes Squeeze.** jax2onnx reshapes a one-element dimension value to
  a scalar with ``Reshape(x, [])``, the shape ``[]`` an int64 initializer of zero elements. On
  any zero-element initializer TensorRT's parser warns "Empty initializer ... was provided
  with non-empty data. Overriding data to nullptr". ``Squeeze(x)`` without axes drops every
  size-1 axis, which for a one-element ``x`` is the same scalar; the initializer, then unused,
  is removed.
"""

from __future__ import annotations

import collections


def clean_graph(model) -> dict[str, int]:
    """Rewrites an ``onnx.ModelProto`` in place (subgraphs included); returns the count of each
    rewrite (``reshape_allowzero``, ``reshape_to_squeeze``)."""
    counts: collections.Counter = collections.Counter()
    _clean(model.graph, {}, {}, counts)
    return dict(counts)


def _constants(graph, outer: dict) -> dict:
    """Name -> TensorProto of every constant visible in ``graph`` (outer scopes included)."""
    consts = dict(outer)
    consts.update({init.name: init for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
            # (value_ints & co. are not looked at: jax2onnx writes shapes as tensors)
    return consts


def _may_hold_placeholder_zero(name: str, consts: dict, producers: dict) -> bool:
    """Whether the shape ``name`` has a constant piece holding a 0 (so that allowzero matters)."""
    from onnx import numpy_helper

    if name in consts:
        return bool((numpy_helper.to_array(consts[name]) == 0).any())
    node = producers.get(name)
    if node is not None and node.op_type == "Concat":
        return any(_may_hold_placeholder_zero(i, consts, producers) for i in node.input)
    return False  # computed at run time: a dimension value (see the module docstring)


def _clean(graph, outer: dict, outer_producers: dict, counts) -> None:
    from onnx import AttributeProto, helper

    consts = _constants(graph, outer)
    producers = dict(outer_producers)
    producers.update({out: node for node in graph.node for out in node.output})
    for node in graph.node:
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            shape = consts.get(node.input[1])
            if shape is not None and list(shape.dims) == [0]:  # to a scalar: see the module docstring
                del node.input[1:]
                del node.attribute[:]
                node.op_type = "Squeeze"
                counts["reshape_to_squeeze"] += 1
                continue
            current = next((a for a in node.attribute if a.name == "allowzero"), None)
            if (current is None or current.i == 0) and not _may_hold_placeholder_zero(node.input[1], consts,
                                                                                       producers):
                if current is None:
                    node.attribute.append(helper.make_attribute("allowzero", 1))
                else:
                    current.i = 1
                counts["reshape_allowzero"] += 1
        for attr in node.attribute:  # If / Loop / Scan bodies see this graph's values
            for sub in [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs:
                _clean(sub, consts, producers, counts)
    used = _names_used(graph)
    for init in [i for i in graph.initializer if 0 in i.dims and i.name not in used]:
        graph.initializer.remove(init)  # the empty shapes of the Reshapes made Squeezes


def _names_used(graph) -> set[str]:
    """Every value name read in ``graph`` or its subgraphs, and its outputs."""
    from onnx import AttributeProto

    used = {out.name for out in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs:
                used |= _names_used(sub)
    return used
