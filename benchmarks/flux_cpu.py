"""Flux and T5 on CPU: streamflow-jax (XLA) vs diffusers/transformers + PyTorch, same threads,
one run, JSON.

- ``flux``: a reduced Flux.1-dev (guidance embedding; 4 double + 8 single blocks, 8 heads x 64,
  512-d, 32x32x16 latent = 256 image tokens, 128 text tokens, batch 1): one velocity call
  (ours jitted, theirs eager, as ``FluxPipeline`` calls it: packed latents and ids). Target:
  ratio (theirs / ours) >= 1.0.
- ``t5``: a reduced T5 v1.1 encoder (8 layers, 512-d, 8 heads, 256 tokens, batch 2) vs
  transformers' ``T5EncoderModel`` without a mask.

Weights are the same on both sides (ours converted from the torch model's directory).

    python benchmarks/flux_cpu.py [--threads N] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, set_cpu_threads, timed  # noqa: E402

FLUX = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
            num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(8, 28, 28))
T5 = dict(vocab_size=1000, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=8, feed_forward_proj="gated-gelu",
          decoder_start_token_id=0)


def bench_flux(repeats: int) -> dict:
    import diffusers
    import jax
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    import streamflow_jax as sf

    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**FLUX).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        model = sf.load(d)
    b, lat, text = 1, 32, 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, lat, lat, 16), dtype=np.float32)
    cond = {"encoder_hidden_states": rng.standard_normal((b, text, 1024), dtype=np.float32),
            "pooled_projections": rng.standard_normal((b, 768), dtype=np.float32),
            "guidance": np.full(b, 3.5, np.float32)}
    t = np.full(b, 0.7, np.float32)
    velocity = jax.jit(lambda m, x, t, c: m.velocity(x, t, c))
    ours = timed(lambda: velocity(model, x, t, cond), warmup=2, repeats=repeats, sync=jax.block_until_ready)
    packed = FluxPipeline._pack_latents(torch.from_numpy(x).permute(0, 3, 1, 2), b, 16, lat, lat)
    ids = FluxPipeline._prepare_latent_image_ids(b, lat // 2, lat // 2, "cpu", torch.float32)
    args = dict(hidden_states=packed, encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
                pooled_projections=torch.from_numpy(cond["pooled_projections"]), timestep=torch.from_numpy(t),
                img_ids=ids, txt_ids=torch.zeros(text, 3), guidance=torch.from_numpy(cond["guidance"]),
                return_dict=False)

    def call():
        with torch.inference_mode():
            return ref(**args)[0]

    theirs = timed(call, warmup=2, repeats=repeats)
    want = FluxPipeline._unpack_latents(call(), lat * 8, lat * 8, 8).permute(0, 2, 3, 1).numpy()
    got = np.asarray(velocity(model, x, t, cond))
    return {"model": "flux (reduced)", "params_M": round(sum(p.numel() for p in ref.parameters()) / 1e6, 1),
            "ours_ms": round(1e3 * ours["mean_s"], 2), "diffusers_ms": round(1e3 * theirs["mean_s"], 2),
            "speedup": round(theirs["mean_s"] / ours["mean_s"], 2),
            "max_rel_diff": float(np.max(np.abs(got - want)) / np.max(np.abs(want)))}


def bench_t5(repeats: int) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    import streamflow_jax as sf

    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(transformers.T5Config(**T5)).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        model = sf.load(d)
    ids = np.random.default_rng(0).integers(2, 1000, (2, 256)).astype(np.int32)
    encode = jax.jit(lambda m, i: m.module(i)["last_hidden_state"])
    ours = timed(lambda: encode(model, ids), warmup=2, repeats=repeats, sync=jax.block_until_ready)
    tids = torch.from_numpy(ids.astype(np.int64))

    def call():
        with torch.inference_mode():
            return ref(tids).last_hidden_state

    theirs = timed(call, warmup=2, repeats=repeats)
    want, got = call().numpy(), np.asarray(encode(model, ids))
    return {"model": "t5 encoder (reduced)", "params_M": round(sum(p.numel() for p in ref.parameters()) / 1e6, 1),
            "ours_ms": round(1e3 * ours["mean_s"], 2), "transformers_ms": round(1e3 * theirs["mean_s"], 2),
            "speedup": round(theirs["mean_s"] / ours["mean_s"], 2),
            "max_rel_diff": float(np.max(np.abs(got - want)) / np.max(np.abs(want)))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    set_cpu_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    emit({"benchmark": "flux_cpu", "threads": args.threads, "env": environment(),
          "results": [bench_flux(args.repeats), bench_t5(args.repeats)]}, args.out)


if __name__ == "__main__":
    main()
