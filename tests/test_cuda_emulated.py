"""The real CUDA kernels (csrc/cuda/*.cu), run on the CPU under the host emulator.

csrc/cuda/emulate.cuh turns every CUDA thread into a coroutine whose barriers and warp
collectives are real rendezvous; csrc/cuda/emulate_driver.cuh wraps the kernels in C entry points
(emu_*) that mirror the host launchers but cap the grid, so grid-stride loops iterate. A
session fixture compiles both with g++ into a shared library (about 10 s) and these tests call it
through ctypes on CPU tensors, against ReferenceBackend.

Two schedules (parametrised): "roundrobin" advances every thread in turn; "greedy" runs the
highest-priority runnable thread as far as it can (random priorities per block), so warps drift
far apart and a shared-memory reuse race or a missing __syncthreads changes the result.

Skipped when g++ or the CUDA headers ($CUDA_HOME/include or /usr/local/cuda/include) are
missing, unless CDK_REQUIRE_BACKENDS contains "cuda-emulated": then it fails.
"""
import ctypes
import itertools
import math
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REQUIRED, TOL, ulp_distance

import cdkernels
from cdkernels.backends.reference import ReferenceBackend, stream_normals16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DRIVER = os.path.join(CSRC, "cuda", "emulate_driver.cuh")
R = ReferenceBackend()
CPU_OK = cdkernels.backends()["cpu"]["available"]

DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4, "softplus": 5}
SPACE = {"prob": 0, "logit": 1, "logprob": 2}
SEED = torch.tensor([0x0123456789ABCDEF - 2 ** 63], dtype=torch.int64)
CAP = 3  # grid cap: grid-stride loops run several iterations for n > 3 * 256 * 4
SCHEDS = [pytest.param(0, id="roundrobin"), pytest.param(1, id="greedy")]


# -- building the emulator ------------------------------------------------------------------------
def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def _unavailable(why):
    if "cuda-emulated" in REQUIRED:
        pytest.fail(f"cuda-emulated is required (CDK_REQUIRE_BACKENDS) but unavailable: {why}",
                    pytrace=False)
    pytest.skip(f"cuda-emulated: {why}")


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX") or "g++")
    if cxx is None:
        _unavailable(f"C++ compiler {os.environ.get('CXX') or 'g++'!r} not found")
    inc = _cuda_include()
    if inc is None:
        _unavailable("CUDA headers not found (cuda_runtime.h in $CUDA_HOME/include or "
                     "/usr/local/cuda/include)")
    lib = str(tmp_path_factory.mktemp("cuda_emu") / "libcdk_emu.so")
    # -O1: compiles in ~12 s vs ~18 s at -O2 and runs these tests just as fast.
    # -ffp-contract=off: no FMA contraction the CUDA code did not ask for.
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-DCDK_EMULATE",
           "-x", "c++", f"-I{CSRC}", f"-I{os.path.join(CSRC, 'cuda')}", f"-I{inc}", DRIVER,
           "-o", lib]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:  # a compile error in the kernels is a failure, never a skip
        pytest.fail("building the CUDA emulator failed:\n" + " ".join(cmd) + "\n"
                    + res.stderr[-8000:], pytrace=False)
    L = ctypes.CDLL(lib)
    P, I64, U64, U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32
    D, INT, UI = ctypes.c_double, ctypes.c_int, ctypes.c_uint
    L.emu_set_sched.argtypes = [INT, UI]
    L.emu_philox_words.argtypes = [P, I64, P, U64, U32, UI]
    L.emu_uniform.argtypes = [P, I64, P, U64, U32, UI]
    L.emu_normal.argtypes = [INT, P, I64, P, U64, U32, UI]
    L.emu_cd_step_fwd.argtypes = [INT, I64, P, P, P, D, P, D, I64, I64, P, U64, INT, UI, INT]
    L.emu_cd_step_bwd.argtypes = [INT, I64, P, P, P, P, P, D, I64, I64, P, U64, INT, UI, INT]
    L.emu_cd_smooth_fwd.argtypes = [INT, I64, P, P, P, D, I64, I64, I64, P, U64, INT, UI]
    L.emu_cd_smooth_bwd.argtypes = [INT, I64, P, P, P, P, P, D, I64, I64, I64, P, U64, INT, UI]
    L.emu_ensemble_fwd.argtypes = [INT, P, P, I64, I64, I64, INT, UI]
    L.emu_ensemble_bwd.argtypes = [INT, P, P, P, P, I64, I64, I64, INT, UI]
    for f in ("emu_set_sched", "emu_philox_words", "emu_uniform", "emu_normal", "emu_cd_step_fwd",
              "emu_cd_step_bwd", "emu_cd_smooth_fwd", "emu_cd_smooth_bwd", "emu_ensemble_fwd",
              "emu_ensemble_bwd"):
        getattr(L, f).restype = None
    return L


