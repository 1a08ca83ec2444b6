"""cdkernels.ensemble_mean and cdkernels.nn.MonteCarlo."""
import math

import pytest
import torch

import cdkernels
from cdkernels.backends import get_backend
from cdkernels.nn import CDStep, MonteCarlo
from conftest import TOL, poisoned_like

SPACES = ["prob", "logit", "logprob"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _plain(z: torch.Tensor, K: int, space: str) -> torch.Tensor:
    """The plain PyTorch definition, in float64."""
    z = z.double().reshape(K, -1, z.shape[-1])
    if space == "logit":
        return z.mean(0)
    if space == "prob":
        return torch.softmax(z, -1).mean(0)
    return torch.logsumexp(torch.log_softmax(z, -1), 0) - math.log(K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("K,B,C", [(1, 3, 10), (4, 5, 37), (3, 2, 1000)])
def test_backend_kernels_against_plain_pytorch(native, dtype, space, K, B, C):
    name, dev = native
    be = get_backend(torch.device(dev), dtype, name)
    g0 = torch.Generator().manual_seed(K * B + C)
    z = (3 * torch.randn(K, B, C, generator=g0)).to(dtype)
    out = poisoned_like(torch.empty(B, C, dtype=dtype)).to(dev)
    be.ensemble_mean_fwd(z.to(dev), out, space)
    want = _plain(z, K, space)
    tol = dict(TOL[dtype]) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    tol = {k: max(v, 1e-5) for k, v in tol.items()}
    torch.testing.assert_close(out.cpu().double(), want, **tol)

    g = torch.randn(B, C, generator=g0).to(dtype)
    zz = z.double().requires_grad_()
    _plain(zz, K, space).backward(g.double())
    grad = poisoned_like(z).to(dev)
    be.ensemble_mean_bwd(g.to(dev), z.to(dev), out, grad, space)
    torch.testing.assert_close(grad.cpu().double(), zz.grad, **tol)


@pytest.mark.parametrize("space", SPACES)
def test_extreme_logits_do_not_overflow(native, space):
    """Logits of +-1e4: no inf/nan; a class no replica predicts gets a finite log-probability
    near -2e4 instead of log(0). (fp32 logits of size 1e4 carry 1e-3 absolute rounding, hence
    the tolerance.)"""
    name, dev = native
    z = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 1e4, -5e3],
                      [0.0, 0.0, -1e4, 1e4]]).reshape(3, 1, 4)
    out = cdkernels.ensemble_mean(z.to(dev), replicas=3, space=space, backend=name).cpu()
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out.double(), _plain(z, 3, space), rtol=1e-3, atol=1e-3)
    one = torch.tensor([[1e4, -1e4, 0.0]])
    lp = cdkernels.ensemble_mean(one.to(dev), replicas=1, space="logprob", backend=name).cpu()
    torch.testing.assert_close(lp.double(), torch.tensor([[0.0, -2e4, -1e4]], dtype=torch.float64),
                               rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("space", SPACES)
def test_nan_logit_poisons_its_row_only(native, space):
    """A nan logit makes its row's result nan (prob, logprob: every class; logit: that class),
    like the float64 definition, and leaves the other rows alone: never a finite wrong value
    (the CPU log's bit tricks once turned a nan sum into 88.03)."""
    name, dev = native
    z = torch.randn(3, 2, 20, generator=torch.Generator().manual_seed(4))
    z[1, 0, 5] = float("nan")
    out = cdkernels.ensemble_mean(z.to(dev), replicas=3, space=space, backend=name).cpu()
    want = _plain(z, 3, space)
    assert torch.equal(out.isnan(), want.isnan()), (out, want)
    torch.testing.assert_close(out[1].double(), want[1], rtol=1e-5, atol=1e-6)


def test_logprob_accurate_on_both_sides_of_the_direct_route(native):
    """The CPU kernel takes log(sum_k p_k) directly when every summed probability is at least
    2^-100 and the log-sum-exp route otherwise. Rows whose smallest probability sits just above
    and just below that (logit gaps 60..95) must both match float64 to float32 accuracy."""
    name, dev = native
    rows = []
    for gap in (60.0, 68.0, 69.5, 70.0, 71.0, 75.0, 87.0, 95.0):
        rows.append([0.0, -gap, -gap / 2, 1.0] + [-3.0] * 13)  # C = 17: one padded lane group
    z = torch.tensor(rows).unsqueeze(0).repeat(2, 1, 1)
    z[1] += torch.linspace(-0.5, 0.5, 17)
    out = cdkernels.ensemble_mean(z.to(dev), replicas=2, space="logprob", backend=name).cpu()
    want = _plain(z, 2, "logprob")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-5)
    # the backward switches the same way (1/P_c once per row, or a bounded exp per element)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    zz = z.double().requires_grad_()
    _plain(zz, 2, "logprob").backward(g.double())
    grad = poisoned_like(z).to(dev)
    get_backend(torch.device(dev), torch.float32, name).ensemble_mean_bwd(
        g.to(dev), z.to(dev), out.to(dev), grad, "logprob")
    torch.testing.assert_close(grad.cpu().double(), zz.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", SPACES)
def test_gradcheck_and_opcheck(space):
    z = torch.randn(3 * 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: cdkernels.ensemble_mean(z, replicas=3, space=space), (z,))
    z32 = torch.randn(3, 4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.cdkernels.ensemble_mean.default, (z32, space, ""))


def test_three_d_input_and_compile():
    z = torch.randn(4, 3, 5)
    a = cdkernels.ensemble_mean(z, replicas=4)
    b = cdkernels.ensemble_mean(z.reshape(12, 5), replicas=4)
    torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: cdkernels.ensemble_mean(t, replicas=4, space="logprob"),
                       fullgraph=True)
    torch.testing.assert_close(fn(z), cdkernels.ensemble_mean(z, replicas=4, space="logprob"))


