"""The CPU backend's SIMD clones (baseline / AVX2 / AVX-512) compute the same bits.

The clones share one source, but the Philox rounds are hand-vectorised per level (vpmuludq on
even and odd lanes), with a scalar loop for the blocks that do not fill a vector. So every level
this CPU supports is run over block counts around the vector widths (8, 16) and the structure-of-
arrays chunk (128 blocks), at offsets where the low counter word wraps, and compared bit for bit
with the reference's words and with the baseline clone's normals and op outputs.

cd_smooth is the exception: its normals use the fast transcendentals of docs/noise.md 3c
(rsqrt14 in AVX-512, rsqrt in AVX2, an exact 1/sqrt in baseline), so every level is checked
against the float64 oracle within that section's bound instead.
"""
import math

import pytest
import torch

import cdkernels
from cdkernels.backends import _load

_cpu, _why = _load("cpu")
pytestmark = pytest.mark.skipif(_cpu is None, reason=f"cpu backend: {_why}")

if _cpu is not None:
    import cdkernels._C as _C

    SUPPORTED = list(_C.cpu_simd_levels())
    COMPILED = list(_C.build_info()["simd_levels"])
else:
    SUPPORTED, COMPILED = [], []

BLOCKS = [1, 7, 8, 9, 15, 16, 17, 31, 127, 128, 129, 300, 513]
OFFSETS = [0, (1 << 32) - 5, 3 * (1 << 32) + 11]


def _levels():
    """Every compiled level; the ones this CPU cannot run are skipped with the reason."""
    out = []
    for name in ("baseline", "avx2", "avx512"):
        marks = ()
        if name not in COMPILED:
            marks = pytest.mark.skip(reason=f"SIMD level {name} not compiled on this platform")
        elif name not in SUPPORTED:
            marks = pytest.mark.skip(reason=f"this CPU does not support {name}")
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@pytest.fixture
def level(request):
    """Switch the CPU kernels to a SIMD level for one test, then restore the previous one."""
    before = _C.cpu_simd_level()
    _C._set_cpu_simd_level(request.param)
    try:
        yield request.param
    finally:
        _C._set_cpu_simd_level(before)


def _at(name, fn):
    before = _C.cpu_simd_level()
    _C._set_cpu_simd_level(name)
    try:
        return fn()
    finally:
        _C._set_cpu_simd_level(before)


def test_every_x86_level_compiled_and_best_one_picked():
    assert "baseline" in SUPPORTED
    # the default is the widest supported level (unless CDK_CPU_SIMD forced another)
    import os
    if not os.environ.get("CDK_CPU_SIMD"):
        assert _C.cpu_simd_level() == SUPPORTED[-1]


@pytest.mark.parametrize("level", _levels(), indirect=True)
@pytest.mark.parametrize("offset", OFFSETS)
def test_philox_words_match_reference(level, offset):
    seed = 0x9E3779B97F4A7C15 & ((1 << 63) - 1)
    for nb in BLOCKS:
        got = cdkernels.philox_words(nb, seed, offset=offset, sample=3, backend="cpu")
        ref = cdkernels.philox_words(nb, seed, offset=offset, sample=3, backend="reference")
        assert torch.equal(got, ref), (level, offset, nb)


