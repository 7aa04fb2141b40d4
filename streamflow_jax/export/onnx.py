"""ONNX export with jax2onnx (velocity graphs, decoders), and loading it back with integrity checks.

An export is a directory::

    model.onnx           the graph (weights as initializers)
    model.onnx.data      external weights, when the graph is over 2 GB
    export.json          the ExportSpec, the model's config and fingerprint, the files' SHA-256

It is written to a temporary sibling and renamed into place; loading re-hashes the files so a
corrupt or stale export is refused, never silently used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from streamflow_jax import ops
from streamflow_jax._version import __version__
from streamflow_jax.errors import ExportError
from streamflow_jax.export.clean import clean_graph
from streamflow_jax.export.spec import ExportSpec
from streamflow_jax.fsutil import atomic_dir
from streamflow_jax.models import velocity_of

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
META_NAME = "export.json"
FORMAT_VERSION = 1
DEFAULT_OPSET = 23
_PROTO_LIMIT = 2**31 - 2**26  # protobuf's 2 GB cap, with headroom for the graph itself


def file_sha256(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


IDENTITY_FIELDS = ("format", "spec", "class_name", "config", "model_fingerprint", "model", "opset", "files")


def identity_sha256(meta: dict) -> str:
    """The hash of what ``export.json`` says the graph is (its spec, the model it was made from,
    its files' names): recorded as ``identity_sha256`` beside the files' ``sha256``, so that an
    edited or mixed-up ``export.json`` is refused like an edited graph. Fields written after the
    export (a TensorRT engine's entry) are not part of it."""
    fields = {k: meta.get(k) for k in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ExportedGraph:
    """A verified export directory."""

    path: Path
    spec: ExportSpec
    meta: dict

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_NAME


def _import_onnx():
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx extra: pip install 'streamflow-jax[onnx]' ({e})") from None
    return onnx, to_onnx


@functools.cache
def _fp8_lowerings() -> str | None:
    """Registers the FP8 primitives' jax2onnx lowerings (``export.qdq``, which reaches into
    jax2onnx's plugin API); returns why they could not be, or None. Only FP8 models need them."""
    try:
        from streamflow_jax.export import qdq  # noqa: F401
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _input_specs(spec: ExportSpec) -> list:
    """jax2onnx's inputs: shape tuples (float32, ``"B"``-style symbolic names) or, when an input
    is not float32, ``ShapeDtypeStruct`` s whose symbolic dims share one scope."""
    if all(t.dtype == "float32" for t in spec.inputs):
        return [t.shape for t in spec.inputs]
    scope = jax.export.SymbolicScope()
    return [jax.ShapeDtypeStruct(jax.export.symbolic_shape(",".join(str(d) for d in t.shape), scope=scope),
                                 np.dtype(t.dtype)) for t in spec.inputs]


@contextlib.contextmanager
def linear_output_binding():
    """jax2onnx 0.17 checks after every equation that each output is connected to the graph by
    scanning every node built so far: quadratic in the graph's size (the tiny SDXL UNet's 3,500
    equations spend 70% of a 3.5-minute export there; a full-size UNet or Flux would spend
    hours). While this is entered, a value produced by a node of the graph being built answers
    yes at once (what the scan would find by identity); anything else still takes jax2onnx's own
    check, so its answers, and the graph, are unchanged. A jax2onnx without that function is
    left alone."""
    try:
        from jax2onnx.converter import output_binding
    except ImportError:
        yield
        return
    original = getattr(output_binding, "_value_is_graph_connected", None)
    if original is None:
        yield
        return

    def connected(ctx, value):
        producer = getattr(value, "producer", None)
        node = producer() if callable(producer) else None
        if node is not None and node.graph is not None and node.graph is getattr(ctx.builder, "nodes", None):
            return True
        return original(ctx, value)

    output_binding._value_is_graph_connected = connected
    try:
        yield
    finally:
        output_binding._value_is_graph_connected = original


def _inline_jits(fn):
    """``fn`` traced with its inner ``jit``s inlined (``jax.disable_jit`` only while it traces):
    jnp functions such as ``cumsum`` and ``take_along_axis`` are jitted wrappers, which jax2onnx
    0.17's ``jit`` lowering fails on under JAX 0.12 (it asks for ``jax._src.core.ClosedJaxpr``,
    gone there). Inlined, the graph holds their primitives, which it lowers on every JAX. (Under
    ``disable_jit`` a ``lax.scan`` or ``fori_loop`` would be unrolled: the exported graphs have none.)"""
    @functools.wraps(fn)
    def inlined(*args):
        with jax.disable_jit():
            return fn(*args)

    return inlined


def trace_onnx(model, spec: ExportSpec, *, opset: int = DEFAULT_OPSET):
    """The ONNX ``ModelProto`` of ``model``'s ``spec.method`` (velocity or ``decode_latents``)."""
    _, to_onnx = _import_onnx()
    from streamflow_jax.quantization import is_quantized

    if is_quantized(model) and (why := _fp8_lowerings()) is not None:
        raise ExportError(f"this jax2onnx cannot take the FP8 lowerings (export/qdq.py): {why}")
    # unrolled: the graph holds each block's weights as an initializer of its own (named as the
    # checkpoint names them), not a loop over stacked ones; convolution kernels HWIO, the layout
    # jax2onnx lowers (an OHWI model, ``with_conv_layout``, raised its NotImplementedError)
    module = model.with_scanned_blocks(False).with_conv_layout("HWIO").astype(spec.dtype).module
    names = spec.cond_names
    if spec.method == "velocity":
        def graph(x, t, *cond):
            return velocity_of(module, model.adapter, x, t, dict(zip(names, cond)))
    elif spec.method == "encode":  # a text encoder: int32 ids in, float32 states out
        def graph(ids):
            return module(ids)["last_hidden_state"].astype(jnp.float32)
    else:  # a decoder: float32 in, float32 out, the compute dtype inside
        def graph(latents):
            return getattr(module, spec.method)(latents).astype(latents.dtype)

    # onnx_ir warns once per untyped shape constant jax2onnx makes; harmless, and hundreds
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    with linear_output_binding(), ops.exporting():
        proto = to_onnx(_inline_jits(graph), _input_specs(spec), model_name=f"{model.family.name}_{spec.method}",
                        opset=opset, input_names=spec.input_names, output_names=[t.name for t in spec.outputs])
    # jax2onnx 0.17 annotates some intermediate values with symbolic dims that conflate
    # distinct axes (the arange over H//P and W//P both get one name), which makes ONNX
    # Runtime re-use buffers of the wrong size; ONNX's own shape inference redoes them.
    del proto.graph.value_info[:]
    clean_graph(proto)  # what TensorRT's parser and builder would warn about; meaning unchanged
    return proto


def save_onnx(proto, out: Path) -> list[str]:
    """Writes ``model.onnx`` (weights outside it, in ``model.onnx.data``, over protobuf's 2 GB)."""
    onnx, _ = _import_onnx()
    if proto.ByteSize() > _PROTO_LIMIT:
        onnx.save_model(proto, out / ONNX_NAME, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_NAME, size_threshold=1024)
        return [ONNX_NAME, DATA_NAME]
    onnx.save_model(proto, out / ONNX_NAME)
    return [ONNX_NAME]


NEWEST_OPSET = 24  # the newest both runtimes run: from 25 jax2onnx writes Swish, which ONNX Runtime (1.2x)
# and TensorRT (opsets 9-24) do not implement; the export said success and nothing loaded the graph


def check_opset(opset) -> int:
    """An opset the export writes: an integer from ``DEFAULT_OPSET`` (what the graph needs) to
    ``NEWEST_OPSET`` (the newest ONNX Runtime and TensorRT load), and no newer than the
    installed ``onnx`` knows."""
    onnx, _ = _import_onnx()
    newest = min(NEWEST_OPSET, onnx.defs.onnx_opset_version())
    if isinstance(opset, bool) or not isinstance(opset, int | np.integer) or not DEFAULT_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r}: the export takes an integer from {DEFAULT_OPSET} (what its graph needs) "
                          f"to {newest} (the newest ONNX Runtime and TensorRT load, and this onnx "
                          f"{onnx.__version__} writes)")
    return int(opset)


def _check_spec_fits(model, spec: ExportSpec) -> None:
    """A spec made for another configuration of the same class is refused before tracing (its
    shapes fail inside the model's layers with a message about them otherwise)."""
    inputs = [jax.ShapeDtypeStruct(spec.shape_at(t, "opt"), np.dtype(t.dtype)) for t in spec.inputs]
    try:
        if spec.method == "velocity":
            model.check_call(inputs[0], inputs[1], dict(zip(spec.cond_names, inputs[2:])))
        elif spec.method == "decode_latents" and inputs[0].shape[-1] != model.latent_channels:
            raise ValueError(f"its latents have {inputs[0].shape[-1]} channels; the model takes {model.latent_channels}")
    except ValueError as e:
        raise ExportError(f"the spec does not fit this {model.class_name} (made for another configuration?): {e}") \
            from None


def export_onnx(model, spec: ExportSpec, out_dir, *, opset: int = DEFAULT_OPSET, progress: bool = True,
                shared: bool = False, before_commit=None, before_commit_desc: str = "finishing") -> ExportedGraph:
    """Exports ``model``'s ``spec.method`` (velocity, or a decoder's ``decode_latents``) to ``out_dir``.

    Args:
        model: a ``FlowModel`` (cast to ``spec.dtype`` for the export).
        spec: from ``export.export_spec``.
        out_dir: a new directory (or an empty one); written atomically.
        opset: ONNX opset (``check_opset``: from 23 to the newest the installed onnx knows).
        shared: ``out_dir`` is a cache entry that concurrent processes may also be making.
        before_commit: ``(ExportedGraph) -> None``, run on the finished export while it is still
            the hidden partial directory (``export --backend tensorrt`` builds its engine there),
            so that the directory appears with everything or not at all; a failure, Ctrl-C or
            SIGTERM in it leaves nothing. ``before_commit_desc`` names it in the progress bar.
    """
    check_opset(opset)
    if spec.class_name != model.class_name:
        raise ExportError(f"spec is for {spec.class_name}, model is {model.class_name}")
    _check_spec_fits(model, spec)
    out_dir = Path(out_dir).absolute()
    stages_n = 4 + (before_commit is not None)
    with tqdm(total=stages_n, desc="export", unit="stage", disable=not progress) as stages, \
            atomic_dir(out_dir, shared=shared) as tmp:
        stages.set_description("export: tracing to ONNX")
        proto = trace_onnx(model, spec, opset=opset)
        stages.update()
        stages.set_description("export: saving")
        files = save_onnx(proto, tmp)
        del proto
        stages.update()
        stages.set_description("export: onnx.checker + shape inference")
        check_graph(tmp / ONNX_NAME)
        stages.update()
        meta = {
            "format": FORMAT_VERSION,
            "spec": spec.to_json(),
            "class_name": model.class_name,
            "config": dataclasses.asdict(model.config),
            "model_fingerprint": model.fingerprint(),
            "model": {"dtype": str(jnp.dtype(model.dtype)), "fp8": _is_quantized(model)},  # how it was loaded
            "opset": opset,
            "files": files,
            "sha256": file_sha256(tmp / f for f in files),
            "versions": _versions(),
        }
        meta["identity_sha256"] = identity_sha256(json.loads(json.dumps(meta)))  # as it will be read
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        stages.update()
        if before_commit is not None:
            stages.set_description(f"export: {before_commit_desc}")
            before_commit(ExportedGraph(tmp, spec, meta))
            stages.update()
        stages.set_description("export: done")
    if shared:  # another process may have made the entry first: its files, verified
        return load_export(out_dir)
    if before_commit is not None:  # it may have added to the metadata (the engine's entry); the files are hashed
        meta = json.loads((out_dir / META_NAME).read_text())
    return ExportedGraph(out_dir, spec, meta)


def _is_quantized(model) -> bool:
    from streamflow_jax.quantization import is_quantized

    return is_quantized(model)


def check_graph(onnx_path: Path) -> None:
    """``onnx.checker`` with strict shape inference; raises ``ExportError`` naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{onnx_path}: invalid ONNX graph ({e})") from None


def read_export_meta(path) -> tuple[dict, ExportSpec]:
    """An export directory's metadata and spec, read without touching its graph (``load_export``
    verifies the files); an ``ExportError`` names what is wrong."""
    path = Path(path)
    meta_path = path / META_NAME
    if not path.exists():
        raise ExportError(f"{path}: no such export directory")
    if not meta_path.is_file():
        raise ExportError(f"{path}: no {META_NAME} (not a streamflow-jax export directory)")
    try:
        meta = json.loads(meta_path.read_text())
        spec = ExportSpec.from_json(meta["spec"])
        if not isinstance(meta["files"], list) or not isinstance(meta["sha256"], str):
            raise ValueError("files or sha256 of the wrong type")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"no {e} in it" if isinstance(e, KeyError) else str(e)
        raise ExportError(f"{meta_path}: unreadable export metadata ({what}); export again") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ExportError(f"{meta_path}: export format {meta.get('format')} is not {FORMAT_VERSION}; export again")
    return meta, spec


def load_export(path) -> ExportedGraph:
    """Opens an export directory, verifying its files against the recorded SHA-256."""
    path = Path(path)
    meta, spec = read_export_meta(path)
    try:
        files = [path / f for f in meta["files"]]
    except TypeError as e:
        raise ExportError(f"{path / META_NAME}: unreadable export metadata ({e}); export again") from None
    recorded = meta["sha256"]
    for f in files:
        if not f.is_file():
            raise ExportError(f"{f}: missing; export again")
    if file_sha256(files) != recorded:
        raise ExportError(f"{path / ONNX_NAME}: content does not match {META_NAME} (corrupt or stale); export again")
    if "identity_sha256" in meta and meta["identity_sha256"] != identity_sha256(meta):  # older exports lack it
        raise ExportError(f"{path / META_NAME}: edited since the export (its spec, model or files do not match the "
                          "recorded identity_sha256); export again")
    return ExportedGraph(path, spec, meta)


def _versions() -> dict:
    """The versions an export is made with (from the installed distributions: jax2onnx has no
    ``__version__``, and nothing is imported to read them); read once a process, a new dict each call."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> tuple:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return (("streamflow_jax", __version__), ("jax", jax.__version__), ("jax2onnx", installed("jax2onnx")),
            ("onnx", installed("onnx")), ("numpy", np.__version__))


def made_here(meta: dict) -> bool:
    """Whether an export was made by the versions installed here (the library, JAX, jax2onnx,
    onnx): the export cache uses only such entries, so that an upgrade (an export fix) re-exports."""
    now, then = _versions(), meta.get("versions") or {}
    return all(then.get(k) == now[k] for k in ("streamflow_jax", "jax", "jax2onnx", "onnx"))
