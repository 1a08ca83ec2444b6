"""Modules around the fused ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .cd_step import cd_step, ACTIVATIONS
from . import _common as C


class CDStep(nn.Module):
    """One convection–diffusion (Euler–Maruyama) update ``act(x + dt*f + sigma*sqrt(dt)*eps)``.

    Args:
        dt: step size.
        sigma: diffusion coefficient (initial value when learnable).
        learnable_sigma: make sigma an ``nn.Parameter``.
        per_channel: number of channels for a per-channel sigma (dim 1 of x), or None for one
            scalar sigma.
        activation: None or "relu".
        noise_in_eval: keep the noise on in eval mode (Monte-Carlo inference). In train mode the
            noise is always on. Toggle it later with ``cdkernels.nn.set_noise_in_eval``.
    """

    def __init__(self, dt: float, sigma: float, learnable_sigma: bool = False,
                 per_channel: Optional[int] = None, activation: Optional[str] = None,
                 noise_in_eval: bool = False):
        super().__init__()
        self.dt = C.check_nonneg_number(dt, "dt")
        sigma = C.check_nonneg_number(sigma, "sigma")
        self.activation = C.check_activation(activation, ACTIVATIONS)
        if per_channel is not None and (not isinstance(per_channel, int) or per_channel < 1):
            raise ValueError(f"per_channel must be None or a positive int, got {per_channel!r}")
        self.per_channel = per_channel
        self.noise_in_eval = bool(noise_in_eval)
        shape = (per_channel,) if per_channel else ()
        value = torch.full(shape, sigma, dtype=torch.float32)
        if learnable_sigma:
            self.sigma = nn.Parameter(value)
        elif per_channel:
            self.register_buffer("sigma", value)
        else:
            self.sigma = sigma

    @property
    def noise_active(self) -> bool:
        return self.training or self.noise_in_eval

    def forward(self, x: torch.Tensor, f: torch.Tensor, seed=None) -> torch.Tensor:
        if not self.noise_active:
            z = x + self.dt * f
            return torch.relu(z) if self.activation == "relu" else z
        return cd_step(x, f, self.dt, self.sigma, activation=self.activation, seed=seed)

    def extra_repr(self) -> str:
        s = "learnable" if isinstance(self.sigma, nn.Parameter) else "fixed"
        return (f"dt={self.dt}, sigma={s}{'' if not self.per_channel else f'[{self.per_channel}]'}"
                f", activation={self.activation}, noise_in_eval={self.noise_in_eval}")


def set_noise_in_eval(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch eval-mode noise on or off in every cdkernels module of ``model``."""
    for m in model.modules():
        if hasattr(m, "noise_in_eval"):
            m.noise_in_eval = bool(enabled)
    return model
