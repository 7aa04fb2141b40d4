"""One of two processes sampling one global batch over 2 x 4 CPU devices (jax.distributed on
localhost, gloo collectives); process 0 writes the gathered result. Started by
tests/test_sharding.py::test_two_processes_equal_one.

    python two_process.py RANK PORT MODEL_DIR OUT.npy
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

rank, port, model_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=rank)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import streamflow_jax as sf  # noqa: E402
from streamflow_jax.sharding import batch_sharding  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = sf.make_mesh(data=4, model=2)
model = sf.load(model_dir, mesh=mesh, strategy="tensor")
inputs = np.load(os.path.join(os.path.dirname(out), "inputs.npz"))


def global_array(a):
    """The same global batch in every process, each holding its own shards."""
    sharding = batch_sharding(mesh, a.ndim, a.shape[0])
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


x = global_array(inputs["x"])
cond = {k: global_array(inputs[k]) for k in ("encoder_hidden_states", "pooled_projections")}
result = sf.sample(model, x, sf.schedules.flow_match(3), cond)
gathered = multihost_utils.process_allgather(result, tiled=True)
if rank == 0:
    np.save(out, np.asarray(gathered))
jax.distributed.shutdown()
