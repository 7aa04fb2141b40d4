"""Per-device weight bytes of Flux-dev and SD3.5-large pipelines under each strategy, at 1, 2,
4 and 8 devices, and whether each fits 24, 40 and 80 GB cards with room for 1024^2
activations at batch 1 and 4; JSON.

Everything is computed from shapes: the real shardings (``sf.shard``'s rules) of abstract
arrays (``jax.eval_shape``), nothing allocated. Activation room, per device and counted whole
on every device (not divided by data or tensor parallelism, so the "fits" columns are
conservative), is an estimate for a GPU with fused (cuDNN) attention: one transformer block's
live tensors, ``12 x batch x (L + M) x D`` bf16 values (q, k, v, attention out, the 4D-wide
MLP hidden, residuals), plus 1 GB of cuBLAS/cuDNN workspace. XLA:CPU's own buffer assignment
for the same call (``compile().memory_analysis()``, which materializes attention logits and
reuses less) is reported beside it as an upper bound; it was not used for "fits". Neither has
been measured on a GPU.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding_memory.py [--no-activations]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment  # noqa: E402

CARDS_GB = (24, 40, 80)


def components():
    from streamflow_jax.models.clip import CLIPTextConfig
    from streamflow_jax.models.flux import FluxConfig
    from streamflow_jax.models.mmdit import SD3Config
    from streamflow_jax.models.t5 import T5Config
    from streamflow_jax.models.vae import VAEConfig

    t5_xxl = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_attention_heads=12,
                            num_hidden_layers=12)
    clip_l_proj = CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_attention_heads=12,
                                 num_hidden_layers=12, with_projection=True)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_attention_heads=20,
                            num_hidden_layers=32, hidden_act="gelu", with_projection=True)
    vae16 = VAEConfig(block_out_channels=(128, 256, 512, 512), latent_channels=16, use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    return {
        "Flux.1-dev + T5-XXL + CLIP-L + VAE": [("FluxTransformer2DModel", FluxConfig.dev()),
                                              ("T5EncoderModel", t5_xxl), ("CLIPTextModel", clip_l),
                                              ("AutoencoderKL", vae16)],
        "SD3.5-large + T5-XXL + CLIP-L + CLIP-G + VAE": [("SD3Transformer2DModel", SD3Config.sd35_large()),
                                                        ("T5EncoderModel", t5_xxl),
                                                        ("CLIPTextModelWithProjection", clip_l_proj),
                                                        ("CLIPTextModelWithProjection", clip_g),
                                                        ("AutoencoderKL", vae16)],
    }


def abstract_state(class_name, config, dtype):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from streamflow_jax.models import abstract_module, family_of

    _, state = nnx.split(abstract_module(family_of(class_name), config))
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), state)


def gpu_activation_estimate(class_name, config, batch: int) -> int:
    """``12 x batch x (L + M) x D`` bf16 values + 1 GB workspace (see the module doc)."""
    from streamflow_jax.models import family_of

    fam = family_of(class_name)
    text = 512 if class_name.startswith("Flux") else 333
    tokens = text + (128 // 2) ** 2 if class_name.startswith("Flux") else text + (128 // config.patch_size) ** 2
    return int(12 * batch * tokens * config.inner_dim * 2 + 1e9) if fam.kind == "velocity" else 0


def activation_bytes(class_name, config, batch: int) -> int:
    """XLA's temporaries + outputs for one velocity call at 1024^2 (latent 128), bf16."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from streamflow_jax.models import abstract_module, family_of

    fam = family_of(class_name)
    graphdef, _ = nnx.split(abstract_module(fam, config))
    state = abstract_state(class_name, config, jnp.bfloat16)
    text = 512 if class_name.startswith("Flux") else 333
    c = fam.latent_channels(config)
    x = jax.ShapeDtypeStruct((batch, 128, 128, c), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = {k: jax.ShapeDtypeStruct((batch, *s), jnp.bfloat16 if s else jnp.float32)
            for k, s in fam.conditioning(config, text).items()}
    fn = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st).velocity(x, t, c))
    analysis = fn.lower(state, x, t, cond).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-activations", action="store_true", help="skip the activation estimates (compiles)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    import streamflow_jax as sf
    from streamflow_jax.models import abstract_module, family_of
    from streamflow_jax.sharding import attention_heads, bytes_per_device

    if jax.device_count() < 8:
        raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    rows = []
    for name, parts in components().items():
        states = [(cls, cfg, abstract_state(cls, cfg, jnp.bfloat16)) for cls, cfg in parts]
        heads = [attention_heads(abstract_module(family_of(cls), cfg)) for cls, cfg in parts]  # tensor: whole heads
        act = {}
        if not args.no_activations:
            cls, cfg = parts[0]
            cfg_batch = 2 if cls.startswith("SD3") else 1  # SD3 runs CFG: the velocity batch doubles
            act = {b: gpu_activation_estimate(cls, cfg, b * cfg_batch) for b in (1, 4)}
            cpu = {b: activation_bytes(cls, cfg, b * cfg_batch) for b in (1, 4)}
        for strategy in ("replicate", "fsdp", "tensor"):
            for n in (1, 2, 4, 8):
                mesh = sf.make_mesh(n, data=1, model=n) if strategy == "tensor" else sf.make_mesh(n)
                per_device = sum(bytes_per_device(st, mesh, strategy, family_of(cls).logical_axes, h)
                                 for (cls, cfg, st), h in zip(states, heads))
                row = {"pipeline": name, "strategy": strategy, "devices": n, "weights_gb": round(per_device / 1e9, 2)}
                for b, a in act.items():
                    row[f"activations_b{b}_gb"] = round(a / 1e9, 2)
                    row[f"xla_cpu_buffers_b{b}_gb"] = round(cpu[b] / 1e9, 2)
                    for card in CARDS_GB:
                        row[f"fits_{card}gb_b{b}"] = per_device + a <= card * 1e9
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    emit({"benchmark": "sharding_memory", "dtype": "bfloat16", "env": environment(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
