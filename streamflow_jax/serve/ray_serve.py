"""``streamflow-jax serve --replicas N``: N engine replicas as a Ray Serve deployment, one API.

Each replica is a Ray actor that loads the model, compiles it (the deployment is ready only
then) and serves the same ASGI app as a single server (``create_app``), behind Ray Serve's
HTTP proxy on ``--host``/``--port``; Ray's router spreads requests over the replicas, and each
response names its replica (``x-streamflow-replica``). With ``RAY_ADDRESS`` unset, Ray starts
on this machine; set, the deployment goes to that cluster (every node needs this library and
the model directory at the same path).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

ENV_PASSED = ("JAX_PLATFORMS", "XLA_FLAGS", "STREAMFLOW_JAX_CACHE", "STREAMFLOW_JAX_XLA_CACHE", "PYTHONPATH",
              "XLA_PYTHON_CLIENT_PREALLOCATE")


def _replica_name() -> str:
    from ray import serve

    try:
        rid = serve.get_replica_context().replica_id
        tag = getattr(rid, "unique_id", None) or str(rid)
    except Exception:  # outside a replica
        tag = str(os.getpid())
    return f"{socket.gethostname()}:{tag}"


def gpus_per_replica(cluster_gpus: float, devices: int | None, replicas: int, *, local: bool) -> int:
    """The GPUs each replica asks Ray for: none on a cluster without GPUs, else ``--devices``
    (1 by default). Ray then gives each replica GPUs of its own (it sets the replica's
    ``CUDA_VISIBLE_DEVICES``); asking for none, every replica would see every GPU, take the
    first as its default device and preallocate memory on all of them.

    Raises:
        ValueError: on a local Ray (``local``) with fewer GPUs than the replicas need (Ray
            would leave the extra replicas pending, and the deployment would never be ready).
            A cluster (``RAY_ADDRESS``) may add nodes, so there the count is not checked.
    """
    if not cluster_gpus:
        return 0
    per = devices or 1
    if local and per * replicas > cluster_gpus:
        raise ValueError(f"--replicas {replicas} with {per} GPU(s) each needs {per * replicas} GPUs; this machine "
                         f"has {int(cluster_gpus)} (fewer --replicas, or fewer --devices)")
    return per


def actor_options(env: dict, gpus: int) -> dict:
    """A replica's ``ray_actor_options``: its GPUs (``gpus_per_replica``), no CPUs (CPU counts
    are for Ray's scheduling only: a replica uses what XLA gives it), and the environment."""
    return {"num_cpus": 0, "num_gpus": gpus, "runtime_env": {"env_vars": env}}


def build_deployment(load: dict, options: dict, replicas: int, gpus: int = 0):
    """The Ray Serve application: ``replicas`` copies of the server, each built from ``load``
    (``load_served``'s arguments, plus ``devices``/``strategy`` for a mesh made on the replica)
    and ``options`` (``Options`` fields), each with ``gpus`` GPUs of its own."""
    from ray import serve

    @serve.ingress()
    class StreamflowReplica:
        def __init__(self, load: dict, options: dict):
            from streamflow_jax.backends.cache import enable_compilation_cache
            from streamflow_jax.serve.app import create_app, warm_up
            from streamflow_jax.serve.models import load_served

            enable_compilation_cache()
            load = dict(load)
            devices, strategy = load.pop("devices", None), load.get("strategy", "fsdp")
            if devices:
                from streamflow_jax.sharding import make_mesh

                load["mesh"] = (make_mesh(devices, data=1, model=devices) if strategy == "tensor"
                                else make_mesh(devices, data=devices, model=1))
            served = load_served(**load)
            warm_up(served, _options(options).max_n)  # the replica is ready once compiled
            self.asgi_app = create_app(served=served, warm_up=False, **dict(options, replica=_replica_name()))

        def __serve_build_asgi_app__(self):
            return self.asgi_app

    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    opts = _options(options)  # the Options defaults, written once
    max_ongoing = opts.max_queue + load.get("slots_per_stream", 4) * load.get("streams", 2)
    deployment = serve.deployment(
        StreamflowReplica, name="streamflow", num_replicas=replicas, max_ongoing_requests=max_ongoing,
        ray_actor_options=actor_options(env, gpus),
        graceful_shutdown_timeout_s=opts.timeout + 5, health_check_period_s=5)
    return deployment.bind(load, options)


def _options(opts: dict):
    from streamflow_jax.serve.app import Options

    return Options(**opts)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_ray(load: dict, options: dict, *, replicas: int, host: str = "127.0.0.1", port: int = 8000,
              name: str = "model") -> int:
    """Starts (or joins, with ``RAY_ADDRESS``) Ray, runs the deployment, prints the serving line,
    and waits for a signal: the first shuts Serve down gracefully (replicas finish their requests)
    and exits 0, a second exits at once."""
    import ray
    from ray import serve

    _options(options)  # refuse bad options before starting anything
    address = os.environ.get("RAY_ADDRESS")
    # "local": always a Ray of our own when RAY_ADDRESS is unset, even where `ray start` runs one
    ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING", log_to_driver=True,
             **({} if address else {"num_cpus": os.cpu_count()}))
    try:
        gpus = gpus_per_replica(ray.cluster_resources().get("GPU", 0), load.get("devices"), replicas,
                                local=not address)
    except ValueError:
        ray.shutdown()
        raise
    stop = threading.Event()
    signals = []

    def on_signal(sig, frame):
        if signals:
            os.write(2, f"streamflow-jax serve: second {signal.Signals(sig).name}, exiting now\n".encode())
            os._exit(128 + sig)
        signals.append(sig)
        print(f"streamflow-jax serve: {signal.Signals(sig).name}: draining the replicas (a second signal exits "
              "at once)", flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        # port 0: a free one picked just before Serve binds it (after ray.init, whose processes
        # bind ports of their own: one picked before could be taken by then)
        port = port or _free_port(host)
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_deployment(load, options, replicas, gpus), name="streamflow", route_prefix="/")
        print(f"serving {name} on http://{host}:{port} ({replicas} replicas on Ray Serve"
              f"{', cluster ' + address if address else ', local Ray'}"
              f"{f', {gpus} GPU(s) each' if gpus else ''})", flush=True)
        while not stop.wait(0.5):
            pass
        serve.shutdown()
    finally:
        ray.shutdown()
    sys.stdout.flush()
    return 0
