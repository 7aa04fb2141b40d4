"""streamflow-jax: rectified-flow image generators compiled with JAX/XLA.

The public API, re-exported explicitly::

    import streamflow_jax as sf
    sf.convert(src, dst)                      # diffusers dir -> converted dir
    model = sf.load(path)                     # converted or diffusers dir -> FlowModel
    v = model.velocity(x, t, cond)            # [B,H,W,C], [B], dict -> [B,H,W,C]
    x0 = sf.sample(model, noise, ts, cond)    # ts: [S+1] or [S+1, B]
"""

__version__ = "0.1.0"

from streamflow_jax import schedules
from streamflow_jax.checkpoint import convert, load, save
from streamflow_jax.converters.common import ConversionError
from streamflow_jax.models import FlowModel
from streamflow_jax.pipelines import Pipeline
from streamflow_jax.sampling import euler_step, guided_velocity, sample
from streamflow_jax.stream import RequestError, StreamEngine

__all__ = [
    "ConversionError",
    "FlowModel",
    "Pipeline",
    "RequestError",
    "StreamEngine",
    "__version__",
    "convert",
    "euler_step",
    "guided_velocity",
    "load",
    "sample",
    "save",
    "schedules",
]
