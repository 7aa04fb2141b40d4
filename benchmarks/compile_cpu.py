"""Compile times on this CPU, and what the persistent compilation cache saves; one run, JSON.

1. ``compile_only``: the velocity call of full-size SD1.5 UNet (with the PeRFlow adapter),
   SD3-medium, SDXL's UNet and Flux.1-dev configs, lowered and compiled by XLA:CPU on abstract
   bf16 weights (``jax.ShapeDtypeStruct``: nothing allocated, so the 12B Flux compiles on a
   24 GB machine), batch 2, 1024^2 images (512^2 for SD1.5). Lowering and compiling are timed
   apart. SD3, SDXL, Flux and T5-XXL's encoder (SD3's and Flux's text encoder, 256 tokens) again
   with their repeated blocks scanned (``FlowModel.with_scanned_blocks``: one compiled body per
   run of identical blocks).
2. ``generate_cache``: ``streamflow-jax generate`` (the embedded digits model) run three times in
   fresh processes against one empty ``$STREAMFLOW_JAX_CACHE``: with the XLA cache off, then
   twice with it on (the first fills it). Each prints ``first call (compile + run): X s``.
   Target: the second process's first call <= 0.5x the first process's.

    python benchmarks/compile_cpu.py [--skip-flux] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment  # noqa: E402


def compile_only(name: str, class_name: str, config, latent: tuple[int, int, int], adapter=None,
                 scanned: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from streamflow_jax.models import FlowModel, abstract_module, family_of, velocity_of

    family = family_of(class_name)
    graphdef, state = nnx.split(abstract_module(family, config))
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype),
        state)
    if scanned:  # the stacking traced on the abstract weights: still nothing allocated
        model = jax.eval_shape(lambda m: m.with_scanned_blocks(),
                               FlowModel(class_name, config, graphdef, state, family=family))
        graphdef, state = model.graphdef, model.state
    b = 2
    if family.kind == "text_encoder":  # ``latent`` is the token count: ``[b, L]`` ids in
        args = (jax.ShapeDtypeStruct((b, latent[0]), jnp.int32),)

        @jax.jit
        def call(state, ids):
            return nnx.merge(graphdef, state)(ids)["last_hidden_state"]
    else:
        x = jax.ShapeDtypeStruct((b, *latent), jnp.float32)
        t = jax.ShapeDtypeStruct((b,), jnp.float32)
        shapes = family.conditioning(config, family.text_len(config))
        args = (x, t, {k: jax.ShapeDtypeStruct((b, *s), jnp.float32) for k, s in shapes.items()})

        @jax.jit
        def call(state, x, t, cond):
            return velocity_of(nnx.merge(graphdef, state), adapter, x, t, cond)

    t0 = time.perf_counter()
    lowered = call.lower(state, *args)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    params = sum(int(jnp.prod(jnp.array(a.shape))) for a in jax.tree_util.tree_leaves(state))
    return {"model": name, "blocks": "scanned" if scanned else "unrolled", "params_M": round(params / 1e6, 1),
            "batch": b, "latent": list(latent), "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2)}


FIRST_CALL = re.compile(r"first call \(compile \+ run\): ([0-9.]+) s")


def generate_cache() -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        for label, xla_cache in (("cache off", "0"), ("cache on, first process", "1"),
                                 ("cache on, second process", "1")):
            env = {**os.environ, "STREAMFLOW_JAX_CACHE": cache, "STREAMFLOW_JAX_XLA_CACHE": xla_cache}
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "streamflow_jax", "generate", "--out",
                                   os.path.join(out, "d.png")], env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            m = FIRST_CALL.search(proc.stdout)
            if not m:
                raise RuntimeError(f"no first-call line in: {proc.stdout}")
            runs.append({"run": label, "first_call_s": float(m[1]), "process_wall_s": round(wall, 2)})
    ratio = runs[2]["first_call_s"] / runs[1]["first_call_s"]
    return {"runs": runs, "second_over_first": round(ratio, 2), "target": "<= 0.5"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-flux", action="store_true", help="leave out Flux-dev (its compile takes the longest)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from streamflow_jax.models.flux import FluxConfig
    from streamflow_jax.models.mmdit import SD3Config
    from streamflow_jax.models.perflow import PeRFlowAdapter
    from streamflow_jax.models.t5 import T5Config
    from streamflow_jax.models.unet import UNetConfig

    # google/t5-v1_1-xxl, as SD3's and Flux's text_encoder_3 / text_encoder_2
    T5_XXL = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)  # noqa: N806

    results = [compile_only("SD1.5 UNet + PeRFlow adapter, 512^2", "UNet2DConditionModel", UNetConfig.sd15(),
                            (64, 64, 4), PeRFlowAdapter("diff_eps"))]
    for scanned in (False, True):
        results.append(compile_only("SD3-medium, 1024^2", "SD3Transformer2DModel", SD3Config.sd3_medium(),
                                    (128, 128, 16), scanned=scanned))
        results.append(compile_only("SDXL UNet + PeRFlow adapter, 1024^2", "UNet2DConditionModel", UNetConfig.sdxl(),
                                    (128, 128, 4), PeRFlowAdapter("diff_eps"), scanned=scanned))
        if not args.skip_flux:
            results.append(compile_only("Flux.1-dev, 1024^2", "FluxTransformer2DModel", FluxConfig.dev(),
                                        (128, 128, 16), scanned=scanned))
        results.append(compile_only("T5-XXL encoder, 256 tokens", "T5EncoderModel", T5_XXL, (256,), scanned=scanned))
    emit({"benchmark": "compile_cpu", "env": environment(), "compile_only": results,
          "generate_cache": generate_cache()}, args.out)


if __name__ == "__main__":
    main()
