"""The instruction budget (bench/sass_budget.py): no kernel's common-path SASS count per element
rises above bench/sass_budget.json.

A count is not a timing, so this runs without a GPU: it compiles the CUDA kernels with nvcc for
sm_90 and the Triton kernels ahead of time, disassembles them with the cuobjdump of the triton
wheel and counts (see the tool's docstring for how the loop and the common path are found).
Cubins are cached under build/sass_budget/ (about 2 minutes on 2 cores the first time, seconds
afterwards). Skips without nvcc, unless CDK_REQUIRE_BACKENDS names "cuda-emulated" (CI), which
implies nvcc is installed: then it fails.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "bench", "sass_budget.py")
BUDGET = os.path.join(ROOT, "bench", "sass_budget.json")
_REQ = {b.strip() for b in os.environ.get("CDK_REQUIRE_BACKENDS", "").split(",")}
REQUIRED = "cuda-emulated" in _REQ


def _have_nvcc():
    return any(p and os.path.exists(p) for p in (
        shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin",
                                           "nvcc"), "/usr/local/cuda/bin/nvcc"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    if not _have_nvcc():
        if REQUIRED:
            pytest.fail("nvcc is required (CDK_REQUIRE_BACKENDS has cuda-emulated) but missing",
                        pytrace=False)
        pytest.skip("nvcc not found")
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        have_triton = "nvidia" in backends
    except Exception:
        have_triton = False
    if not have_triton and "triton" in _REQ:
        pytest.fail("triton (NVIDIA backend) is required but cannot be imported", pytrace=False)
    out = tmp_path_factory.mktemp("sass") / "rows.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, TOOL, "--json", str(out)] + ([] if have_triton else ["--no-triton"])
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and out.exists(), f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    data = json.loads(out.read_text())
    data["have_triton"] = have_triton
    return data


def test_every_row_analysed(rows):
    errors = [f"{r['id']}: {r['error']}" for r in rows["rows"] if "error" in r]
    assert not errors, "\n".join(errors)


def test_counts_within_budget(rows):
    with open(BUDGET) as f:
        budget = json.load(f)
    over, missing = [], []
    ids = {r["id"]: r for r in rows["rows"] if not r.get("derived")}
    for rid, b in budget.items():
        if rid.startswith("triton") and not rows["have_triton"]:
            continue
        if rid not in ids:
            missing.append(rid)
        elif ids[rid]["instr_per_elem"] > b + 1e-9:
            over.append(f"{rid}: {ids[rid]['instr_per_elem']:.2f} instr/elem > {b}")
    assert not over, "counts above budget:\n" + "\n".join(over)
    assert not missing, f"budgeted rows no longer produced: {missing}"
    unbudgeted = [i for i in ids if i not in budget]
    assert not unbudgeted, f"rows without a budget (run --update-budget): {unbudgeted}"


def test_loop_found_is_the_steady_state(rows):
    """The loop the tool counts is the one that does the work: the noise kernels' counted
    region holds a whole Philox call per 4 elements (8 for 16-bit data; 10 round multiplies by
    M0 each) where the product is formed once, and loads/stores data."""
    for r in rows["rows"]:
        if r.get("derived") or "error" in r or r["op"].startswith("ensemble"):
            continue
        assert r["classes"]["philox_mul"] > 0, r["id"]
        if r["op"] not in ("normal", "cd_smooth_fwd"):  # cd_smooth: the K loop (no loads)
            assert r["classes"]["ldg"] > 0, r["id"]
