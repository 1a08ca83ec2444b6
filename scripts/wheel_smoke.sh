#!/usr/bin/env bash
# The package as a user gets it: build a wheel, install it (not editable) into a fresh venv
# that has only torch, and use it from outside the source tree:
#   python -m cdkernels.info, cd_step on the CPU backend, cdk-train --help, a one-epoch digits
#   run that writes a checkpoint, metrics.jsonl and curves.png, then cdk-attack on it.
# Also builds a second wheel from a read-only copy of the tree with build isolation (the way
# pip builds an sdist or a package manager builds a mounted checkout).
#
# Needs the build requirements (setuptools>=77, pybind11, ninja) in $PYTHON: scripts/install.sh
# puts them there. The first wheel is built --no-build-isolation from this tree, so it reuses
# the objects of the editable build (same ninja commands: nothing recompiles).
#
# Env: PYTHON (default python3); CDK_SMOKE_DIR (work folder, default a new /tmp folder, removed
# at the end unless CDK_SMOKE_KEEP=1); CDK_SMOKE_TORCH (default torch==2.13.0, which this
# machine's package configuration serves as the CPU build; elsewhere point pip at the PyTorch
# CPU index, e.g. PIP_INDEX_URL=https://download.pytorch.org/whl/cpu);
# CDK_SMOKE_READONLY=0 skips the read-only / isolated build.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${PYTHON:-python3}
TORCH_REQ=${CDK_SMOKE_TORCH:-torch==2.13.0}
WORK=${CDK_SMOKE_DIR:-$(mktemp -d /tmp/cdk-wheel-smoke.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
RO_PID=
cleanup() {
  # stop our own background build if a later step failed, then remove the temporary folder
  if [ -n "$RO_PID" ] && kill -0 "$RO_PID" 2>/dev/null; then kill "$RO_PID" 2>/dev/null || true; fi
  if [ "${CDK_SMOKE_KEEP:-0}" != 1 ] && [ -z "${CDK_SMOKE_DIR:-}" ]; then
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
t0=$SECONDS
step() { echo "== wheel smoke [$((SECONDS - t0))s]: $*"; }
fail() { echo "wheel smoke FAILED: $*" >&2; exit 1; }

# -- 1. the wheel -------------------------------------------------------------------------------
step "building the wheel from $SRC"
rm -rf "$WORK/dist"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"
WHEEL=$(ls "$WORK"/dist/cdkernels-*.whl)
[ "$(echo "$WHEEL" | wc -l)" = 1 ] || fail "expected one wheel, got: $WHEEL"
"$PY" - "$WHEEL" <<'EOF'
import re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
meta = zipfile.ZipFile(sys.argv[1]).read(meta_name).decode()
problems = []
if not any(re.fullmatch(r"cdkernels/_C\.[^/]*\.so", n) for n in names):
    problems.append("no compiled module cdkernels/_C*.so")
for need in ("cdkernels/__init__.py", "cdkernels/info.py", "cdkernels/models/__init__.py",
             "cdkernels/backends/cuda.py"):
    if need not in names:
        problems.append(f"missing {need}")
if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
           for n in names):
    problems.append("no LICENSE in .dist-info")
for line in ("Requires-Dist: torch>=2.4", "License-Expression: BSD-3-Clause",
             "Provides-Extra: train", "Provides-Extra: attacks"):
    if line not in meta:
        problems.append(f"METADATA lacks {line!r}")
ep = zipfile.ZipFile(sys.argv[1]).read(meta_name.replace("METADATA", "entry_points.txt")).decode()
for script in ("cdk-train = cdkernels.train:main", "cdk-attack = cdkernels.attack:main"):
    if script not in ep:
        problems.append(f"entry_points.txt lacks {script!r}")
if any(n.startswith(("csrc/", "tests/", "build/")) for n in names):
    problems.append("sources or tests inside the wheel")
if problems:
    sys.exit("wheel check: " + "; ".join(problems))
print(f"wheel ok: {sys.argv[1].rsplit('/', 1)[-1]} ({len(names)} files)")
EOF

# -- 2. read-only source tree, build isolation (in the background: it compiles the CPU part
#       from scratch, which overlaps with the pip installs of the next steps) ------------------
if [ "${CDK_SMOKE_READONLY:-1}" != 0 ]; then
  step "started: a wheel from a read-only copy of the tree, with build isolation (CPU part only)"
  RO="$WORK/ro-src"
  [ -d "$RO" ] && chmod -R u+w "$RO"
  rm -rf "$RO" "$WORK/ro-dist"
  mkdir -p "$RO" "$WORK/ro-dist"
  # the files a source distribution would have: tracked and new, not ignored (no build/)
  git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$RO"
  chmod -R a-w "$RO"
  # -v: the log must show setup.py's messages (checked below). MAX_JOBS=1 leaves a core to the
  # foreground steps (on 2 cores, two compilers made the pip installs 4x slower).
  build_ro=(env -u CDK_FORCE_CUDA CDK_SKIP_CUDA=1 MAX_JOBS="${CDK_SMOKE_RO_JOBS:-1}" "$PY" -m pip wheel -v --no-deps
            -w "$WORK/ro-dist" "$RO")
  if [ "$(id -u)" = 0 ]; then
    # root ignores permission bits: make the tree really read-only in a private mount namespace
    unshare -m --propagation private sh -c 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" &&
      if touch "$1/.probe" 2>/dev/null; then echo "read-only mount failed" >&2; exit 1; fi &&
      shift && exec "$@"' sh "$RO" "${build_ro[@]}" > "$WORK/ro-build.log" 2>&1 &
  else
    "${build_ro[@]}" > "$WORK/ro-build.log" 2>&1 &
  fi
  RO_PID=$!
fi

# -- 3. a fresh venv with only torch, then the wheel --------------------------------------------
step "fresh venv with $TORCH_REQ"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q "$TORCH_REQ"
TORCH_BEFORE=$("$V/python" -c "import torch; print(torch.__version__)")
step "installing the wheel with [train] (torch $TORCH_BEFORE must stay)"
"$V/python" -m pip install -q "$WHEEL[train]"
TORCH_AFTER=$("$V/python" -c "import torch; print(torch.__version__)")
[ "$TORCH_BEFORE" = "$TORCH_AFTER" ] || fail "installing the wheel replaced torch $TORCH_BEFORE by $TORCH_AFTER"
"$V/python" -m pip check

# -- 4. use it from outside the source tree -----------------------------------------------------
cd "$WORK"
unset PYTHONPATH TRITON_INTERPRET CDK_BACKEND   # the installed package, never the source tree
step "python -m cdkernels.info"
"$V/python" -m cdkernels.info
"$V/python" -m cdkernels.info --version
"$V/python" -m cdkernels.info --json > info.json
"$V/python" - "$WORK/venv" <<'EOF'
import json, os, sys
info = json.load(open("info.json"))
venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(info["location"]).startswith(venv), ("not the installed copy", info["location"])
assert "error" not in info["build_info"], info["build_info"]
assert info["backends"]["cpu"]["available"], info["backends"]["cpu"]
print("info ok:", info["cdkernels"], info["location"])
EOF
step "cd_step on the CPU backend"
"$V/python" - <<'EOF'
import torch, cdkernels
x, f = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
y = cdkernels.cd_step(x, f, 0.1, 0.5, seed=1234, activation="relu", backend="cpu")
ref = cdkernels.cd_step(x, f, 0.1, 0.5, seed=1234, activation="relu", backend="reference")
torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
assert cdkernels.get_backend(torch.device("cpu"), torch.float32).name == "cpu"
print("cd_step ok on", cdkernels.get_backend(torch.device("cpu"), torch.float32).name)
EOF
step "cdk-train --help / cdk-attack --help"
"$V/cdk-train" --help > /dev/null
"$V/cdk-attack" --help > /dev/null
"$V/cdk-info" --version
step "cdk-train: one epoch on digits"
"$V/cdk-train" --model cd_preact_resnet20 --width 4 --data digits --epochs 1 --limit-train 256 \
  --limit-eval 64 --batch-size 64 --eval-batch-size 256 --device cpu --quiet \
  --out "$WORK/run" --overwrite
for f in checkpoint.pt best.pt metrics.jsonl curves.png; do
  [ -s "$WORK/run/$f" ] || fail "cdk-train did not write $f"
done
[ "$(wc -l < "$WORK/run/metrics.jsonl")" = 1 ] || fail "metrics.jsonl should have one line per epoch"
[ "$(head -c 4 "$WORK/run/curves.png" | od -An -c | tr -d ' ')" = "211PNG" ] \
  || fail "curves.png is not a PNG"
step "cdk-attack on the checkpoint"
"$V/cdk-attack" --checkpoint "$WORK/run/best.pt" --attack pgd --eps 0.1 --steps 2 --limit 64 \
  --batch-size 64 --device cpu --out "$WORK/run/pgd.json"
"$V/python" -c "import json, sys; r = json.load(open(sys.argv[1])); print('attack ok:', sorted(r)[:8])" \
  "$WORK/run/pgd.json"
cd "$SRC"

# -- 5. the read-only build's result -------------------------------------------------------------
if [ -n "$RO_PID" ]; then
  step "waiting for the read-only build"
  if ! wait "$RO_PID"; then
    tail -40 "$WORK/ro-build.log" >&2
    fail "building a wheel from the read-only tree failed"
  fi
  grep -q "not writable" "$WORK/ro-build.log" || { tail -20 "$WORK/ro-build.log" >&2;
    fail "the read-only build did not take the out-of-tree path"; }
  chmod -R u+w "$RO"
  ls "$WORK"/ro-dist/cdkernels-*.whl > /dev/null || fail "no wheel from the read-only tree"
  if [ -e "$RO/build" ] || compgen -G "$RO/*.egg-info" > /dev/null; then
    fail "the read-only build wrote into the tree"
  fi
  "$PY" -c "import sys, zipfile, re; n = zipfile.ZipFile(sys.argv[1]).namelist();
assert any(re.fullmatch(r'cdkernels/_C\.[^/]*\.so', x) for x in n), n" "$(ls "$WORK"/ro-dist/cdkernels-*.whl)"
  echo "read-only, isolated build ok: $(ls "$WORK"/ro-dist/)"
fi
step "all passed"
