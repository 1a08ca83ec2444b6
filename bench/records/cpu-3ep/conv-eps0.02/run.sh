#!/bin/bash
cd "$(dirname "$0")/../../../.."
for arm in "$@"; do
  extra="--eot 4 --mc-samples 4"
  [ "$arm" = none ] && extra="--eot 1"
  OMP_NUM_THREADS=1 python -m cdkernels.attack --checkpoint runs/reproduce_cpu-3ep/${arm}_s0/best.pt --data fashion-mnist --limit-eval 100 --attack pgd --eps 0.02 --steps 20 --restarts 2 $extra --seed 1000 --device cpu --out bench/records/cpu-3ep/conv-eps0.02/${arm}_s0.json --quiet
  echo "$arm done $(date +%T)"
done