@pytest.mark.parametrize("level", _levels(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", OFFSETS)
def test_normals_bitwise_equal_to_baseline(level, dtype, offset):
    per_block = 4 if dtype == torch.float32 else 8
    for nb in BLOCKS:
        n = nb * per_block - 1  # a partial last block too
        got = cdkernels.normal(n, 77, offset=offset, sample=1, dtype=dtype, backend="cpu")
        base = _at("baseline", lambda: cdkernels.normal(n, 77, offset=offset, sample=1,
                                                        dtype=dtype, backend="cpu"))
        assert torch.isfinite(got.float()).all()
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           base.view(torch.int16 if dtype != torch.float32 else torch.int32)), \
            (level, dtype, offset, nb)
        if nb == 300:  # and against the oracle, within the spec's budget (test_noise covers it)
            ref = cdkernels.normal(n, 77, offset=offset, sample=1, dtype=dtype,
                                   backend="reference")
            assert (got.double() - ref.double()).abs().max() < 1e-2


@pytest.mark.parametrize("level", _levels(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_bitwise_equal_to_baseline(level, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 7, 11, generator=g).to(dtype)
    f = torch.randn(3, 5, 7, 11, generator=g).to(dtype)
    sig = torch.rand(5, generator=g) + 0.1

    def run():
        xs = x.clone().requires_grad_(True)
        s = sig.clone().requires_grad_(True)
        y = cdkernels.cd_step(xs, f, 0.1, s, activation="relu", seed=11, backend="cpu")
        sm = cdkernels.cd_smooth(x, 0.3, samples=3, activation="gelu", seed=12, backend="cpu")
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xs.grad, s.grad, sm

    got, base = run(), _at("baseline", run)
    for a, b in zip(got[:3], base[:3]):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), level
    # cd_smooth: each level within 2^-18 r (r <= 5.77) of the oracle's eps, times sigma 0.3 and
    # gelu's Lipschitz constant 1.13, so two levels within twice that (plus the output rounding)
    sm, sm_base = got[3], base[3]
    assert sm.dtype == sm_base.dtype
    torch.testing.assert_close(sm.float(), sm_base.float(), rtol=0 if dtype == torch.float32
                               else 2 ** -8, atol=2 * 2 ** -18 * 5.77 * 0.3 * 1.13 + 1e-7)


@pytest.mark.parametrize("level", _levels(), indirect=True)
@pytest.mark.parametrize("nb", [1, 15, 16, 17, 129, 513, 65536])
@pytest.mark.parametrize("offset", OFFSETS)
def test_cd_smooth_fast_normals_within_the_3c_bound(level, nb, offset):
    """The eps each cd_smooth sample adds, read back exactly through grad_sigma (one channel per
    element, relu at x = 10 so act' = 1, K = 1, g = 1: grad_sigma[c] = eps_c), against the
    float64 oracle: |eps_fast - eps| <= 2^-18 r, r = sqrt(-2 ln U) = |(eps_2j, eps_2j+1)|."""
    from cdkernels.backends import get_backend
    be = get_backend(torch.device("cpu"), torch.float32, "cpu")
    n = 4 * nb
    x = torch.full((n,), 10.0)
    gx, gs = torch.full((n,), float("nan")), torch.zeros(n)
    seed = torch.tensor([4242])
    be.cd_smooth_bwd(torch.ones(n), x, gx, gs, torch.ones(n), 1.0, n, 1, 1, seed, offset, "relu")
    eps = cdkernels.normal(n, 4242, offset=offset, dtype=torch.float64, backend="reference")
    r = eps.view(-1, 2).norm(dim=1).repeat_interleave(2)
    err = (gs.double() - eps).abs() / r
    assert err.max().item() <= 2 ** -18, (level, err.max().item())
    # and the CPU path's own bound (kernels_impl.h, docs/noise.md 3c): 1.2e-6 r
    assert err.max().item() <= 1.2e-6, (level, err.max().item())
    assert torch.equal(gx, torch.ones(n))


@pytest.mark.parametrize("level", _levels(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [1, 15, 16, 17, 100, 1000])
def test_ensemble_mean_every_level_against_float64(level, dtype, C):
    """ensemble_mean's forward uses fused multiply-adds in the AVX2/AVX-512 clones (its exp is
    not part of the noise spec), so levels agree to rounding, not bit for bit: each one is
    checked against float64, for row lengths around the 16-lane vector (masked tail)."""
    import math
    K, B = 3, 5
    g = torch.Generator().manual_seed(C)
    z = (4 * torch.randn(K, B, C, generator=g)).to(dtype)
    zd = z.double()
    want = {"prob": torch.softmax(zd, -1).mean(0), "logit": zd.mean(0),
            "logprob": torch.logsumexp(torch.log_softmax(zd, -1), 0) - math.log(K)}
    tol = 2e-6 if dtype == torch.float32 else (1e-3 if dtype == torch.float16 else 8e-3)
    for space, ref in want.items():
        out = cdkernels.ensemble_mean(z, replicas=K, space=space, backend="cpu")
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def _words16_grid():
    """uint32 words covering every 16-bit radius half (with four angle halves) and every angle
    half (with four radius halves, the smallest and largest radii among them)."""
    h = torch.arange(1 << 16, dtype=torch.int64)
    fixed = torch.tensor([0, 1, 0x1234, 0x7FFF, 0x8000, 0xFFFF], dtype=torch.int64)
    radius_sweep = (fixed.view(-1, 1) << 16) | h.view(1, -1)
    angle_sweep = (h.view(1, -1) << 16) | fixed.view(-1, 1)
    return torch.cat([radius_sweep.reshape(-1), angle_sweep.reshape(-1)]).to(torch.int32)


@pytest.mark.parametrize("level", _levels(), indirect=True)
def test_fast_normals16_every_half_word(level):
    """The 16-bit stream's float32 normals as the CPU kernels compute them (the fast
    transcendentals of kernels_impl.h's word_to_normals16_fast, before the 16-bit rounding),
    over every radius half and every angle half of a word: within 1.2e-6 r of the float64
    formulas of docs/noise.md 3b (50x inside the spec's 2^-14 + 2^-16 |eps|), and the same bits
    at every SIMD level."""
    w = _words16_grid()
    n = w.numel()
    out = torch.full((2 * n,), float("nan"))
    _C.normals16_of_words(w.data_ptr(), out.data_ptr(), n)
    u = w.to(torch.int64) & 0xFFFFFFFF
    ur = ((u & 0xFFFF) * 2 + 1).double() * 2.0 ** -17
    ua = ((u >> 16) * 2 + 1).double() * 2.0 ** -17
    r = torch.sqrt(-2 * torch.log(ur))
    exact = torch.stack([r * torch.cos(2 * math.pi * ua), r * torch.sin(2 * math.pi * ua)], 1)
    got = out.view(n, 2).double()
    err = ((got - exact).abs() / r.view(-1, 1)).max().item()
    assert err <= 1.2e-6, (level, err)
    spec = ((got - exact).abs() - (2.0 ** -14 + 2.0 ** -16 * exact.abs())).max().item()
    assert spec <= 0, spec
    base = torch.full_like(out, float("nan"))
    _at("baseline", lambda: _C.normals16_of_words(w.data_ptr(), base.data_ptr(), n))
    assert torch.equal(out.view(torch.int32), base.view(torch.int32)), level