def test_bad_input():
    z = torch.randn(6, 5)
    cases = [
        (lambda: cdkernels.ensemble_mean(z, replicas=0), ValueError, "replicas"),
        (lambda: cdkernels.ensemble_mean(z, replicas=4), ValueError, "divisible"),
        (lambda: cdkernels.ensemble_mean(z, replicas=2, space="median"), ValueError, "space"),
        (lambda: cdkernels.ensemble_mean(z.long(), replicas=2), TypeError, "outputs"),
        (lambda: cdkernels.ensemble_mean(z.reshape(3, 2, 5), replicas=2), ValueError,
         "replicas"),
        (lambda: cdkernels.ensemble_mean(z.reshape(30), replicas=2), ValueError, "shape"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


class _TinyNoisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.step = CDStep(0.5, 0.8, activation="relu")
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.step(x, self.lin(x)))


def test_monte_carlo_matches_manual_average_and_chunks():
    torch.manual_seed(0)
    m = _TinyNoisy().eval()
    x = torch.randn(5, 6)
    torch.manual_seed(1)
    full = MonteCarlo(m, samples=6, space="prob")(x)
    torch.manual_seed(1)
    chunked = MonteCarlo(m, samples=6, space="prob", chunk=4)(x)
    # same draws? no: chunks draw separate seeds; both are valid estimates of one mean
    assert full.shape == chunked.shape == (5, 4)
    torch.testing.assert_close(full.sum(-1), torch.ones(5))
    # noise is on inside MonteCarlo even in eval mode, and restored afterwards
    assert not torch.equal(MonteCarlo(m, samples=1)(x), MonteCarlo(m, samples=1)(x))
    assert m.step.noise_in_eval is False
    torch.testing.assert_close(m(x), m(x))
    # with many samples the estimate converges (two independent estimates agree)
    a = MonteCarlo(m, samples=4000, chunk=1000)(x)
    b = MonteCarlo(m, samples=4000, chunk=1000)(x)
    assert (a - b).abs().max() < 0.03


def test_monte_carlo_gradients_and_no_grad():
    m = _TinyNoisy().train()
    x = torch.randn(3, 6, requires_grad=True)
    mc = MonteCarlo(m, samples=5, space="logprob", chunk=2)
    loss = torch.nn.functional.nll_loss(mc(x), torch.tensor([0, 1, 2]))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert mc(x).requires_grad is False


def test_monte_carlo_evaluate_with_progress(capsys):
    m = _TinyNoisy().eval()
    data = [(torch.randn(4, 6), torch.randint(0, 4, (4,))) for _ in range(3)]
    res = MonteCarlo(m, samples=3).evaluate(data, progress=True)
    assert res["n"] == 12 and 0 <= res["accuracy"] <= 1 and res["nll"] > 0
    with pytest.raises(ValueError, match="samples"):
        MonteCarlo(m, samples=0)
    with pytest.raises(ValueError, match="space"):
        MonteCarlo(m, samples=2, space="vote")