@pytest.fixture(params=SCHEDS)
def lib(emu, request):
    """The emulator with the schedule set (fixed seed, so a failure reproduces)."""
    emu.emu_set_sched(request.param, 12345)
    return emu


# -- helpers --------------------------------------------------------------------------------------
def ptr(t):
    """t's address. The caller must hold t until the call returns (never pass a temporary)."""
    return None if t is None else t.data_ptr()


def buf(n, dtype, mis=0, fill=float("nan")):
    """A 1-D tensor of n elements starting `mis` elements past an aligned address (mis > 0 makes
    the kernels take their scalar path), filled with `fill`: NaN by default, like
    conftest.poisoned_like, so an element the kernel fails to write cannot pass."""
    b = torch.full((n + mis,), fill, dtype=dtype)
    assert b.data_ptr() % 16 == 0
    return b[mis:]


def like(t, mis=0):
    """A copy of t at a misalignment of `mis` elements."""
    v = buf(t.numel(), t.dtype, mis)
    v.copy_(t.reshape(-1))
    return v


class Checker:
    """Collects every mismatch of a test, so one run reports all failing cases."""

    def __init__(self):
        self.errors = []
        self.checks = 0

    def close(self, name, got, ref, rtol, atol):
        self.checks += 1
        got, ref = got.double(), ref.double()
        try:
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            self.errors.append(f"{name}: " + "; ".join(lines[1:4]))

    def close_slack(self, name, got, ref, rtol, atol, slack):
        """|got - ref| <= rtol |ref| + atol + slack, elementwise (slack: a tensor like ref)."""
        self.checks += 1
        got, ref = got.double(), ref.double()
        bad = ~((got - ref).abs() <= rtol * ref.abs() + atol + slack.double())
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            self.errors.append(f"{name}: {int(bad.sum())}/{got.numel()} off, first at {i}: "
                               f"{got[i].item()} vs {ref[i].item()} (slack {slack[i].item()})")

    def exact(self, name, got, ref):
        self.checks += 1
        if not torch.equal(got, ref):
            bad = (got != ref).nonzero()
            self.errors.append(f"{name}: {len(bad)}/{got.numel()} differ, first at "
                               f"{bad[0].tolist()}: {got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}")

    def done(self):
        assert self.checks > 0
        if self.errors:
            pytest.fail(f"{len(self.errors)}/{self.checks} checks failed:\n"
                        + "\n".join(self.errors[:20]), pytrace=False)


# -- noise ----------------------------------------------------------------------------------------
NOISE_CASES = [  # n, offset, sample, misalignment (elements)
    (1, 0, 0, 0), (13, 5, 0, 0), (4097, 2 ** 32 - 3, 7, 1), (1000, 2 ** 64 - 300, 2 ** 32 - 1, 3),
]


