#!/usr/bin/env bash
# The GPU benchmarks in parts of at most 5 minutes each, for a session lent an H100/H200 (see
# the device tool's README): a session has 15 minutes of device time and 10 per command, so it
# runs as many parts as its time allows, in this order:
#   profile  jax.profiler traces of a stream tick (seed setting), SD3-medium (batch 2) and Flux-dev
#            (batch 1), summarized: top kernels by category, kernels per call, idle gaps, TFLOP/s;
#            traces + compiled HLO under $OUT/profile_traces (profile_gpu.py, 240 s); profile-nographs:
#            SD3-medium and the tick without CUDA graphs, so that each kernel names its op (150 s)
#   fp8      quantize(model, "fp8") vs bf16: FP8 GEMMs in the compiled HLO, ms per call,
#            velocity distance, bytes; SD3-medium (static scales too, then with cuDNN's FP8 attention),
#            SD1.5 UNet if time is left (fp8_gpu.py, 270 s); fp8-flux: Flux-dev, bf16 against static
#            scales (400 s); fp8-flux-all: with dynamic scales and FP8 attention too (450 s);
#            fp8-flux-cublas: fp8-flux with $STREAMFLOW_JAX_GEMM=cublas (cuBLASLt's FP8 GEMMs; 400 s)
#   levers   XLA flags / switch variants vs the default, one process each, stream images/s:
#            4 and 8 ticks a call (one scan), CUDA graphs off (the process's, the tick's), JAX's
#            preallocation, the allocators, stable temp addresses, the old defaults, cuDNN conv
#            fusions (levers_gpu.py group a, 280 s); levers-b: command buffers off, one-pass GroupNorm alone,
#            JAX's preallocation, FP8 attention, GroupNorm by channels, XLA attention at head dim 40, Triton GEMM off, cuBLASLt, cuDNN GEMM fusion, tiling
#            search, autotune, graphs around loops (280 s); levers-sd3: the transformer group on
#            SD3-medium: cuBLAS GEMMs without DotMerger, DotMerger off, Triton GEMMs off, scanned
#            blocks, graphs off, FP8 attention, scanned blocks with dynamic-slice fusion, GEMM
#            backends, preallocation, autotune (280 s); levers-flux: Flux-dev with cuBLAS GEMMs
#            without DotMerger, DotMerger off, the single blocks' [attention, MLP] product split,
#            its 57 blocks scanned, with and without
#            dynamic-slice fusion: compile and call time (400 s)
#   stream   the seed's setting: SD1.5 UNet + TAESD, PeRFlow 4 steps, stream batch (stream_sd15.py)
#   sd3      SD3-medium velocity call vs diffusers eager and torch.compile, per call, queued, and in an
#            8-step sampling loop (sd3_gpu.py)
#   flux     Flux.1-dev velocity call vs diffusers eager (flux_gpu.py); flux-compiled: and torch.compile,
#            with a 4-step sampling loop on both sides
#   components  UNet / VAE / TAESD per call (components.py)
#   engine   the stream engine's own cost vs batched sf.sample, host time per tick (stream_engine.py)
#   encode   image-to-image encoding per request vs batched per tick (img2img_encode.py)
#   sdxl     SDXL UNet 1024^2 (batch 1/2/4) vs diffusers eager, then PeRFlow-SDXL 4 steps through the
#            stream engine vs diffusers eager sequential/stream (sdxl_gpu.py; torch.compile only if the
#            budget allows, 290 s); sdxl-compiled: the SDXL UNet at batch 4, 2, 1 vs torch.compile (450 s)
#   first    time to first image (seed setting) and first SD3-medium call in fresh processes: no cache,
#            cache cold, cache warm (what the persistent compilation cache saves), then no cache with the
#            blocks scanned (first_image_gpu.py, 300 s)
#   serve    the seed setting behind `streamflow-jax serve`: images/s of 16 concurrent n=1 requests and
#            realtime frames/s over WS /v1/stream (serve_gpu.py, 280 s; the server's stack travels as
#            wheels too: starlette uvicorn websockets httpx python-multipart prometheus-client pydantic)
# Usage: bash benchmarks/gpu_all.sh [PART ...]   (default: all thirteen, profile and levers first; e.g. `profile` in one
# command, `fp8` in the next, `levers` in a third). Each part prints a summary table; JSON lands in $OUT (or
# benchmarks/results/ when run by hand). Figures go to benchmarks/RESULTS.md.
# Preflight without a GPU: `SMOKE=1 bash benchmarks/gpu_all.sh [PART ...]` runs every part on this CPU
# with its tiny configs (--smoke, or the CPU preset), JSON in /tmp/gpu_all_smoke: the same commands and
# imports as on the device, so a Python 3.12 venv with the device's JAX (0.11.2) checks the script before
# device time is spent on it.
# The machine has Python 3.12 with JAX (CUDA), torch, flax, onnx and onnxruntime; diffusers and
# the server's stack travel as wheels in .whl/: `bash benchmarks/device_wheels.sh` here (9 MB),
# then run(..., carry=[".whl"]).
set -u
smoke="${SMOKE:-0}"
if [ "$smoke" = 1 ]; then
  out="${OUT:-/tmp/gpu_all_smoke}"
  export JAX_PLATFORMS=cpu
else
  out="${OUT:-benchmarks/results}"
fi
mkdir -p "$out"
# the library from the checkout, uninstalled (streamflow_jax/converters links to convert/)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else  # device_wheels.sh fetches them for the device's Python
    echo "gpu_all: .whl/ holds wheels for Python 3.12; not installed for $(python3 -V 2>&1)"
  fi
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
git rev-parse --short HEAD 2>/dev/null || true

