"""Per-call time of the SD1.5-family components, ours (XLA) vs diffusers (PyTorch), one run, JSON.

UNet (batch 1, 4, 8), VAE decode and TAESD decode, random weights, same inputs on both sides.
``--preset gpu``: the real SD1.5 UNet/VAE/TAESD architectures, 64x64 latents (512^2 images),
bf16, CUDA. ``--preset cpu``: reduced widths so a 2-core machine finishes in minutes, fp32.

    python benchmarks/components.py [--preset cpu|gpu] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, set_cpu_threads, timed  # noqa: E402

PRESETS = {
    "gpu": dict(
        unet=dict(cross_attention_dim=768, sample_size=64), latent=64, text_len=77, batches=(1, 4, 8), dtype="bfloat16",
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        taesd=dict(), decode_batch=1,
    ),
    "cpu": dict(
        unet=dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=768, attention_head_dim=4,
                  norm_num_groups=16, sample_size=32),
        latent=32, text_len=77, batches=(1, 4, 8), dtype="float32",
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        taesd=dict(), decode_batch=1,
    ),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    set_cpu_threads(args.threads)
    if args.preset == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import streamflow_jax as sf

    torch.set_num_threads(args.threads)
    spec = PRESETS[args.preset]
    device = "cuda" if args.preset == "gpu" else "cpu"
    tdtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    sync_t = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    rng = np.random.default_rng(0)
    rows = []

    def both(name, ref, ours_fn, torch_fn, **info):
        ours = timed(ours_fn, warmup=2, repeats=args.repeats, sync=jax.block_until_ready)
        theirs = timed(torch_fn, warmup=2, repeats=args.repeats, sync=sync_t)
        row = {"component": name, **info, "ours_ms": round(1e3 * ours["mean_s"], 2),
               "diffusers_ms": round(1e3 * theirs["mean_s"], 2),
               "speedup_vs_diffusers": round(theirs["mean_s"] / ours["mean_s"], 3)}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)

    def build(cls, cfg):
        torch.manual_seed(0)
        ref = getattr(diffusers, cls)(**cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            ref.save_pretrained(d)
            ours = sf.load(d, dtype=spec["dtype"])
        return ref.to(device, tdtype), ours

    ref, unet = build("UNet2DConditionModel", spec["unet"])
    call = jax.jit(lambda m, x, t, c: m.module(x, t, c))
    for b in spec["batches"]:
        x = rng.standard_normal((b, spec["latent"], spec["latent"], 4), dtype=np.float32)
        t = np.linspace(999, 1, b).astype(np.float32)
        c = rng.standard_normal((b, spec["text_len"], spec["unet"]["cross_attention_dim"]), dtype=np.float32)
        xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(device, tdtype)
        tt, ct = torch.from_numpy(t).to(device), torch.from_numpy(c).to(device, tdtype)

        def torch_unet():
            with torch.inference_mode():
                return ref(xt, tt, ct).sample

        both("unet", ref, lambda: call(unet, xj, tj, cj), torch_unet, batch=b, latent=spec["latent"],
             params_M=round(sum(q.numel() for q in ref.parameters()) / 1e6, 1))

    for cls, key in (("AutoencoderKL", "vae"), ("AutoencoderTiny", "taesd")):
        ref, model = build(cls, spec[key])
        decode = jax.jit(lambda m, z: m.module.decode(z))
        b = spec["decode_batch"]
        z = rng.standard_normal((b, spec["latent"], spec["latent"], 4), dtype=np.float32)
        zj = jnp.asarray(z)
        zt = torch.from_numpy(z).permute(0, 3, 1, 2).to(device, tdtype)

        def torch_decode():
            with torch.inference_mode():
                return ref.decode(zt).sample

        both(f"{key}_decode", ref, lambda: decode(model, zj), torch_decode, batch=b, latent=spec["latent"],
             params_M=round(sum(q.numel() for q in ref.parameters()) / 1e6, 2))

    emit({"benchmark": "components", "preset": args.preset, "dtype": spec["dtype"], "threads": args.threads,
          "env": environment(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
