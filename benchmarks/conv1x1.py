"""1x1 convolutions as convolutions or as GEMMs (``$STREAMFLOW_JAX_CONV1X1`` = ``conv`` / ``dot``)
on this machine's backend, next to torch's ``conv2d``: SD1.5's 1x1 convolution shapes (the
transformers' ``proj_in``/``proj_out`` and the resnet shortcuts, batch 4, 512^2), and the
seed setting's reduced-width UNet call (``stream_sd15.py --preset cpu``'s, 256^2, batch 4) end
to end; JSON with ratios (above 1: ``dot`` is faster).

Each setting is traced in its own ``jax.jit`` (the switch is read when tracing); best of
``--repeats`` after a warm-up, the two settings interleaved; torch on the same threads, NCHW
(its layout), fp32 on the CPU.

    python benchmarks/conv1x1.py [--repeats 10] [--out FILE]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_switch_args, emit, environment, random_flowmodel  # noqa: E402

# (label, NHWC input, output channels): SD1.5 at 64x64 latents, batch 4
SHAPES = [("proj 64^2 x 320", (4, 64, 64, 320), 320), ("proj 32^2 x 640", (4, 32, 32, 640), 640),
          ("proj 16^2 x 1280", (4, 16, 16, 1280), 1280), ("shortcut 32^2 960->640", (4, 32, 32, 960), 640),
          ("shortcut 64^2 640->320", (4, 64, 64, 640), 320)]
SETTINGS = ("conv", "dot")


def interleaved_best(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: round(1e3 * s, 3) for name, s in best.items()}


def traced(setting: str, make):
    """``make()``'s jitted function, traced (by its first call) with the switch at ``setting``."""
    from streamflow_jax import ops

    os.environ[ops.CONV1X1_ENV] = setting
    return make()


def main():
    args = cpu_switch_args(__doc__)
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from stream_sd15 import PRESETS
    from streamflow_jax.models.layers import Conv2d
    from streamflow_jax.models.unet import UNetConfig

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for label, shape, cout in SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        kernel = (rng.standard_normal((1, 1, shape[-1], cout)) * 0.05).astype(np.float32)
        conv = Conv2d(shape[-1], cout, 1)
        conv.kernel = nnx.Param(jnp.asarray(kernel))
        graphdef, state = nnx.split(conv)
        xj = jax.device_put(x)
        fns = {}
        for setting in SETTINGS:
            def make():  # the weights are an argument, as in the models (not a folded constant)
                f = jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))
                jax.block_until_ready(f(state, xj))
                return lambda: jax.block_until_ready(f(state, xj))
            fns[setting] = traced(setting, make)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        wt = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        fns["torch"] = lambda: torch.nn.functional.conv2d(xt, wt)
        ms = interleaved_best(fns, args.repeats)
        rows.append({"workload": label, "input": list(shape), "out_channels": cout,
                     **{f"{k}_ms": v for k, v in ms.items()}, "dot_vs_conv": round(ms["conv"] / ms["dot"], 3)})
        print(rows[-1], file=sys.stderr, flush=True)

    spec = PRESETS["cpu"]
    unet = random_flowmodel("UNet2DConditionModel", dataclasses.replace(UNetConfig.sd15(), **spec["unet"]), "float32")
    lat = spec["latent"]
    x = jax.device_put(rng.standard_normal((4, lat, lat, 4)).astype(np.float32))
    t = jax.device_put(np.linspace(900, 100, 4).astype(np.float32))
    ehs = jax.device_put(rng.standard_normal((4, 77, 768)).astype(np.float32))
    fns = {}
    for setting in SETTINGS:
        def make():
            f = jax.jit(lambda m, x, t, e: m.module(x, t, e))
            jax.block_until_ready(f(unet, x, t, ehs))
            return lambda: jax.block_until_ready(f(unet, x, t, ehs))
        fns[setting] = traced(setting, make)
    ms = interleaved_best(fns, max(3, args.repeats // 2))
    rows.append({"workload": f"reduced SD1.5 UNet call, batch 4, {lat}x{lat} latents",
                 **{f"{k}_ms": v for k, v in ms.items()}, "dot_vs_conv": round(ms["conv"] / ms["dot"], 3)})
    print(rows[-1], file=sys.stderr, flush=True)
    emit({"benchmark": "conv1x1", "env": environment(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
