"""The seed's setting: SD1.5-architecture UNet + TAESD, PeRFlow (diff_eps), 4 steps, random
weights; images/s sequential and in stream batch, ours vs diffusers, one run, JSON.

Rows: diffusers eager sequential (batch 1: 4 UNet calls + TAESD decode per image), diffusers
eager stream batch (N slots at different steps, one UNet call per tick with per-element
timesteps, the finished slot decoded), the same under ``torch.compile`` (GPU), ours
sequential (``sf.sample`` + decode), ours stream N, the same with four ticks a call
(``ticks_per_call=4``: one compiled scan of four ticks) and ours stream N x 4 streams
(``sf.StreamEngine``). Text encoding is excluded (random 77x768 prompt embeddings), as in the
seed's measurements.

    python benchmarks/stream_sd15.py --preset gpu   # SD1.5 sizes, 512^2, bf16 (target: >= 100 images/s stream N=4)
    python benchmarks/stream_sd15.py --preset cpu   # reduced widths, 256^2, fp32, minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, set_cpu_threads  # noqa: E402

PRESETS = {
    # one compiled step per engine on the GPU (min_batch = slots): its compile time is the budget
    "gpu": dict(unet=dict(cross_attention_dim=768, sample_size=64), latent=64, dtype="bfloat16", images=48, slots=4,
                compile=True),
    "cpu": dict(unet=dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=4, norm_num_groups=16,
                          cross_attention_dim=768, sample_size=32),
                latent=32, dtype="float32", images=8, slots=4, compile=False),
}
STEPS, WINDOWS = 4, 4
PER_CALL = 4  # the stream row with ticks_per_call: four ticks a call


def torch_perflow_step(x, eps, t, t_next, ac):
    """The reference note's diff_eps formulas, vectorized over the batch in torch."""
    import torch

    k = torch.clamp((torch.tensor([1 - (i + 1) / WINDOWS for i in range(WINDOWS)], device=x.device)[None, :]
                     >= (t - 1e-4)[:, None]).sum(1), max=WINDOWS - 1)
    t_s, t_e = 1 - k / WINDOWS, 1 - (k + 1) / WINDOWS
    a_s = ac[(t_s * 1000).long() - 1]
    a_e = ac[torch.clamp((t_e * 1000).long() - 1, min=0)]
    gamma = torch.sqrt(a_s / a_e)
    lam_s, eta_s = 1 / gamma, -torch.sqrt(1 - gamma**2) / gamma
    denom = lam_s * (t - t_s) + (t_e - t)
    lam_t, eta_t = lam_s * (t_e - t_s) / denom, eta_s * (t_e - t) / denom
    b = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    xf = x.float()
    x_end = b(lam_t) * xf + b(eta_t) * eps.float()
    v = (x_end - xf) / b(t_e - t)
    return (xf + b(t_next - t) * v).to(x.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    set_cpu_threads(args.threads)
    spec = PRESETS[args.preset]
    if args.preset == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import streamflow_jax as sf
    from streamflow_jax.models.perflow import PeRFlowAdapter
    from streamflow_jax.schedules import alphas_cumprod as sd_alphas_cumprod

    torch.set_num_threads(args.threads)
    device = "cuda" if args.preset == "gpu" else "cpu"
    tdtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    n_img, slots, lat = args.images or spec["images"], spec["slots"], spec["latent"]
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)

    torch.manual_seed(0)
    unet_t = diffusers.UNet2DConditionModel(**spec["unet"]).eval()
    taesd_t = diffusers.AutoencoderTiny().eval()
    with tempfile.TemporaryDirectory() as d:
        unet_t.save_pretrained(d + "/unet")
        taesd_t.save_pretrained(d + "/taesd")
        unet = sf.load(d + "/unet", dtype=spec["dtype"]).with_adapter(PeRFlowAdapter("diff_eps", WINDOWS))
        taesd = sf.load(d + "/taesd", dtype=spec["dtype"])
    unet_t, taesd_t = unet_t.to(device, tdtype), taesd_t.to(device, tdtype)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((n_img, lat, lat, 4)).astype(np.float32)
    emb = rng.standard_normal((77, 768)).astype(np.float32)
    grid = sf.schedules.perflow(STEPS, WINDOWS)
    ac = torch.from_numpy(sd_alphas_cumprod()).to(device)
    emb_t = torch.from_numpy(emb).to(device, tdtype)
    rows = []

    def record(name, seconds, **info):
        rows.append({"run": name, "images": n_img, "images_per_s": round(n_img / seconds, 3), **info})
        print(rows[-1], file=sys.stderr, flush=True)

    # ---- diffusers, eager (and compiled) -----------------------------------------------------
    def torch_sequential(u, dec):
        with torch.inference_mode():
            for i in range(n_img):
                x = torch.from_numpy(noise[i : i + 1]).permute(0, 3, 1, 2).to(device, tdtype)
                for t, t_next in zip(grid[:-1], grid[1:]):
                    tt = torch.full((1,), float(t), device=device)
                    eps = u(x, torch.floor(tt * 1000), emb_t[None]).sample
                    x = torch_perflow_step(x, eps, tt, torch.full((1,), float(t_next), device=device), ac)
                dec(x)
        sync()

    def torch_stream(u, dec):
        """N slots one step apart; a tick = one UNet call on all slots, then the oldest finishes."""
        with torch.inference_mode():
            x = torch.zeros((slots, 4, lat, lat), device=device, dtype=tdtype)
            step = [-1] * slots  # -1: empty
            queue, done = list(range(n_img)), 0
            ctx = emb_t[None].expand(slots, -1, -1)
            while done < n_img:
                for s in range(slots):  # admit one per tick into a free slot
                    if step[s] < 0 and queue:
                        x[s] = torch.from_numpy(noise[queue.pop(0)]).permute(2, 0, 1).to(device, tdtype)
                        step[s] = 0
                        break
                t = torch.tensor([grid[k] if k >= 0 else 0.0 for k in step], device=device)
                tn = torch.tensor([grid[k + 1] if k >= 0 else 0.0 for k in step], device=device)
                eps = u(x, torch.floor(t * 1000), ctx).sample
                x = torch_perflow_step(x, eps, t, tn, ac)
                for s in range(slots):
                    if step[s] >= 0:
                        step[s] += 1
                        if step[s] == STEPS:
                            dec(x[s : s + 1])
                            step[s], done = -1, done + 1
        sync()

    decode_t = lambda m: (lambda z: m.decode(z).sample)  # noqa: E731
    for name, fn in (("diffusers_eager_sequential", torch_sequential), ("diffusers_eager_stream", torch_stream)):
        fn(unet_t, decode_t(taesd_t))  # warm-up
        t0 = time.perf_counter()
        fn(unet_t, decode_t(taesd_t))
        record(name, time.perf_counter() - t0, slots=slots if "stream" in name else 1)
    if spec["compile"] and not args.no_compile:
        cu = torch.compile(unet_t)
        taesd_t.decoder = torch.compile(taesd_t.decoder)
        t0 = time.perf_counter()
        torch_stream(cu, decode_t(taesd_t))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch_stream(cu, decode_t(taesd_t))
        record("diffusers_compiled_stream", time.perf_counter() - t0, slots=slots, compile_s=round(compile_s, 1))

    # ---- ours ----------------------------------------------------------------------------------
    decode_j = jax.jit(lambda m, z: m.module.decode(z))
    cond1 = {"encoder_hidden_states": jnp.asarray(emb)[None]}

    def ours_sequential(u=unet, dec=taesd):
        for i in range(n_img):
            x = sf.sample(u, noise[i : i + 1], grid, cond1)
            jax.block_until_ready(decode_j(dec, x))

    ours_sequential()
    t0 = time.perf_counter()
    ours_sequential()
    record("ours_sequential", time.perf_counter() - t0, slots=1)
    from streamflow_jax import ops

    layout = ops.conv_layout_choice()
    if layout != "HWIO":  # on GPUs: the layout the engine runs (OHWI) in the sequential loop too, the
        # measurement for pipelines to take it (they keep the models' HWIO so far)
        u2, d2 = unet.with_conv_layout(layout), taesd.with_conv_layout(layout)
        ours_sequential(u2, d2)
        t0 = time.perf_counter()
        ours_sequential(u2, d2)
        record(f"ours_sequential_{layout.lower()}", time.perf_counter() - t0, slots=1)
        del u2, d2

    # per_call: ticks_per_call, K ticks as one compiled scan (None: the engine's default)
    for streams, per_call in ((1, None), (1, PER_CALL), (4, None)):
        def ours_stream():
            engine = sf.StreamEngine(unet, (lat, lat, 4), {"encoder_hidden_states": (77, 768)},
                                     slots_per_stream=slots, streams=streams, decoder=taesd,
                                     min_batch=slots * streams if device == "cuda" else None,
                                     ticks_per_call=per_call)
            for i in range(n_img):
                engine.submit({"encoder_hidden_states": emb}, grid=grid, noise=noise[i])
            engine.run()
            return engine.ticks

        ours_stream()  # compiles
        t0 = time.perf_counter()
        ticks = ours_stream()
        name = f"ours_stream_{slots}x{streams}" + (f"_{per_call}ticks" if per_call else "")
        record(name, time.perf_counter() - t0, slots=slots * streams, ticks=ticks)

    by = {r["run"]: r["images_per_s"] for r in rows}
    ratios = {"ours_stream_vs_diffusers_eager_sequential":
              round(by[f"ours_stream_{slots}x1"] / by["diffusers_eager_sequential"], 2),
              "ours_stream_vs_diffusers_eager_stream": round(by[f"ours_stream_{slots}x1"] / by["diffusers_eager_stream"], 2)}
    if "diffusers_compiled_stream" in by:
        ratios["ours_stream_vs_diffusers_compiled_stream"] = round(
            by[f"ours_stream_{slots}x1"] / by["diffusers_compiled_stream"], 2)
        ratios[f"ours_stream_{PER_CALL}ticks_vs_diffusers_compiled_stream"] = round(
            by[f"ours_stream_{slots}x1_{PER_CALL}ticks"] / by["diffusers_compiled_stream"], 2)
    emit({"benchmark": "stream_sd15", "preset": args.preset, "dtype": spec["dtype"], "latent": lat,
          "steps": STEPS, "unet_params_M": round(sum(q.numel() for q in unet_t.parameters()) / 1e6, 1),
          "env": environment(), "results": rows, "ratios": ratios}, args.out)


if __name__ == "__main__":
    main()