def test_noise(lib):
    ck = Checker()
    apart16 = {torch.float16: [0, 0], torch.bfloat16: [0, 0]}  # (differing, total) CPU vs CUDA
    for n, off, smp, mis in NOISE_CASES:
        tag = f"n={n} off={off} sample={smp} mis={mis}"
        out = buf(n, torch.int32, mis, 0)
        out.fill_(-1)
        lib.emu_philox_words(ptr(out), n, ptr(SEED), off, smp, CAP)
        ref = torch.zeros((n + 3) // 4 * 4, dtype=torch.int32)
        R.philox_words(ref, SEED, off, smp)
        ck.exact(f"philox_words {tag}", out, ref[:n])

        out = buf(n, torch.float32, mis)
        lib.emu_uniform(ptr(out), n, ptr(SEED), off, smp, CAP)
        ref = torch.zeros(n)
        R.uniform(ref, SEED, off, smp)
        ck.exact(f"uniform {tag}", out, ref)

        for dt, code in DT.items():
            out = buf(n, dt, mis)
            lib.emu_normal(code, ptr(out), n, ptr(SEED), off, smp, CAP)
            ref = torch.zeros(n, dtype=dt)
            R.normal(ref, SEED, off, smp)
            if CPU_OK:
                cpu = torch.full((n,), float("nan"), dtype=dt)
                cdkernels.get_backend(torch.device("cpu"), dt, "cpu").normal(cpu, SEED, off, smp)
                if dt == torch.float32:  # the CPU build rounds like the GPU (fused CDK_FMA)
                    ck.exact(f"cpu == cuda normal {dt} {tag}", out, cpu)
                else:  # 16-bit: the CPU's polynomials (noise.md 3b) move rare near-ties
                    ck.checks += 1
                    d = steps16(out, cpu)
                    if cpu.isnan().any() or d.max() > 1:
                        ck.errors.append(f"cpu ~ cuda normal {dt} {tag}: more than 1 ulp apart")
                    apart16[dt] = [apart16[dt][0] + int((d != 0).sum()), apart16[dt][1] + n]
            ck.checks += 1
            if out.isnan().any():
                ck.errors.append(f"normal {dt} {tag}: unwritten (NaN) elements")
            elif dt == torch.float32:
                u = ulp_distance(out, ref).max().item()
                if u > 4:
                    ck.errors.append(f"normal {dt} {tag}: {u} ulp > 4")
            else:  # float32 within 4 ulp, then one rounding: at most one ulp of dt apart
                eps = torch.finfo(dt).eps
                d = (out.double() - ref.double()).abs()
                if (d > eps * ref.double().abs() + 1e-7).any():
                    ck.errors.append(f"normal {dt} {tag}: more than 1 ulp of {dt} off, "
                                     f"max {d.max().item()}")
    for dt, (bad, tot) in apart16.items():
        ck.checks += 1
        if tot and bad > 2e-3 * tot:  # (measured on 6M elements: 6e-5 bf16, 5e-4 fp16)
            ck.errors.append(f"cpu ~ cuda normal {dt}: {bad}/{tot} elements differ")
    ck.done()


def steps16(a, b):
    """How many representable 16-bit values apart a and b (same 16-bit dtype) are: 0 equal,
    1 neighbours (one ulp, also across zero: +0 and -0 count as one value)."""
    def key(t):
        i = t.contiguous().view(torch.int16).to(torch.int64)
        mag = i & 0x7FFF
        return torch.where(i < 0, -mag, mag)
    return (key(a) - key(b)).abs()


# n, offset, sample, misalignment (elements): partial 8-element blocks, the 16-byte steady loop
# (n > CAP * 256 * 8 iterates it), odd offsets and the 32-bit carry of the block counter.
NOISE16_CASES = [(1, 0, 0, 0), (7, 3, 0, 0), (9, 0, 1, 0), (13, 5, 0, 1), (4097, 2 ** 32 - 3, 7, 1),
                 (1000, 2 ** 64 - 300, 2 ** 32 - 1, 3), (20005, 11, 0, 0), (20003, 2 ** 32 - 1000, 2, 4)]


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=str)
def test_normal16(lib, dt):
    """normal(dtype=16-bit) is the 16-bit stream (docs/noise.md 3b): the emulator evaluates the
    accurate float32 Box-Muller, so its 16-bit values equal the oracle's (float64 rounded to
    float32, then to dt) except for rare one-ulp rounding ties."""
    ck = Checker()
    tot = bad = 0
    for n, off, smp, mis in NOISE16_CASES:
        tag = f"n={n} off={off} sample={smp} mis={mis} {dt}"
        out = buf(n, dt, mis)
        lib.emu_normal(DT[dt], ptr(out), n, ptr(SEED), off, smp, CAP)
        ref = stream_normals16(SEED, off, smp, n, "cpu", dt)
        ck.checks += 1
        if out.isnan().any():
            ck.errors.append(f"normal16 {tag}: unwritten (NaN) elements")
            continue
        d = steps16(out, ref)
        if d.max() > 1:
            ck.errors.append(f"normal16 {tag}: {int(d.max())} ulp apart at {int(d.argmax())}")
        tot += n
        bad += int((d != 0).sum())
    ck.checks += 1
    if bad >= 1e-3 * tot:
        ck.errors.append(f"normal16 {dt}: {bad}/{tot} elements differ from the oracle")
    ck.done()


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=str)
def test_cd_step16_noise_is_normal(lib, dt):
    """The ε cd_step adds to 16-bit data is exactly normal(dtype=dt) of the same stream, in the
    forward pass (x = f = 0, σ√dt = 1: y = ε) and as the backward pass regenerates it
    (grad_y = 1, one channel per element: grad_σ[c] = ε_c), on the 16-byte steady loop and on
    the tail loop (misaligned), with scalar and per-channel σ."""
    ck = Checker()
    for n, off, mis in [(13003, 5, 0), (13003, 2 ** 32 - 7, 1), (4003, 0, 0), (4003, 9, 3),
                        (37, 2 ** 64 - 3, 0), (8, 1, 0)]:
        tag = f"n={n} off={off} mis={mis} {dt}"
        eps = buf(n, dt, mis)
        lib.emu_normal(DT[dt], ptr(eps), n, ptr(SEED), off, 0, CAP)
        zero = buf(n, dt, mis, 0.0)
        for sk in ("value", "scalar", "tensor"):
            C = n if sk == "tensor" else 1
            sigma = None if sk == "value" else torch.ones(C)
            y = buf(n, dt, mis)
            lib.emu_cd_step_fwd(DT[dt], n, ptr(zero), ptr(zero), ptr(y), 1.0, ptr(sigma), 1.0,
                                C, 1, ptr(SEED), off, ACT["none"], CAP, 0)
            ck.exact(f"cd_step_fwd ε sigma={sk} {tag}", y, eps)
        ones = buf(n, dt, mis, 1.0)
        gs = torch.zeros(n)
        lib.emu_cd_step_bwd(DT[dt], n, ptr(ones), None, None, None, ptr(gs), 1.0, n, 1,
                            ptr(SEED), off, ACT["none"], CAP, 0)
        ck.exact(f"cd_step_bwd ε (grad_sigma, C=n) {tag}", gs, eps.float())
    ck.done()