part() {  # name, seconds, json, command...
  local name=$1 limit=$2 json=$3; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" --out "$out/$json" || echo "part $name failed or timed out: $?"
  echo "part $name: $((SECONDS - t0)) s"
  python3 benchmarks/summarize.py "$out/$json"
}

# pick GPU_ARGS SMOKE_ARGS: the first on the device, the second under SMOKE=1 (word-split by the caller)
pick() { if [ "$smoke" = 1 ]; then echo "$2"; else echo "$1"; fi; }
S=$(pick "" --smoke)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(profile levers fp8 fp8-flux stream sd3 flux components engine encode sdxl serve first)
for p in "${parts[@]}"; do
  case "$p" in
    profile) part profile 240 profile_gpu.json python3 benchmarks/profile_gpu.py $S ;;
    # the same without CUDA graphs (SD3-medium, the seed tick): each kernel then names its own HLO
    # op, so the summary's op_coverage says whether the trace misses kernels where it shows idle time
    profile-nographs) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" part profile-nographs 150 \
        profile_nographs_gpu.json python3 benchmarks/profile_gpu.py --workloads sd3 stream \
        --trace-dir "$out/profile_traces_nographs" $S ;;
    fp8) part fp8 270 fp8_gpu.json python3 benchmarks/fp8_gpu.py --workloads sd3 unet --static sd3 --attention sd3 $S ;;
    # Flux-dev: bf16 against FP8 with static scales only (the dynamic form and FP8 attention are
    # a compile each: the first device run's part ran out of time before writing anything)
    fp8-flux) part fp8-flux 400 fp8_flux_gpu.json python3 benchmarks/fp8_gpu.py --workloads flux --static flux --no-dynamic flux --budget-s 390 $S ;;
    # the same with the library's programs on cuBLAS(Lt) GEMMs without DotMerger ($STREAMFLOW_JAX_GEMM=cublas):
    # bf16 and static FP8 both (cuBLASLt's FP8 GEMM instead of Triton's FP8 fusion)
    fp8-flux-cublas) part fp8-flux-cublas 400 fp8_flux_cublas_gpu.json env STREAMFLOW_JAX_GEMM=cublas python3 benchmarks/fp8_gpu.py --workloads flux --static flux --no-dynamic flux --budget-s 390 $S ;;
    fp8-flux-all) part fp8-flux-all 450 fp8_flux_all_gpu.json python3 benchmarks/fp8_gpu.py --workloads flux --static flux --attention flux --budget-s 440 $S ;;
    levers) part levers 280 levers_gpu.json python3 benchmarks/levers_gpu.py --workloads stream --group a --budget-s 260 $S ;;
    levers-b) part levers-b 280 levers_b_gpu.json python3 benchmarks/levers_gpu.py --workloads stream --group b --budget-s 260 $S ;;
    levers-sd3) part levers-sd3 280 levers_sd3_gpu.json python3 benchmarks/levers_gpu.py --workloads sd3 --group transformer --budget-s 260 $S ;;
    levers-flux) part levers-flux 400 levers_flux_gpu.json python3 benchmarks/levers_gpu.py --workloads flux --group scan --budget-s 380 $S ;;
    # torch.compile of the SD1.5 UNet + TAESD (~2 min) does not fit the seed part's budget: its
    # in-run references are diffusers eager, sequential and stream
    stream) part stream 260 stream_sd15_gpu.json python3 benchmarks/stream_sd15.py --preset $(pick gpu cpu) --no-compile ;;
    sd3) part sd3 200 sd3_gpu.json python3 benchmarks/sd3_gpu.py $S ;;
    # flux: eager reference only (build + our compile ~2-3 min); flux-compiled adds torch.compile (~2 min more)
    # and a 4-step sampling loop on both sides (our scan's compile, ~25 s)
    flux) part flux 200 flux_gpu.json python3 benchmarks/flux_gpu.py --no-compile $S ;;
    flux-compiled) part flux-compiled 330 flux_gpu_compiled.json python3 benchmarks/flux_gpu.py --sampler-steps 4 $S ;;
    components) part components 150 components_gpu.json python3 benchmarks/components.py --preset $(pick gpu cpu) $(pick '' '--repeats 1') ;;
    engine) part engine 120 stream_engine_gpu.json python3 benchmarks/stream_engine.py $(pick '' '--requests 32 --repeats 1') ;;
    encode) part encode 90 img2img_encode_gpu.json python3 benchmarks/img2img_encode.py --vae $(pick '' '--size 64 --images 2 --repeats 1') ;;
    sdxl) part sdxl 290 sdxl_gpu.json python3 benchmarks/sdxl_gpu.py --budget-s 280 $S ;;
    sdxl-compiled) part sdxl-compiled 450 sdxl_gpu_compiled.json python3 benchmarks/sdxl_gpu.py --stages unet compile --budget-s 440 $S ;;
    serve) part serve 280 serve_gpu.json python3 benchmarks/serve_gpu.py $S ;;
    first) part first 300 first_image_gpu.json python3 benchmarks/first_image_gpu.py --budget-s 290 $S ;;
    *) echo "unknown part $p (profile profile-nographs fp8 fp8-flux fp8-flux-cublas fp8-flux-all levers levers-b levers-sd3 levers-flux stream sd3 flux flux-compiled components engine encode sdxl sdxl-compiled serve first)" ;;
  esac
done
