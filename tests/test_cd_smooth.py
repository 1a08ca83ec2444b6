"""cdkernels.cd_smooth: backends against the reference, convergence to the closed form,
gradients, memory independent of K, and bad input."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cdkernels
from cdkernels.backends import get_backend
from conftest import TOL, poisoned_like

ACTS = ["relu", "gelu", "tanh", "sigmoid", "softplus"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_backend_kernels_against_reference(native, dtype, act, per_channel):
    name, dev = native
    be = get_backend(torch.device(dev), dtype, name)
    ref = get_backend(torch.device("cpu"), dtype, "reference")
    n, C, cs, K = 4 * 53 + 1, 3, 5, 5
    g0 = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(n, generator=g0)).to(dtype)
    g = torch.randn(n, generator=g0).to(dtype)
    sigma = torch.tensor([0.3, 1.0, 2.5]) if per_channel else None
    seed = torch.tensor([-987654321])
    args = (sigma, 0.7, C, cs, K, seed, 9, act)
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    dargs = (to(sigma), 0.7, C, cs, K, seed.to(dev), 9, act)

    # Native backends' cd_smooth uses the fast transcendentals of docs/noise.md 3c:
    # |d eps| <= 2^-18 r <= 2.2e-5, so |d y| <= 2.2e-5 * sigma_max * Lip(act) (Lip <= 1.13,
    # gelu) on top of the rounding.
    tol = dict(TOL[dtype])
    tol["atol"] += 2.2e-5 * 2.5 * 1.13

    y, y_ref = poisoned_like(x).to(dev), poisoned_like(x)
    be.cd_smooth_fwd(x.to(dev), y, *dargs)
    ref.cd_smooth_fwd(x, y_ref, *args)
    torch.testing.assert_close(y.cpu(), y_ref, **tol)

    gx, gs = poisoned_like(x).to(dev), torch.zeros(C, device=dev)
    gx_ref, gs_ref = poisoned_like(x), torch.zeros(C)
    be.cd_smooth_bwd(g.to(dev), x.to(dev), gx, gs, *dargs)
    ref.cd_smooth_bwd(g, x, gx_ref, gs_ref, *args)
    if act == "relu":
        # a sample within 2.2e-5*sigma of relu's kink may flip (|g|/K); allow one such element
        bad = ~torch.isclose(gx.cpu(), gx_ref, **tol)
        assert bad.sum().item() <= 1 and torch.isfinite(gx.cpu()).all()
        if bad.any():
            return  # the flipped sample also moves grad_sigma by up to |g eps| / K
    torch.testing.assert_close(gx.cpu(), gx_ref, **tol)
    torch.testing.assert_close(gs.cpu(), gs_ref, rtol=1e-4, atol=1e-3)


def test_sample_k_uses_stream_k():
    """docs/noise.md: sample k is stream (seed, 0, k)."""
    x = torch.randn(3, 7, dtype=torch.float64)
    K = 4
    y = cdkernels.cd_smooth(x, 0.8, samples=K, activation="tanh", seed=17)
    eps = [cdkernels.normal(x.shape, 17, sample=k, dtype=torch.float64) for k in range(K)]
    want = sum(torch.tanh(x + 0.8 * e) for e in eps) / K
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_converges_to_closed_form_at_rate_one_over_sqrt_k(act):
    """The Monte-Carlo error shrinks like 1/sqrt(K): the RMS error over many points, relative
    to the per-sample standard deviation, stays within a band around 1/sqrt(K)."""
    x = torch.linspace(-3, 3, 4001, dtype=torch.float64)
    sigma = 0.8
    exact = cdkernels.cd_smooth(x, sigma, samples=None, activation=act)
    # per-sample std of act(x + sigma*eps), estimated once with many samples
    eps = torch.randn(2000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    from cdkernels.backends.reference import act_fwd
    sd = act_fwd(x + sigma * eps, act).std(0)
    for K in (4, 16, 64, 256, 2048):
        mc = cdkernels.cd_smooth(x, sigma, samples=K, activation=act, seed=K)
        # E[err^2] = sd^2 / K at each point, so mean(err^2) / mean(sd^2) = 1/K
        rms = ((mc - exact).pow(2).mean() / sd.pow(2).mean()).sqrt().item()
        assert 0.8 < rms * math.sqrt(K) < 1.2, (K, rms)


def test_closed_form_relu_values():
    """relu smoothing x*Phi(x/s) + s*phi(x/s) against a float64 quadrature."""
    x = torch.tensor([-2.0, -0.3, 0.0, 0.4, 3.0], dtype=torch.float64)
    s = 0.6
    t = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    w = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) * (t[1] - t[0])
    quad = (torch.relu(x[:, None] + s * t[None]) * w).sum(1)
    got = cdkernels.cd_smooth(x, s, samples=None, activation="relu")
    torch.testing.assert_close(got, quad, rtol=1e-8, atol=1e-10)
    gel = cdkernels.cd_smooth(x, s, samples=None, activation="gelu")
    quad_g = (torch.nn.functional.gelu(x[:, None] + s * t[None]) * w).sum(1)
    torch.testing.assert_close(gel, quad_g, rtol=1e-8, atol=1e-10)
    # sigma = 0 is the activation itself
    torch.testing.assert_close(cdkernels.cd_smooth(x, 0.0, samples=None), torch.relu(x))


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    x = (2 * torch.randn(2, 3, 5, dtype=torch.float64)).requires_grad_()
    s = torch.tensor([0.3, 0.9, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, s: cdkernels.cd_smooth(x, s, samples=3, activation=act, seed=5), (x, s))
    s1 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, s: cdkernels.cd_smooth(x, s, samples=2, activation=act, seed=5), (x, s1))
    if act in ("relu", "gelu"):
        assert torch.autograd.gradcheck(
            lambda x, s: cdkernels.cd_smooth(x, s, samples=None, activation=act), (x, s))


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    sig = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    torch.library.opcheck(torch.ops.cdkernels.cd_smooth.default,
                          (x, 0.0, sig, 3, torch.tensor([8]), 0, "gelu", ""))
    torch.library.opcheck(torch.ops.cdkernels.cd_smooth.default,
                          (x, 0.5, None, 2, torch.tensor([8]), 0, "relu", ""))
    torch._dynamo.reset()
    fn = lambda x: cdkernels.cd_smooth(x, sig, samples=4, activation="softplus", seed=3)  # noqa
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


def _peak_rss_mb(backend: str, K: int, n: int) -> float:
    code = textwrap.dedent(f"""
        import resource, torch, cdkernels
        x = torch.randn({n}, requires_grad=True)
        sig = torch.tensor(0.5, requires_grad=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = cdkernels.cd_smooth(x, sig, samples={K}, activation="relu", seed=1,
                                backend="{backend}")
        y.sum().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) / 1024)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_k(native):
    """Peak resident memory of forward+backward with K=64 stays within a small margin of K=1
    (a naive implementation holds K noisy copies: 64x the input). CPU backends only; the GPU
    script measures peak allocation on the device."""
    name, dev = native
    if dev != "cpu":
        pytest.skip("peak RSS is a CPU measurement (tests/test_cuda.py measures the GPU)")
    if name == "triton":
        pytest.skip("the Triton interpreter's own numpy temporaries dominate RSS; Triton's "
                    "memory is measured on the GPU in tests/test_cuda.py")
    n = 1 << 22  # 16 MB
    mb = n * 4 / 2 ** 20
    m1, m64 = _peak_rss_mb(name, 1, n), _peak_rss_mb(name, 64, n)
    assert m64 <= m1 + 0.5 * mb + 8, (m1, m64, mb)


def test_bad_input():
    x = torch.randn(2, 3)
    cases = [
        (lambda: cdkernels.cd_smooth(x, 0.5, samples=0), ValueError, "samples"),
        (lambda: cdkernels.cd_smooth(x, 0.5, samples=2.0), ValueError, "samples"),
        (lambda: cdkernels.cd_smooth(x, 0.5, samples=2, activation="elu"), ValueError,
         "activation"),
        (lambda: cdkernels.cd_smooth(x, 0.5, samples=None, activation="tanh"), ValueError,
         "exact"),
        (lambda: cdkernels.cd_smooth(x, -0.5, samples=2), ValueError, "sigma"),
        (lambda: cdkernels.cd_smooth(x.long(), 0.5, samples=2), TypeError, "x must be"),
        (lambda: cdkernels.cd_smooth(x, torch.ones(2), samples=2), ValueError, "sigma"),
        (lambda: cdkernels.cd_smooth(x, 0.5, samples=2, mode="quasi"), ValueError, "mode"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    assert cdkernels.cd_smooth(torch.empty(0, 3), 0.5, samples=4).shape == (0, 3)
