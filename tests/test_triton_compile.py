"""The Triton kernels compile for real GPUs (sm_90 and sm_80), without a GPU.

The rest of the suite runs the Triton kernels under TRITON_INTERPRET=1, which never invokes the
compiler: type, constexpr and layout errors, or ops the NVIDIA backend cannot lower, would only
show on a GPU machine. tests/triton_compile_driver.py records every launch TritonBackend makes
(over the dtypes, activations, sigma/channel modes, ensemble spaces and row widths, and scalar
specialisations it uses), binds each with Triton's own launcher and compiles it ahead of time
for GPUTarget("cuda", 90, 32) and ("cuda", 80, 32) down to a cubin. It runs in a subprocess
without TRITON_INTERPRET (the kernels of this process are interpreted functions), once for the
whole module, writing a JSON report the tests below read (about a minute on 2 cores).

Skips when triton (or its NVIDIA backend / ptxas) is missing, unless CDK_REQUIRE_BACKENDS names
"triton", in which case it fails.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "triton_compile_driver.py")
REQUIRED = "triton" in {b.strip() for b in os.environ.get("CDK_REQUIRE_BACKENDS", "").split(",")}

ARCHS = (90, 80)
KERNELS = ("_words_kernel", "_uniform_kernel", "_normal_kernel", "_cd_step_fwd_kernel",
           "_cd_step_bwd_kernel", "_cd_smooth_fwd_kernel", "_cd_smooth_bwd_kernel",
           "_ensemble_fwd_kernel", "_ensemble_bwd_kernel", "_z_moments_kernel",
           "_z_std_bwd_kernel")
ELEMENTWISE = KERNELS[:7]
# ptxas (13.4, as bundled with triton 3.9) saves one predicate register to local memory once
# before / after the K loop of a few cd_smooth specialisations (softplus fwd with per-channel
# sigma; 4-byte store + 4-byte load per thread, outside the loop, next to the call-based slow
# paths of the IEEE divisions). Anything beyond one such register fails.
SPILL_ALLOWANCE_BYTES = 4


def _unavailable(why):
    if REQUIRED:
        pytest.fail(f"triton is required (CDK_REQUIRE_BACKENDS) but AOT compilation cannot "
                    f"run: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as e:  # ImportError, or a broken install raising something else
        _unavailable(f"triton cannot be imported ({type(e).__name__}: {e})")
    if "nvidia" not in backends:
        _unavailable(f"triton has no NVIDIA backend (backends: {sorted(backends)})")
    out = tmp_path_factory.mktemp("triton_compile")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # really compile, leave no cache behind
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = default
    try:
        r = subprocess.run([sys.executable, DRIVER, "--out-dir", str(out),
                            "--archs", ",".join(map(str, ARCHS))],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("AOT compilation of the Triton kernels timed out (900 s)")
    path = out / "report.json"
    if not path.exists():
        _unavailable(f"compile driver wrote no report (exit status {r.returncode}):\n"
                     f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rep = json.loads(path.read_text())
    if not rep["ok"]:
        _unavailable(f"compilation could not start: {rep['error']}")
    rep["out_dir"] = str(out)
    return rep


def _results(report, kernel, arch):
    res = [r for r in report["results"] if r["kernel"] == kernel and r["arch"] == arch]
    assert res, f"{kernel} was never launched by the scenarios for sm_{arch}"
    return res


def _fmt(r):
    return f"{r['label']} | {r['signature']} {r['constexprs']} num_warps={r['num_warps']}"


def test_every_kernel_is_covered(report):
    """The test knows every *_kernel of the backend, and the scenarios launch all of them."""
    assert tuple(sorted(KERNELS)) == tuple(report["kernels"]), (
        "triton_backend's kernels changed: update KERNELS here and the scenarios of "
        f"tests/triton_compile_driver.py ({report['kernels']})")
    for arch in ARCHS:
        assert {r["kernel"] for r in report["results"] if r["arch"] == arch} == set(KERNELS)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_to_cubin(report, kernel, arch):
    res = _results(report, kernel, arch)
    bad = [r for r in res if not r["ok"]]
    assert not bad, f"{len(bad)}/{len(res)} specialisations of {kernel} fail for sm_{arch}:\n" + \
        "\n\n".join(f"{_fmt(r)}\n{r['error']}" for r in bad[:3])


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("kernel", ELEMENTWISE)
def test_elementwise_kernels_do_not_spill(report, kernel, arch):
    res = [r for r in _results(report, kernel, arch) if r["ok"]]
    if any(r["resources"] is None for r in res):
        pytest.skip("register usage unavailable (no ptxas log and no cuobjdump)")
    spilling = [r for r in res
                if r["resources"]["spill_stores"] > SPILL_ALLOWANCE_BYTES
                or (r["resources"]["spill_loads"] or 0) > SPILL_ALLOWANCE_BYTES]
    assert not spilling, f"{kernel} spills registers on sm_{arch}:\n" + "\n".join(
        f"{_fmt(r)}: {r['resources']}" for r in spilling)
    regs = sorted(r["resources"]["n_regs"] for r in res)
    print(f"{kernel} sm_{arch}: {len(res)} specialisations, registers {regs[0]}..{regs[-1]}")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_aligned_elementwise_access_is_vectorised(report, arch):
    """With aligned pointers and n % 16 == 0 (the usual case), each thread moves 4 consecutive
    elements per access: 16-byte ld/st.global.v4 for fp32, 8-byte v2.b32 for fp16/bf16 (the
    [BLOCK, 4] tile layout of triton_backend). Ragged n (not a multiple of 16, so Triton cannot
    prove the mask constant over 4 elements) or misaligned views fall back to scalar accesses;
    those are only checked to compile. The kernels of the 16-bit stream (normal and cd_step on
    fp16/bf16: [BLOCK // 2, 8] tiles, docs/noise.md section 3b) move 8 consecutive 16-bit
    elements per access, 16-byte v4.b32."""
    want = {"fp32": ".v4.b32", "fp16": ".v2.b32", "bf16": ".v2.b32"}
    noise16 = ("_normal_kernel", "_cd_step_fwd_kernel", "_cd_step_bwd_kernel")
    checked = 0
    for r in report["results"]:
        if r["arch"] != arch or r["kernel"] not in ELEMENTWISE or not r["ok"]:
            continue
        if "n=aligned" not in r["label"] or r["kernel"] == "_words_kernel":
            continue
        ptrs = [v for k, v in r["signature"].items()
                if v[1:] in want and k not in ("sigma_ptr", "gs_ptr")]
        dt = ptrs[0][1:]
        assert all(p[1:] == dt for p in ptrs), _fmt(r)
        ops = r["mem_ops"]
        data_ops = {k: v for k, v in ops.items() if k.startswith("st.") or "v" in k}
        w = ".v4.b32" if r["kernel"] in noise16 else want[dt]
        assert data_ops and all(w in k for k in data_ops) and \
            not any(k.endswith(".b16") for k in ops), \
            f"{_fmt(r)}: expected {w} data accesses, got {ops}"
        checked += 1
    assert checked > 50, checked


def test_cd_step_fwd_fp32_ptx(report):
    """The PTX of the reference specialisation (fp32, scalar sigma, no activation, aligned):
    cd_step runs 1024-element programs on one warp (triton_backend.STEP_WARPS), 32 elements
    per thread: eight 16-byte loads per input and eight 16-byte stores per thread, no scalar
    data access."""
    for arch in ARCHS:
        path = os.path.join(report["out_dir"], f"cd_step_fwd_sm{arch}.ptx")
        assert os.path.exists(path), path
        ptx = open(path).read()
        assert ptx.count("ld.global.v4.b32") == 16 and ptx.count("st.global.v4.b32") == 8, arch
        assert "ld.global.b32" not in ptx and "st.global.b32" not in ptx, arch


def test_report_register_counts(report):
    """Not a check: one line per kernel and arch (see with pytest -s / -rP)."""
    lines = []
    for arch in ARCHS:
        for k in KERNELS:
            res = [r for r in _results(report, k, arch) if r["ok"] and r["resources"]]
            if not res:
                continue
            regs = [r["resources"]["n_regs"] for r in res]
            spill = max(r["resources"]["spill_stores"] for r in res)
            lines.append(f"sm_{arch} {k:24s} n={len(res):3d} regs {min(regs):3d}..{max(regs):3d}"
                         f" max spill stores {spill} B")
    print(f"triton {report['triton']}, {len(report['results'])} compilations in "
          f"{report.get('wall_s')} s\n" + "\n".join(lines))
