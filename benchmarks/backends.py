"""Per-call and end-to-end sampling time per backend, same checkpoint and inputs, one run, JSON.

On CPU: XLA vs ONNX Runtime (and diffusers + torch per call, as the reference); on a GPU
machine also TensorRT where it is installed. The model is a random SD3 config from
``sd3_cpu.py`` (``small``: ~31M parameters) or the embedded digits model.

    python benchmarks/backends.py [--config small|tiny|digits] [--batch 2] [--steps 28] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, set_cpu_threads, timed  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["small", "tiny", "digits"], default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--guidance", type=float, default=None, help="sample with CFG at this scale (doubles the batch)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    set_cpu_threads(args.threads)

    import jax
    import numpy as np

    import streamflow_jax as sf
    from streamflow_jax import backends
    from streamflow_jax.pipelines import DIGITS_DIR

    tmp = tempfile.mkdtemp()
    os.environ["STREAMFLOW_JAX_CACHE"] = os.path.join(tmp, "cache")
    torch_model = None
    if args.config == "digits":
        model = sf.load(DIGITS_DIR)
        side, text_len = model.config.sample_size, 1
    else:
        import diffusers
        import torch

        from sd3_cpu import CONFIGS

        torch.set_num_threads(args.threads)
        spec = CONFIGS[args.config]
        torch.manual_seed(0)
        torch_model = diffusers.SD3Transformer2DModel(**spec["model"]).eval()
        torch_model.save_pretrained(tmp + "/src")
        model = sf.load(tmp + "/src")
        side, text_len = spec["latent"], spec["text_len"]
    cfg = model.config
    rng = np.random.default_rng(0)
    b = args.batch
    x = rng.standard_normal((b, side, side, cfg.in_channels), dtype=np.float32)
    t = np.linspace(0.9, 0.2, b).astype(np.float32)
    cond = {"encoder_hidden_states": rng.standard_normal((b, text_len, cfg.joint_attention_dim), dtype=np.float32),
            "pooled_projections": rng.standard_normal((b, cfg.pooled_projection_dim), dtype=np.float32)}
    grid = sf.schedules.flow_match(args.steps)
    sync = jax.block_until_ready
    guided = {}
    if args.guidance is not None:
        guided = {"guidance_scale": args.guidance,
                  "uncond": {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in cond.items()}}

    names = ["xla", "onnxruntime"]
    from streamflow_jax.backends.tensorrt import TensorRTUnavailable, local_gpu, tensorrt_flavour

    try:  # either flavour ($STREAMFLOW_JAX_TENSORRT chooses), where its engines can run on this GPU
        flavour = tensorrt_flavour()
        reason = flavour.cannot_run(flavour.targets(), local_gpu())
        if reason is None:
            names.append("tensorrt")
        else:
            print(f"tensorrt left out: {reason}", file=sys.stderr)
    except TensorRTUnavailable:
        pass
    rows, ref_out = [], None
    for name in names:
        t0 = time.perf_counter()
        out = np.asarray(sf.sample(model, x, grid, cond, backend=name, **guided))  # exports/compiles on first use
        first = time.perf_counter() - t0
        if name == "xla":
            ref_out = out
            call = jax.jit(lambda m, x, t, c: m.velocity(x, t, c))
            velocity = lambda: call(model, x, t, cond)  # noqa: E731
        else:
            runner = backends.runner_for(model, name, batch=2 * b if guided else b, height=side, width=side,
                                         cond=cond)
            velocity = lambda: runner.velocity(x, t, cond)  # noqa: E731
        per_call = timed(velocity, warmup=2, repeats=args.repeats * 4, sync=sync)
        sampling = timed(lambda: sf.sample(model, x, grid, cond, backend=name, **guided), warmup=0,
                         repeats=args.repeats, sync=sync)
        rows.append({"backend": name, "first_sample_s": round(first, 3),
                     "velocity_ms": round(1e3 * per_call["mean_s"], 3),
                     "sample_s": round(sampling["mean_s"], 4),
                     "max_rel_diff_vs_xla": float(np.max(np.abs(out - ref_out)) / np.max(np.abs(ref_out)))})
    if torch_model is not None:
        import torch

        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        feeds = {k: torch.from_numpy(v) for k, v in cond.items()}
        tt = torch.from_numpy(t * 1000)

        def torch_call():
            with torch.inference_mode():
                return torch_model(hidden_states=xt, timestep=tt, **feeds).sample

        ref = timed(torch_call, warmup=2, repeats=args.repeats * 4)
        rows.append({"backend": "diffusers+torch (reference)", "velocity_ms": round(1e3 * ref["mean_s"], 3)})
    base, base_sample = rows[0]["velocity_ms"], rows[0]["sample_s"]
    for r in rows:
        r["velocity_vs_xla"] = round(r["velocity_ms"] / base, 3)
        if "sample_s" in r:
            r["sampling_speed_vs_xla"] = round(base_sample / r["sample_s"], 3)
    emit({"benchmark": "backends", "config": args.config, "batch": b, "latent": side, "steps": args.steps,
          "guidance": args.guidance,
          "threads": args.threads, "env": environment(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
