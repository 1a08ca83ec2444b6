"""The noise stream (docs/noise.md): known answers, every backend against the oracle,
statistics, and seeding behaviour."""
import math

import numpy as np
import pytest
import torch

import cdkernels
from cdkernels.backends.reference import philox4x32_10
from conftest import ulp_distance

KAT = [  # Random123 known-answer vectors for philox4x32-10: (counter, key) -> words
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _np_philox(ctr, key):
    """An independent numpy Philox4x32-10 (uint64 arithmetic) to cross-check the oracle."""
    c = [np.uint64(v) for v in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return tuple(int(v) for v in c)


@pytest.mark.parametrize("ctr,key,expect", KAT)
def test_reference_philox_known_answers(ctr, key, expect):
    t = [torch.tensor([v], dtype=torch.int64) for v in ctr + key]
    assert tuple(int(w) for w in philox4x32_10(*t)) == expect
    assert _np_philox(ctr, key) == expect


def _seed_for_key(k0, k1):
    return k0 | (k1 << 32)


@pytest.mark.parametrize("ctr,key,expect", KAT)
def test_backend_known_answers(native, ctr, key, expect):
    """Counter (c0, c1, c2, 0) is block c0 + 2^32 c1 with sample c2 (the spec's mapping); the
    third vector has c3 != 0, which the stream never uses, so it checks the reference only."""
    name, dev = native
    if ctr[3] != 0:
        pytest.skip("stream counters always have c3 = 0")
    w = cdkernels.philox_words(1, _seed_for_key(*key), offset=ctr[0] | (ctr[1] << 32),
                               sample=ctr[2], device=dev, backend=name)
    assert tuple(int(v) for v in w[0].cpu()) == expect


def test_stream_known_answer_all_ones():
    """The all-ones KAT through the stream API: block 2^64-1 does not fit an int64 offset, so
    compare the oracle's words at a large offset with the independent numpy Philox."""
    off, sample, seed = (1 << 63) - 5, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
    w = cdkernels.philox_words(3, seed, offset=off, sample=sample, backend="reference")
    for i in range(3):
        b = off + i
        expect = _np_philox((b & 0xFFFFFFFF, b >> 32, sample, 0), (0xFFFFFFFF, 0xFFFFFFFF))
        assert tuple(int(v) for v in w[i]) == expect


@pytest.mark.parametrize("offset,sample", [(0, 0), (5, 0), ((1 << 32) - 3, 7), (3 << 40, 1)])
def test_words_and_uniforms_bit_identical(native, offset, sample):
    name, dev = native
    seed = 0x1234_5678_9ABC_DEF0
    ref_w = cdkernels.philox_words(37, seed, offset=offset, sample=sample, backend="reference")
    got_w = cdkernels.philox_words(37, seed, offset=offset, sample=sample, device=dev,
                                   backend=name)
    assert torch.equal(got_w.cpu(), ref_w)
    ref_u = cdkernels.uniform(147, seed, offset=offset, sample=sample, backend="reference")
    got_u = cdkernels.uniform(147, seed, offset=offset, sample=sample, device=dev, backend=name)
    assert torch.equal(got_u.cpu(), ref_u)
    # uniforms are exactly (2*(w >> 9) + 1) * 2^-24 of the words, lane by lane
    w = ref_w.reshape(-1)[:147]
    assert torch.equal(ref_u.double(), ((w >> 9) * 2 + 1).double() * 2.0 ** -24)


@pytest.mark.parametrize("offset,sample", [(0, 0), ((1 << 32) - 1, 3)])
def test_normals_within_4_ulp(native, offset, sample):
    name, dev = native
    n = 4099  # not a multiple of 4: the tail block is used partially
    ref = cdkernels.normal(n, 99, offset=offset, sample=sample, backend="reference")
    got = cdkernels.normal(n, 99, offset=offset, sample=sample, device=dev, backend=name)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    d = ulp_distance(got.cpu(), ref)
    assert d.max().item() <= 4.0, f"worst {d.max().item():.1f} ulp at {int(d.argmax())}"


def test_stream_layout_and_offsets():
    """Element e uses block offset + e//4, so offset=k continues the stream at element 4k,
    and samples are distinct streams."""
    full = cdkernels.normal(64, 11, backend="reference")
    tail = cdkernels.normal(16, 11, offset=12, backend="reference")
    assert torch.equal(full[48:], tail)
    assert torch.equal(cdkernels.normal((4, 16), 11, backend="reference").reshape(-1), full)
    other = cdkernels.normal(64, 11, sample=1, backend="reference")
    assert not torch.equal(full, other)


def test_statistics():
    """Mean, variance, Kolmogorov–Smirnov and lag-1 correlation of 400k draws; thresholds
    are ~5 standard errors so a broken mapping fails and a good one passes reliably."""
    from scipy import stats
    n = 400_000
    z = cdkernels.normal(n, 2024).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    for lag in (1, 2, 3, 4):  # neighbours within and across Philox blocks
        r = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(r) < 5 * se, (lag, r)
    z2 = cdkernels.normal(n, 2025).double()  # a neighbouring seed
    assert abs(torch.corrcoef(torch.stack([z, z2]))[0, 1].item()) < 5 * se
    # all four lanes of a block are standard normal (a lane mix-up shows here)
    lanes = z.reshape(-1, 4)
    for j in range(4):
        assert abs(lanes[:, j].var().item() - 1) < 10 * se


def test_seed_none_follows_torch_generator():
    torch.manual_seed(0)
    a = cdkernels.cd_step(torch.ones(64), torch.ones(64), 0.1, 1.0)
    b = cdkernels.cd_step(torch.ones(64), torch.ones(64), 0.1, 1.0)
    torch.manual_seed(0)
    a2 = cdkernels.cd_step(torch.ones(64), torch.ones(64), 0.1, 1.0)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


def test_seed_argument_checks():
    with pytest.raises(ValueError, match="seed"):
        cdkernels.normal(4, -1)
    with pytest.raises(ValueError, match="seed"):
        cdkernels.normal(4, 1 << 64)
    with pytest.raises(TypeError, match="seed"):
        cdkernels.normal(4, 1.5)
    with pytest.raises(ValueError, match="offset"):
        cdkernels.normal(4, 1, offset=-1)
    with pytest.raises(ValueError, match="sample"):
        cdkernels.normal(4, 1, sample=1 << 32)
    # 64-bit seeds: the high word matters
    assert not torch.equal(cdkernels.normal(8, 1), cdkernels.normal(8, 1 | (1 << 32)))
    # seeds >= 2^63 work (stored as two's complement)
    assert torch.isfinite(cdkernels.normal(8, (1 << 64) - 1)).all()


def test_shape_dtype_and_blocks_checks():
    with pytest.raises(ValueError, match="shape"):
        cdkernels.normal((2, -1), 1)
    with pytest.raises(TypeError, match="dtype"):
        cdkernels.normal(4, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="blocks"):
        cdkernels.philox_words(-1, 1)
    with pytest.raises(ValueError, match="backend"):
        cdkernels.normal(4, 1, backend="gpu")
    assert cdkernels.normal((0, 3), 1).shape == (0, 3)
