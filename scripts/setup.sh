#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install gigamamba into it.
# Sourced by scripts/test.sh and scripts/demo.sh; sets $VENV.
set -euo pipefail
VENV=${GIGAMAMBA_VENV:-.venv}
# .installed is written once every install step below has passed: an environment without it is new, or was
# left half-installed (by a full disk, say), and pip will write several GiB into it.
if [ ! -e "$VENV/.installed" ]; then
  # About 10 GiB: the environment's 7 GiB (torch and its CUDA libraries) and pip's unpacking beside it. On a
  # fuller disk pip fails halfway with "No space left on device" (a CI run did): say so first, with the way out.
  parent=$VENV
  while [ ! -d "$parent" ]; do parent=$(dirname "$parent"); done  # the folder venv will create it in
  free_kib=$(df -Pk "$parent" 2>/dev/null | awk 'NR == 2 {print $4}') || free_kib=""  # no df: no check
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $((10 * 1024 * 1024)) ]; then
    echo "setup: only $((free_kib / 1024)) MiB free on the disk of $parent; installing needs about 10 GiB" \
         "(torch and its CUDA libraries): free some space, or set GIGAMAMBA_VENV to a folder on a larger disk" >&2
    exit 1
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1: the pair timm needs that imports cleanly on a CPU-only machine.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[test]"
touch "$VENV/.installed"
# The CUDA extension is compiled (not run) when nvcc is present; point torch at a toolkit with libcudart.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -e "$d/lib64/libcudart.so" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
export PYTHONUNBUFFERED=1
