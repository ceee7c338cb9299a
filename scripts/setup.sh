#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install gigamamba into it.
# Sourced by scripts/test.sh and scripts/demo.sh; sets $VENV.
set -euo pipefail
VENV=${GIGAMAMBA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1: the pair timm needs that imports cleanly on a CPU-only machine.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# The CUDA extension is compiled (not run) when nvcc is present; point torch at a toolkit with libcudart.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -e "$d/lib64/libcudart.so" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
export PYTHONUNBUFFERED=1
