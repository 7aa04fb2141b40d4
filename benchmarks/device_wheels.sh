#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels gpu_all.sh installs on the GPU machine, which has no
# package registry: what its image lacks (the device README's list, KINDS.md), for Python 3.12
# x86-64, each named with its version and without its dependencies (the image has those; a
# second numpy or torch in /tmp/site would shadow the image's own builds). Then call
#   run(command="bash benchmarks/gpu_all.sh profile fp8", carry=[".whl"], timeout_s=...)
# Versions: the ones this project's tests run with (diffusers as in the test extra; pydantic and
# pydantic-core must match each other).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0                           # the references (+ diffusers' need)
  starlette==1.10.0 uvicorn==0.54.0 websockets==17.4 python-multipart==0.0.34  # the serve part
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl  # carried with the working tree: 64 MiB in all per call
