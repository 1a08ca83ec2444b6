"""The eager fast path of cd_step (autograd.Function / direct backend call) against the
torch.library custom op that torch.compile and export see; the seed scheme; the CPU pool under
concurrent callers."""
import math
import os
import sys
import threading

import pytest
import torch

import cdkernels
import cdkernels.cd_step  # noqa: F401
from conftest import TOL

S = sys.modules["cdkernels.cd_step"]  # the module (cdkernels.cd_step is also the function)

OP = torch.ops.cdkernels.cd_step.default


def _data(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


def _grads(fn, x, f, sigma, g):
    xs, fs = x.clone().requires_grad_(), f.clone().requires_grad_()
    ss = sigma.clone().requires_grad_() if isinstance(sigma, torch.Tensor) else sigma
    y = fn(xs, fs, ss)
    y.backward(g)
    return y.detach(), xs.grad, fs.grad, (ss.grad if isinstance(ss, torch.Tensor) else None)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("sigma_kind", ["float", "scalar", "channel"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dt", [0.3, 1.0])
def test_fast_path_equals_custom_op(native_or_ref, backend, act, sigma_kind, layout, dt):
    """Same seed: the eager fast path and the custom op give bit-identical y and gradients
    (dt = 1 with no activation: grad_x and grad_f are grad_y itself, no kernel writes them)."""
    native_or_ref(backend)
    x, f = _data((2, 3, 5, 6))
    g = torch.randn(2, 3, 5, 6)
    if layout == "channels_last":
        x, f, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, f, g))
    sigma = {"float": 0.7, "scalar": torch.tensor(0.7),
             "channel": torch.tensor([0.2, 0.9, 1.5])}[sigma_kind]
    seed = torch.tensor([987654321])

    def fast(a, b, s):
        return cdkernels.cd_step(a, b, dt, s, activation=act, seed=seed, backend=backend)

    def op(a, b, s):
        sv, st = (s, None) if not isinstance(s, torch.Tensor) else (0.0, s)
        return OP(a, b, dt, sv, st, seed, 0, act, backend)

    rf, ro = _grads(fast, x, f, sigma, g), _grads(op, x, f, sigma, g)
    for a, b in zip(rf, ro):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    assert rf[1].abs().sum() > 0
    if sigma_kind != "float":
        assert rf[3].abs().sum() > 0
    if act == "none":  # d/dx = 1, d/df = dt, whatever sigma is
        torch.testing.assert_close(rf[1], g, rtol=0, atol=0)
        torch.testing.assert_close(rf[2], g * dt, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sigma_kind", ["scalar", "channel"])
@pytest.mark.parametrize("dt", [1e-70, 0.3, 1.0])
def test_cpu_learnable_sigma_backward_equals_custom_op(cpu_backend, monkeypatch, dtype, layout,
                                                       sigma_kind, dt):
    """An int seed on the CPU takes the learnable-sigma backward's one-call path
    (CpuBackend.cd_step_sigma_grad; dt = 1e-70, sqrt(dt) < 1e-30, falls back): its sigma
    gradient equals the custom op's bit for bit, for an incoming gradient in y's layout or not."""
    x, f = (t.to(dtype) for t in _data((2, 3, 5, 6)))
    if layout == "channels_last":
        x, f = (t.contiguous(memory_format=torch.channels_last) for t in (x, f))
    sigma = {"scalar": torch.tensor(0.7), "channel": torch.tensor([0.2, 0.9, 1.5])}[sigma_kind]
    taken = []
    lean = type(cpu_backend).cd_step_sigma_grad
    monkeypatch.setattr(type(cpu_backend), "cd_step_sigma_grad",
                        lambda self, *a: taken.append(lean(self, *a)) or taken[-1])
    for g in (torch.randn(2, 3, 5, 6).to(dtype), None):
        grads = []
        for path in ("fast", "op"):
            s = sigma.clone().requires_grad_()
            y = (cdkernels.cd_step(x, f, dt, s, seed=987654321, backend="cpu") if path == "fast"
                 else OP(x, f, dt, 0.0, s, torch.tensor([987654321]), 0, "none", "cpu"))
            y.backward(g) if g is not None else y.sum().backward()
            grads.append(s.grad)
        assert torch.equal(grads[0], grads[1])
        assert grads[0].abs().sum() > 0 or dt == 1e-70
    assert len(taken) == 2 and all((t is None) == (dt == 1e-70) for t in taken)


@pytest.fixture
def native_or_ref():
    def check(name):
        if not cdkernels.backends()[name]["available"]:
            pytest.skip(f"{name} unavailable")
    return check


def test_fast_path_taken_eagerly_and_not_under_compile(monkeypatch):
    calls = []
    orig = S._cd_step_eager
    monkeypatch.setattr(S, "_cd_step_eager", lambda *a: calls.append(1) or orig(*a))
    x, f = _data((4, 8))
    cdkernels.cd_step(x, f, 0.1, 0.5, seed=1)
    assert calls == [1]
    # functorch transforms and dispatch modes see the custom op
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        cdkernels.cd_step(x, f, 0.1, 0.5, seed=1)
    assert calls == [1] and any("cdkernels" in o for o in Seen.ops)


def test_compiled_matches_fast_path_per_channel_grads():
    torch._dynamo.reset()
    x, f = _data((2, 3, 4, 4))
    sig = torch.tensor([0.3, 0.6, 0.9], requires_grad=True)

    def fn(a, b, s):
        return cdkernels.cd_step(a, b, 0.2, s, activation="relu", seed=77)

    ye = fn(x, f, sig)
    ye.sum().backward()
    ge = sig.grad.clone()
    sig.grad = None
    yc = torch.compile(fn, fullgraph=True)(x, f, sig)
    yc.sum().backward()
    assert torch.equal(ye, yc)
    torch.testing.assert_close(sig.grad, ge, rtol=0, atol=0)


def test_float64_gradcheck_fast_path():
    x, f = _data((2, 3, 4), torch.float64)
    sig = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    args = (x.requires_grad_(), f.requires_grad_(), sig.requires_grad_())
    torch.autograd.gradcheck(
        lambda a, b, s: cdkernels.cd_step(a, b, 0.2, s, activation="relu", seed=5), args)


# -- seeds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True])
def test_manual_seed_reproduces_and_calls_differ(grad):
    x, f = _data((64,))
    x.requires_grad_(grad)
    torch.manual_seed(11)
    a1, a2 = cdkernels.cd_step(x, f, 0.1, 1.0), cdkernels.cd_step(x, f, 0.1, 1.0)
    torch.manual_seed(11)
    b1, b2 = cdkernels.cd_step(x, f, 0.1, 1.0), cdkernels.cd_step(x, f, 0.1, 1.0)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    # interleaving other torch RNG use shifts the stream, like any torch RNG consumer
    torch.manual_seed(11)
    torch.rand(1)
    assert not torch.equal(cdkernels.cd_step(x, f, 0.1, 1.0), a1)


def test_seed_none_is_the_documented_draw():
    """docs/noise.md section 5: seed=None uses random_() of an int64 [1] tensor (rank 0)."""
    x, f = _data((37,))
    torch.manual_seed(5)
    s = torch.empty(1, dtype=torch.int64).random_()
    torch.manual_seed(5)
    y = cdkernels.cd_step(x, f, 0.1, 1.0)
    assert torch.equal(y, cdkernels.cd_step(x, f, 0.1, 1.0, seed=int(s)))
    # the custom-op path draws the same seed
    torch.manual_seed(5)
    assert torch.equal(y, OP(x, f, 0.1, 1.0, None, cdkernels._common.make_seed(None, x.device),
                             0, "none", ""))


def test_cd_smooth_seed_none_is_the_documented_draw_on_both_paths():
    """cd_smooth's eager no-grad CPU path (seed in the per-thread buffer) draws the seed the
    custom-op path (taken with grad) draws: same manual_seed, same samples; calls differ."""
    x = torch.randn(3, 4, 5)
    torch.manual_seed(9)
    s = torch.empty(1, dtype=torch.int64).random_()
    torch.manual_seed(9)
    eager = cdkernels.cd_smooth(x, 0.4, samples=4, backend="cpu")
    assert torch.equal(eager, cdkernels.cd_smooth(x, 0.4, samples=4, seed=int(s) % (1 << 64),
                                                  backend="cpu"))
    torch.manual_seed(9)
    op = cdkernels.cd_smooth(x.clone().requires_grad_(True), 0.4, samples=4, backend="cpu")
    assert torch.equal(eager, op.detach())
    assert not torch.equal(eager, cdkernels.cd_smooth(x, 0.4, samples=4, backend="cpu"))


def test_backward_uses_its_forward_seed_after_other_calls():
    """The CPU seed buffer is reused by later calls; backward must still see its own noise."""
    x, f = _data((50, 3))
    sig = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    y = cdkernels.cd_step(x, f, 0.2, sig, seed=1234)
    for s in (None, 99, None):  # overwrite the buffer
        cdkernels.cd_step(x, f, 0.2, sig, seed=s).sum()
    y.sum().backward()
    g1 = sig.grad.clone()
    sig.grad = None
    cdkernels.cd_step(x, f, 0.2, sig, seed=1234).sum().backward()
    assert torch.equal(g1, sig.grad)
    sig.grad = None
    torch.manual_seed(2)
    y = cdkernels.cd_step(x, f, 0.2, sig)
    cdkernels.cd_step(x, f, 0.2, sig).sum()
    y.sum().backward()
    g2 = sig.grad.clone()
    sig.grad = None
    torch.manual_seed(2)
    cdkernels.cd_step(x, f, 0.2, sig).sum().backward()
    assert torch.equal(g2, sig.grad) and g2.abs().sum() > 0


# -- the CPU pool -----------------------------------------------------------------------------

@pytest.fixture(params=["openmp", "pool"])
def cpu_threading(request):
    """Run a test with the CPU kernels' helpers on torch's OpenMP threads, then on our pool."""
    if not cdkernels.backends()["cpu"]["available"]:
        pytest.skip("cpu backend unavailable")
    import cdkernels._C as _C
    _C._set_cpu_threading(request.param)
    try:
        if request.param == "openmp" and not _C.cpu_threading().startswith("openmp"):
            pytest.skip("no OpenMP runtime loaded in this process")
        yield request.param
    finally:
        _C._set_cpu_threading(os.environ.get("CDK_CPU_THREADS", "auto"))


def test_cpu_threading_uses_torchs_openmp_runtime():
    """With torch's libgomp/libiomp5/libomp loaded (Linux wheels), the CPU kernels run on its
    threads, not on a second pool that would compete with them for the cores."""
    if not cdkernels.backends()["cpu"]["available"]:
        pytest.skip("cpu backend unavailable")
    import cdkernels._C as _C
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        pytest.skip("no /proc/self/maps")
    loaded = any(n in maps for n in ("libgomp", "libiomp5", "libomp"))
    if os.environ.get("CDK_CPU_THREADS") == "pool":
        assert _C.cpu_threading() == "pool"
    elif loaded:
        assert _C.cpu_threading().startswith("openmp ("), _C.cpu_threading()
    with pytest.raises(ValueError, match="threading mode"):
        _C._set_cpu_threading("fibres")


def test_bad_cpu_threading_setting_makes_the_backend_unavailable():
    import subprocess
    code = ("import cdkernels; b = cdkernels.backends()['cpu']; "
            "print(b['available'], b['reason'])")
    env = dict(os.environ, CDK_CPU_THREADS="fibres")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False") and "CDK_CPU_THREADS" in out.stdout


def test_cpu_kernels_in_a_forked_child():
    """A forked child (DataLoader workers) cannot use the parent's OpenMP or pool threads: the
    CPU kernels must still run there (own pool) and give the parent's result, without hanging."""
    if not cdkernels.backends()["cpu"]["available"]:
        pytest.skip("cpu backend unavailable")
    import multiprocessing as mp
    x, f = _data((4, 16, 64, 64))
    want = cdkernels.cd_step(x, f, 0.1, 0.5, seed=9, backend="cpu")  # threads started here
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        # (no torch reductions here: torch's own OpenMP ops are not fork-safe, which is why
        # DataLoader workers run with one thread; ours must work with two)
        import cdkernels._C as _C
        torch.set_num_threads(2)
        y = cdkernels.cd_step(x, f, 0.1, 0.5, seed=9, backend="cpu")
        q.put((_C.cpu_threading(), y.flatten().tolist()))

    p = ctx.Process(target=child)
    p.start()
    try:
        mode, got = q.get(timeout=60)  # (before join: the child exits once this is read)
    finally:
        p.join(10)
        if p.exitcode is None:
            p.kill()
    assert p.exitcode == 0, "child failed"
    assert mode == "pool"
    assert got == want.flatten().tolist()


def test_pool_concurrent_python_threads(cpu_threading):
    """Several Python threads calling the CPU kernels at once (the GIL is released): each result
    equals the same call made alone, and grad_sigma sums stay deterministic; on torch's OpenMP
    threads and on our own pool."""
    shapes = [(4, 16, 64, 64), (3, 7, 33), (1, 5, 1000), (2, 8, 128, 64)]
    inputs = [(_data(s, seed=i), torch.rand(s[1]) + 0.1) for i, s in enumerate(shapes)]

    def work(i):
        (x, f), sig = inputs[i]
        xs, ss = x.clone().requires_grad_(), sig.clone().requires_grad_()
        y = cdkernels.cd_step(xs, f, 0.1, ss, activation="relu", seed=100 + i, backend="cpu")
        y.backward(torch.ones_like(y))
        sm = cdkernels.cd_smooth(x, 0.3, samples=3, seed=7 + i, backend="cpu")
        return y.detach(), xs.grad, ss.grad, sm

    expected = [work(i) for i in range(len(shapes))]
    results, errors = {}, []

    def runner(tid):
        try:
            for rep in range(6):
                i = (tid + rep) % len(shapes)
                results.setdefault(i, []).append(work(i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=runner, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        for out in outs:
            for a, b in zip(out, expected[i]):
                assert torch.equal(a, b)


def test_pool_thread_counts_agree(cpu_threading):
    """torch.set_num_threads changes the split, not the result (beyond float32 sum order)."""
    x, f = _data((8, 16, 32, 32))
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sig = torch.full((16,), 0.4, requires_grad=True)
            y = cdkernels.cd_step(x, f, 0.1, sig, seed=3, backend="cpu")
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), sig.grad))
    finally:
        torch.set_num_threads(n0)
    for y, gs in outs[1:]:
        assert torch.equal(y, outs[0][0])
        torch.testing.assert_close(gs, outs[0][1], **TOL[torch.float32])


def test_jit_trace_uses_the_custom_op():
    x, f = _data((3, 4))
    traced = torch.jit.trace(lambda a, b: cdkernels.cd_step(a, b, 0.1, 0.5, seed=3), (x, f))
    assert "cdkernels::cd_step" in str(traced.graph)
    torch.testing.assert_close(traced(x, f), cdkernels.cd_step(x, f, 0.1, 0.5, seed=3))


# -- big CPU outputs reuse faulted-in memory ------------------------------------------------

def test_output_cache_reuses_only_dropped_outputs():
    from cdkernels._common import output_cache
    if not output_cache.enabled or not cdkernels.backends()["cpu"]["available"]:
        pytest.skip("output cache off")
    cdkernels.empty_cache()
    x, f = _data((3, 1 << 20))  # 12 MiB
    ref = x + 0.1 * f + 0.5 * math.sqrt(0.1) * cdkernels.normal(x.shape, 7)
    y1 = cdkernels.cd_step(x, f, 0.1, 0.5, seed=7, backend="cpu")
    y2 = cdkernels.cd_step(x, f, 0.1, 0.5, seed=8, backend="cpu")
    assert y1.data_ptr() != y2.data_ptr()  # y1 is alive: never handed out twice
    p1 = y1.data_ptr()
    del y1
    y3 = cdkernels.cd_step(x, f, 0.1, 0.5, seed=7, backend="cpu")
    assert y3.data_ptr() == p1  # dropped: reused, and fully rewritten
    torch.testing.assert_close(y3, ref, **TOL[torch.float32])
    # a view of an output keeps it alive
    v = y3[0]
    del y3
    y4 = cdkernels.cd_step(x, f, 0.1, 0.5, seed=9, backend="cpu")
    assert y4.data_ptr() != v.data_ptr() or v.numel() == 0
    torch.testing.assert_close(v, ref[0], **TOL[torch.float32])
    # outputs saved for backward (relu) are in use until backward
    xr = x.clone().requires_grad_()
    y5 = cdkernels.cd_step(xr, f, 0.1, 0.5, activation="relu", seed=1, backend="cpu")
    loss = y5.sum()
    del y5
    y6 = cdkernels.cd_step(x, f, 0.1, 0.5, seed=2, backend="cpu")
    y6.add_(1.0)  # scribbling on a new output must not touch the saved one
    loss.backward()
    torch.testing.assert_close(xr.grad, (torch.relu(x + 0.1 * f + 0.5 * math.sqrt(0.1)
                                                   * cdkernels.normal(x.shape, 1)) > 0).float())
    cdkernels.empty_cache()
    assert output_cache.bufs == []


@pytest.mark.parametrize("op", ["cd_step", "cd_std_step", "cd_smooth"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bad, err", [(-1, ValueError), (2 ** 64, ValueError), ("1", TypeError),
                                      (1.5, TypeError), (True, TypeError)])
def test_eager_paths_refuse_bad_seeds(cpu_backend, op, grad, bad, err):
    """The eager CPU paths (seed through the per-thread buffer, _common.eager_seed) give the same
    clear errors for a bad seed as the custom-op path, with and without grad."""
    x = torch.randn(2, 3, 4, requires_grad=grad)
    f = torch.randn(2, 3, 4)
    call = {"cd_step": lambda: cdkernels.cd_step(x, f, 0.5, 0.3, seed=bad, backend="cpu"),
            "cd_std_step": lambda: cdkernels.cd_std_step(x, f, 0.5, 0.3, seed=bad, backend="cpu"),
            "cd_smooth": lambda: cdkernels.cd_smooth(x, 0.3, samples=2, seed=bad, backend="cpu"),
            }[op]
    with pytest.raises(err, match="seed"):
        call()
