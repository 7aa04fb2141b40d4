"""Flux.1-dev velocity call on one GPU: streamflow-jax (XLA, cuDNN attention) vs diffusers eager
and diffusers under ``torch.compile``, all in one run, JSON.

Flux.1-dev architecture (11.9B parameters: 19 double + 38 single blocks, guidance embedding),
random weights, 1024^2 images (latent 128x128x16 = 4096 image tokens), 512 text tokens, bf16,
batch 1. Both sides hold the same weights: ours are taken from the torch model on the GPU by
DLPack (no host copy). Target: <= 0.9x the torch.compile time per call (on an H200 diffusers
took 175.7 ms eager and 132.2 ms compiled).

    python benchmarks/flux_gpu.py [--repeats 10] [--no-compile] [--out FILE]
    python benchmarks/flux_gpu.py --smoke      # the same code on CPU with a tiny config
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
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--sampler-steps", type=int, default=0,
                   help="also time a sampling loop of this many Euler steps, ms per step: ours jitted whole "
                        "(sf.sample), diffusers' a Python loop (default 0: skip; a second compile of ours)")
    p.add_argument("--smoke", action="store_true", help="check the script on CPU: a tiny Flux, fp32, no torch.compile")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"

    import dataclasses

    import diffusers
    import jax
    import numpy as np
    import torch

    from streamflow_jax.models.flux import FluxConfig

    cfg = dataclasses.asdict(FluxConfig.dev())
    tdtype = torch.bfloat16
    if args.smoke:
        cfg.update(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                   axes_dims_rope=(4, 6, 6), joint_attention_dim=32, pooled_projection_dim=32)
        args.latent, args.text_len, args.repeats, args.warmup, args.no_compile = 16, 8, 2, 1, True
        tdtype = torch.float32
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(tdtype)  # built in bf16 directly: 24 GB, not 48 GB of fp32 first
    with torch.device(device):
        ref = diffusers.FluxTransformer2DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    n_params = sum(x.numel() for x in ref.parameters())
    t0 = time.perf_counter()
    model = torch_to_flowmodel({"_class_name": "FluxTransformer2DModel", **cfg}, ref)
    convert_s = time.perf_counter() - t0
    jdtype = model.dtype

    b, lat, c = 1, args.latent, cfg["in_channels"] // 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, lat, lat, c), dtype=np.float32)
    ehs = rng.standard_normal((b, args.text_len, cfg["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((b, cfg["pooled_projection_dim"]), dtype=np.float32)
    t = np.array([0.7], np.float32)
    g = np.array([3.5], np.float32)
    velocity = library_jit(lambda m, x, t, c: m.velocity(x, t, c))
    xj = jax.device_put(x.astype(jdtype))
    cj = {"encoder_hidden_states": jax.device_put(ehs.astype(jdtype)),
          "pooled_projections": jax.device_put(pooled.astype(jdtype)), "guidance": jax.device_put(g)}
    tj = jax.device_put(t)
    t0 = time.perf_counter()
    ours_v = jax.block_until_ready(velocity(model, xj, tj, cj))
    ours_compile = time.perf_counter() - t0
    ours = timed(lambda: velocity(model, xj, tj, cj), warmup=args.warmup, repeats=args.repeats,
                 sync=jax.block_until_ready, queued=True)

    from diffusers import FluxPipeline

    lt = torch.from_numpy(x).permute(0, 3, 1, 2).to(device, tdtype)
    packed = FluxPipeline._pack_latents(lt, b, c, lat, lat)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, lat // 2, lat // 2, device, tdtype)
    txt_ids = torch.zeros(args.text_len, 3, device=device, dtype=tdtype)
    et = torch.from_numpy(ehs).to(device, tdtype)
    pt = torch.from_numpy(pooled).to(device, tdtype)
    tt = torch.from_numpy(t).to(device, tdtype)
    gt = torch.from_numpy(g).to(device)

    def call(m):
        with torch.inference_mode():
            return m(hidden_states=packed, encoder_hidden_states=et, pooled_projections=pt, timestep=tt,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=gt, return_dict=False)[0]

    sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: None)  # noqa: E731
    eager = timed(lambda: call(ref), warmup=args.warmup, repeats=args.repeats, sync=sync, queued=True)
    ref_v = FluxPipeline._unpack_latents(call(ref), lat * 8, lat * 8, 8).float().permute(0, 2, 3, 1).cpu().numpy()
    row = {"batch": b, "ours_ms": 1e3 * ours["mean_s"], "ours_compile_s": ours_compile,
           "diffusers_eager_ms": 1e3 * eager["mean_s"],
           "ours_queued_ms": 1e3 * ours["queued_s"], "diffusers_eager_queued_ms": 1e3 * eager["queued_s"], "ours_vs_eager": ours["mean_s"] / eager["mean_s"],
           "max_rel_diff_vs_diffusers": float(np.max(np.abs(np.asarray(ours_v, np.float32) - ref_v))
                                              / np.max(np.abs(ref_v)))}
    print(row, file=sys.stderr, flush=True)
    if not args.no_compile:
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
    if args.sampler_steps:
        # what a user's sampling loop costs a step: our scan against diffusers' loop
        timing, ours_x = ours_sampler(model, xj, cj, args.sampler_steps, repeats=3)
        row.update(timing)

        def v_of(m):
            return lambda h, tv: m(hidden_states=h, encoder_hidden_states=et, pooled_projections=pt,
                                   timestep=torch.full_like(tt, tv), img_ids=img_ids, txt_ids=txt_ids,
                                   guidance=gt, return_dict=False)[0]

        row["diffusers_eager_sampler_ms_per_step"], ref_x = torch_sampler(v_of(ref), packed, args.sampler_steps, sync)
        ref_x = FluxPipeline._unpack_latents(ref_x, lat * 8, lat * 8, 8).float().permute(0, 2, 3, 1).cpu()
        row["sampler_max_rel_diff_vs_diffusers"] = rel_diff(ours_x, ref_x)
        row["ours_vs_eager_sampler"] = row["ours_sampler_ms_per_step"] / row["diffusers_eager_sampler_ms_per_step"]
        if not args.no_compile:
            row["diffusers_compiled_sampler_ms_per_step"] = torch_sampler(v_of(compiled), packed, args.sampler_steps,
                                                                          sync)[0]
            row["ours_vs_compiled_sampler"] = (row["ours_sampler_ms_per_step"]
                                               / row["diffusers_compiled_sampler_ms_per_step"])
    emit({"benchmark": "flux_gpu", "model": "Flux.1-dev architecture, random weights"
          + (" (SMOKE: tiny, CPU)" if args.smoke else ""), "params_B": n_params / 1e9,
          "latent": [lat, lat, c], "text_tokens": args.text_len, "dtype": str(tdtype).replace("torch.", ""),
          "torch_build_s": build_s, "convert_s": convert_s, "env": environment(), "results": [row]}, args.out)


if __name__ == "__main__":
    main()
