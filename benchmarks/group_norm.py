"""GroupNorm + SiLU (the ResNet blocks' prologue): ``ops.group_norm``'s ways of reducing
(``$STREAMFLOW_JAX_GROUPNORM`` = ``groups`` / ``channels`` / ``onepass``) against torch's ``group_norm``, on
the activations of SD1.5's UNet levels (batch 4, 512^2) and of a VAE decoder; JSON with ratios.

Each setting is traced in its own ``jax.jit`` (the switch is read when tracing). Best of
``--repeats`` after a warm-up; torch on the same threads, NCHW (its layout), fp32 on the CPU.

    python benchmarks/group_norm.py [--repeats 10] [--out FILE]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_switch_args, emit, environment  # noqa: E402

# (label, NHWC shape, groups)
SHAPES = [("unet 64^2 x 320", (4, 64, 64, 320), 32), ("unet 32^2 x 640", (4, 32, 32, 640), 32),
          ("unet 16^2 x 1280", (4, 16, 16, 1280), 32), ("vae 128^2 x 128", (1, 128, 128, 128), 32),
          ("vae 256^2 x 256", (1, 256, 256, 256), 32)]


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    args = cpu_switch_args(__doc__)
    import jax
    import numpy as np
    import torch

    from streamflow_jax import ops

    torch.set_num_threads(args.threads)
    rows = []
    for label, shape, groups in SHAPES:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        row = {"activation": label, "shape": list(shape), "groups": groups}
        xj = jax.device_put(x)
        for setting in ("groups", "channels", "onepass"):
            os.environ[ops.GROUPNORM_ENV] = setting
            fn = jax.jit(lambda v: jax.nn.silu(ops.group_norm(v, groups, 1e-5)))
            row[f"{setting}_ms"] = round(1e3 * best_of(lambda: jax.block_until_ready(fn(xj)), args.repeats), 3)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            row["torch_ms"] = round(1e3 * best_of(
                lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(xt, groups, eps=1e-5)), args.repeats), 3)
        row["channels_vs_groups"] = round(row["groups_ms"] / row["channels_ms"], 2)
        row["channels_vs_torch"] = round(row["torch_ms"] / row["channels_ms"], 2)
        row["onepass_vs_channels"] = round(row["channels_ms"] / row["onepass_ms"], 2)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    os.environ.pop(ops.GROUPNORM_ENV, None)
    emit({"benchmark": "group_norm", "env": environment(), "note": "ratios above 1: the first named is faster",
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
