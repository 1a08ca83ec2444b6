"""The 16-bit noise stream (docs/noise.md section 3b): layout, agreement of every backend with
the oracle within the spec's bound, the ops adding exactly ``normal(dtype=...)``, and the
statistics of the stream itself (KS at 10^7 samples, tails to 4.5 sigma, independence)."""
import math

import numpy as np
import pytest
import torch

import cdkernels
from cdkernels.backends import reference as R
from conftest import poisoned_like

DT16 = [torch.bfloat16, torch.float16]
MANT = {torch.bfloat16: 7, torch.float16: 10}  # explicit mantissa bits


def ulp16(v: torch.Tensor, dtype) -> torch.Tensor:
    """The 16-bit ulp at |v| (float64), with float16's subnormal floor."""
    a = v.abs().clamp_min(2.0 ** -126).double()
    e = torch.floor(torch.log2(a))
    if dtype == torch.float16:
        e = e.clamp_min(-14.0)
    return torch.pow(2.0, e - MANT[dtype])


def spec_error(got16: torch.Tensor, exact64: torch.Tensor, dtype) -> torch.Tensor:
    """|got - exact| over what the spec allows: the native float32 value is within
    2^-14 + 2^-16|e| of the float64 value, then rounded (half an ulp, at the larger binade)."""
    g = got16.double()
    allow = (2.0 ** -14 + 2.0 ** -16 * exact64.abs()
             + 0.5 * torch.maximum(ulp16(g, dtype), ulp16(exact64, dtype)))
    return (g - exact64).abs() / allow


def test_layout_from_the_words():
    """Element e = 8b + 2j + k is word j of block b: low half the radius, high half the angle;
    k = 0 the cosine, k = 1 the sine; U16(h) = (2h + 1) 2^-17. Recomputed here from the raw
    Philox words (a path independent of the stream code), offset and sample included."""
    seed, off, sample, nb = 0xDEADBEEF12345, 7, 3, 64
    w = cdkernels.philox_words(nb, seed, offset=off, sample=sample, backend="reference").numpy()
    ur = ((w & 0xFFFF) * 2 + 1) * 2.0 ** -17
    ua = ((w >> 16) * 2 + 1) * 2.0 ** -17
    r = np.sqrt(-2 * np.log(ur))
    expect = np.stack([r * np.cos(2 * np.pi * ua), r * np.sin(2 * np.pi * ua)], axis=2).reshape(-1)
    for dt in DT16:
        got = cdkernels.normal(8 * nb - 3, seed, offset=off, sample=sample, dtype=dt,
                               backend="reference")
        want = torch.from_numpy(expect[:8 * nb - 3]).float().to(dt)
        assert torch.equal(got, want)
    # offset counts 8-element blocks in this stream
    full = cdkernels.normal(80, 5, dtype=torch.bfloat16, backend="reference")
    assert torch.equal(full[16:], cdkernels.normal(64, 5, offset=2, dtype=torch.bfloat16,
                                                   backend="reference"))


@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("offset,sample", [(0, 0), ((1 << 32) - 2, 5)])
def test_native_normal16_matches_oracle(native, dtype, offset, sample):
    name, dev = native
    n = 8 * 1000 + 5  # a partial last block; with offset 2^32-2 the low counter word wraps
    seed = 0x0123_4567_89AB_CDEF
    exact = R.stream_normals16_64(torch.tensor([seed]), offset, sample, n, "cpu")
    ref = cdkernels.normal(n, seed, offset=offset, sample=sample, dtype=dtype, backend="reference")
    got = cdkernels.normal(n, seed, offset=offset, sample=sample, dtype=dtype, device=dev,
                           backend=name).cpu()
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = spec_error(got, exact, dtype)
    assert err.max().item() <= 1.0, f"worst {err.max().item():.2f} of the bound at {int(err.argmax())}"
    # On the CPU (float32 polynomials within 1.2e-6 r) the 16-bit numbers are the oracle's
    # except at rare near-ties; a GPU's hardware approximations move more of them by one ulp.
    mismatch = (got != ref).double().mean().item()
    assert mismatch < (0.05 if dev == "cuda" else 1e-3), mismatch


@pytest.mark.parametrize("dtype", DT16)
@pytest.mark.parametrize("per_channel", [False, True])
def test_cd_step_adds_exactly_normal16(native, dtype, per_channel):
    """cd_step on 16-bit data adds eps = normal(shape, seed, dtype) of the same backend, and its
    backward regenerates the same eps (grad of a learnable sigma)."""
    name, dev = native
    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 7, 11)  # 1155 elements: not a multiple of 8
    x = torch.randn(shape, generator=g).to(dev, dtype)
    f = torch.randn(shape, generator=g).to(dev, dtype)
    dt, seed = 0.25, 1234
    sigma = (torch.rand(5, generator=g) + 0.5) if per_channel else torch.tensor([0.7])
    sigma = sigma.to(dev).requires_grad_(True)
    eps = cdkernels.normal(shape, seed, dtype=dtype, device=dev, backend=name)
    with cdkernels.use_backend(name):
        y = cdkernels.cd_step(x, f, dt, sigma, seed=seed)
    s = sigma.detach().double().cpu()
    s = s.view(1, -1, 1, 1) if per_channel else s
    want = x.double().cpu() + dt * f.double().cpu() + s * math.sqrt(dt) * eps.double().cpu()
    torch.testing.assert_close(y.double().cpu(), want.to(dtype).double(),
                               rtol=2.0 ** -MANT[dtype], atol=2.0 ** -MANT[dtype])
    gy = torch.randn(shape, generator=g).to(dev, dtype)
    y.backward(gy)
    prod = gy.double().cpu() * eps.double().cpu() * math.sqrt(dt)
    gs = prod.sum(dim=(0, 2, 3)) if per_channel else prod.sum().view(1)
    torch.testing.assert_close(sigma.grad.double().cpu(), gs, rtol=1e-4, atol=1e-4)


