"""cd_std_step (the fused EnResNet std-noise step): definition, exact gradient through the std
(gradcheck), every backend against the reference, fast path against the custom op."""
import math

import pytest
import torch

import cdkernels
from cdkernels.backends import get_backend
from conftest import TOL, poisoned_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = torch.ops.cdkernels.cd_std_step.default


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + shift).to(dtype=dtype, device=device)
    f = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    return x, f


def _expected(x, f, dt, coef, seed):
    """The definition in float64: x + dt*f + coef*std(z)*eps, eps = cd_step's stream."""
    xd, fd = x.double(), f.double()
    z = xd + dt * fd
    eps = cdkernels.normal(x.shape, seed, dtype=torch.float64)
    c = coef.double().reshape((1, -1) + (1,) * (x.dim() - 2)) if isinstance(coef, torch.Tensor) \
        else coef
    return z + c * z.std() * eps


@pytest.mark.parametrize("coef", [0.3, "scalar", "channel"])
def test_matches_definition_float64(coef):
    x, f = _inputs((3, 4, 5, 2), torch.float64)
    c = {0.3: 0.3, "scalar": torch.tensor(0.3, dtype=torch.float64),
         "channel": torch.tensor([0.1, 0.4, 0.9, 2.0], dtype=torch.float64)}[coef]
    y = cdkernels.cd_std_step(x, f, 0.2, c, seed=77)
    torch.testing.assert_close(y, _expected(x, f, 0.2, c, 77), rtol=0, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck_through_std(per_channel):
    x, f = _inputs((2, 3, 4), torch.float64, seed=1)
    c = torch.tensor([0.5, 1.5, 0.8] if per_channel else 0.7, dtype=torch.float64)
    args = (x.requires_grad_(), f.requires_grad_(), c.requires_grad_())
    fn = lambda a, b, s: cdkernels.cd_std_step(a, b, 0.3, s, seed=11)  # noqa: E731
    torch.autograd.gradcheck(fn, args)
    # and the gradient of the std is really there: detaching it changes grad_x
    y = fn(*args)
    gx = torch.autograd.grad(y.sum(), x)[0]
    z = x + 0.3 * f
    eps = cdkernels.normal(x.shape, 11, dtype=torch.float64)
    cc = c.reshape(1, -1, 1) if per_channel else c
    y_det = z + cc * z.std().detach() * eps
    gx_det = torch.autograd.grad(y_det.sum(), x)[0]
    assert (gx - gx_det).abs().max() > 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_z_stats_and_bwd_against_reference(native, dtype):
    """Backend-level kernels with poisoned outputs, including |mean| >> std (the shift)."""
    name, dev = native
    be = get_backend(torch.device(dev), dtype, name)
    ref = get_backend(torch.device("cpu"), dtype, "reference")
    for n, shift in ((4 * 301 + 3, 0.0), (5000, 50.0), (1, 0.0), (2, 0.0)):
        x, f = _inputs((n,), dtype, dev, seed=n, shift=shift)
        st = torch.full((2,), float("nan"), dtype=torch.float64, device=dev)
        be.z_stats(x, f, 0.3, st)
        st_ref = torch.empty(2, dtype=torch.float64)
        ref.z_stats(x.cpu(), f.cpu(), 0.3, st_ref)
        if n == 1:
            assert torch.isnan(st[1]) and torch.isnan(st_ref[1])
            continue
        torch.testing.assert_close(st.cpu(), st_ref, rtol=1e-5, atol=1e-6)
        g = torch.randn(n).to(dtype=dtype, device=dev)
        coefs = torch.tensor([float(st_ref[0]), 0.37, -0.05], dtype=torch.float64, device=dev)
        for gy in (g, None):
            gx, gf = poisoned_like(x), poisoned_like(x)
            be.z_std_bwd(x, f, gy, 0.3, coefs, gx, gf)
            gx_r, gf_r = poisoned_like(x.cpu()), poisoned_like(x.cpu())
            ref.z_std_bwd(x.cpu(), f.cpu(), None if gy is None else gy.cpu(), 0.3, coefs.cpu(),
                          gx_r, gf_r)
            tol = dict(TOL[dtype])
            if shift:  # z - mean of two float32 z's ~ 50: one ulp of 50 times a
                tol = dict(rtol=max(tol["rtol"], 1e-5), atol=max(tol["atol"], 1e-5))
            torch.testing.assert_close(gx.cpu(), gx_r, **tol)
            torch.testing.assert_close(gf.cpu(), gf_r, **tol)


@pytest.mark.parametrize("dt", [0.25, 1.0])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_op_against_reference(native, per_channel, layout, dt):
    """y and all gradients of every native backend against the reference (float32); dt = 1
    is the models' default, where grad_f is grad_x itself (no second write)."""
    name, dev = native
    x, f = _inputs((2, 3, 6, 5), device=dev, seed=3)
    g = torch.randn(2, 3, 6, 5).to(dev)
    if layout == "channels_last":
        x, f, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, f, g))
    coef = torch.tensor([0.2, 0.5, 1.1] if per_channel else 0.4, device=dev)

    def run(backend, *ts):
        xs, fs, cs = (t.detach().clone().requires_grad_() for t in ts)
        y = cdkernels.cd_std_step(xs, fs, dt, cs, seed=2024, backend=backend)
        y.backward(g.to(y.device))
        return y.detach(), xs.grad, fs.grad, cs.grad

    got = run(name, x, f, coef)
    exp = run("reference", x.cpu(), f.cpu(), coef.cpu())
    for a, b in zip(got, exp):
        assert a.stride() == b.stride() or a.dim() <= 1
        torch.testing.assert_close(a.cpu(), b, rtol=2e-5, atol=2e-5)
    assert got[3].abs().sum() > 0
    if dt == 1.0:
        torch.testing.assert_close(got[1], got[2], rtol=0, atol=0)


