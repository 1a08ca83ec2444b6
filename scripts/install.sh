#!/usr/bin/env bash
# Install cdkernels for development (editable) with everything its tests, benchmarks and demos
# need, on a fresh machine.
#
# torch first, and pinned: `torch==2.13.0` is the CPU build here only because this machine's
# pip configuration serves the CPU wheel for it; from plain PyPI on Linux the same line pulls a
# CUDA build of several GB. Elsewhere pick the build with the PyTorch index, e.g.
#   pip install torch --index-url https://download.pytorch.org/whl/cpu      (or .../whl/cu128)
# and run this script afterwards: an installed torch >= 2.4 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# The build requirements of pyproject.toml, installed here because the editable build below
# runs without build isolation (so rebuilds are incremental and reuse this environment).
"$PY" -m pip install -q "setuptools>=77" pybind11 ninja wheel
# Real Fashion-MNIST, offline, from Debian (used by the training CLI and its tests).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist (digits still work)" >&2
  else
    echo "note: run 'sudo apt-get install dataset-fashion-mnist' for Fashion-MNIST" >&2
  fi
fi
# The package with the extras the tests and demos use (dependencies come from pyproject.toml),
# built by setup.py: one compiled module, ninja, no libtorch link, CUDA part when nvcc exists.
"$PY" -m pip install -q --no-build-isolation -e ".[train,test]"
# torchattacks (independent cross-check of cdkernels.robust) without its dependencies: it needs
# only torch, numpy and scipy at import, while its declared torchvision requirement would make
# pip replace torch with the newest (CUDA) build.
"$PY" -m pip install -q --no-deps "torchattacks==3.5.1"
"$PY" -c "import cdkernels, json; print(json.dumps(cdkernels.backends(), indent=1))"
