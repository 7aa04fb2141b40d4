"""The server: OpenAI's images API on the stream engine, a realtime WebSocket, a web page, replicas.

``create_app(model)`` is the ASGI app (Starlette) for any ASGI server; ``streamflow-jax serve``
runs it under uvicorn (``server.serve``) or as Ray Serve replicas (``ray_serve.serve_ray``).
Needs the ``serve`` extra (``ray`` for replicas).

Modules: ``app`` (routes, the request life cycle), ``api`` (validation, OpenAI's error shape),
``worker`` (the device thread that owns the engine), ``realtime`` (``WS /v1/stream``),
``metrics`` (Prometheus), ``models`` (what is served: any prompt pipeline, the digits model),
``server`` (uvicorn with a draining shutdown), ``ray_serve`` (replicas), ``static/`` (the page).
"""

from streamflow_jax.serve.app import Options, create_app
from streamflow_jax.serve.models import DigitsPrompts, Served, load_served

__all__ = ["DigitsPrompts", "Options", "Served", "create_app", "load_served"]
