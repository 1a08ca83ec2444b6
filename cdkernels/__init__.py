"""cdkernels: fused kernels for convection–diffusion residual networks.

One residual block is one Euler–Maruyama step ``x + dt*F(x) + sigma*sqrt(dt)*eps``; the noise
is generated inside the kernels from a documented Philox stream (docs/noise.md) and regenerated
in backward instead of being stored.
"""
from . import backends  # the package is callable: cdkernels.backends() lists the backends
from .backends import get_backend, use_backend
from .cd_smooth import cd_smooth
from .cd_step import cd_step
from .std_step import cd_std_step
from .ensemble_mean import ensemble_mean
from .noise import normal, philox_words, uniform
from ._common import steady_heap
from . import nn  # noqa: F401  (cdkernels.nn.CDStep, cdkernels.nn.MonteCarlo)

__version__ = "0.1.0"


def empty_cache() -> None:
    """Release the memory the CPU backend keeps for reuse as big outputs (see
    ``cdkernels._common.output_cache``)."""
    from ._common import output_cache
    output_cache.clear()


__all__ = ["cd_step", "cd_std_step", "cd_smooth", "ensemble_mean", "normal", "uniform", "philox_words",
           "backends", "use_backend", "get_backend", "nn", "empty_cache", "steady_heap",
           "__version__"]
