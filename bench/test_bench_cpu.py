"""CPU op benchmarks under pytest-benchmark:  pytest bench/ --benchmark-only

Not part of the test suite (tests/ is); these time the fused CPU kernels against the eager
PyTorch code they replace, on 4M float32 elements. Compare groups with --benchmark-group-by=group.
"""
import math

import pytest
import torch

import cdkernels

N = 1 << 22
DT, SIGMA = 0.1, 0.5


@pytest.fixture(scope="module")
def xf():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=g), torch.randn(N, generator=g)


def _native():
    if not cdkernels.backends()["cpu"]["available"]:
        pytest.skip("cpu backend unavailable: " + cdkernels.backends()["cpu"]["reason"])


@pytest.mark.benchmark(group="cd_step fwd 4M fp32")
def test_cd_step_eager(benchmark, xf):
    x, f = xf
    benchmark(lambda: x + DT * f + SIGMA * math.sqrt(DT) * torch.randn_like(x))


@pytest.mark.benchmark(group="cd_step fwd 4M fp32")
def test_cd_step_fused(benchmark, xf):
    _native()
    x, f = xf
    benchmark(lambda: cdkernels.cd_step(x, f, DT, SIGMA, backend="cpu"))


@pytest.mark.benchmark(group="cd_step fwd 4M fp32")
def test_plain_axpy(benchmark, xf):
    x, f = xf
    benchmark(lambda: x + DT * f)


@pytest.mark.benchmark(group="cd_smooth K=8 1M fp32")
def test_cd_smooth_eager(benchmark, xf):
    x = xf[0][: 1 << 20]
    benchmark(lambda: torch.relu(x + SIGMA * torch.randn(8, x.numel())).mean(0))


@pytest.mark.benchmark(group="cd_smooth K=8 1M fp32")
def test_cd_smooth_fused(benchmark, xf):
    _native()
    x = xf[0][: 1 << 20]
    benchmark(lambda: cdkernels.cd_smooth(x, SIGMA, samples=8, backend="cpu"))


@pytest.mark.benchmark(group="ensemble_mean K=16 B=256 C=1000")
def test_ensemble_eager(benchmark):
    z = torch.randn(16 * 256, 1000)
    benchmark(lambda: torch.softmax(z.reshape(16, 256, 1000), -1).mean(0))


@pytest.mark.benchmark(group="ensemble_mean K=16 B=256 C=1000")
def test_ensemble_fused(benchmark):
    _native()
    z = torch.randn(16 * 256, 1000)
    benchmark(lambda: cdkernels.ensemble_mean(z, replicas=16, backend="cpu"))
