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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dt", [0.1, 1.0])
def test_cpu_int_seed_path_equals_custom_op(cpu_backend, monkeypatch, dtype, layout, dt):
    """An int or drawn seed on the CPU keeps the seed's value, not its buffer (reused by later
    calls), and replays it through the seed buffer in backward: y and every gradient equal the
    custom op's bit for bit, for a gradient in y's layout or an expanded one (y.sum())."""
    import cdkernels.std_step as S
    calls = []
    replay = S.C.cpu_seed_buffer_signed
    monkeypatch.setattr(S.C, "cpu_seed_buffer_signed", lambda v: calls.append(v) or replay(v))
    x, f = (t.to(dtype) for t in _inputs((2, 3, 4, 5), seed=12))
    if layout == "channels_last":
        x, f = (t.contiguous(memory_format=torch.channels_last) for t in (x, f))
    for g in (torch.randn(2, 3, 4, 5).to(dtype), None):
        outs = []
        for path in ("fast", "op"):
            xs, fs = (t.clone().requires_grad_() for t in (x, f))
            cs = torch.tensor([0.3, 0.6, 0.9], requires_grad=True)
            y = (cdkernels.cd_std_step(xs, fs, dt, cs, seed=4242, backend="cpu")
                 if path == "fast" else OP(xs, fs, dt, cs, torch.tensor([4242]), "cpu")[0])
            y.backward(g) if g is not None else y.sum().backward()
            outs.append((y.detach(), xs.grad, fs.grad, cs.grad))
        for a, b in zip(*outs):
            assert a.stride() == b.stride() and torch.equal(a, b)
    assert calls == [4242, 4242]


def test_backward_uses_its_forward_seed_after_other_calls():
    """The CPU seed buffer is reused by later calls; the backward must still use its own
    forward's noise (drawn with torch.manual_seed, or given as an int)."""
    x, f = _inputs((3, 4, 6, 6), seed=30)
    for seed in (None, 777):
        grads = []
        for other_calls in (True, False):
            torch.manual_seed(5)
            c = torch.tensor([0.2, 0.4, 0.6, 0.8], requires_grad=True)
            y = cdkernels.cd_std_step(x, f, 1.0, c, seed=seed)
            if other_calls:
                for s in (None, 99, None):
                    cdkernels.cd_std_step(x, f, 1.0, c, seed=s)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            grads.append(c.grad)
        assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_opcheck_and_compile():
    x, f = _inputs((2, 3, 4, 4), seed=6)
    coef = torch.tensor([0.3, 0.6, 0.9], requires_grad=True)
    torch.library.opcheck(OP, (x.requires_grad_(), f, 0.1, coef, torch.tensor([3]), ""))
    torch._dynamo.reset()
    fn = lambda a, b, c: cdkernels.cd_std_step(a, b, 0.1, c, seed=9)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, f, coef), fn(x, f, coef))


