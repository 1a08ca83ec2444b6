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


class _NoiseOn:
    """Context manager: every cdkernels module of ``model`` keeps its noise on in eval mode."""

    def __init__(self, model: nn.Module):
        self.mods = [m for m in model.modules() if hasattr(m, "noise_in_eval")]

    def __enter__(self):
        self.saved = [m.noise_in_eval for m in self.mods]
        for m in self.mods:
            m.noise_in_eval = True

    def __exit__(self, *exc):
        for m, v in zip(self.mods, self.saved):
            m.noise_in_eval = v


class MonteCarlo(nn.Module):
    """Monte-Carlo inference: the average of ``model`` over ``samples`` noise realisations.

    Each input of the batch is replicated K times (``x.repeat``), the model runs with its noise
    on (also in eval mode) on chunks of at most ``chunk`` replicas (bounding activation memory to
    chunk*B inputs), and the K predictions are averaged with :func:`cdkernels.ensemble_mean` in
    ``space`` ("prob", "logit" or "logprob"). Works in train and eval mode, under
    ``torch.no_grad`` and with gradients (an attack differentiates through it).

    Under :func:`cdkernels.robust.frozen_noise` sample k uses its own frozen stream (derived from
    the module's frozen seed and k) and the samples run one after another, so the prediction
    is the same for every ``chunk``.
    """

    def __init__(self, model: nn.Module, samples: int = 8, space: str = "prob",
                 chunk: Optional[int] = None):
        super().__init__()
        from .ensemble_mean import SPACES
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        if space not in SPACES:
            raise ValueError(f"space={space!r} must be one of {', '.join(map(repr, SPACES))}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                  or chunk < 1):
            raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
        self.model, self.samples, self.space = model, samples, space
        self.chunk = samples if chunk is None else min(chunk, samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .ensemble_mean import ensemble_mean
        outs = []
        frozen = [m for m in self.model.modules() if getattr(m, "frozen_seed", None) is not None]
        with _NoiseOn(self.model):
            if frozen:
                # Frozen noise (cdkernels.robust.frozen_noise) passes one fixed seed per module
                # and call, and the kernels index the noise by element position. Replicating
                # x would then tie a sample's noise to where its chunk starts, so chunk=2 and
                # chunk=K would give different networks (and equal-sized chunks the SAME noise).
                # Instead each sample k runs on its own with the stream (seed, k): the result
                # does not depend on `chunk`, and the K samples are K distinct draws.
                try:
                    for k in range(self.samples):
                        for m in frozen:
                            m.frozen_sample = k
                        outs.append(self.model(x))
                finally:
                    for m in frozen:
                        m.__dict__.pop("frozen_sample", None)
            else:
                done = 0
                while done < self.samples:
                    c = min(self.chunk, self.samples - done)
                    outs.append(self.model(x.repeat(c, *([1] * (x.dim() - 1)))))
                    done += c
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return ensemble_mean(out, replicas=self.samples, space=self.space)

    @torch.no_grad()
    def evaluate(self, loader, device=None, progress: bool = True, desc: str = "MC eval"):
        """Accuracy and mean NLL of the averaged prediction over ``loader`` (an iterable of
        (inputs, labels)), with a tqdm progress bar."""
        from tqdm.auto import tqdm
        correct, nll, n = 0, 0.0, 0
        try:
            total = len(loader)
        except TypeError:
            total = None
        for xb, yb in tqdm(loader, total=total, desc=f"{desc} (K={self.samples})",
                           disable=not progress, leave=False):
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            p = self(xb).float()
            logp = p if self.space == "logprob" else (
                torch.log(p.clamp_min(1e-30)) if self.space == "prob"
                else torch.log_softmax(p, -1))
            correct += (logp.argmax(-1) == yb).sum().item()
            nll += -logp.gather(1, yb[:, None]).sum().item()
            n += yb.numel()
        return {"accuracy": correct / max(n, 1), "nll": nll / max(n, 1), "n": n,
                "samples": self.samples}

    def extra_repr(self) -> str:
        return f"samples={self.samples}, space={self.space!r}, chunk={self.chunk}"
