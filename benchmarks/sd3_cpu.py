"""End-to-end SD3 sampling on CPU: streamflow-jax (XLA) vs diffusers + PyTorch, one run, JSON.

Same random checkpoint, same noise and conditioning, same number of intra-op threads; the
reference is diffusers' own ``FlowMatchEulerDiscreteScheduler`` loop around the torch model.
Our jit compile time is reported separately and excluded from the sampling time.

    python benchmarks/sd3_cpu.py [--configs small tiny] [--steps 28] [--threads N] [--out FILE]

``small`` is a ~31M-parameter SD3 (6 layers, 6 heads x 64, 32x32 latent, 77 text tokens,
batch 2); ``tiny`` is a 2-layer toy where per-call overhead dominates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, set_cpu_threads, timed  # noqa: E402

CONFIGS = {
    "small": dict(model=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
                             attention_head_dim=64, num_attention_heads=6, joint_attention_dim=4096,
                             caption_projection_dim=384, pooled_projection_dim=2048, pos_embed_max_size=32),
                  latent=32, text_len=77, batch=2),
    "tiny": dict(model=dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                            caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8),
                 latent=8, text_len=8, batch=2),
}


def bench_config(name: str, steps: int, repeats: int) -> dict:
    import diffusers
    import jax
    import numpy as np
    import torch

    import streamflow_jax as sf

    spec = CONFIGS[name]
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(**spec["model"]).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = sf.load(tmp)

    b, s, c = spec["batch"], spec["latent"], spec["model"]["in_channels"]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((b, s, s, c), dtype=np.float32)
    cond = {"encoder_hidden_states": rng.standard_normal((b, spec["text_len"], spec["model"]["joint_attention_dim"]),
                                                         dtype=np.float32),
            "pooled_projections": rng.standard_normal((b, spec["model"]["pooled_projection_dim"]), dtype=np.float32)}
    grid = sf.schedules.flow_match(steps)

    # ours: first call compiles; later calls reuse the executable
    t0 = time.perf_counter()
    ours_out = np.asarray(sf.sample(model, noise, grid, cond))
    first_call = time.perf_counter() - t0
    ours = timed(lambda: sf.sample(model, noise, grid, cond), warmup=0, repeats=repeats,
                 sync=jax.block_until_ready)

    # diffusers: scheduler loop as in StableDiffusion3Pipeline (no CFG)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x_t = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    ehs = torch.from_numpy(cond["encoder_hidden_states"])
    pooled = torch.from_numpy(cond["pooled_projections"])

    def torch_sample():
        sched.set_timesteps(steps)
        x = x_t
        with torch.inference_mode():
            for ts in sched.timesteps:
                v = ref(hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled,
                        timestep=ts.expand(b)).sample
                x = sched.step(v, ts, x).prev_sample
        return x

    ref_out = torch_sample().permute(0, 2, 3, 1).numpy()
    theirs = timed(torch_sample, warmup=0, repeats=repeats)
    rel_err = float(np.max(np.abs(ours_out - ref_out)) / np.max(np.abs(ref_out)))
    return {
        "config": name, "params_M": round(n_params / 1e6, 2), "batch": b, "latent": [s, s, c],
        "text_tokens": spec["text_len"], "steps": steps,
        "ours_compile_plus_first_run_s": round(first_call, 3),
        "ours_sample_s": round(ours["mean_s"], 4), "diffusers_sample_s": round(theirs["mean_s"], 4),
        "speedup_vs_diffusers": round(theirs["mean_s"] / ours["mean_s"], 3),
        "max_rel_err_vs_diffusers": rel_err, "repeats": repeats,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["small", "tiny"])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    set_cpu_threads(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    results = [bench_config(name, args.steps, args.repeats) for name in args.configs]
    emit({"benchmark": "sd3_cpu", "threads": args.threads, "env": environment(), "results": results}, args.out)


if __name__ == "__main__":
    main()
