# Entry points, each self-contained on a fresh machine with Python 3.11:
#   make demo   runtime install (+ scikit-learn, for the digit accuracy), then `streamflow-jax generate`
#   make serve  runtime + serve extra, then `streamflow-jax serve` (the digits model on http://127.0.0.1:8000)
#   make test   runtime + test extra (CPU torch pinned, diffusers, transformers), then pytest
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench serve clean

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
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n auto --dist loadgroup

bench: $(VENV)/.test
	$(BIN)/python benchmarks/sd3_cpu.py
	$(BIN)/python benchmarks/backends.py

clean:
	rm -rf $(VENV) build *.egg-info digits.png
