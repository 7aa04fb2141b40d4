"""Trains the embedded default model: a class-conditional rectified flow on scikit-learn's digits.

A genuine diffusers ``SD3Transformer2DModel`` (PyTorch, CPU) learns the RF velocity
``v = noise - data`` on the 1,797 8x8 digits, upscaled to 16x16, one channel, pixel space.
Classes enter as one learned text token (``encoder_hidden_states``) and a learned pooled
vector (``pooled_projections``); class 10 is the null class, used for classifier-free guidance
(10% of training labels are replaced by it).

Output (a diffusers-style pipeline directory)::

    OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}   save_pretrained
    OUT/scheduler/scheduler_config.json       FlowMatchEulerDiscreteScheduler(shift=1.0)
    OUT/conditioning.safetensors              encoder_hidden_states [11, 1, J], pooled_projections [11, P]
    OUT/model_index.json, OUT/training.json   how it was made (script, seed, steps, loss)

Usage: python scripts/train_digits.py --out streamflow_jax/assets/digits [--steps 2500]
Needs the test extra (torch, diffusers); the library itself never imports them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import save_file
from sklearn.datasets import load_digits

NULL_CLASS = 10
IMAGE_SIZE = 16
MODEL_CONFIG = dict(
    sample_size=IMAGE_SIZE, patch_size=2, in_channels=1, out_channels=1, num_layers=4,
    attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
    pooled_projection_dim=32, pos_embed_max_size=IMAGE_SIZE // 2,
)


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``[N, 1, 16, 16]`` floats in [-1, 1] (bilinear upscale) and ``[N]`` labels."""
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> -1..1
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), torch.from_numpy(data.target.astype(np.int64))


class ClassConditioning(torch.nn.Module):
    """Class id -> (one text token, pooled vector); row NULL_CLASS is the unconditional one."""

    def __init__(self, joint_dim: int, pooled_dim: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(NULL_CLASS + 1, joint_dim)
        self.pooled = torch.nn.Embedding(NULL_CLASS + 1, pooled_dim)

    def forward(self, labels):
        return self.tokens(labels)[:, None, :], self.pooled(labels)


def train(out: Path, steps: int, batch: int, lr: float, seed: int, threads: int, log_every: int = 250) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    images, labels = digits_dataset()
    model = SD3Transformer2DModel(**MODEL_CONFIG)
    cond = ClassConditioning(MODEL_CONFIG["joint_attention_dim"], MODEL_CONFIG["pooled_projection_dim"])
    params = list(model.parameters()) + list(cond.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    ema = [p.detach().clone() for p in params]
    ema_decay = 0.995 if steps >= 1000 else 0.9
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal times, as SD3 trains
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        ehs, pooled = cond(y)
        pred = model(hidden_states=xt, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - ema_decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  {time.time() - t0:.0f}s", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return _save(out, model, cond, dict(
        script="scripts/train_digits.py", seed=seed, steps=steps, batch=batch, lr=lr, ema_decay=ema_decay,
        threads=threads, final_loss=float(np.mean(losses[-min(len(losses), 200):])),
        train_seconds=round(time.time() - t0, 1), torch=torch.__version__,
        data="sklearn.datasets.load_digits, 1797 images, 8x8 -> 16x16 bilinear, scaled to [-1, 1]",
        objective="rectified flow, v = noise - data, logit-normal t, 10% null-class dropout",
        model=MODEL_CONFIG,
    ))


def _save(out: Path, model, cond, record: dict) -> dict:
    """Writes the pipeline directory atomically (temporary sibling, then rename)."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        model.save_pretrained(tmp / "transformer")
        FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(tmp / "scheduler")
        with torch.no_grad():
            ehs, pooled = cond(torch.arange(NULL_CLASS + 1))
        save_file({"encoder_hidden_states": ehs.contiguous(), "pooled_projections": pooled.contiguous()},
                  tmp / "conditioning.safetensors")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StreamflowDigits",
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        }, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(tmp), str(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced if it exists)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    return train(args.out, args.steps, args.batch, args.lr, args.seed, args.threads)


if __name__ == "__main__":
    main()
