"""streamflow-jax: rectified-flow image generators compiled with JAX/XLA.

The public API, re-exported explicitly::

    import streamflow_jax as sf
    sf.convert(src, dst)                      # diffusers dir -> converted dir
    model = sf.load(path)                     # converted or diffusers dir -> FlowModel
    v = model.velocity(x, t, cond)            # [B,H,W,C], [B], dict -> [B,H,W,C]
    x0 = sf.sample(model, noise, ts, cond)    # ts: [S+1] or [S+1, B]; backend="xla" | ...
    pipe = sf.Pipeline.from_diffusers(path)   # the pipeline class from model_index.json
    styled = sf.apply_loras(model, ["lora.safetensors:0.8"])  # same structure: nothing recompiles

Importing it changes no global state: the CLI, the server and the pipelines' loaders turn on
JAX's persistent compilation cache (``sf.enable_compilation_cache()`` does it for your own code).
"""

from streamflow_jax import schedules
from streamflow_jax._version import __version__
from streamflow_jax.backends import enable_compilation_cache, sample
from streamflow_jax.checkpoint import convert, load, save
from streamflow_jax.errors import ConfigError, ConversionError, ExportError, RequestError, ShapeError
from streamflow_jax.lora import apply_loras
from streamflow_jax.models import FlowModel
from streamflow_jax.pipelines import Pipeline
from streamflow_jax.sharding import make_mesh, shard
from streamflow_jax.sampling import Guidance, euler_step, guided_velocity
from streamflow_jax.stream import StreamEngine

__all__ = [
    "ConfigError",
    "ConversionError",
    "ExportError",
    "FlowModel",
    "Guidance",
    "Pipeline",
    "RequestError",
    "ShapeError",
    "StreamEngine",
    "__version__",
    "apply_loras",
    "convert",
    "enable_compilation_cache",
    "euler_step",
    "guided_velocity",
    "load",
    "make_mesh",
    "sample",
    "save",
    "schedules",
    "shard",
]