# -- cd_step --------------------------------------------------------------------------------------
# (n, C, chan_stride): C=1 / 1<C<=4096 / C>4096 pick the three grad_sigma reduction modes;
# n=4096 with CAP=3 makes the grid-stride loop iterate; odd n leaves a tail.
# (6000, 8, 1) and (8192, 4, 16): channel period divides the grid-stride step, loops iterate:
# the fixed-channel path with several iterations; (4096, 64, 64): the per-iteration slow path.
STEP_SHAPES = [(1023, 3, 341), (2048, 16, 1), (1001, 7, 11), (640, 5000, 1), (999, 1, 999),
               (4096, 64, 64), (6000, 8, 1), (8192, 4, 16)]
STEP_VARIANTS = [  # dtype, act, sigma kind, 64-bit index, misalignment
    (torch.float32, "none", "tensor", 0, 0), (torch.float32, "relu", "value", 0, 0),
    (torch.float32, "relu", "tensor", 1, 0), (torch.float32, "none", "value", 1, 1),
    (torch.float32, "relu", "tensor", 0, 1),
    (torch.float16, "relu", "tensor", 0, 0), (torch.float16, "none", "value", 0, 1),
    (torch.float16, "none", "tensor", 1, 3),
    (torch.bfloat16, "none", "tensor", 0, 0), (torch.bfloat16, "relu", "value", 1, 0),
    (torch.bfloat16, "relu", "tensor", 0, 1),
]


