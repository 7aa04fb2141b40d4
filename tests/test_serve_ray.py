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
