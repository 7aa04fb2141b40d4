"""`streamflow-jax serve --replicas 2` on a local Ray (RAY_ADDRESS unset): one API, two engine
replicas, each request answered by one of them (x-streamflow-replica), SIGTERM exits 0."""

from __future__ import annotations

import concurrent.futures

import pytest
from conftest import ServerProcess

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")


def test_two_replicas_behind_one_api():
    server = ServerProcess(["--replicas", "2", "--slots", "2", "--streams", "1"], startup_s=400,
                           env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        assert "2 replicas on Ray Serve, local Ray" in server.log
        url = server.url

        def generate(i):
            return httpx.post(url + "/v1/images/generations", json={"prompt": str(i % 10), "steps": 16, "seed": i},
                              timeout=120)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(generate, range(24)))
        assert all(r.status_code == 200 and len(r.json()["data"]) == 1 for r in responses)
        replicas = [r.headers.get_list("x-streamflow-replica") for r in responses]
        assert all(len(names) == 1 for names in replicas)  # each request answered by one replica
        assert len({names[0] for names in replicas}) == 2, replicas
        bad = httpx.post(url + "/v1/images/generations", json={"prompt": "3", "n": 0}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
        assert server.stop() == 0
    finally:
        server.stop(timeout=30)


def test_each_replica_asks_for_gpus_of_its_own():
    """On a cluster with GPUs each replica asks Ray for ``--devices`` GPUs (1 by default), so
    that Ray gives it cards of its own; none on a CPU cluster (as the test above runs)."""
    from streamflow_jax.serve.ray_serve import actor_options, gpus_per_replica

    assert gpus_per_replica(0, None, 4, local=True) == 0
    assert gpus_per_replica(8, None, 4, local=True) == 1
    assert gpus_per_replica(8, 2, 4, local=True) == 2
    with pytest.raises(ValueError, match=r"--replicas 3 with 2 GPU\(s\) each needs 6 GPUs; this machine has 4"):
        gpus_per_replica(4, 2, 3, local=True)
    assert gpus_per_replica(4, 2, 3, local=False) == 2  # a cluster may grow: Ray queues the rest
    assert actor_options({"XLA_FLAGS": "x"}, 1) == {"num_cpus": 0, "num_gpus": 1,
                                                    "runtime_env": {"env_vars": {"XLA_FLAGS": "x"}}}
