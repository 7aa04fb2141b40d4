"""streamflow-jax: rectified-flow image generators compiled with JAX/XLA.

The public API, re-exported explicitly (the table below)::

    import streamflow_jax as sf
    sf.convert(src, dst)                      # diffusers dir -> converted dir
    model = sf.load(path)                     # converted or diffusers dir -> FlowModel
    v = model.velocity(x, t, cond)            # [B,H,W,C], [B], dict -> [B,H,W,C]
    x0 = sf.sample(model, noise, ts, cond)    # ts: [S+1] or [S+1, B]; backend="xla" | ...
    pipe = sf.Pipeline.from_diffusers(path)   # the pipeline class from model_index.json
    styled = sf.apply_loras(model, ["lora.safetensors:0.8"])  # same structure: nothing recompiles
    fast = sf.quantize(model, "fp8")          # e4m3 linear weights with scales
    fixed = sf.calibrate(fast, run)           # static activation scales, measured by run(model)

Importing it changes no global state: the CLI, the server and the pipelines' loaders turn on
JAX's persistent compilation cache (``sf.enable_compilation_cache()`` does it for your own code).
Each name is imported on first use (PEP 562), so ``import streamflow_jax`` (and the CLI's
``--help``, and Ctrl-C while it starts) costs no JAX import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from streamflow_jax._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "streamflow_jax.errors",
    "ConversionError": "streamflow_jax.errors",
    "ExportError": "streamflow_jax.errors",
    "RequestError": "streamflow_jax.errors",
    "ShapeError": "streamflow_jax.errors",
    "FlowModel": "streamflow_jax.models",
    "Guidance": "streamflow_jax.sampling",
    "euler_step": "streamflow_jax.sampling",
    "guided_velocity": "streamflow_jax.sampling",
    "Pipeline": "streamflow_jax.pipelines",
    "StreamEngine": "streamflow_jax.stream",
    "apply_loras": "streamflow_jax.lora",
    "convert": "streamflow_jax.checkpoint",
    "load": "streamflow_jax.checkpoint",
    "save": "streamflow_jax.checkpoint",
    "enable_compilation_cache": "streamflow_jax.backends.cache",
    "sample": "streamflow_jax.backends",
    "make_mesh": "streamflow_jax.sharding",
    "shard": "streamflow_jax.sharding",
    "quantize": "streamflow_jax.quantization",
    "calibrate": "streamflow_jax.quantization",
}
_SUBMODULES = ("schedules",)

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])

if TYPE_CHECKING:  # what static tools see: the same names, imported eagerly
    from streamflow_jax import schedules
    from streamflow_jax.backends import sample
    from streamflow_jax.backends.cache import enable_compilation_cache
    from streamflow_jax.checkpoint import convert, load, save
    from streamflow_jax.errors import ConfigError, ConversionError, ExportError, RequestError, ShapeError
    from streamflow_jax.lora import apply_loras
    from streamflow_jax.models import FlowModel
    from streamflow_jax.pipelines import Pipeline
    from streamflow_jax.quantization import calibrate, quantize
    from streamflow_jax.sampling import Guidance, euler_step, guided_velocity
    from streamflow_jax.sharding import make_mesh, shard
    from streamflow_jax.stream import StreamEngine


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