def test_fast_path_equals_custom_op():
    x, f = _inputs((2, 3, 4, 4), seed=5)
    coef = torch.tensor([0.3, 0.6, 0.9])
    seed = torch.tensor([4242])
    outs = []
    for use_op in (False, True):
        xs, fs, cs = (t.clone().requires_grad_() for t in (x, f, coef))
        y = OP(xs, fs, 0.1, cs, seed, "")[0] if use_op else \
            cdkernels.cd_std_step(xs, fs, 0.1, cs, seed=seed)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xs.grad, fs.grad, cs.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_opcheck_and_compile():
    x, f = _inputs((2, 3, 4, 4), seed=6)
    coef = torch.tensor([0.3, 0.6, 0.9], requires_grad=True)
    torch.library.opcheck(OP, (x.requires_grad_(), f, 0.1, coef, torch.tensor([3]), ""))
    torch._dynamo.reset()
    fn = lambda a, b, c: cdkernels.cd_std_step(a, b, 0.1, c, seed=9)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, f, coef), fn(x, f, coef))


def test_same_noise_as_cd_step_and_std_noise_step_module():
    """cd_std_step(.., c, seed) == cd_step(.., c*std/sqrt(dt), seed); StdNoiseStep uses it."""
    from cdkernels.models.resnet import StdNoiseStep
    x, f = _inputs((4, 3, 5, 5), seed=7)
    z = (x + 0.1 * f).double()
    sd = z.std().item()
    y = cdkernels.cd_std_step(x, f, 0.1, 0.3, seed=5)
    torch.testing.assert_close(y, cdkernels.cd_step(x, f, 0.1, 0.3 * sd / math.sqrt(0.1), seed=5),
                               rtol=1e-5, atol=1e-5)
    m = StdNoiseStep(0.1, 0.3, learnable="channel", channels=3).train()
    torch.testing.assert_close(m(x, f, seed=5), y, **TOL[torch.float32])
    m(x, f).sum().backward()
    assert m.coef.grad is not None and m.coef.grad.abs().sum() > 0


