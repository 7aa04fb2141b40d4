"""The server under load, on this machine, JSON.

1. ``throughput``: 32 concurrent clients, each sending n=1 requests (digits model, 8 steps,
   its default CFG 3.0) one after another to ``streamflow-jax serve --slots 8 --streams 4``
   (32 slots, 4 join per step): images/s and p50/p99 latency, against in-process batched
   sampling of the same work (``DigitsPipeline.__call__`` on batches of 32, 8 steps, CFG), which
   is the ceiling: no HTTP, no PNG, no per-request admission.
2. ``memory``: the server's resident memory (VmRSS) after warm-up, after 1,000 and after 10,000
   requests.
3. ``realtime``: one WebSocket stream (8 frames in flight) sending 64x64 JPEG frames at a fixed
   rate (60/s) for a while: frames/s processed, dropped, per-frame latency (frame in -> result out,
   server side).

The clients run in this process on the same cores as the server: the figures include them.

    python benchmarks/serve_load.py [--requests 10000] [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment  # noqa: E402


class Server:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "streamflow_jax.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.perf_counter()
        for line in self.proc.stdout:
            if line.startswith("serving "):
                self.url = line.split(" on ", 1)[1].split()[0]
                break
        else:
            raise RuntimeError("the server did not start")
        self.startup_s = time.perf_counter() - t0
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(kb / 1024, 1)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(120)


async def load(url: str, requests: int, clients: int, steps: int) -> dict:
    """``clients`` closed-loop clients sharing ``requests`` n=1 requests; latencies in seconds."""
    import httpx

    latencies, errors, counter = [], [], iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def one_client():
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post("/v1/images/generations", json={"prompt": str(i % 10), "steps": steps, "seed": i})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(r.status_code)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1)  # noqa: E731
    return {"requests": requests, "clients": clients, "ok": len(lat), "errors": len(errors), "wall_s": round(wall, 2),
            "images_per_s": round(len(lat) / wall, 1), "latency_ms": {"p50": q(0.5), "p99": q(0.99),
                                                                      "mean": round(statistics.mean(lat) * 1000, 1)}}


def batched_reference(n: int, steps: int, batch: int) -> dict:
    import numpy as np

    from streamflow_jax.pipelines import DigitsPipeline

    pipe = DigitsPipeline.load()
    labels = np.arange(batch) % 10
    pipe(labels, steps=steps, seed=0, progress=False)  # compiles
    t0 = time.perf_counter()
    for k in range(n // batch):
        pipe(labels, steps=steps, seed=k, progress=False)
    wall = time.perf_counter() - t0
    return {"images": n // batch * batch, "batch": batch, "wall_s": round(wall, 2),
            "images_per_s": round(n // batch * batch / wall, 1)}


async def realtime(url: str, seconds: float, fps: float, steps: int, strength: float) -> dict:
    import websockets
    from PIL import Image

    frames = []
    for v in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (30 * v, 200 - 20 * v, 90)).save(buf, format="JPEG")
        frames.append(buf.getvalue())
    results, errors = [], []
    async with websockets.connect(url.replace("http://", "ws://") + "/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"prompt": "3", "steps": steps, "strength": strength}))
        sent = 0

        async def sender():
            nonlocal sent
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                await ws.send(frames[sent % len(frames)])
                sent += 1
                await asyncio.sleep(max(0.0, t0 + sent / fps - time.perf_counter()))

        async def receiver():
            while True:
                msg = json.loads(await ws.recv())
                if "error" in msg:
                    errors.append(msg)
                    continue
                await ws.recv()
                results.append((time.perf_counter(), msg))

        recv = asyncio.ensure_future(receiver())
        t0 = time.perf_counter()
        await sender()
        await asyncio.sleep(2.0)  # the last frames in flight
        recv.cancel()
    done = [m for t, m in results if t - t0 <= seconds]
    lat = sorted(m["latency_ms"] for _, m in results)
    return {"seconds": seconds, "sent": sent, "sent_fps": round(sent / seconds, 1), "processed": len(results),
            "frames_per_s": round(len(done) / seconds, 1), "dropped": results[-1][1]["dropped"] if results else None,
            "errors": len(errors), "latency_ms": {"p50": lat[len(lat) // 2], "p99": lat[int(0.99 * (len(lat) - 1))]}
            if lat else None, "steps": steps, "strength": strength}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10000, help="requests for the memory figure (1,000 and this)")
    p.add_argument("--throughput-requests", type=int, default=1280)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rt-seconds", type=float, default=15)
    p.add_argument("--rt-fps", type=float, default=60)
    p.add_argument("--smoke", action="store_true", help="a few requests of each kind (checks the script)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.smoke:
        args.requests, args.throughput_requests, args.rt_seconds = 200, 128, 3
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    ref = batched_reference(args.throughput_requests, args.steps, 32)
    server = Server(["--slots", "8", "--streams", "4", "--max-queue", "64", "--frames-in-flight", "8"])
    try:
        rss = {"after_warm_up": server.rss_mib()}
        asyncio.run(load(server.url, 64, args.clients, args.steps))  # first requests, connections
        cpu0, client0 = server.cpu_s(), time.process_time()
        tp = asyncio.run(load(server.url, args.throughput_requests, args.clients, args.steps))
        # where the two cores went: the server (XLA's threads included) and this process's clients
        tp["cpu_s"] = {"server": round(server.cpu_s() - cpu0, 1), "clients": round(time.process_time() - client0, 1),
                       "available": round(os.cpu_count() * tp["wall_s"], 1)}
        done = 64 + args.throughput_requests
        for mark in sorted({1000, args.requests}):
            if mark > done:
                asyncio.run(load(server.url, mark - done, args.clients, args.steps))
                done = mark
            rss[f"after_{mark}_requests"] = server.rss_mib()
        rt = asyncio.run(realtime(server.url, args.rt_seconds, args.rt_fps, steps=16, strength=0.5))
        rss["after_realtime"] = server.rss_mib()
        status = server.stop()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    emit({"benchmark": "serve_load", "env": environment(), "server_startup_s": round(server.startup_s, 1),
          "batched_reference": ref, "throughput": tp,
          "throughput_vs_batched": round(tp["images_per_s"] / ref["images_per_s"], 3),
          "rss_mib": rss, "realtime": rt, "exit_status": status}, args.out)


if __name__ == "__main__":
    main()
