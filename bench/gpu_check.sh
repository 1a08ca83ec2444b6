#!/usr/bin/env bash
# Everything that needs a GPU, in one prepared run (< 5 minutes on an H100/H200):
# build with the CUDA part, the GPU tests, the op benchmark with the SASS prediction beside it,
# the training benchmark. Full results go
# under $OUT (default bench/results); a short table is printed last.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#
# Fashion-MNIST timing (issue #4: 8 epochs, batch 256, bf16, --cuda-graph): the GPU machine has
# no Debian package, so copy the IDX files into the ignored folder .data/fashion-mnist here
# (cp -r /usr/share/datasets/fashion-mnist .data/) and carry ".data" to the device.
# At most 8 files are written under $OUT (the device tool returns no more).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CDK_FORCE_CUDA=1 CDK_REQUIRE_BACKENDS=cuda,triton
t0=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/machine.txt"

echo "== build"
( time pip install -q --no-build-isolation -e . ) > "$OUT/build.log" 2>&1
status_build=$?
tail -3 "$OUT/build.log"
python -c "import cdkernels, json; print(json.dumps(cdkernels.backends()))" | tee -a "$OUT/machine.txt"

echo "== GPU tests"
timeout 180 python -m pytest -q tests -k "(cuda or graph) and not emulated" \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
status_tests=${PIPESTATUS[0]}

echo "== op benchmark"
timeout 120 python bench/bench_ops.py --device cuda --csv "$OUT/ops.csv" --png "$OUT/ops.png" \
  2>&1 | tee "$OUT/ops.txt" | tail -40
echo "== predicted from SASS (bench/sass_budget.py), appended to ops.txt beside the measured"
# the same table as docs/benchmarks.md "Predicted from SASS": compare its % of copy with the
# measured GB/s above and correct the model (docs/benchmarks.md) where they disagree
timeout 240 python bench/sass_budget.py --markdown --jobs 4 2>&1 | grep -v Warning \
  | tee -a "$OUT/ops.txt" | tail -45
echo "== training-step benchmark"
timeout 60 python bench/bench_train.py --device cuda --models cd_preact_resnet56 --batch 128 \
  --dtype bf16 --size 32 --channels 3 --out "$OUT/train.json" 2>&1 | tee "$OUT/train.txt" | tail -15
FMNIST=${CDK_FMNIST_DIR:-.data/fashion-mnist}
if [ -d "$FMNIST" ]; then
  echo "== Fashion-MNIST, PreActResNet-20, 8 epochs, batch 256, bf16, CUDA graph (std noise)"
  for noise in none std; do
    ( time timeout 90 python -m cdkernels.train --model cd_preact_resnet20 --data fashion-mnist \
        --data-dir "$FMNIST" --epochs 8 --batch-size 256 --amp bf16 --cuda-graph --noise $noise \
        --sigma 0.1 --out "/tmp/fmnist_$noise" --overwrite --quiet ) 2>&1 | tail -4 \
      | sed "s/^/[$noise] /" | tee -a "$OUT/train.txt"
  done
else
  echo "(no $FMNIST: Fashion-MNIST timing skipped)" | tee -a "$OUT/train.txt"
fi

echo "== summary ($(( $(date +%s) - t0 )) s)"
echo "build: $([ $status_build = 0 ] && echo ok || echo FAILED)   tests: $([ $status_tests = 0 ] && echo ok || echo FAILED)"
grep -E "cd_step fwd |cd_step fwd\+bwd|cd_smooth|ensemble_mean|copy" "$OUT/ops.txt" | grep -v "^#" | head -30