def test_bad_input():
    x, f = _inputs((2, 3))
    with pytest.raises(ValueError, match="dt"):
        cdkernels.cd_std_step(x, f, 0.0, 0.3)
    with pytest.raises(ValueError, match="sigma"):
        cdkernels.cd_std_step(x, f, 0.1, torch.ones(4))
    with pytest.raises(ValueError, match="f must have"):
        cdkernels.cd_std_step(x, torch.ones(3), 0.1, 0.3)


# -- the CUDA kernels (csrc/cuda/std_step.cu) under the host emulator ---------------------------

@pytest.fixture(scope="module")
def std_emu(tmp_path_factory):
    import ctypes
    import os
    import shutil
    import subprocess
    from conftest import REQUIRED
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    inc = next((os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME"),
                                                      os.environ.get("CUDA_PATH"),
                                                      "/usr/local/cuda")
                if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))), None)
    cxx = shutil.which(os.environ.get("CXX") or "g++")
    if inc is None or cxx is None:
        msg = "cuda-emulated: g++ or the CUDA headers not found"
        if "cuda-emulated" in REQUIRED:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    lib = str(tmp_path_factory.mktemp("std_emu") / "libcdk_std_emu.so")
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-DCDK_EMULATE",
           "-x", "c++", f"-I{csrc}", f"-I{os.path.join(csrc, 'cuda')}", f"-I{inc}",
           os.path.join(csrc, "cuda", "std_step_emu.cuh"), "-o", lib]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        pytest.fail("building the std_step emulator failed:\n" + res.stderr[-6000:],
                    pytrace=False)
    L = ctypes.CDLL(lib)
    P, I64, D, INT, UI = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int,
                          ctypes.c_uint)
    L.emu_set_sched_std.argtypes = [INT, UI]
    L.emu_z_stats.argtypes = [INT, I64, P, P, D, P, P, UI]
    L.emu_z_std_bwd.argtypes = [INT, I64, P, P, P, P, P, D, P, UI]
    return L


@pytest.mark.parametrize("sched", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_std_kernels_emulated(std_emu, sched, dtype):
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    ref = get_backend(torch.device("cpu"), dtype, "reference")
    std_emu.emu_set_sched_std(sched, 1234)
    for n, shift, cap in ((3000, 0.0, 3), (2 * 256 * 5 + 7, 40.0, 4), (2, 0.0, 2)):
        x, f = _inputs((n,), dtype, seed=n, shift=shift)
        part = torch.full((2 * cap,), float("nan"), dtype=torch.float64)
        st = torch.full((2,), float("nan"), dtype=torch.float64)
        std_emu.emu_z_stats(codes[dtype], n, x.data_ptr(), f.data_ptr(), 0.3, part.data_ptr(),
                            st.data_ptr(), cap)
        st_ref = torch.empty(2, dtype=torch.float64)
        ref.z_stats(x, f, 0.3, st_ref)
        torch.testing.assert_close(st, st_ref, rtol=1e-6, atol=1e-7)
        coefs = torch.tensor([float(st_ref[0]), 0.37, -0.05], dtype=torch.float64)
        g = torch.randn(n).to(dtype)
        for gy in (g, None):
            gx, gf = poisoned_like(x), poisoned_like(x)
            std_emu.emu_z_std_bwd(codes[dtype], n, x.data_ptr(), f.data_ptr(),
                                  None if gy is None else gy.data_ptr(), gx.data_ptr(),
                                  gf.data_ptr(), 0.3, coefs.data_ptr(), cap)
            gx_r, gf_r = torch.empty_like(x), torch.empty_like(x)
            ref.z_std_bwd(x, f, gy, 0.3, coefs, gx_r, gf_r)
            tol = dict(TOL[dtype])
            if shift:
                tol = dict(rtol=max(tol["rtol"], 1e-5), atol=max(tol["atol"], 1e-5))
            torch.testing.assert_close(gx, gx_r, **tol)
            torch.testing.assert_close(gf, gf_r, **tol)
