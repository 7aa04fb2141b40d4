"""ONNX Runtime backend: an exported graph run by an ``InferenceSession``.

It implements the velocity protocol, so ``sampling`` drives it with the same Euler step and
the same CFG code as the XLA path: on the CPU provider with numpy arrays (``sf.sample`` runs
its loop on the host, so a step is one graph call and a few numpy operations); with the CUDA
provider (``onnxruntime-gpu`` installed, JAX on the same GPU) with device buffers bound to the
session (``io_binding``), so nothing is copied to the host between steps. The CUDA path has not
run here: the machines this project is built on have no onnxruntime-gpu (see the README).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from streamflow_jax.backends.base import Runner
from streamflow_jax.export.onnx import ExportedGraph, load_export
from streamflow_jax.export.spec import dim_value


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it (the onnxruntime-gpu build), then CPU."""
    import onnxruntime as ort  # optional extra

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeRunner(Runner):
    """An exported graph run by ONNX Runtime: ``velocity(x, t, cond)``, ``encode(ids)`` or
    ``decode_latents(z)`` (the ``Runner`` protocol).

    Args:
        exported: an ``ExportedGraph`` or an export directory.
        cache_dir: unused (ONNX Runtime keeps nothing between processes).
        providers: ONNX Runtime execution providers (default: CUDA when present, then CPU).

    Attributes:
        on_device: the session runs on CUDA and JAX is on a GPU: inputs and outputs stay in
            device memory (JAX arrays in, JAX arrays out).
    """

    backend = "onnxruntime"

    def __init__(self, exported, *, cache_dir=None, providers: list[str] | None = None):
        try:
            import onnxruntime as ort  # optional extra
        except ImportError:
            raise ValueError("backend 'onnxruntime' needs the onnx extra: pip install 'streamflow-jax[onnx]'") from None

        self.exported = exported if isinstance(exported, ExportedGraph) else load_export(exported)
        self.spec = self.exported.spec
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.exported.onnx_path), opts,
                                                providers=providers or default_providers())
        except Exception as e:  # ORT raises its own exception types; name the file
            raise ValueError(f"{self.exported.onnx_path}: ONNX Runtime cannot load it ({e})") from None
        self._outputs = [t.name for t in self.spec.outputs]
        self._dtypes = {t.name: np.dtype(t.dtype) for t in self.spec.inputs}
        gpu = jax.devices()[0]
        self.on_device = "CUDAExecutionProvider" in self.session.get_providers() and gpu.platform == "gpu"
        self._device_id = getattr(gpu, "id", 0)

    def run(self, feeds: dict):
        """The graph's first output for inputs named as in the spec (checked against it first):
        a numpy array, or on the device a JAX array."""
        if self.on_device:
            return self._run_bound(feeds)
        # C-contiguous numpy arrays of the graph's dtypes are handed to ONNX Runtime without a copy
        feeds = {k: np.ascontiguousarray(v, dtype=self._dtypes.get(k, np.float32)) for k, v in feeds.items()}
        self.spec.check(feeds)
        return self.session.run(self._outputs, feeds)[0]

    def _run_bound(self, feeds: dict) -> jax.Array:
        """The CUDA provider with device buffers bound: JAX's input buffers are read in place,
        the output is written into a fresh JAX buffer."""
        arrays = {k: jnp.asarray(v, self._dtypes.get(k, np.float32)) for k, v in feeds.items()}
        bound = self.spec.check(arrays)
        binding = self.session.io_binding()
        for name, a in arrays.items():
            binding.bind_input(name, "cuda", self._device_id, a.dtype, tuple(a.shape), a.unsafe_buffer_pointer())
        out_spec = self.spec.outputs[0]
        shape = tuple(dim_value(d, bound) for d in out_spec.shape)
        out = jnp.zeros(shape, np.dtype(out_spec.dtype))  # a buffer of its own, written by ONNX Runtime
        binding.bind_output(out_spec.name, "cuda", self._device_id, out.dtype, shape, out.unsafe_buffer_pointer())
        jax.block_until_ready((arrays, out))  # inputs computed, output allocated, before ORT touches them
        self.session.run_with_iobinding(binding)
        return out