def test_compiled_backward_at_dt_1():
    """dt = 1 (the models' default), where grad_f is grad_x itself: the custom backward op
    returns it once (op outputs may not alias). It used to return the same tensor twice on the
    CPU, which torch.library refuses, so a compiled std model failed in its backward."""
    x, f = _inputs((2, 3, 4, 4), seed=16)
    c = torch.tensor([0.3, 0.6, 0.9])
    torch.library.opcheck(OP, (x.clone().requires_grad_(), f, 1.0, c.clone().requires_grad_(),
                               torch.tensor([3]), ""))
    torch._dynamo.reset()
    fn = lambda a, b, k: cdkernels.cd_std_step(a, b, 1.0, k, seed=21)  # noqa: E731
    grads = []
    for run in (torch.compile(fn, fullgraph=True), fn):
        xs, fs, cs = (t.clone().requires_grad_() for t in (x, f, c))
        (run(xs, fs, cs) * torch.arange(96.0).reshape(2, 3, 4, 4)).sum().backward()
        grads.append((xs.grad, fs.grad, cs.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch.testing.assert_close(grads[0][0], grads[0][1], rtol=0, atol=0)


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


# -- the CPU backend's one-call step: eps read back from y in its backward (docs/noise.md 3d) -----

def _cpu_bwd(x, f, y, g, coef, dt, seed, stats, need_xf=True):
    """CpuBackend.std_step_bwd with poisoned outputs: (grad_x, grad_f, grad_coef)."""
    from cdkernels import _common as C
    be = get_backend(torch.device("cpu"), x.dtype, "cpu")
    c = C.sigma_for_kernel(coef, x.dtype)
    ch, cs = C.channel_map(x, c)
    gx, gf = (poisoned_like(x), poisoned_like(x)) if need_xf else (None, None)
    gc = torch.full((c.numel(),), float("nan"))
    mean, sd = stats.tolist()
    be.std_step_bwd(g, y, x, f, gx, gf, gc, dt, c, ch, cs, seed, 0, mean, sd)
    return gx, gf, gc


def _cpu_fwd(x, f, coef, dt, seed):
    from cdkernels import _common as C
    be = get_backend(torch.device("cpu"), x.dtype, "cpu")
    c = C.sigma_for_kernel(coef, x.dtype)
    ch, cs = C.channel_map(x, c)
    y, stats = poisoned_like(x), torch.full((2,), float("nan"), dtype=torch.float64)
    be.std_step_fwd(x, f, y, dt, c, ch, cs, seed, 0, stats)
    return y, stats


@pytest.mark.parametrize("dt", [0.3, 1.0])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_reads_eps_back_within_its_bound(cpu_backend, per_channel, layout, dt):
    """float32: every gradient within the 3d bound of the float64 definition's, and grad_coef
    within 5e-6 * std * sum|g| of the regenerated-eps result (which it must not equal: the
    read-back path really ran). 4x5x9x7 = 1260 elements: 512-element tiles cross channels."""
    x, f = _inputs((4, 5, 9, 7), seed=21, shift=0.5)
    g = torch.randn(4, 5, 9, 7, generator=torch.Generator().manual_seed(22))
    if layout == "channels_last":
        x, f, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, f, g))
    coef = torch.tensor([0.1, 0.25, 0.4, 0.7, 1.3] if per_channel else 0.15)
    seed = torch.tensor([31337])
    y, stats = _cpu_fwd(x, f, coef, dt, seed)
    torch.testing.assert_close(y, cdkernels.cd_std_step(x, f, dt, coef, seed=seed, backend="cpu"),
                               rtol=0, atol=0)
    back = _cpu_bwd(x, f, y, g, coef, dt, seed, stats)
    regen = _cpu_bwd(x, f, None, g, coef, dt, seed, stats)
    # the float64 definition's gradients
    xd, fd, cd = (t.double().requires_grad_() for t in (x, f, coef))
    z = xd + dt * fd
    eps = torch.empty_like(x, dtype=torch.float64)  # the stream runs in memory order
    eps.as_strided((x.numel(),), (1,)).copy_(
        cdkernels.normal((x.numel(),), seed, dtype=torch.float64))
    cc = cd.reshape(1, -1, 1, 1) if per_channel else cd
    (z + cc * z.std() * eps).backward(g.double())
    sd = stats[1].item()
    gabs = g.double().abs()
    per_c = gabs.sum(dim=(0, 2, 3)) if per_channel else gabs.sum().reshape(1)
    bound = 5e-6 * sd * per_c + 1e-6 * regen[2].double().abs()
    assert ((back[2].double() - regen[2].double()).abs() <= bound).all()
    # eps really comes from y: shifting y by s/2 (s = coef_c std) shifts every eps~ by 1/2
    s = (coef.reshape(1, -1, 1, 1) if per_channel else coef) * sd
    shifted = _cpu_bwd(x, f, y + 0.5 * s, g, coef, dt, seed, stats, need_xf=False)[2]
    half = 0.5 * sd * (g.double().sum(dim=(0, 2, 3)) if per_channel else g.double().sum())
    torch.testing.assert_close(shifted.double() - back[2].double(), half.reshape(-1),
                               rtol=1e-4, atol=1e-4 * sd * per_c.max().item())
    ref_c = cd.grad.reshape(-1)
    assert ((back[2].double() - ref_c).abs() <= bound + 2e-6 * ref_c.abs()).all()
    for got, ref in ((back[0], xd.grad), (back[1], fd.grad)):
        assert got.stride() == x.stride()
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)
    if dt == 1.0:
        assert torch.equal(back[0], back[1])


