# Entry points, each self-contained on a fresh machine with Python 3.11:
#   make demo   runtime install (+ scikit-learn, for the digit accuracy), then `streamflow-jax generate`
#   make serve  runtime + serve extra, then `streamflow-jax serve` (the digits model on http://127.0.0.1:8000)
#   make test   runtime + test extra (CPU torch pinned, diffusers, transformers), then pytest
#   make compat the GPU machine's versions on this CPU (Python 3.12, JAX 0.11.2): the suite, then the
#               device script's preflight (SMOKE=1 benchmarks/gpu_all.sh). Not part of CI: ~4 GB
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench serve compat clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# torch first and pinned: any other spelling may pull a multi-GB CUDA build.
# The onnx extra too: the export and ONNX Runtime tests run in CI. And TensorRT-RTX (~330 MB):
# its builder needs no GPU, so CI parses and builds an engine of every exported graph. And the
# serve and ray extras with the clients the serve tests use (CI runs a server, 2 Ray replicas
# and a headless Chromium against it). The runtime comes with the extras, in the same command.
# --no-compile: pip would byte-compile every file of every package, on one core (transformers'
# thousands of model files, Ray, torch): 141 s of install here, 59 s without. The test run
# writes the bytecode of what it imports instead (see test).
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e ".[test,onnx,tensorrt-rtx,serve,ray]"
	touch $@

$(VENV)/.serve: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e ".[serve]"
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/streamflow-jax generate

serve: $(VENV)/.serve
	$(BIN)/streamflow-jax serve

# one pytest-xdist worker per core; each test file stays on one worker (conftest.py). Bytecode
# is written even where PYTHONDONTWRITEBYTECODE is set: the first process to import a module
# compiles it once for the workers, servers and subprocesses after it (else every one of them
# compiles torch, diffusers and transformers again: 15 s each)
test: $(VENV)/.test
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -rs -n auto --dist loadgroup

bench: $(VENV)/.test
	$(BIN)/python benchmarks/sd3_cpu.py
	$(BIN)/python benchmarks/backends.py

# The device has Python 3.12 and JAX 0.11.2 (the code must run on 0.11 and 0.12): COMPAT_JAX=0.12.0.1
# checks the next. PyPI's torch 2.13.0 for Python 3.12 is a CUDA build (~4 GB in the venv, downloaded:
# the CPU build on this disk is for 3.11); it runs on the CPU. No Ray or TensorRT-RTX: those tests skip.
COMPAT_PYTHON ?= python3.12
COMPAT_JAX    ?= 0.11.2
COMPAT        := .venv-compat
$(COMPAT)/.jax-$(COMPAT_JAX): pyproject.toml
	$(COMPAT_PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip
	$(COMPAT)/bin/python -m pip install -q --no-compile torch==2.13.0
	$(COMPAT)/bin/python -m pip install -q --no-compile "jax==$(COMPAT_JAX)" "jaxlib==$(COMPAT_JAX)" -e ".[test,onnx,serve]"
	rm -f $(COMPAT)/.jax-* && touch $@

compat: $(COMPAT)/.jax-$(COMPAT_JAX)
	env -u PYTHONDONTWRITEBYTECODE $(COMPAT)/bin/python -m pytest -q -n auto --dist loadgroup -p no:cacheprovider
	SMOKE=1 PATH="$(CURDIR)/$(COMPAT)/bin:$$PATH" bash benchmarks/gpu_all.sh

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info digits.png
