"""Peak memory of converting a large sharded checkpoint: ``streamflow-jax convert`` under
``/usr/bin/time -v``, JSON.

Writes a random SD3-architecture diffusers checkpoint of about ``--gb`` GB in float32, in
shards of at most ``--shard-gb`` GB (with its index, as ``save_pretrained`` does), then converts
it in a separate process and reads that process's maximum resident set size (memory-mapped
pages it touched count). Target: <= 1.5 GB + the largest shard.

    python benchmarks/convert_memory.py [--gb 6] [--shard-gb 2] [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment  # noqa: E402


def write_checkpoint(root: Path, gb: float, shard_gb: float) -> dict:
    """A random SD3Transformer2DModel directory of about ``gb`` GB (fp32), sharded."""
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from streamflow_jax.models import abstract_module, family_of, flat_params
    from streamflow_jax.models.mmdit import SD3Config

    # width and depth chosen so the parameters come to about `gb` GB of float32
    layers = max(2, int(round(gb * 1e9 / 4 / (36 * 1536 ** 2))))  # a joint block holds ~36 D^2 weights
    cfg = SD3Config(num_layers=layers, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=96)
    fam = family_of("SD3Transformer2DModel")
    _, state = nnx.split(abstract_module(fam, cfg))
    shapes, _, names = flat_params(nnx.to_pure_dict(state))
    root.mkdir(parents=True)
    raw = {"_class_name": "SD3Transformer2DModel",
           **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}}
    (root / "config.json").write_text(json.dumps(raw))
    rng = np.random.default_rng(0)
    weight_map, shard, size, index, total = {}, {}, 0, 0, 0
    limit = shard_gb * 1e9

    def flush():
        nonlocal shard, size, index
        if shard:
            name = f"diffusion_pytorch_model-{index:05d}.safetensors"
            save_file(shard, root / name)
            weight_map.update({k: name for k in shard})
            shard, size, index = {}, 0, index + 1

    for n in names:
        shape = tuple(shapes[n].shape)
        key = re.sub(r"\.kernel$", ".weight", n)
        if n.endswith(".kernel"):  # PyTorch layout: Linear [out, in], Conv [O, I, kh, kw]
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        nbytes = int(np.prod(shape)) * 4
        if size + nbytes > limit:
            flush()
        shard[key] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        size += nbytes
        total += nbytes
    flush()
    n_shards = index
    renamed = {}
    for i in range(n_shards):  # save_pretrained's names: -0000i-of-0000n
        old = root / f"diffusion_pytorch_model-{i:05d}.safetensors"
        new = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        old.rename(root / new)
        renamed[old.name] = new
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    (root / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    largest = max((root / f).stat().st_size for f in set(weight_map.values()))
    return {"layers": layers, "params_B": total / 4 / 1e9, "bytes": total, "shards": n_shards,
            "largest_shard_bytes": largest}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=6.0)
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--dtype", default=None, help="convert to this dtype (default: keep float32)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        t0 = time.perf_counter()
        info = write_checkpoint(work / "src", args.gb, args.shard_gb)
        info["write_s"] = round(time.perf_counter() - t0, 1)
        cmd = [sys.executable, "-m", "streamflow_jax", "convert", str(work / "src"), str(work / "dst"), "-q"]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"conversion failed:\n{proc.stderr[-3000:]}")
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        peak = peak_kb * 1024
        budget = 1.5e9 + info["largest_shard_bytes"]
        out_bytes = sum(f.stat().st_size for f in (work / "dst").rglob("*") if f.is_file())
        emit({"benchmark": "convert_memory", "source": info, "dtype": args.dtype or "float32",
              "convert_s": round(seconds, 1), "peak_rss_bytes": peak, "peak_rss_gb": round(peak / 1e9, 2),
              "budget_gb": round(budget / 1e9, 2), "within_budget": peak <= budget,
              "output_bytes": out_bytes, "env": environment()}, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
