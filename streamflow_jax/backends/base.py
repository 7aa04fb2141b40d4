"""The Runner protocol: what every backend's runner of an exported graph does.

A runner wraps one exported graph (``export.onnx.ExportedGraph``) and runs it with its engine
(``run(feeds)``); the rest is shared here: the velocity protocol (``velocity(x, t, cond)``), a text
encoder's ``encode(ids)``, an autoencoder's ``decode_latents(latents)``, and ``covers(feeds)``,
whether the graph's profile takes inputs of these shapes. A backend is a ``Runner`` subclass
plus one ``Backend`` line in ``backends.BACKENDS``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from streamflow_jax.errors import ShapeError


@dataclasses.dataclass(frozen=True)
class Backend:
    """One entry of the backend registry.

    Attributes:
        name: the ``backend=`` value (and the CLI's ``--backend`` choice).
        summary: one line for help texts.
        runner: ``"module:Class"`` of its ``Runner`` (imported on first use: the engines are
            optional extras), or None for ``xla``, which runs models directly.
    """

    name: str
    summary: str
    runner: str | None = None

    @property
    def exported(self) -> bool:
        """Runs exported graphs (made from a model on first use)."""
        return self.runner is not None


class Runner:
    """An exported graph and the engine that runs it.

    Subclasses set ``backend`` and implement ``__init__(exported, *, cache_dir)`` (the cache root
    for what the engine keeps: every runner takes it, whether it uses it or not) and ``run``.

    Attributes:
        backend: the backend's name.
        exported: the ``ExportedGraph`` (its directory, spec and metadata).
        spec: the graph's ``ExportSpec`` (inputs, outputs, dynamic axes, method).
        on_device: inputs and outputs stay in device memory (JAX arrays in and out); False for
            an engine computing on the host, which ``sf.sample`` then drives with numpy arrays.
    """

    backend: str = ""
    on_device: bool = False
    exported = None
    spec = None

    def __init__(self, exported, *, cache_dir: Path | None = None):
        raise NotImplementedError

    def run(self, feeds: dict):
        """The graph's first output for inputs named as in the spec (checked against it first)."""
        raise NotImplementedError

    @property
    def method(self) -> str:
        """What the graph computes: ``"velocity"``, ``"decode_latents"`` or ``"encode"``."""
        return self.spec.method

    def covers(self, feeds: dict) -> bool:
        """Whether the graph's profile takes inputs of these shapes (anything with ``.shape``)."""
        try:
            self.spec.check(feeds)
        except ShapeError:
            return False
        return True

    def velocity(self, x, t, cond):
        """``[B, H, W, C]``, ``[B]``, dict of ``[B, ...]`` -> ``[B, H, W, C]`` in x's dtype: numpy
        for numpy input (a host loop), a JAX array otherwise."""
        missing = [n for n in self.spec.cond_names if n not in cond]
        if missing:
            raise ValueError(f"cond lacks {missing} (the graph takes {self.spec.cond_names})")
        extra = [n for n in cond if n not in self.spec.cond_names]
        if extra:  # dropped, it would change nothing: a caller expecting it to is told
            raise ValueError(f"cond has {extra}, which the graph does not take (it takes {self.spec.cond_names})")
        host = isinstance(x, np.ndarray)
        xp = np if host else jnp
        t = xp.asarray(t, np.float32)
        feeds = {"x": x, "t": xp.broadcast_to(t, x.shape[:1]) if t.ndim == 0 else t,
                 **{n: cond[n] for n in self.spec.cond_names}}
        out = self.run(feeds)
        if host:
            return np.asarray(out).astype(x.dtype, copy=False)
        return jnp.asarray(out).astype(x.dtype)

    def encode(self, ids):
        """A text-encoder graph: ``[B, L]`` token ids -> ``[B, L, D]`` last hidden state."""
        return jnp.asarray(self.run({"ids": ids}))

    def decode_latents(self, latents):
        """An autoencoder graph: ``[B, h, w, C]`` scaled latents -> ``[B, H, W, 3]`` images."""
        return jnp.asarray(self.run({"latents": latents}))
