"""TensorRT backend: a dynamic-shape engine built from the exported ONNX graph.

Written against the TensorRT 10/11 Python API. TensorRT cannot be installed on the machines
this project is developed and tested on, so the engine build and execution below have NOT
been run; the pure parts (engine cache keys, stale-entry handling, profiles, shape checks, the
ONNX graph TensorRT would parse) are tested. See README, "Backends".

- Build: strongly typed network (TensorRT 10's flag; 11 is always strongly typed) from the ONNX
  file, one optimization profile from the ``ExportSpec``, a persistent timing cache, a
  builder optimization level.
- Cache: engines stored on disk keyed by (ONNX SHA-256, profile, dtype, TensorRT version,
  GPU name, optimization level); an entry whose record or plan does not match is rebuilt.
- Run: ``execute_async_v3`` on a CUDA stream; JAX arrays are passed by DLPack both ways,
  made ready for that stream on the way in and synchronized before JAX sees the output.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax.backends import cache_root
from streamflow_jax.export.onnx import ExportedGraph, load_export
from streamflow_jax.export.spec import dim_value
from streamflow_jax.fsutil import write_atomic


class TensorRTUnavailable(RuntimeError):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "backend 'tensorrt' needs the TensorRT Python package (pip install 'streamflow-jax[tensorrt]') "
            "and an NVIDIA GPU"
        ) from None
    return trt


# ---------------------------------------------------------------------------------------------
# Engine cache (pure; tested without TensorRT)
# ---------------------------------------------------------------------------------------------


def engine_record(exported: ExportedGraph, *, tensorrt_version: str, gpu_name: str, opt_level: int) -> dict:
    """Everything an engine depends on; its hash is the cache key."""
    return {
        "onnx_sha256": exported.meta["sha256"],
        "profile": {k: [list(s) for s in v] for k, v in exported.spec.profile().items()},
        "dtype": exported.spec.dtype,
        "tensorrt": tensorrt_version,
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
# Build and run (TensorRT 10/11; not exercised here)
# ---------------------------------------------------------------------------------------------


def build_engine(exported: ExportedGraph, *, opt_level: int = 3, timing_cache: Path | None = None,
                 workspace_bytes: int | None = None) -> bytes:
    """Parses the ONNX file and builds a serialized engine with the spec's profile."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # absent in 11: always on
    network = builder.create_network(0 if strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(exported.onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ValueError(f"{exported.onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in exported.spec.profile().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{exported.onnx_path}: TensorRT failed to build an engine (see the log above)")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


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


class TensorRTRunner:
    """An exported graph run by a TensorRT engine (built once, cached on disk):
    ``velocity(x, t, cond)`` or ``decode_latents(z)``."""

    backend = "tensorrt"

    def __init__(self, exported, *, cache_dir=None, opt_level: int = 3):
        trt = import_tensorrt()
        cache_dir = Path(cache_dir or cache_root())
        self.exported = exported if isinstance(exported, ExportedGraph) else load_export(exported)
        self.spec = self.exported.spec
        gpu = jax.devices()[0]
        if gpu.platform != "gpu":
            raise TensorRTUnavailable("backend 'tensorrt' needs JAX on an NVIDIA GPU (pip install 'streamflow-jax[cuda]')")
        cache = EngineCache(cache_dir)
        record = engine_record(self.exported, tensorrt_version=trt.__version__, gpu_name=gpu.device_kind,
                               opt_level=opt_level)
        plan = cache.lookup(record)
        if plan is None:
            plan = build_engine(self.exported, opt_level=opt_level,
                                timing_cache=Path(cache_dir) / f"timing-{trt.__version__}.cache")
            cache.store(record, plan)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the cached engine")
        self.context = self.engine.create_execution_context()
        self._cudart = _cudart()
        err, self._stream = self._cudart.cudaStreamCreate()
        if int(err) != 0:
            raise RuntimeError(f"cudaStreamCreate failed: {err}")
        self._out_dtype = {t.name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(t.name))) for t in self.spec.outputs}

    def velocity(self, x, t, cond):
        x = jnp.asarray(x)
        t = jnp.asarray(t, jnp.float32)
        feeds = {"x": x, "t": jnp.full(x.shape[:1], t) if t.ndim == 0 else t}
        feeds.update({n: cond[n] for n in self.spec.cond_names})
        return self.run(feeds).astype(x.dtype)

    def decode_latents(self, latents):
        return self.run({"latents": latents})

    def run(self, feeds: dict) -> jax.Array:
        """The engine's first output for inputs named as in the spec (checked against it first)."""
        feeds = {k: jnp.asarray(v, jnp.float32) for k, v in feeds.items()}
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
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self._cudart.cudaStreamSynchronize(self._stream)  # outputs complete before JAX reads them
        del keep
        return outputs[self.spec.outputs[0].name]
