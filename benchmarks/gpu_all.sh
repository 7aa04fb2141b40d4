#!/usr/bin/env bash
# Every GPU benchmark in one command, for a session lent an H100/H200 (see the device tool's
# README). The machine has Python 3.12 with JAX (CUDA), torch, flax, onnx and onnxruntime;
# diffusers (and its pure-Python dependencies the image lacks) travel as wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# then: run(command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=590)
# Each benchmark has its own time limit so one slow compile cannot starve the others; the JSON
# lands in $OUT (or benchmarks/results/ when run by hand).
set -u
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
# the library from the checkout, uninstalled (streamflow_jax/converters links to convert/)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 200 python3 benchmarks/stream_sd15.py --preset gpu --out "$out/stream_sd15_gpu.json" || echo "stream_sd15 failed: $?"
timeout 200 python3 benchmarks/sd3_gpu.py --out "$out/sd3_gpu.json" || echo "sd3_gpu failed: $?"
timeout 120 python3 benchmarks/components.py --preset gpu --out "$out/components_gpu.json" || echo "components failed: $?"
