"""TensorRT backend: a dynamic-shape engine built from the exported ONNX graph, by either flavour.

Two TensorRT flavours share one Python API and this one module:

- ``tensorrt`` (datacenter TensorRT 10/11, ``pip install 'streamflow-jax[tensorrt]'``): builds
  on the GPU the engine will run on (its kernels are timed there) and runs on that GPU's
  compute capability (H100/H200, A100, L40S, ...).
- ``tensorrt_rtx`` (TensorRT for RTX, ``pip install 'streamflow-jax[tensorrt-rtx]'``): builds
  ahead of time on the CPU, no GPU needed, an engine that runs on every compute capability it
  targets (8.0, 8.6, 8.9, 12.x by default; Turing's 7.5 on request), its kernels compiled just
  in time on the GPU at run time and kept in a runtime cache. It does not run on Hopper (9.0).

The flavour is ``tensorrt`` when that package imports, else ``tensorrt_rtx``; choose with
``$STREAMFLOW_JAX_TENSORRT`` or the ``flavour=`` argument. ``Flavour`` holds every difference.

- Build (``build_engine``): the ONNX file parsed into a strongly typed network (each tensor
  keeps the graph's dtype; a flag in TensorRT 10 and TensorRT-RTX, always so in TensorRT 11),
  one optimization profile from the ``ExportSpec``, an optimization level; datacenter
  TensorRT keeps a persistent timing cache, TensorRT-RTX is given its compute-capability
  targets. TensorRT's log is captured: warnings and errors go to the
  ``streamflow_jax.tensorrt`` logger and into the result.
- Cache (``engine_for``): the engine written beside an export by ``streamflow-jax export
  --backend tensorrt`` when its record matches, else ``ROOT/engines/KEY.plan`` keyed by
  (ONNX SHA-256, profile, dtype, flavour, version, targets, GPU name for datacenter
  TensorRT, optimization level); an entry that does not match is rebuilt.
- Run (``TensorRTRunner``, the same for both flavours): ``execute_async_v3`` on a CUDA
  stream; JAX arrays are passed by DLPack both ways, made ready for that stream on the way in
  and synchronized before JAX sees the output.

Building with TensorRT-RTX is tested on CPU for every exported family. Execution has NOT run:
the machines this project is built on have no GPU that TensorRT-RTX runs on, and datacenter
TensorRT cannot be installed on them (see the README, "Backends").
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from streamflow_jax.backends.base import Runner
from streamflow_jax.backends.cache import cache_root
from streamflow_jax.export.onnx import META_NAME, ExportedGraph, load_export
from streamflow_jax.export.spec import dim_value
from streamflow_jax.fsutil import interrupts_held, write_atomic

FLAVOURS = ("tensorrt", "tensorrt_rtx")
FLAVOUR_ENV = "STREAMFLOW_JAX_TENSORRT"
ENGINE_NAME = "model.engine"  # beside model.onnx, made by `streamflow-jax export --backend tensorrt`
_EXTRAS = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}
_LOG = logging.getLogger("streamflow_jax.tensorrt")
# TensorRT DataType member -> numpy dtype name
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
           "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
# the builder's listing of the engine's layers names tensors "NAME (Float[-1,16,16,4])"
_LISTED_DTYPES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Int32": "int32",
                  "Int64": "int64", "Int8": "int8", "UInt8": "uint8", "Bool": "bool"}


class TensorRTUnavailable(RuntimeError):
    """TensorRT is missing, or the engine cannot be built or run on this machine."""


# ---------------------------------------------------------------------------------------------
# Flavours: the one place where tensorrt and tensorrt_rtx differ
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPU:
    """The GPU that JAX sees (TensorRT runs on it, on JAX's buffers)."""

    name: str
    compute_capability: str  # "8.6"


def local_gpu() -> GPU | None:
    """JAX's first NVIDIA GPU, or None (no CUDA backend, or JAX limited to the CPU)."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:  # "Unknown backend gpu" / "no devices": JAX has no GPU here
        return None
    return GPU(device.device_kind, str(getattr(device, "compute_capability", "?")))


def _cc_name(cc: str) -> str:
    """"8.6" -> "SM86" (TensorRT-RTX's ``ComputeCapability`` member)."""
    major, _, minor = cc.partition(".")
    return f"SM{major}{minor}"


def _cc_text(member: str) -> str:
    """"SM120" -> "12.0"."""
    digits = member[2:]
    return f"{digits[:-1]}.{digits[-1]}"


FP8_TARGETS = "an FP8 graph runs on compute capability 8.9 (Ada) or later only (Ampere's 8.0 and 8.6 have no FP8)"


def _parse_cc(item) -> str | None:
    """``"8.6"``, ``"86"``, ``"sm86"``, ``"sm_86"`` -> ``"8.6"``; None when it is none of those."""
    digits = re.sub(r"^sm_?|\.", "", str(item).strip().lower())
    return _cc_text("SM" + digits) if digits.isdigit() and len(digits) >= 2 else None


def _fp8_capable(cc: str) -> bool:
    major, _, minor = str(cc).partition(".")
    return major.isdigit() and (minor or "0").isdigit() and (int(major), int(minor or 0)) >= (8, 9)


class Flavour:
    """One TensorRT flavour: its module, and every difference between the two flavours.

    Attributes:
        name: ``"tensorrt"`` or ``"tensorrt_rtx"``.
        trt: the imported module (the same API under either name).
        version: the module's version.
        portable: builds without a GPU, for a list of compute capabilities (TensorRT-RTX).
    """

    def __init__(self, name: str, trt):
        self.name, self.trt = name, trt
        self.version = str(trt.__version__)
        self.portable = name == "tensorrt_rtx"

    def __repr__(self):
        return f"Flavour({self.name} {self.version})"

    def rtx_targets(self) -> tuple[str, ...]:
        """Every compute capability this TensorRT-RTX can target, as ``"8.6"``."""
        return tuple(_cc_text(m) for m in self.trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d+", m))

    def targets(self, requested=None, *, fp8: bool = False) -> tuple[str, ...]:
        """The compute capabilities an engine is built for.

        TensorRT-RTX: ``requested`` (``"8.6"``, ``"86"`` or ``"sm86"``; a list or a comma-separated
        string), by default every one it offers but Turing's 7.5: the documented default
        (Turing opt-in, as portable engines including it run slower elsewhere; and it builds
        float16 graphs only: no FP32 GEMM, no bfloat16). Datacenter TensorRT: the build GPU's.
        ``fp8``: the graph has FP8 products (a calibrated ``sf.quantize`` model's), which only
        compute capability 8.9 (Ada) and later run: the default keeps those, and an older
        requested one is an error.
        """
        items = [] if not requested else requested.split(",") if isinstance(requested, str) else list(requested)
        parsed = [(item, _parse_cc(item)) for item in items]
        if not self.portable:
            gpu = local_gpu()
            if gpu is None:
                raise TensorRTUnavailable(
                    "datacenter TensorRT builds an engine on the GPU it will run on, and JAX sees no NVIDIA GPU here "
                    f"(TensorRT-RTX builds without one: {FLAVOUR_ENV}=tensorrt_rtx)")
            if any(cc != gpu.compute_capability for _, cc in parsed):  # its own (resolved already) is fine
                raise ValueError("compute-capability targets are a TensorRT-RTX option; datacenter TensorRT builds "
                                 f"for the GPU it runs on ({gpu.name}, {gpu.compute_capability})")
            if fp8 and not _fp8_capable(gpu.compute_capability):
                raise ValueError(f"{FP8_TARGETS}; {gpu.name} is {gpu.compute_capability}")
            return (gpu.compute_capability,)
        offered = self.rtx_targets()
        if not parsed:
            return tuple(cc for cc in offered if cc != "7.5" and (not fp8 or _fp8_capable(cc)))
        for item, cc in parsed:
            if cc not in offered:
                raise ValueError(f"compute capability {item!r}: TensorRT-RTX {self.version} targets "
                                 f"{', '.join(offered)} (Hopper's 9.0, as on H100/H200, needs datacenter TensorRT)")
            if fp8 and not _fp8_capable(cc):
                raise ValueError(f"compute capability {item!r}: {FP8_TARGETS}")
        return tuple(dict.fromkeys(cc for _, cc in parsed))

    def create_network(self, builder):
        """A strongly typed network: TensorRT 10 and TensorRT-RTX take a flag, 11 always is."""
        strongly = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return builder.create_network(0 if strongly is None else 1 << int(strongly))

    def configure(self, config, targets: tuple[str, ...], timing_cache: Path | None):
        """Flavour-specific builder settings. Returns the timing cache to save after the build
        (datacenter TensorRT times kernels on the GPU; TensorRT-RTX chooses them just in time)."""
        if self.portable:
            config.num_compute_capabilities = len(targets)
            for i, cc in enumerate(targets):
                if not config.set_compute_capability(getattr(self.trt.ComputeCapability, _cc_name(cc)), i):
                    raise ValueError(f"TensorRT-RTX refused compute capability {cc}")
            return None
        cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def cannot_run(self, targets, gpu: GPU | None) -> str | None:
        """Why an engine for ``targets`` cannot run here, or None."""
        if gpu is None:
            return ("JAX sees no NVIDIA GPU (engines run on JAX's GPU buffers: pip install 'streamflow-jax[cuda]', "
                    "and JAX_PLATFORMS must allow cuda)")
        if gpu.compute_capability not in targets:
            if self.portable:
                return (f"{gpu.name} has compute capability {gpu.compute_capability}, and this TensorRT-RTX engine "
                        f"runs on {', '.join(targets)} only (on other GPUs, such as H100/H200, use datacenter "
                        f"TensorRT: {FLAVOUR_ENV}=tensorrt)")
            return (f"the engine was built for compute capability {', '.join(targets)}, "
                    f"{gpu.name} is {gpu.compute_capability}")
        return None

    def execution_context(self, engine, runtime_cache: Path | None):
        """An execution context; TensorRT-RTX's with its runtime cache (the kernels it compiled
        just in time on this GPU), read from ``runtime_cache`` when present. Returns
        (context, the cache object or None)."""
        if not self.portable:
            return engine.create_execution_context(), None
        config = engine.create_runtime_config()
        cache = config.create_runtime_cache()
        if runtime_cache is not None and runtime_cache.is_file():
            cache.deserialize(runtime_cache.read_bytes())  # rejected (and rebuilt) if from another GPU/version
        config.set_runtime_cache(cache)
        return engine.create_execution_context(config), cache


def tensorrt_flavour(flavour: str | Flavour | None = None) -> Flavour:
    """The TensorRT flavour to use: ``flavour``, else ``$STREAMFLOW_JAX_TENSORRT``, else
    ``tensorrt`` when it imports, else ``tensorrt_rtx``.

    Raises:
        TensorRTUnavailable: the chosen flavour, or (unchosen) either, is not installed.
        ValueError: an unknown flavour name.
    """
    if isinstance(flavour, Flavour):
        return flavour
    source = "flavour" if flavour else f"${FLAVOUR_ENV}"
    chosen = (flavour or os.environ.get(FLAVOUR_ENV, "")).strip().lower().replace("-", "_") or None
    if chosen is not None and chosen not in FLAVOURS:
        raise ValueError(f"{source}: unknown TensorRT flavour {flavour or os.environ.get(FLAVOUR_ENV)!r} "
                         "(choose tensorrt or tensorrt_rtx)")
    for name in [chosen] if chosen else FLAVOURS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return Flavour(name, module)
    if chosen:
        source = "" if flavour else f" (from {FLAVOUR_ENV})"
        raise TensorRTUnavailable(f"TensorRT flavour {chosen}{source} is not installed: "
                                  f"pip install 'streamflow-jax[{_EXTRAS[chosen]}]'")
    raise TensorRTUnavailable(
        "backend 'tensorrt' needs TensorRT: pip install 'streamflow-jax[tensorrt]' (datacenter GPUs: H100, H200, "
        "A100, L40S...) or 'streamflow-jax[tensorrt-rtx]' (RTX GPUs and A100; builds engines without a GPU)")


# ---------------------------------------------------------------------------------------------
# Engine cache (pure)
# ---------------------------------------------------------------------------------------------


def engine_record(exported: ExportedGraph, *, tensorrt_version: str, gpu_name: str | None, opt_level: int,
                  flavour: str = "tensorrt", targets=()) -> dict:
    """Everything an engine depends on; its hash is the cache key.

    ``gpu_name`` is None for TensorRT-RTX, whose engines depend on their ``targets`` only.
    """
    return {
        "onnx_sha256": exported.meta["sha256"],
        "profile": {k: [list(s) for s in v] for k, v in exported.spec.profile().items()},
        "dtype": exported.spec.dtype,
        "flavour": flavour,
        "tensorrt": tensorrt_version,
        "targets": list(targets),
        "gpu": gpu_name,
        "opt_level": opt_level,
    }


def engine_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


class EngineCache:
    """``ROOT/engines/KEY.plan`` + ``KEY.json`` (the record and the plan's SHA-256)."""

    def __init__(self, root=None):
        self.dir = Path(root or cache_root()) / "engines"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.plan", self.dir / f"{key}.json"

    def lookup(self, record: dict) -> bytes | None:
        """The cached plan for ``record``, or None; a mismatching or damaged entry is deleted."""
        plan_path, meta_path = self.paths(engine_key(record))
        if not (plan_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            plan = plan_path.read_bytes()
            ok = meta.get("record") == record and meta.get("plan_sha256") == hashlib.sha256(plan).hexdigest()
        except (OSError, json.JSONDecodeError):
            ok = False
        if not ok:
            plan_path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            return None
        return plan

    def store(self, record: dict, plan: bytes) -> Path:
        """Writes the entry atomically (partial files, then rename): the plan first, its record last."""
        plan_path, meta_path = self.paths(engine_key(record))
        write_atomic(plan_path, plan)
        write_atomic(meta_path, json.dumps({"record": record, "plan_sha256": hashlib.sha256(plan).hexdigest()}).encode())
        return plan_path


# ---------------------------------------------------------------------------------------------
# Build (no GPU with TensorRT-RTX)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuiltEngine:
    """A serialized engine and what TensorRT reported while building it.

    Attributes:
        plan: the serialized engine.
        flavour, version, targets: as in the engine record.
        seconds: wall time of ``build_serialized_network``.
        inputs, outputs: the network's I/O tensors, name -> (dtype, shape with -1 for a
            dynamic axis), in order.
        profile: input name -> (min, opt, max) as TensorRT holds the optimization profile.
        engine_io: tensor name -> (dtype, shape) of the graph's I/O as the builder lists the
            built engine's layers (its verbose "Engine Layer Information"); empty when a
            TensorRT version words that listing otherwise.
        warnings: the warnings and errors TensorRT logged while parsing and building.
    """

    plan: bytes
    flavour: str
    version: str
    targets: tuple[str, ...]
    seconds: float
    inputs: dict
    outputs: dict
    profile: dict
    engine_io: dict
    warnings: list


@dataclasses.dataclass
class _Capture:
    """What TensorRT logged while a capture was active: warnings and errors, and the builder's
    listing of the engine's layers."""

    warnings: list = dataclasses.field(default_factory=list)
    layers: str = ""


_LOGGERS: dict[str, object] = {}


def _process_logger(trt):
    """The flavour's one logger in this process.

    TensorRT keeps the first logger a process gives it: builders, runtimes and refitters made
    later with another one log a warning and use the first. So there is one per flavour; it
    sends warnings and errors to the ``streamflow_jax.tensorrt`` logger (INFO to DEBUG) and
    everything relevant to the captures active at the time (``with logger.capture() as c``;
    builds running at once in one process each see the other's messages too).
    """
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.captures: list[_Capture] = []

        @contextlib.contextmanager
        def capture(self):
            capture = _Capture()
            self.captures.append(capture)
            try:
                yield capture
            finally:
                self.captures.remove(capture)

        def log(self, level, msg):
            if level in (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING):
                _LOG.warning("TensorRT: %s", msg)
                for capture in self.captures:
                    capture.warnings.append(msg)
            elif msg.startswith("Engine Layer Information"):  # VERBOSE
                for capture in self.captures:
                    capture.layers = msg
            elif level == severity.INFO:
                _LOG.debug("TensorRT: %s", msg)

    _LOGGERS[trt.__name__] = _Logger()
    return _LOGGERS[trt.__name__]


def _listed_io(layers: str, names) -> dict:
    """name -> (dtype, shape) for the tensors ``names`` in the builder's layer listing."""
    out = {}
    for name in names:
        m = re.search(rf"(?<![\w\]\[]){re.escape(name)} \((\w+)\[([-\d,]*)\]\)", layers)
        if m:
            shape = tuple(int(d) for d in m.group(2).split(",") if d)
            out[name] = (_LISTED_DTYPES.get(m.group(1), m.group(1)), shape)
    return out


def _parser_error(error) -> str:
    """One parser error: the node (its name, else its index) and operator, the code, the text
    (which alone can be as terse as "false")."""
    where = error.node_name() or f"#{error.node()}"
    return f"node {where} ({error.node_operator()}): {error.code().name} {error.desc()}"


def _tensor_info(tensor) -> tuple[str, tuple[int, ...]]:
    return _DTYPES.get(tensor.dtype.name, tensor.dtype.name), tuple(tensor.shape)


def fp8_graph(onnx_path) -> str | None:
    """How the graph at ``onnx_path`` quantizes to FP8: ``"static"`` (QuantizeLinear with a
    constant scale: a calibrated model's export, which TensorRT builds), ``"dynamic"`` (Casts to
    float8 with scales computed in the graph, which TensorRT refuses: it takes FP8 tensors only
    from its Q/DQ layers, with build-time scales), or None (no FP8). Read once per file version
    (the runner, ``engine_for`` and ``build_engine`` each ask)."""
    st = Path(onnx_path).stat()
    return _fp8_graph(str(onnx_path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _fp8_graph(onnx_path: str, mtime_ns: int, size: int) -> str | None:
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    if any(n.op_type == "Cast" and any(a.name == "to" and a.i in fp8 for a in n.attribute) for n in graph.node):
        return "dynamic"
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "static"
    return None


def _targets_for(exported: ExportedGraph, fl: Flavour, targets) -> tuple[str, ...]:
    """``fl.targets(targets)`` for this graph (FP8 ones: compute capability 8.9 and later);
    a dynamic FP8 graph is refused."""
    kind = fp8_graph(exported.onnx_path)
    if kind == "dynamic":
        from streamflow_jax.quantization import TENSORRT_REFUSAL

        raise ValueError(f"{exported.onnx_path}: {TENSORRT_REFUSAL}")
    return fl.targets(targets, fp8=kind is not None)  # resolved targets resolve to themselves


def build_engine(exported: ExportedGraph, *, flavour: str | Flavour | None = None, targets=None,
                 opt_level: int = 3, timing_cache: Path | None = None,
                 workspace_bytes: int | None = None, progress: bool = False) -> BuiltEngine:
    """Parses the export's ONNX file and builds a serialized engine with the spec's profile.

    Args:
        exported: an ``ExportedGraph``.
        flavour: see ``tensorrt_flavour``.
        targets: TensorRT-RTX's compute capabilities (default: ``Flavour.targets()``'s).
        opt_level: the builder optimization level (0-5).
        timing_cache: datacenter TensorRT's timing cache file, read and updated.
        workspace_bytes: the builder's workspace limit.
        progress: a progress bar per phase of the build, as TensorRT's progress monitor reports
            them (a large model's build takes minutes).

    Raises:
        ValueError: the graph is an FP8 model's (``quantize``; TensorRT cannot take its
            per-call activation scales), the parser rejected the graph, or the builder failed
            (TensorRT's errors in the message).
    """
    fl = tensorrt_flavour(flavour)
    trt = fl.trt
    targets = _targets_for(exported, fl, targets)
    logger = _process_logger(trt)
    with logger.capture() as log:
        builder = trt.Builder(logger)
        network = fl.create_network(builder)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(exported.onnx_path)):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"{exported.onnx_path}: {fl.name}'s ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        config.builder_optimization_level = int(opt_level)
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in exported.spec.profile().items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise ValueError(f"{exported.onnx_path}: TensorRT refused the optimization profile "
                             f"{exported.spec.profile()}")
        cache = fl.configure(config, targets, timing_cache)
        start = time.perf_counter()
        # Ctrl-C: TensorRT swallows a KeyboardInterrupt raised in its callbacks (the build went
        # on, and the run ended "successfully"); the signal is held, a progress monitor cancels
        # the build at its next step, and the interrupt is raised when the builder returns
        with interrupts_held() as interrupted:
            if hasattr(trt, "IProgressMonitor"):
                config.progress_monitor = _cancelling_monitor(trt, interrupted, progress)
            plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
    if plan is None:
        raise ValueError(f"{exported.onnx_path}: {fl.name} failed to build an engine: "
                         + ("; ".join(log.warnings) or "no message"))
    if cache is not None and timing_cache is not None:
        write_atomic(timing_cache, bytes(cache.serialize()))
    inputs = {t.name: _tensor_info(t) for t in (network.get_input(i) for i in range(network.num_inputs))}
    outputs = {t.name: _tensor_info(t) for t in (network.get_output(i) for i in range(network.num_outputs))}
    return BuiltEngine(
        plan=bytes(plan), flavour=fl.name, version=fl.version, targets=targets, seconds=seconds,
        inputs=inputs, outputs=outputs,
        profile={name: tuple(tuple(d) for d in profile.get_shape(name)) for name in inputs},
        engine_io=_listed_io(log.layers, list(inputs) + list(outputs)), warnings=log.warnings)


def _cancelling_monitor(trt, interrupted: list, progress: bool = False):
    """A TensorRT progress monitor that stops the build once ``interrupted`` holds a signal, and
    with ``progress`` shows a bar per top-level phase (TensorRT swallows what its callbacks
    raise: they only count)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if progress and parent_phase is None:
                self.bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", unit="step",
                                             leave=False)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(1)
            return not interrupted  # False cancels the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()


def _record_for(exported: ExportedGraph, fl: Flavour, targets, opt_level: int) -> dict:
    gpu = None if fl.portable else local_gpu()
    return engine_record(exported, tensorrt_version=fl.version, gpu_name=None if gpu is None else gpu.name,
                         opt_level=opt_level, flavour=fl.name, targets=targets)


def export_engine(exported: ExportedGraph, *, flavour: str | Flavour | None = None, targets=None,
                  opt_level: int = 3, progress: bool = False) -> dict:
    """Builds the engine of an export directory and writes it beside the graph, ``model.engine``,
    recording it in ``export.json`` under ``"tensorrt"`` (flavour, version, targets, build
    time, the engine record and SHA-256, TensorRT's warnings). ``TensorRTRunner`` uses it when
    its record matches (``progress``: bars over the build's phases). Returns that entry."""
    fl = tensorrt_flavour(flavour)
    targets = _targets_for(exported, fl, targets)
    built = build_engine(exported, flavour=fl, targets=targets, opt_level=opt_level, progress=progress)
    engine_path = write_atomic(exported.path / ENGINE_NAME, built.plan)
    mode = exported.onnx_path.stat().st_mode & 0o777  # write_atomic's files are private; these are the export's
    engine_path.chmod(mode)
    entry = {"engine": ENGINE_NAME, "engine_sha256": hashlib.sha256(built.plan).hexdigest(),
             "engine_bytes": len(built.plan), "flavour": built.flavour, "version": built.version,
             "targets": list(built.targets), "build_seconds": round(built.seconds, 3), "opt_level": opt_level,
             "record": _record_for(exported, fl, targets, opt_level), "warnings": built.warnings}
    meta_path = exported.path / META_NAME
    meta = json.loads(meta_path.read_text())
    meta["tensorrt"] = entry
    write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode()).chmod(mode)
    _LOG.info("engine %s (%s %s, built in %.1f s)", engine_path, fl.name, fl.version, built.seconds)
    return entry


def _as_shipped(exported: ExportedGraph, fl: Flavour, targets, opt_level: int | None) -> tuple:
    """``(targets, opt_level)``: those given, else the ones the engine beside the export was
    built with (``export --compute-capability/--opt-level``), when it is this flavour's; else
    the defaults (all targets, level 3). An export built for a subset, or at another level,
    was rebuilt on the deployment machine, or refused there for the default targets."""
    beside = exported.meta.get("tensorrt") or {}
    if beside.get("flavour") == fl.name:
        targets = targets if targets is not None else beside.get("targets")
        opt_level = opt_level if opt_level is not None else beside.get("opt_level")
    return targets, 3 if opt_level is None else opt_level


def engine_for(exported: ExportedGraph, *, flavour: str | Flavour | None = None, targets=None,
               opt_level: int | None = None, cache_dir=None) -> tuple[bytes, dict, str]:
    """The serialized engine for ``exported``: the one beside it (``export_engine``) when its
    record matches, else the cached one, else built and cached. ``targets`` and ``opt_level``
    default to the shipped engine's (``_as_shipped``).

    Returns:
        (plan, engine record, where it came from: a path).
    """
    fl = tensorrt_flavour(flavour)
    targets, opt_level = _as_shipped(exported, fl, targets, opt_level)
    targets = _targets_for(exported, fl, targets)
    record = _record_for(exported, fl, targets, opt_level)
    beside = exported.meta.get("tensorrt") or {}
    engine_path = exported.path / ENGINE_NAME
    if beside.get("record") == record and engine_path.is_file():
        plan = engine_path.read_bytes()  # read once: hashed and used
        if hashlib.sha256(plan).hexdigest() == beside.get("engine_sha256"):
            return plan, record, str(engine_path)
        _LOG.warning("%s: does not match %s (changed since export); using the engine cache", engine_path, META_NAME)
    cache_dir = Path(cache_dir or cache_root())
    cache = EngineCache(cache_dir)
    plan = cache.lookup(record)
    if plan is None:
        timing = None if fl.portable else cache_dir / f"timing-{fl.name}-{fl.version}.cache"
        plan = build_engine(exported, flavour=fl, targets=targets, opt_level=opt_level, timing_cache=timing).plan
        cache.store(record, plan)
    return plan, record, str(cache.paths(engine_key(record))[0])


# ---------------------------------------------------------------------------------------------
# Run (both flavours; needs a GPU the engine runs on, and JAX on it)
# ---------------------------------------------------------------------------------------------


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("dtype", ctypes.c_uint8 * 4), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


def _dlpack_pointer(array: jax.Array, stream: int) -> tuple[int, object]:
    """Device pointer of a JAX array exported by DLPack, ready for use on ``stream``.

    Returns the pointer and the capsule, which must stay alive while the pointer is in use.
    """
    capsule = array.__dlpack__(stream=stream)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    tensor = _DLTensor.from_address(get(capsule, b"dltensor"))  # DLManagedTensor starts with its DLTensor
    if tensor.strides:
        expected = np.cumprod((1,) + tuple(array.shape[::-1]))[:-1][::-1]
        if any(tensor.strides[i] != expected[i] for i in range(tensor.ndim)):
            raise ValueError("TensorRT needs row-major contiguous inputs")
    return tensor.data + tensor.byte_offset, capsule


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTUnavailable("backend 'tensorrt' needs cuda-python for its CUDA stream") from None
    return cudart


class TensorRTRunner(Runner):
    """An exported graph run by a TensorRT engine of either flavour: ``velocity(x, t, cond)``,
    ``encode(ids)`` or ``decode_latents(z)`` (the ``Runner`` protocol).

    Args:
        exported: an ``ExportedGraph`` or an export directory.
        cache_dir: the cache root (engines, timing and runtime caches); default ``cache_root()``.
        opt_level: the builder optimization level (default: the shipped engine's, else 3).
        flavour: ``"tensorrt"`` / ``"tensorrt_rtx"`` (default: see ``tensorrt_flavour``).
        targets: TensorRT-RTX's compute capabilities (default: the shipped engine's, else all
            but 7.5).

    Raises:
        TensorRTUnavailable: TensorRT is missing, or the engine cannot run here (no GPU visible
            to JAX, or one the engine does not target); checked before anything is built.
    """

    backend = "tensorrt"
    on_device = True

    def __init__(self, exported, *, cache_dir=None, opt_level: int | None = None, flavour: str | None = None,
                 targets=None):
        self.flavour = tensorrt_flavour(flavour)
        trt = self.flavour.trt
        self.exported = exported if isinstance(exported, ExportedGraph) else load_export(exported)
        self.spec = self.exported.spec
        targets, opt_level = _as_shipped(self.exported, self.flavour, targets, opt_level)
        targets = _targets_for(self.exported, self.flavour, targets)
        gpu = local_gpu()
        reason = self.flavour.cannot_run(targets, gpu)
        if reason:  # before building: the engine could not be used (`streamflow-jax export` builds it anyway)
            raise TensorRTUnavailable(f"a {self.flavour.name} engine cannot run here: {reason}")
        cache_dir = Path(cache_dir or cache_root())
        plan, self.record, self.engine_path = engine_for(self.exported, flavour=self.flavour, targets=targets,
                                                         opt_level=opt_level, cache_dir=cache_dir)
        self._runtime = trt.Runtime(_process_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"{self.engine_path}: {self.flavour.name} could not deserialize the engine")
        # TensorRT-RTX's just-in-time kernels are per GPU architecture: one runtime cache each
        self._runtime_cache_path = (cache_dir / "engines" / f"{engine_key(self.record)}-"
                                    f"{_cc_name(gpu.compute_capability).lower()}.runtime-cache"
                                    if self.flavour.portable else None)
        self.context, self._runtime_cache = self.flavour.execution_context(self.engine, self._runtime_cache_path)
        self._seen_shapes: set = set()
        self._cudart = _cudart()
        err, self._stream = self._cudart.cudaStreamCreate()
        if int(err) != 0:
            raise RuntimeError(f"cudaStreamCreate failed: {err}")
        self._in_dtype = {t.name: np.dtype(t.dtype) for t in self.spec.inputs}
        self._out_dtype = {t.name: jnp.dtype(_DTYPES[self.engine.get_tensor_dtype(t.name).name])
                           for t in self.spec.outputs}

    def run(self, feeds: dict) -> jax.Array:
        """The engine's first output for inputs named as in the spec (checked against it first)."""
        feeds = {k: jnp.asarray(v, self._in_dtype.get(k, np.float32)) for k, v in feeds.items()}
        bound = self.spec.check(feeds)
        stream = int(self._stream)
        keep = []
        for name, arr in feeds.items():
            self.context.set_input_shape(name, tuple(arr.shape))
            ptr, capsule = _dlpack_pointer(arr, stream)
            keep.append(capsule)
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for spec_t in self.spec.outputs:
            shape = tuple(dim_value(d, bound) for d in spec_t.shape)
            out = jnp.empty(shape, self._out_dtype[spec_t.name])
            ptr, capsule = _dlpack_pointer(out, stream)
            keep.append(capsule)
            self.context.set_tensor_address(spec_t.name, ptr)
            outputs[spec_t.name] = out
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self.flavour.name} execute_async_v3 failed")
        self._cudart.cudaStreamSynchronize(self._stream)  # outputs complete before JAX reads them
        del keep
        shapes = tuple(sorted(bound.items()))
        if self._runtime_cache is not None and shapes not in self._seen_shapes:
            # new shapes may have compiled new kernels: keep them for the next process
            self._seen_shapes.add(shapes)
            write_atomic(self._runtime_cache_path, bytes(self._runtime_cache.serialize()))
        return outputs[self.spec.outputs[0].name]
