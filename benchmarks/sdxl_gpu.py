"""SDXL on one GPU: the UNet call (streamflow-jax vs diffusers eager and ``torch.compile``) and
PeRFlow-SDXL at 4 steps through the stream engine, in one run, JSON.

SDXL-base UNet architecture (2.57B parameters), random weights, 1024^2 images (latent
128x128x4), 77 text tokens of width 2048, the pooled embedding (1280) and the six time ids,
bf16. Both sides hold the same weights: ours are taken from the torch model on the GPU by
DLPack (no host copy).

- ``unet``: one UNet call (noise prediction, ``added_cond_kwargs``), batch 1/2/4, a different
  timestep per element; ours vs diffusers eager; ``torch.compile`` at each batch, the largest
  first, while ``--budget-s`` allows.
- ``stream``: PeRFlow-SDXL (``ddim_eps``, 4 windows, 4 steps) images/s with a TAESD-sized tiny
  autoencoder (TAESDXL's architecture) decoding: diffusers eager sequential (batch 1) and eager
  stream batch (N slots at different steps, one UNet call per tick), ours through
  ``sf.StreamEngine`` (N slots, one stream). Text encoding is excluded (random embeddings), as
  in the seed's measurements.

Stages write the JSON as they finish (a part cut by its time limit keeps what it measured), in
this order: UNet calls, stream, then ``torch.compile`` (skipped when ``--budget-s`` would be
overrun: it takes about 2 minutes on an H100/H200).

    python benchmarks/sdxl_gpu.py [--stages unet stream compile] [--batches 1 2 4] [--budget-s 280] [--out FILE]
    python benchmarks/sdxl_gpu.py --smoke   # the whole script on CPU: a tiny SDXL-like UNet, fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch on the same GPU
sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, timed, torch_to_flowmodel  # noqa: E402

STEPS, WINDOWS, PREDICTION = 4, 4, "ddim_eps"  # PeRFlow-SDXL's published setting
COMPILE_S = 150  # what torch.compile of the SDXL UNet is given room for (estimate, H100/H200)
# a tiny SDXL-like UNet for --smoke (the layout's three levels, added conditions, 2 transformer layers)
SMOKE_UNET = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=64,
                  attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2), addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24 + 6 * 8, sample_size=16)


def torch_perflow_step(x, eps, t, t_next, ac, prediction=PREDICTION):
    """PeRFlow's window formulas (the reference note), vectorized over the batch in torch."""
    import torch

    ends = torch.tensor([1 - (i + 1) / WINDOWS for i in range(WINDOWS)], device=x.device)
    k = torch.clamp((ends[None, :] >= (t - 1e-4)[:, None]).sum(1), max=WINDOWS - 1)
    t_s, t_e = 1 - k / WINDOWS, 1 - (k + 1) / WINDOWS
    a_s = ac[(t_s * 1000).long() - 1]
    a_e = ac[torch.clamp((t_e * 1000).long() - 1, min=0)]
    if prediction == "diff_eps":
        gamma = torch.sqrt(a_s / a_e)
        lam_s, eta_s = 1 / gamma, -torch.sqrt(1 - gamma**2) / gamma
    else:  # ddim_eps
        lam_s, eta_s = torch.sqrt(a_e / a_s), torch.sqrt(1 - a_e) - torch.sqrt(a_e / a_s * (1 - a_s))
    denom = lam_s * (t - t_s) + (t_e - t)
    lam_t, eta_t = lam_s * (t_e - t_s) / denom, eta_s * (t_e - t) / denom
    b = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    xf = x.float()
    x_end = b(lam_t) * xf + b(eta_t) * eps.float()
    return (xf + b(t_next - t) * (x_end - xf) / b(t_e - t)).to(x.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=["unet", "stream", "compile"], choices=["unet", "stream", "compile"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--images", type=int, default=16, help="images per stream run")
    p.add_argument("--slots", type=int, default=4, help="stream batch N")
    p.add_argument("--budget-s", type=float, default=None, help="skip torch.compile when it would overrun this")
    p.add_argument("--smoke", action="store_true", help="check the script on CPU: a tiny SDXL-like UNet, fp32")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"

    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import streamflow_jax as sf
    from streamflow_jax.models.perflow import PeRFlowAdapter
    from streamflow_jax.models.unet import UNetConfig
    from streamflow_jax.schedules import alphas_cumprod

    cfg = dataclasses.asdict(UNetConfig.sdxl())
    tdtype, latent, text_len = torch.bfloat16, 128, 77
    if args.smoke:
        cfg.update(SMOKE_UNET)
        tdtype, latent, text_len = torch.float32, 16, 8
        args.repeats, args.warmup, args.images, args.batches = 2, 1, 4, [1, 2]
        args.stages = [s for s in args.stages if s != "compile"]
    jdtype = jnp.bfloat16 if tdtype == torch.bfloat16 else jnp.float32
    sync = (lambda *_: torch.cuda.synchronize()) if device == "cuda" else (lambda *_: None)
    text_dim, ehs_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"], \
        cfg["cross_attention_dim"]

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        ref = diffusers.UNet2DConditionModel(**cfg).to(tdtype).eval()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = torch_to_flowmodel({"_class_name": "UNet2DConditionModel", **cfg}, ref)
    convert_s = time.perf_counter() - t0
    report = {"benchmark": "sdxl_gpu",
              "model": "SDXL-base UNet architecture, random weights" + (" (SMOKE: tiny, CPU)" if args.smoke else ""),
              "params_B": sum(x.numel() for x in ref.parameters()) / 1e9, "latent": [latent, latent, 4],
              "text_tokens": text_len, "dtype": str(tdtype).replace("torch.", ""), "torch_build_s": build_s,
              "convert_s": convert_s, "env": environment(), "results": [], "ratios": {}}

    def record(row):
        report["results"].append(row)
        print(row, file=sys.stderr, flush=True)
        emit(report, args.out) if args.out else None

    def inputs(b, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((b, latent, latent, 4), dtype=np.float32)
        ehs = rng.standard_normal((b, text_len, ehs_dim), dtype=np.float32)
        pooled = rng.standard_normal((b, text_dim), dtype=np.float32)
        side = latent * 8
        ids = np.tile(np.array([side, side, 0, 0, side, side], np.float32), (b, 1))
        return x, ehs, pooled, ids

    # ---- the UNet call ---------------------------------------------------------------------------
    eps_j = jax.jit(lambda m, x, t, e, p, i: m.module(x, t, e, text_embeds=p, time_ids=i))

    def torch_call(m, xt, tt, et, pt, it):
        with torch.inference_mode():
            return m(xt, tt, et, added_cond_kwargs={"text_embeds": pt, "time_ids": it}).sample

    def torch_inputs(x, t, ehs, pooled, ids):
        return (torch.from_numpy(x).permute(0, 3, 1, 2).to(device, tdtype), torch.from_numpy(t).to(device),
                torch.from_numpy(ehs).to(device, tdtype), torch.from_numpy(pooled).to(device, tdtype),
                torch.from_numpy(ids).to(device, tdtype))

    ours_ms = {}
    if "unet" in args.stages:
        for b in args.batches:
            x, ehs, pooled, ids = inputs(b, b)
            t = np.floor(np.linspace(0.95, 0.3, b) * 1000).astype(np.float32)  # one timestep per element
            xj, ej, pj, ij = (jax.device_put(a.astype(jdtype)) for a in (x, ehs, pooled, ids))
            tj = jax.device_put(t)
            t0 = time.perf_counter()
            ours_out = jax.block_until_ready(eps_j(model, xj, tj, ej, pj, ij))
            compile_s = time.perf_counter() - t0
            ours = timed(lambda: eps_j(model, xj, tj, ej, pj, ij), warmup=args.warmup, repeats=args.repeats,
                         sync=jax.block_until_ready)
            tin = torch_inputs(x, t, ehs, pooled, ids)
            eager = timed(lambda: torch_call(ref, *tin), warmup=args.warmup, repeats=args.repeats, sync=sync)
            want = torch_call(ref, *tin).float().permute(0, 2, 3, 1).cpu().numpy()
            got = np.asarray(ours_out, np.float32)
            ours_ms[b] = 1e3 * ours["mean_s"]
            record({"run": "unet_call", "batch": b, "ours_ms": ours_ms[b], "ours_compile_s": compile_s,
                    "diffusers_eager_ms": 1e3 * eager["mean_s"], "ours_vs_eager": ours["mean_s"] / eager["mean_s"],
                    "max_rel_diff_vs_diffusers": float(np.max(np.abs(got - want)) / np.max(np.abs(want)))})

    # ---- PeRFlow-SDXL, 4 steps, through the stream engine ---------------------------------------
    def stream_stage():
        """Images/s of PeRFlow-SDXL at 4 steps: diffusers eager sequential and stream batch, ours
        through the stream engine; the decoder a random tiny autoencoder (TAESDXL's architecture)."""
        import tempfile

        n_img, slots = args.images, args.slots
        unet = model.with_adapter(PeRFlowAdapter(PREDICTION, WINDOWS))
        torch.manual_seed(1)
        taesd_t = diffusers.AutoencoderTiny().eval()
        with tempfile.TemporaryDirectory() as d:
            taesd_t.save_pretrained(d + "/taesd")
            taesd = sf.load(d + "/taesd", dtype="bfloat16" if tdtype == torch.bfloat16 else "float32")
        taesd_t = taesd_t.to(device, tdtype)
        noise, ehs, pooled, ids = inputs(n_img, 0)
        grid = sf.schedules.perflow(STEPS, WINDOWS)
        ac = torch.from_numpy(alphas_cumprod()).to(device)
        cond_t = [torch.from_numpy(a[:1]).to(device, tdtype) for a in (ehs, pooled, ids)]
        rows_before = len(report["results"])

        def rate(name, seconds, **info):
            record({"run": name, "images": n_img, "images_per_s": round(n_img / seconds, 3), **info})

        def torch_sequential():
            with torch.inference_mode():
                for i in range(n_img):
                    x = torch.from_numpy(noise[i : i + 1]).permute(0, 3, 1, 2).to(device, tdtype)
                    for t, t_next in zip(grid[:-1], grid[1:]):
                        tt = torch.full((1,), float(t), device=device)
                        eps = torch_call(ref, x, torch.floor(tt * 1000), *cond_t)
                        x = torch_perflow_step(x, eps, tt, torch.full((1,), float(t_next), device=device), ac)
                    taesd_t.decode(x)
            sync()

        def torch_stream():
            """N slots one step apart; a tick = one UNet call on all slots, then the oldest finishes."""
            with torch.inference_mode():
                x = torch.zeros((slots, 4, latent, latent), device=device, dtype=tdtype)
                step, queue, done = [-1] * slots, list(range(n_img)), 0
                cond = [c.expand(slots, *c.shape[1:]) for c in cond_t]
                while done < n_img:
                    for s in range(slots):  # admit one per tick into a free slot
                        if step[s] < 0 and queue:
                            x[s] = torch.from_numpy(noise[queue.pop(0)]).permute(2, 0, 1).to(device, tdtype)
                            step[s] = 0
                            break
                    t = torch.tensor([grid[k] if k >= 0 else 0.0 for k in step], device=device)
                    tn = torch.tensor([grid[k + 1] if k >= 0 else 0.0 for k in step], device=device)
                    x = torch_perflow_step(x, torch_call(ref, x, torch.floor(t * 1000), *cond), t, tn, ac)
                    for s in range(slots):
                        if step[s] >= 0:
                            step[s] += 1
                            if step[s] == STEPS:
                                taesd_t.decode(x[s : s + 1])
                                step[s], done = -1, done + 1
            sync()

        for name, fn in (("diffusers_eager_sequential", torch_sequential), ("diffusers_eager_stream", torch_stream)):
            fn()  # warm-up
            t0 = time.perf_counter()
            fn()
            rate(name, time.perf_counter() - t0, slots=slots if "stream" in name else 1)

        request = {"encoder_hidden_states": ehs[0], "text_embeds": pooled[0], "time_ids": ids[0]}
        shapes = unet.cond_shapes(text_len)
        assert {k: v.shape for k, v in request.items()} == shapes, shapes

        def ours_stream():
            engine = sf.StreamEngine(unet, (latent, latent, 4), shapes, slots_per_stream=slots, streams=1,
                                     decoder=taesd, min_batch=slots if device == "cuda" else None)
            for i in range(n_img):
                engine.submit(request, grid=grid, noise=noise[i])
            engine.run()
            return engine.ticks

        t0 = time.perf_counter()
        ours_stream()  # compiles
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ticks = ours_stream()
        rate(f"ours_stream_{slots}x1", time.perf_counter() - t0, slots=slots, ticks=ticks,
             first_run_s=round(compile_s, 1))
        by = {r["run"]: r["images_per_s"] for r in report["results"][rows_before:]}
        for ref_name in ("diffusers_eager_sequential", "diffusers_eager_stream"):
            report["ratios"][f"ours_stream_vs_{ref_name}"] = round(by[f"ours_stream_{slots}x1"] / by[ref_name], 2)

    if "stream" in args.stages:
        stream_stage()

    # ---- torch.compile, last (about 2 minutes for the first batch) -------------------------------
    if "compile" in args.stages:
        compiled = torch.compile(ref)  # one per batch size (static shapes), the largest first
        for b in sorted(args.batches, reverse=True):
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
            if left is not None and left < COMPILE_S:
                report.setdefault("compile_skipped", []).append(
                    f"batch {b}: {left:.0f} s of the budget left, torch.compile needs about {COMPILE_S} s")
                print(report["compile_skipped"][-1], file=sys.stderr)
                continue
            x, ehs, pooled, ids = inputs(b, b)
            tin = torch_inputs(x, np.floor(np.linspace(0.95, 0.3, b) * 1000).astype(np.float32), ehs, pooled, ids)
            t0 = time.perf_counter()
            torch_call(compiled, *tin)
            sync()
            compile_s = time.perf_counter() - t0
            comp = timed(lambda: torch_call(compiled, *tin), warmup=args.warmup, repeats=args.repeats, sync=sync)
            row = {"run": "unet_call_compiled", "batch": b, "torch_compile_s": compile_s,
                   "diffusers_compiled_ms": 1e3 * comp["mean_s"]}
            if b in ours_ms:
                row["ours_vs_compiled"] = ours_ms[b] / row["diffusers_compiled_ms"]
                report["ratios"][f"ours_vs_diffusers_compiled_b{b}"] = round(row["ours_vs_compiled"], 3)
            record(row)
    for r in report["results"]:
        if r["run"] == "unet_call":
            report["ratios"][f"ours_vs_diffusers_eager_b{r['batch']}"] = round(r["ours_vs_eager"], 3)
    report["wall_s"] = time.perf_counter() - start
    emit(report, args.out)


if __name__ == "__main__":
    main()
