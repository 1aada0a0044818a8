# Mnemosyne — the two commands a newcomer needs are `make up` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup up demo test test-fast bench proto lint clean

setup:
	@bash scripts/setup.sh

proto: setup

# The main job. Runs the built-in model on a long prompt and prints text, TTFT and TBT.
up: setup
	$(PY) -m common.cli demo

test: setup
	$(PYTEST) -q tests

test-fast: setup
	$(PYTEST) -q tests/unit

bench: setup
	$(PY) -m bench.run_all

lint: setup
	$(PY) -m compileall -q common services tests bench

clean:
	rm -rf common/rpc/gen .pytest_cache
