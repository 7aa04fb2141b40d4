"""The seed's setting behind the server, on a GPU: SD1.5-architecture UNet (PeRFlow diff_eps,
4 steps) + TAESD at 512^2, random weights at the real sizes, bf16; images/s of concurrent
n=1 requests through ``POST /v1/images/generations``, and realtime frames/s through
``WS /v1/stream`` (512x512 JPEG frames, image to image). JSON.

Text encoding is excluded, as in the seed's measurements (and ``stream_sd15.py``): each prompt
gets fixed random 77x768 embeddings (a stand-in for CLIP-L, cached like real ones). The server
is the library's app (``create_app``) under uvicorn in a thread of this process; the clients
run in this process too.

    python benchmarks/serve_gpu.py            # on the GPU (about 3 minutes with compilation)
    python benchmarks/serve_gpu.py --smoke    # tiny UNet/TAESD at 128^2 on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, environment, random_flowmodel  # noqa: E402
from serve_load import load, realtime  # noqa: E402

STEPS, WINDOWS = 4, 4


class RandomTextPipe:
    """The seed setting as a prompt pipeline for ``PromptStream``: a PeRFlow UNet, TAESD, and
    per-prompt random text embeddings instead of CLIP."""

    default_steps = STEPS
    default_guidance = None
    guidance_mode = "cfg"
    mesh = None

    def __init__(self, unet, taesd, latent: int, text: tuple[int, int]):
        self.model, self.decoder, self.latent, self.text = unet, taesd, latent, text
        self.vae_scale = taesd.scale_factor

    def resolve_guidance(self, scale=None):
        from streamflow_jax.sampling import Guidance

        return Guidance.resolve(scale, mode="cfg", default=None)

    def latent_shape(self, height=None, width=None):
        return (self.latent, self.latent, 4)

    def cond_shapes(self, text_len=None):
        return {"encoder_hidden_states": self.text}

    def schedule(self, steps, shape):
        import streamflow_jax as sf

        return sf.schedules.perflow(steps, WINDOWS)

    def encode(self, prompts, text_len=None):
        import numpy as np

        rows = [np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
                .standard_normal(self.text).astype(np.float32) for p in prompts]
        return {"encoder_hidden_states": np.stack(rows)}

    def encode_image(self, image, batch):
        import jax.numpy as jnp

        from streamflow_jax.models import encode_latents
        from streamflow_jax.pipelines.images import images_to_array

        latents = encode_latents(self.decoder, jnp.asarray(images_to_array(image, 3)) * 2 - 1)
        return jnp.broadcast_to(latents, (batch, *latents.shape[1:]))


def build(smoke: bool, slots: int, streams: int):
    from streamflow_jax.models.perflow import PeRFlowAdapter
    from streamflow_jax.models.taesd import TinyConfig
    from streamflow_jax.models.unet import UNetConfig
    from streamflow_jax.pipelines import PromptStream
    from streamflow_jax.serve import Served

    if smoke:
        unet_cfg = UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                              cross_attention_dim=32, attention_head_dim=2,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        taesd_cfg = TinyConfig(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(8,) * 4,
                               num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
        latent, text, dtype = 16, (8, 32), "float32"
    else:
        unet_cfg, taesd_cfg, latent, text, dtype = UNetConfig.sd15(), TinyConfig(), 64, (77, 768), "bfloat16"
    unet = random_flowmodel("UNet2DConditionModel", unet_cfg, dtype).with_adapter(PeRFlowAdapter("diff_eps", WINDOWS))
    taesd = random_flowmodel("AutoencoderTiny", taesd_cfg, dtype, seed=1)
    pipe = RandomTextPipe(unet, taesd, latent, text)
    # one step program (every slot computed every tick), as stream_sd15.py on the GPU
    stream = PromptStream(pipe, slots_per_stream=slots, streams=streams, guidance=True,
                          min_batch=slots * streams)
    side = latent * pipe.vae_scale
    return Served(stream, "sd15-random", (side, side), 3, "a photo")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--slots", type=int, default=4, help="slots per stream (the seed's N=4)")
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="default 640 (smoke: 32)")
    p.add_argument("--rt-seconds", type=float, default=None, help="default 15 (smoke: 3)")
    p.add_argument("--rt-fps", type=float, default=60)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    requests = args.requests or (32 if args.smoke else 640)
    rt_seconds = args.rt_seconds or (3 if args.smoke else 15)

    import uvicorn

    from streamflow_jax.backends.cache import enable_compilation_cache
    from streamflow_jax.serve import create_app
    from streamflow_jax.serve.metrics import compilations

    enable_compilation_cache()
    t0 = time.perf_counter()
    served = build(args.smoke, args.slots, args.streams)
    build_s = time.perf_counter() - t0
    app = create_app(served=served, max_queue=4 * args.clients, frames_in_flight=4, timeout=600)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    state = app.state.server
    state.worker.ready.wait()
    while not server.started:
        time.sleep(0.05)
    compile_s = time.perf_counter() - t0
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    compiles = compilations()
    asyncio.run(load(url, 2 * args.clients, args.clients, STEPS))  # connections, first requests
    tp = asyncio.run(load(url, requests, args.clients, STEPS))
    rt = asyncio.run(realtime(url, rt_seconds, args.rt_fps, steps=STEPS, strength=0.5))
    new_compiles = compilations() - compiles
    server.should_exit = True
    thread.join(120)
    import jax

    emit({"benchmark": "serve_gpu", "smoke": args.smoke, "env": environment(), "device": str(jax.devices()[0]),
          "setting": {"image": served.size, "steps": STEPS, "slots": args.slots * args.streams,
                      "dtype": "float32" if args.smoke else "bfloat16", "clients": args.clients},
          "build_s": round(build_s, 1), "compile_s": round(compile_s, 1), "generations": tp, "realtime": rt,
          "compilations_after_warm_up": new_compiles}, args.out)


if __name__ == "__main__":
    main()