def next_up16(t: torch.Tensor) -> torch.Tensor:
    """The next 16-bit number above each finite element of a float16/bfloat16 tensor (on the
    bits: one step away from zero for positives, towards zero for negatives)."""
    b = t.contiguous().view(torch.int16).to(torch.int32)
    neg = b < 0
    zero = (b & 0x7FFF) == 0
    # -0 and +0 both step to the smallest positive subnormal
    nb = torch.where(zero, torch.ones_like(b), torch.where(neg, b - 1, b + 1))
    return nb.to(torch.int16).view(t.dtype)


def _gaussian_16bit_cdf(atoms: np.ndarray, dtype) -> np.ndarray:
    """P(round16(N) <= a) for sorted distinct 16-bit values a: Phi at the rounding boundary
    halfway to the next 16-bit number."""
    from scipy.stats import norm
    t = torch.from_numpy(atoms).to(dtype)
    upper = (t.double() + next_up16(t).double()) / 2
    return norm.cdf(upper.numpy())


@pytest.mark.parametrize("dtype", DT16)
def test_statistics_1e7(dtype):
    """KS against the exactly rounded normal at 10^7 samples, tail frequencies to 4.5 sigma,
    lag 1..8 correlations of values and squares (lanes sharing a word share a radius), and
    independence of neighbouring seeds and of samples. Thresholds are ~5 standard errors."""
    from scipy.stats import norm
    n = 10_000_000
    z = cdkernels.normal(n, 20261202, dtype=dtype)  # the fastest available backend
    zd = z.double()
    se = 1 / math.sqrt(n)
    assert abs(zd.mean().item()) < 5 * se
    assert abs(zd.var().item() - 1) < 5 * math.sqrt(2) * se + 2.0 ** -2 * 2.0 ** (-2 * MANT[dtype])
    # KS: the empirical CDF at every atom against P(round16(N) <= atom)
    atoms, counts = torch.unique(z.float(), return_counts=True)
    emp = torch.cumsum(counts.double(), 0).numpy() / n
    theo = _gaussian_16bit_cdf(atoms.numpy(), dtype)
    D = float(np.max(np.abs(emp - theo)))
    assert D < 1.95 / math.sqrt(n), f"KS distance {D:.2e}"  # p ~ 0.001
    # two-sided tails, thresholds exact in both dtypes
    for T in (1.0, 2.0, 3.0, 4.0, 4.5):
        tt = torch.tensor(T, dtype=dtype)
        bound = (tt.double() + next_up16(tt.view(1)).double().item()) / 2
        p = 2 * norm.sf(bound.item())
        k = (z.float().abs() > T).sum().item()
        assert abs(k - n * p) < 5 * math.sqrt(n * p) + 1, (T, k, n * p)
    assert z.float().abs().max().item() <= math.sqrt(34 * math.log(2)) + 0.05  # the stated cut
    for lag in range(1, 9):
        a, b = zd[:-lag], zd[lag:]
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 * se, lag
        assert abs(torch.corrcoef(torch.stack([a * a, b * b]))[0, 1].item()) < 5 * se, lag
    m = 2_000_000
    base = zd[:m]
    for other in (cdkernels.normal(m, 20261203, dtype=dtype),
                  cdkernels.normal(m, 20261202, sample=1, dtype=dtype)):
        r = torch.corrcoef(torch.stack([base, other.double()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(m), r
    lanes = zd.reshape(-1, 8)
    for j in range(8):  # every lane is standard normal (a lane mix-up shows here)
        assert abs(lanes[:, j].var().item() - 1) < 10 * math.sqrt(8) * se


def test_tail_claims_of_the_spec():
    """The numbers docs/noise.md states: the cut at sqrt(34 ln 2) and P(|eps| > 4.5)."""
    from scipy.stats import norm
    h = np.arange(65536)
    r = np.sqrt(-2 * np.log((2 * h + 1) * 2.0 ** -17))
    assert abs(r.max() - 4.855) < 1e-3 and (r > 4.5).sum() == 3
    mask = r > 4.5
    p = (4 * np.arccos(4.5 / r[mask]) / (2 * np.pi)).sum() / 65536
    assert abs(p - 6.65e-6) < 0.01e-6 and abs(2 * norm.sf(4.5) - 6.80e-6) < 0.01e-6


def test_poisoned_output_fully_written(native):
    name, dev = native
    for dt in DT16:
        out = poisoned_like(torch.empty(1003, dtype=dt, device=dev))
        be = cdkernels.backends.get_backend(torch.device(dev), dt, name)
        be.normal(out, torch.tensor([9], dtype=torch.int64, device=dev), 0, 0)
        assert torch.isfinite(out).all()
