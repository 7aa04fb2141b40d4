"""ONNX Runtime backend: an exported velocity graph run by an ``InferenceSession``.

It implements the velocity protocol, so ``sampling`` drives it with the same Euler step and
the same CFG code as the XLA path.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from streamflow_jax.export.onnx import ExportedGraph, load_export


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeRunner:
    """An exported graph run by ONNX Runtime: ``velocity(x, t, cond)`` or ``decode_latents(z)``.

    Args:
        exported: an ``ExportedGraph`` or an export directory.
        providers: ONNX Runtime execution providers (default: CUDA when present, then CPU).
    """

    backend = "onnxruntime"

    def __init__(self, exported, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
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

    def run(self, feeds: dict) -> np.ndarray:
        """The graph's first output for inputs named as in the spec (checked against it first)."""
        # C-contiguous numpy arrays of the graph's dtypes are handed to ONNX Runtime without a copy
        dtypes = {t.name: np.dtype(t.dtype) for t in self.spec.inputs}
        feeds = {k: np.ascontiguousarray(v, dtype=dtypes.get(k, np.float32)) for k, v in feeds.items()}
        self.spec.check(feeds)
        return self.session.run(self._outputs, feeds)[0]

    def velocity(self, x, t, cond):
        """``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]`` -> ``[B, H, W, C]`` in x's dtype."""
        x_np = np.asarray(x, dtype=np.float32)
        t_np = np.asarray(t, np.float32)
        feeds = {"x": x_np, "t": np.full(x_np.shape[:1], t_np) if t_np.ndim == 0 else t_np}
        missing = [n for n in self.spec.cond_names if n not in cond]
        if missing:
            raise ValueError(f"cond lacks {missing} (the graph takes {self.spec.cond_names})")
        feeds.update({n: cond[n] for n in self.spec.cond_names})
        return jnp.asarray(self.run(feeds)).astype(jnp.asarray(x).dtype)

    def encode(self, ids):
        """A text-encoder graph: ``[B, L]`` token ids -> ``[B, L, D]`` last hidden state."""
        return jnp.asarray(self.run({"ids": ids}))

    def decode_latents(self, latents):
        """A decoder graph: ``[B, h, w, C]`` scaled latents -> ``[B, H, W, 3]`` images."""
        return jnp.asarray(self.run({"latents": latents}))
