"""Shared fixtures: which (backend, device) pairs to test, and per-dtype tolerances.

A backend that is not available is skipped, *unless* it is listed in CDK_REQUIRE_BACKENDS
(comma-separated; CI sets it to "cpu,triton" and bench/gpu_check.sh to "cuda,triton"), in which
case the test fails: a build break can never skip itself into a green run.
"""
import os

import pytest
import torch

from cdkernels.backends import _load

REQUIRED = {b.strip() for b in os.environ.get("CDK_REQUIRE_BACKENDS", "").split(",") if b.strip()}

# (backend, device) pairs for the native backends; "reference" is the oracle itself.
_PAIRS = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]

# Per-dtype tolerance of an op's output against the reference (both compute in float32 and
# round once; differences come from the 4-ulp noise budget and the rounding of the result).
TOL = {
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def _usable(name: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    inst, why = _load(name)
    if inst is None:
        return False, why
    if not inst.supports(torch.device(device)):
        return False, f"{name} does not run on {device} here ({why})"
    return True, why


def native_pairs():
    params = []
    for name, dev in _PAIRS:
        ok, why = _usable(name, dev)
        required = name in REQUIRED and (dev == "cpu" or torch.cuda.is_available())
        marks = () if ok or required else pytest.mark.skip(reason=f"{name} on {dev}: {why}")
        params.append(pytest.param((name, dev), id=f"{name}-{dev}", marks=marks))
    return params


@pytest.fixture(params=native_pairs())
def native(request):
    """(backend name, device string) of a native backend under test."""
    name, dev = request.param
    ok, why = _usable(name, dev)
    if not ok:
        pytest.fail(f"backend {name!r} on {dev} is required (CDK_REQUIRE_BACKENDS) but "
                    f"unavailable: {why}", pytrace=False)
    return name, dev


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so a kernel that skips an element cannot pass."""
    return torch.full_like(t, float("nan"))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the float32 ulp of b (b nonzero)."""
    b32 = b.to(torch.float32)
    ulp = (torch.nextafter(b32.abs(), torch.tensor(float("inf"))) - b32.abs()).to(torch.float64)
    return (a.to(torch.float64) - b.to(torch.float64)).abs() / ulp


@pytest.fixture
def cpu_backend():
    """The compiled CPU backend, for tests of its own entry points: skipped when it is not
    built, failed instead when CDK_REQUIRE_BACKENDS names it."""
    ok, why = _usable("cpu", "cpu")
    if not ok:
        if "cpu" in REQUIRED:
            pytest.fail(f"backend 'cpu' is required (CDK_REQUIRE_BACKENDS) but unavailable: "
                        f"{why}", pytrace=False)
        pytest.skip(f"cpu backend: {why}")
    return _load("cpu")[0]
