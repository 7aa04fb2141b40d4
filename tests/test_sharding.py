"""Multi-device behaviour, run where JAX has 8 host devices: a separate pytest process over
tests/multidevice with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the rest of the
suite keeps one device); and the partition rules themselves, here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamflow_jax.models.family import standard_logical_axes

TESTS = Path(__file__).resolve().parent


def test_multidevice_suite_passes():
    # conftest's LLVM -O0 too: the subprocess's SPMD programs are compile-bound like the rest
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(TESTS / "multidevice")], env=env, cwd=TESTS.parent, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


def test_logical_axes_megatron_roles():
    assert standard_logical_axes("transformer_blocks.0.attn.to_q.kernel", (8, 8)) == ("embed", "heads")
    assert standard_logical_axes("transformer_blocks.0.attn.to_out.0.kernel", (8, 8)) == ("heads", "embed")
    assert standard_logical_axes("transformer_blocks.0.ff.net.0.proj.kernel", (8, 32)) == ("embed", "mlp")
    assert standard_logical_axes("encoder.block.0.layer.1.DenseReluDense.wo.kernel", (32, 8)) == ("mlp", "embed")
    assert standard_logical_axes("single_transformer_blocks.3.proj_out.kernel", (40, 8)) == ("mlp", "embed")
    assert standard_logical_axes("transformer_blocks.0.norm1.linear.kernel", (8, 48)) == (None, "out")
    assert standard_logical_axes("conv_in.kernel", (3, 3, 4, 32)) == (None, None, None, "out")
    assert standard_logical_axes("transformer_blocks.0.attn.to_q.bias", (8,)) == (None,)


def test_two_processes_equal_one(tmp_path):
    """jax.distributed on localhost: 2 processes x 4 CPU devices sample one global batch (the
    model loaded straight onto the 8-device mesh, tensor-parallel); equal to one process."""
    import socket

    import diffusers
    import numpy as np
    from conftest import VARIANTS, randomize, sd3_inputs

    import streamflow_jax as sf

    cfg = dict(VARIANTS["sd3"], num_attention_heads=4, attention_head_dim=16, caption_projection_dim=64)
    randomize(diffusers.SD3Transformer2DModel(**cfg), 0, std=0.1).save_pretrained(tmp_path / "src")
    sf.convert(tmp_path / "src", tmp_path / "model", progress=False)
    x, _, cond = sd3_inputs(cfg, 8, 8, 8, seed=5)
    np.savez(tmp_path / "inputs.npz", x=x, **cond)
    want = np.asarray(sf.sample(sf.load(tmp_path / "model"), x, sf.schedules.flow_match(3), cond))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = TESTS / "multidevice" / "two_process.py"
    for attempt in range(3):  # the coordinator's port, free when picked, may be taken before it binds
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = str(s.getsockname()[1])
        procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path / "model"),
                                   str(tmp_path / "out.npy")], env=env, cwd=TESTS.parent,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        try:
            logs = [p.communicate(timeout=600)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if not any("address already in use" in log.lower() for log in logs):
            break
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-5


def test_load_takes_sharding_or_mesh_not_both(tiny_sd3):
    """Both given: one was ignored without a word, the mesh for a converted directory and the
    sharding for a diffusers one."""
    import streamflow_jax as sf

    with pytest.raises(ValueError, match="give sharding= .* or mesh= .*, not both"):
        sf.load(tiny_sd3[0], mesh=sf.make_mesh(1), sharding=lambda name, abstract: None)
