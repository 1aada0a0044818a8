# Mnemosyne — the two commands a newcomer needs are `make up` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup up demo test test-all test-fast test-gpu k8s bench proto lint clean

setup:
	@bash scripts/setup.sh

proto: setup

# The main job: Redis, kvstore, a prefill instance (spp=2), a decode instance (kvp=2) and the router on
# 127.0.0.1:50051, serving the built-in model. Ctrl-C stops them all. `mnemosyne serve` (scripts/up.py);
# flags: make up ARGS=--help, e.g.
#   make up ARGS="--model DIR --max-model-len N --decode-kvp K --kvp-tokens M"
ARGS ?=
up: setup
	$(PY) -m common.cli serve $(ARGS)

# Offline: the built-in model answers a question about a long document; prints text, TTFT and TBT.
demo: setup
	$(PY) -m common.cli demo

# CI's suite (target: under 20 minutes on 2 cores): everything but the `slow` cases, each of which repeats a
# faster case's coverage on another input (e.g. the untied grids of test_tied_grids.py). It ends with the 30
# slowest tests and the failures only (not the GPU tests' skip reasons), so CI's log shows where the time goes.
test: setup
	$(PYTEST) -q -m "not slow" --durations=30 -rfE tests

# Everything, the slow cases included.
test-all: setup
	$(PYTEST) -q tests

test-fast: setup
	$(PYTEST) -q tests/unit

# On a CUDA machine: the GPU tests alone (kernels, CUDA graphs, fused ops, the engine vs transformers).
test-gpu: setup
	$(PYTEST) -q --confcutdir=tests/gpu tests/gpu

# Kubernetes manifests (deploy/k8s): render every overlay, validate offline, check the wiring.
k8s: setup
	$(PYTEST) -q tests/integration/test_k8s_manifests.py

bench: setup
	$(PY) -m bench.run_all

lint: setup
	$(PY) -m compileall -q common services tests bench

clean:
	rm -rf common/rpc/gen .pytest_cache
