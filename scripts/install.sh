#!/usr/bin/env bash
# Install cdkernels and everything its tests, benchmarks and demos need, on a fresh machine.
# Uses the CPU build of torch 2.13.0 (a bare `torch` requirement would pull a CUDA build of
# several GB). Builds the compiled module with its CUDA part when nvcc is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q triton numpy scipy tqdm matplotlib scikit-learn pytest pytest-benchmark \
  pybind11 ninja "setuptools>=64" wheel
# Real Fashion-MNIST, offline, from Debian (used by the training CLI and its tests).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist (digits still work)" >&2
  else
    echo "note: run 'sudo apt-get install dataset-fashion-mnist' for Fashion-MNIST" >&2
  fi
fi
# The build step: one compiled module, ninja, no libtorch link (see setup.py).
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import cdkernels, json; print(json.dumps(cdkernels.backends(), indent=1))"