def test_cd_step(lib):
    ck = Checker()
    g = torch.Generator().manual_seed(0)
    dtv, sv, off = 0.013, 0.7, 17
    for (n, C, cs), (dt, act, sk, idx64, mis) in itertools.product(STEP_SHAPES, STEP_VARIANTS):
        tag = f"n={n} C={C} cs={cs} {dt} {act} sigma={sk} idx64={idx64} mis={mis}"
        x = torch.randn(n, generator=g).to(dt)
        f = torch.randn(n, generator=g).to(dt)
        sigma = torch.rand(C, generator=g) + 0.5 if sk == "tensor" else None
        xm, fm, y = like(x, mis), like(f, mis), buf(n, dt, mis)  # keep refs during the call
        lib.emu_cd_step_fwd(DT[dt], n, ptr(xm), ptr(fm), ptr(y), dtv,
                            ptr(sigma), sv, C, cs, ptr(SEED), off, ACT[act], CAP, idx64)
        yr = torch.zeros(n, dtype=dt)
        R.cd_step_fwd(x, f, yr, dtv, sigma, sv, C, cs, SEED, off, act)
        ck.close(f"cd_step_fwd {tag}", y, yr, **TOL[dt])

        gy = torch.randn(n, generator=g).to(dt)
        yin = yr if act == "relu" else None
        gym, yinm = like(gy, mis), like(yin, mis) if yin is not None else None
        # 16-bit data: the emulator's ε may differ from the oracle's by one 16-bit ulp where the
        # float32 value rounds near a tie (rare, docs/noise.md 3b, test_normal16); grad_sigma
        # may then differ by |grad_z| * that ulp on those elements, which is more than the
        # float32 tolerance below for bfloat16. Allow exactly that.
        gs_slack = torch.zeros(C, dtype=torch.float64)
        if dt in (torch.float16, torch.bfloat16):
            eps_emu = buf(n, dt)
            lib.emu_normal(DT[dt], ptr(eps_emu), n, ptr(SEED), off, 0, CAP)
            d_eps = (eps_emu.double() - stream_normals16(SEED, off, 0, n, "cpu", dt).double())
            gz = gy.double() * ((yr.double() > 0).double() if act == "relu" else 1.0)
            chan = (torch.arange(n) // cs) % C
            gs_slack.index_add_(0, chan, (gz * d_eps).abs())
        for want in [(1, 1, 1), (1, 0, 0), (0, 0, 1), (0, 1, 1)]:
            gx = buf(n, dt, mis) if want[0] else None
            gf = buf(n, dt, mis) if want[1] else None
            gs0 = torch.randn(C, generator=g)  # grad_sigma accumulates
            gs = gs0.clone() if want[2] else None
            lib.emu_cd_step_bwd(DT[dt], n, ptr(gym), ptr(yinm), ptr(gx), ptr(gf), ptr(gs), dtv, C, cs, ptr(SEED), off, ACT[act], CAP, idx64)
            gxr, gfr, gsr = torch.zeros(n, dtype=dt), torch.zeros(n, dtype=dt), gs0.clone()
            R.cd_step_bwd(gy, yin, gxr, gfr, gsr, dtv, sigma, sv, C, cs, SEED, off, act)
            name = f"cd_step_bwd want={want} {tag}"
            if gx is not None:
                ck.exact(name + " grad_x", gx, gxr)
            if gf is not None:
                ck.exact(name + " grad_f", gf, gfr)
            if gs is not None:  # float atomics: summation order differs
                ck.close_slack(name + " grad_sigma", gs, gsr, 1e-4, 1e-4 * math.sqrt(n),
                               gs_slack)
    ck.done()


# -- cd_smooth ------------------------------------------------------------------------------------
SMOOTH_SHAPES = [(1023, 3, 341), (514, 9, 1), (257, 1, 257), (300, 5000, 1), (3500, 2, 7)]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
def test_cd_smooth(lib, dt):
    ck = Checker()
    g = torch.Generator().manual_seed(1)
    sv, off = 0.8, 5
    acts = list(ACT) if dt == torch.float32 else ["none", "relu", "softplus"]
    for i, ((n, C, cs), act, K) in enumerate(itertools.product(SMOOTH_SHAPES, acts, [1, 5])):
        sk = "tensor" if i % 2 == 0 else "value"
        mis = (i // 2) % 2 if dt == torch.float32 else int(i % 3 == 0)
        tag = f"n={n} C={C} cs={cs} {dt} {act} sigma={sk} K={K} mis={mis}"
        x = torch.randn(n, generator=g).to(dt)
        sigma = torch.rand(C, generator=g) + 0.5 if sk == "tensor" else None
        xm, y = like(x, mis), buf(n, dt, mis)
        lib.emu_cd_smooth_fwd(DT[dt], n, ptr(xm), ptr(y), ptr(sigma), sv, C, cs, K,
                              ptr(SEED), off, ACT[act], CAP)
        yr = torch.zeros(n, dtype=dt)
        R.cd_smooth_fwd(x, yr, sigma, sv, C, cs, K, SEED, off, act)
        ck.close(f"cd_smooth_fwd {tag}", y, yr, **TOL[dt])

        gy = torch.randn(n, generator=g).to(dt)
        gym = like(gy, mis)
        for want_gs in [0, 1]:
            gx = buf(n, dt, mis)
            gs0 = torch.randn(C, generator=g)
            gs = gs0.clone() if want_gs else None
            lib.emu_cd_smooth_bwd(DT[dt], n, ptr(gym), ptr(xm), ptr(gx),
                                  ptr(gs), ptr(sigma), sv, C, cs, K, ptr(SEED), off, ACT[act], CAP)
            gxr = torch.zeros(n, dtype=dt)
            gsr = gs0.clone() if want_gs else None
            R.cd_smooth_bwd(gy, x, gxr, gsr, sigma, sv, C, cs, K, SEED, off, act)
            name = f"cd_smooth_bwd grad_sigma={want_gs} {tag}"
            tol = {k: 4 * v for k, v in TOL[dt].items()}
            if act == "relu":
                # relu' is a step: noise within 4 ulp can flip it where z ~ 0. Allow at most
                # two flipped elements; everything else must match.
                bad = ~torch.isclose(gx.double(), gxr.double(), **tol)
                ck.checks += 1
                if gx.isnan().any() or bad.sum() > 2:
                    ck.errors.append(f"{name} grad_x: {int(bad.sum())} elements off")
            else:
                ck.close(name + " grad_x", gx, gxr, **tol)
            if gs is not None:
                ck.close(name + " grad_sigma", gs, gsr, 1e-4,
                         1e-4 * math.sqrt(n) + (8.0 / K if act == "relu" else 0))
    ck.done()


# -- ensemble_mean --------------------------------------------------------------------------------
# C covers every bucket of dispatch_rows (<=32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) and the
# big-C kernels (C > 8192); K=1; B larger than the rows per block times CAP (grid-stride rows).
ENS_SHAPES = [(1, 3, 5), (2, 9, 33), (3, 10, 100), (4, 3, 250), (2, 5, 300), (16, 3, 1000),
              (3, 2, 1500), (2, 2, 3000), (2, 2, 5000), (1, 17, 32), (2, 40, 64), (3, 2, 4096),
              (1, 2, 8192), (4, 2, 8192), (3, 2, 9000), (1, 1, 8193), (5, 1, 4097)]
ENS_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("space", list(SPACE))
def test_ensemble_mean(lib, space):
    ck = Checker()
    g = torch.Generator().manual_seed(2)
    for i, (K, B, C) in enumerate(ENS_SHAPES):
        dts = [torch.float32, (torch.float16, torch.bfloat16)[i % 2]]
        for dt in dts:
            tag = f"K={K} B={B} C={C} {dt}"
            inp = (torch.randn(K, B, C, generator=g) * 3).to(dt)
            if C >= 33:
                inp[0, 0, 1] = -float("inf")  # a masked logit
            out = buf(B * C, dt).view(B, C)
            lib.emu_ensemble_fwd(DT[dt], ptr(inp), ptr(out), K, B, C, SPACE[space], CAP)
            outr = torch.zeros(B, C, dtype=dt)
            R.ensemble_mean_fwd(inp, outr, space)
            tol = ENS_TOL[dt]
            ck.close(f"ensemble_mean_fwd {tag}", out, outr, tol, tol * 0.01)

            go = torch.randn(B, C, generator=g).to(dt)
            gi = buf(K * B * C, dt).view(K, B, C)
            lib.emu_ensemble_bwd(DT[dt], ptr(go), ptr(inp), ptr(outr), ptr(gi), K, B, C,
                                 SPACE[space], CAP)
            gir = torch.zeros(K, B, C, dtype=dt)
            R.ensemble_mean_bwd(go, inp, outr, gir, space)
            ck.close(f"ensemble_mean_bwd {tag}", gi, gir, tol * 10, tol * 0.1)
    ck.done()
