"""Where the stream engine should encode image-to-image inputs: per request before admission
(what ``PromptStream.submit`` does: one jitted encoder call of batch 1 per request), or
batched with the tick's admissions (what encoding inside the tick would amount to: one call
per tick for the ``streams`` requests it admits); one run, JSON.

The encoder is the real TAESD architecture (random weights, diffusers' ``AutoencoderTiny``
defaults) and, with ``--vae``, SD's VAE encoder; images of ``--size`` pixels, fp32, on this
machine's backend. Each row encodes the same ``--images`` images in calls of ``batch``; the
figure is milliseconds per image (mean of ``--repeats`` passes after one untimed pass).

    python benchmarks/img2img_encode.py [--size 512] [--images 8] [--vae] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, torch_to_flowmodel  # noqa: E402


def per_image_ms(encoder, images, batch: int, repeats: int) -> float:
    import jax

    from streamflow_jax.models import encode_latents

    chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
    jax.block_until_ready([encode_latents(encoder, c) for c in chunks])  # compiles
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready([encode_latents(encoder, c) for c in chunks])
    return (time.perf_counter() - t0) / repeats / len(images) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vae", action="store_true", help="also SD's VAE encoder (83.7M parameters in all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import diffusers
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.manual_seed(0)
    encoders = {"TAESD": (diffusers.AutoencoderTiny().eval(), "AutoencoderTiny")}
    if args.vae:
        encoders["SD VAE"] = (diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval(), "AutoencoderKL")
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.images, args.size, args.size, 3)), jnp.float32)
    rows = []
    for name, (ref, cls) in encoders.items():
        encoder = torch_to_flowmodel({"_class_name": cls, **ref.config}, ref)
        for batch in sorted({1, 2, 4, args.images}):
            if batch <= args.images:
                rows.append({"encoder": name, "batch": batch,
                             "ms_per_image": round(per_image_ms(encoder, images, batch, args.repeats), 2)})
    for row in rows:
        one = next(r for r in rows if r["encoder"] == row["encoder"] and r["batch"] == 1)
        row["vs_batch_1"] = round(one["ms_per_image"] / row["ms_per_image"], 2)
    emit({"benchmark": "img2img_encode", "size": args.size, "images": args.images, "env": environment(),
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
