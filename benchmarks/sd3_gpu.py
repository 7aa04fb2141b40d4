"""SD3-medium velocity call on one GPU: streamflow-jax (XLA, cuDNN attention) vs diffusers eager
and diffusers under ``torch.compile``, all in one run, JSON.

SD3-medium architecture (2.03B parameters, 24 layers), random weights, 1024^2 images (latent
128x128x16), 154 text tokens, bf16, batch 1 and 2. Both sides hold the same weights: ours are
taken from the torch model on the GPU by DLPack (no host copy). Target: <= 0.9x the torch.compile time
per call (on an H200 diffusers took 49.9 ms eager and 38.4 ms compiled at batch 2).

    python benchmarks/sd3_gpu.py [--batches 1 2] [--repeats 10] [--no-compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch on the same GPU
sys.path.insert(0, os.path.dirname(__file__))
from common import (emit, environment, library_jit, ours_sampler, rel_diff, timed, torch_sampler,  # noqa: E402
                    torch_to_flowmodel)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--text-len", type=int, default=154)
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--sampler-steps", type=int, default=8,
                   help="also time a sampling loop of this many Euler steps at the largest batch, ms per step: "
                        "ours jitted whole (sf.sample), diffusers' a Python loop (0: skip)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on CPU: a 2-layer SD3, 16x16 latent, fp32, no torch.compile")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"

    import dataclasses

    import diffusers
    import jax
    import numpy as np
    import torch

    from streamflow_jax.models.mmdit import SD3Config

    cfg = dataclasses.asdict(SD3Config.sd3_medium())
    tdtype = torch.bfloat16
    if args.smoke:
        cfg.update(num_layers=2, num_attention_heads=2, caption_projection_dim=128, pos_embed_max_size=16)
        args.latent, args.text_len, args.repeats, args.warmup, args.no_compile = 16, 8, 2, 1, True
        tdtype = torch.float32
    jdtype = jax.numpy.bfloat16 if tdtype == torch.bfloat16 else jax.numpy.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        ref = diffusers.SD3Transformer2DModel(**cfg).to(tdtype).eval()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = torch_to_flowmodel({"_class_name": "SD3Transformer2DModel", **cfg}, ref)
    convert_s = time.perf_counter() - t0
    n_params = sum(x.numel() for x in ref.parameters())

    velocity = library_jit(lambda m, x, t, c: m.velocity(x, t, c))
    results = []
    for b in args.batches:
        rng = np.random.default_rng(b)
        x = rng.standard_normal((b, args.latent, args.latent, 16), dtype=np.float32)
        ehs = rng.standard_normal((b, args.text_len, 4096), dtype=np.float32)
        pooled = rng.standard_normal((b, 2048), dtype=np.float32)
        t = np.linspace(0.9, 0.3, b).astype(np.float32)
        xj = jax.device_put(x.astype(jdtype))
        cj = {"encoder_hidden_states": jax.device_put(ehs.astype(jdtype)),
              "pooled_projections": jax.device_put(pooled.astype(jdtype))}
        tj = jax.device_put(t)
        t0 = time.perf_counter()
        ours_v = jax.block_until_ready(velocity(model, xj, tj, cj))
        ours_compile = time.perf_counter() - t0
        ours = timed(lambda: velocity(model, xj, tj, cj), warmup=args.warmup, repeats=args.repeats,
                     sync=jax.block_until_ready, queued=True)

        xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(device, tdtype)
        et = torch.from_numpy(ehs).to(device, tdtype)
        pt = torch.from_numpy(pooled).to(device, tdtype)
        tt = torch.from_numpy(t * 1000).to(device)

        def call(m):
            with torch.inference_mode():
                return m(hidden_states=xt, encoder_hidden_states=et, pooled_projections=pt, timestep=tt).sample

        sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: None)  # noqa: E731
        eager = timed(lambda: call(ref), warmup=args.warmup, repeats=args.repeats, sync=sync, queued=True)
        ref_v = call(ref).float().permute(0, 2, 3, 1).cpu().numpy()
        row = {"batch": b, "ours_ms": 1e3 * ours["mean_s"], "ours_compile_s": ours_compile,
               "diffusers_eager_ms": 1e3 * eager["mean_s"],
               "ours_queued_ms": 1e3 * ours["queued_s"], "diffusers_eager_queued_ms": 1e3 * eager["queued_s"],
               "ours_vs_eager": ours["mean_s"] / eager["mean_s"],
               "max_rel_diff_vs_diffusers": float(np.max(np.abs(np.asarray(ours_v, np.float32) - ref_v))
                                                      / np.max(np.abs(ref_v)))}
        if not args.no_compile and b == max(args.batches):  # one torch.compile (~1 min): the largest batch
            compiled = torch.compile(ref)
            t0 = time.perf_counter()
            call(compiled)
            torch.cuda.synchronize()
            row["torch_compile_s"] = time.perf_counter() - t0
            comp = timed(lambda: call(compiled), warmup=args.warmup, repeats=args.repeats, sync=sync, queued=True)
            row["diffusers_compiled_ms"] = 1e3 * comp["mean_s"]
            row["ours_vs_compiled"] = ours["mean_s"] / comp["mean_s"]
            # back to back, one sync (a sampler's steps): each side's dispatch hidden behind its last call
            row["diffusers_compiled_queued_ms"] = 1e3 * comp["queued_s"]
            row["ours_vs_compiled_queued"] = ours["queued_s"] / comp["queued_s"]
        if args.sampler_steps and b == max(args.batches):
            # what a user's sampling loop costs a step: our scan against diffusers' loop, each
            # dispatching as it does (one program; a call a step without syncs)
            timing, ours_x = ours_sampler(model, xj, cj, args.sampler_steps, repeats=3)
            row.update(timing)
            tb = torch.ones(b, device=device)

            def v_of(m):
                return lambda h, tv: m(hidden_states=h, encoder_hidden_states=et, pooled_projections=pt,
                                       timestep=tb * (1000 * tv)).sample

            row["diffusers_eager_sampler_ms_per_step"], ref_x = torch_sampler(v_of(ref), xt, args.sampler_steps, sync)
            # the two loops sample the same latents (within the dtype's rounding over the steps)
            row["sampler_max_rel_diff_vs_diffusers"] = rel_diff(ours_x, ref_x.float().permute(0, 2, 3, 1).cpu())
            row["ours_vs_eager_sampler"] = row["ours_sampler_ms_per_step"] / row["diffusers_eager_sampler_ms_per_step"]
            if "diffusers_compiled_ms" in row:
                row["diffusers_compiled_sampler_ms_per_step"] = torch_sampler(v_of(compiled), xt, args.sampler_steps,
                                                                              sync)[0]
                row["ours_vs_compiled_sampler"] = (row["ours_sampler_ms_per_step"]
                                                   / row["diffusers_compiled_sampler_ms_per_step"])
        results.append(row)
        print(row, file=sys.stderr, flush=True)

    emit({"benchmark": "sd3_gpu", "model": "SD3-medium architecture, random weights" + (" (SMOKE: tiny, CPU)" if args.smoke else ""),
          "params_B": n_params / 1e9, "latent": [args.latent, args.latent, 16], "text_tokens": args.text_len,
          "dtype": str(tdtype).replace("torch.", ""),
          "torch_build_s": build_s, "convert_s": convert_s, "env": environment(), "results": results}, args.out)


if __name__ == "__main__":
    main()