def test_cpu_regenerates_where_y_cannot_give_eps(cpu_backend):
    """The guard: a tiny coef (|y| >> 64 s everywhere), 16-bit data (y rounded) and a missing y
    all regenerate, bit for bit; a few huge elements make only their own tiles regenerate."""
    seed = torch.tensor([99])
    for dtype, coef in ((torch.float32, 1e-4), (torch.bfloat16, 0.3), (torch.float16, 0.3)):
        x, f = _inputs((3, 4, 11, 13), dtype, seed=41)
        g = torch.randn(x.shape).to(dtype)
        y, stats = _cpu_fwd(x, f, torch.tensor(coef), 1.0, seed)
        a = _cpu_bwd(x, f, y, g, torch.tensor(coef), 1.0, seed, stats)
        b = _cpu_bwd(x, f, None, g, torch.tensor(coef), 1.0, seed, stats)
        for u, v in zip(a, b):
            assert torch.equal(u, v), dtype
    x, f = _inputs((3, 4, 11, 13), seed=42)
    x.view(-1)[700:710] = 1e4  # one tile's max |y| far above 64 s
    g = torch.randn(x.shape)
    coef = torch.tensor(0.2)
    y, stats = _cpu_fwd(x, f, coef, 1.0, seed)
    a = _cpu_bwd(x, f, y, g, coef, 1.0, seed, stats, need_xf=False)[2]
    b = _cpu_bwd(x, f, None, g, coef, 1.0, seed, stats, need_xf=False)[2]
    sd = stats[1].item()
    assert (a - b).abs().item() <= 5e-6 * sd * g.abs().sum().item() + 1e-6 * b.abs().item()
    # y shifted by s/2 in the big elements' tile only (elements 512..1023) changes nothing
    # (regenerated there); in the next tile it does
    for lo, moved in ((512, False), (1024, True)):
        y2 = y.clone()
        y2.view(-1)[lo:lo + 512] += 0.5 * 0.2 * sd
        a2 = _cpu_bwd(x, f, y2, g, coef, 1.0, seed, stats, need_xf=False)[2]
        assert torch.equal(a2, a) != moved, lo


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_per_channel_zero_coef_regenerates_its_channel(cpu_backend, layout):
    """Per-channel coef with one channel at 0 (s = 0: eps cannot come from y there). With
    channels innermost (channels_last) every tile holds that channel, so the whole backward
    regenerates, bit for bit; contiguous, the tiles holding only other channels still read eps
    back (their grad_coef moves when y does), and the zero channel's grad_coef is the
    regenerated one exactly."""
    x, f = _inputs((4, 3, 16, 16), seed=51, shift=0.5)  # 256-element channels, 512-element tiles
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(52))
    if layout == "channels_last":
        x, f, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, f, g))
    coef = torch.tensor([0.2, 0.0, 0.3])
    seed = torch.tensor([7])
    y, stats = _cpu_fwd(x, f, coef, 1.0, seed)
    back = _cpu_bwd(x, f, y, g, coef, 1.0, seed, stats)
    regen = _cpu_bwd(x, f, None, g, coef, 1.0, seed, stats)
    sd = stats[1].item()
    moved = _cpu_bwd(x, f, y + 0.5 * 0.2 * sd, g, coef, 1.0, seed, stats, need_xf=False)[2]
    if layout == "channels_last":
        for u, v in zip(back, regen):
            assert torch.equal(u, v)
        assert torch.equal(moved, regen[2])
    else:
        assert torch.equal(back[2][1], regen[2][1])
        assert not torch.equal(moved[0], back[2][0])  # channel 0's tiles read eps back
        assert torch.isfinite(back[2]).all() and torch.isfinite(back[0]).all()


def test_cpu_backward_after_y_changed_in_place_raises(cpu_backend):
    """y is saved for the backward (eps is read back from it): an in-place change of y before
    the backward is refused by autograd, not silently turned into a wrong gradient."""
    x, f = _inputs((2, 3, 4, 4), seed=8)
    x.requires_grad_()
    y = cdkernels.cd_std_step(x, f, 1.0, 0.3, seed=3)
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("seed", [3, "tensor"])
def test_empty_tensor_gives_zero_gradients(seed):
    """numel 0: an empty y and zero gradients (the loss does not depend on coef), on the CPU
    int-seed path and the generic one, not the nan of an empty tensor's std."""
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    f = torch.randn(0, 3, 4, 4, requires_grad=True)
    c = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    y = cdkernels.cd_std_step(x, f, 1.0, c, seed=torch.tensor([3]) if seed == "tensor" else seed)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(c.grad, torch.zeros(3)) and x.grad.shape == x.shape


def test_cpu_entries_refuse_bad_arguments(cpu_backend):
    """The compiled std_step entries check what Python would also catch: dt > 0, a known dtype
    code, and a backward with something to compute."""
    import cdkernels._C as K
    x = torch.randn(8)
    c, st, seed = torch.tensor([0.3]), torch.empty(2, dtype=torch.float64), torch.tensor([1])
    p = x.data_ptr()
    with pytest.raises(ValueError, match="dt > 0"):
        K.std_step_fwd(p, p, p, 8, 0, 0.0, c.data_ptr(), 1, 1, seed.data_ptr(), 0,
                       st.data_ptr(), 1)
    with pytest.raises(ValueError, match="dtype code"):
        K.std_step_fwd(p, p, p, 8, 7, 1.0, c.data_ptr(), 1, 1, seed.data_ptr(), 0,
                       st.data_ptr(), 1)
    with pytest.raises(ValueError, match="no output"):
        K.std_step_bwd(p, 0, p, p, 0, 0, 0, 8, 0, 1.0, c.data_ptr(), 1, 1, seed.data_ptr(), 0,
                       0.0, 1.0, 1)


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
