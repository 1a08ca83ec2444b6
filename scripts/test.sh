#!/usr/bin/env bash
# The test suite. Native backends that should exist here are *required*: if the CPU module or
# the Triton interpreter cannot load, their tests fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1            # Triton kernels run on CPU tensors (slowly)
export CDK_REQUIRE_BACKENDS=${CDK_REQUIRE_BACKENDS:-cpu,triton,cuda-emulated}
exec python3 -m pytest -q tests "$@"
