#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/check.sh installs on the GPU machine, which has no network and
# lacks them (its image has Python 3.12, torch 2.11 + CUDA 13, triton, transformers, pytest,
# psutil, requests, pyyaml, matplotlib, tensorboard; /work/.library/device/KINDS.md lists it).
#
#   bash benchmarks/gpu/fetch_wheels.sh        # -> benchmarks/gpu/wheels/ (gitignored, ~10 MB)
#
# Then carry benchmarks/gpu/wheels with the check (the device tool's `carry`, 64 MiB at most).
# Versions are the ones the CPU suite runs with (.venv); --no-deps: every needed package is named.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/benchmarks/gpu/wheels"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WHEELS=(
  megatron-core==0.16.1          # the trainer's model, optimizer and schedules (cp312 manylinux wheel)
  math-verify==0.9.0             # popo_mega.rewards.math (imported by the train loop)
  latex2sympy2_extended==1.11.0  # math-verify's parser
  antlr4-python3-runtime==4.13.2 # latex2sympy2_extended's runtime
)
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]%% *}"
ls -la "$DEST"
du -sh "$DEST"
