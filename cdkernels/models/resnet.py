"""Pre-activation ResNets whose residual updates are single fused ``cd_step`` calls.

Every block computes ``y = cd_step(shortcut(x), F(x), dt, sigma_eff)``: ``F`` is the
pre-activation branch BN-ReLU-conv-BN-ReLU-conv and ``shortcut`` the identity or a 1x1
projection (with stride) of the pre-activated input. The noise mode picks ``sigma_eff``:

``"em"``    Euler–Maruyama: ``sigma_eff = sigma`` (cd_step multiplies by ``sqrt(dt)``).
``"std"``   EnResNet-style: the noise std is ``coef * std(shortcut + dt*F)`` per block and per
            forward (``coef = sigma``); the std stays in the autograd graph (not detached).
            One fused op, :func:`cdkernels.cd_std_step` (moments of z, then the noisy write).
``"none"``  plain ResNet (``x + dt*F``, no kernel): the baseline.

Noise is on in train mode and in eval mode only with ``noise_in_eval`` (toggle it on a whole
model with :func:`cdkernels.nn.set_noise_in_eval`). Forward has no host syncs and no Python
branching on tensor values, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..cd_step import cd_step
from ..std_step import cd_std_step
from ..nn import CDStep

NOISE_MODES = ("em", "std", "none")
SIGMA_MODES = (False, None, "scalar", "channel")


def _check_noise(noise: str) -> str:
    if not isinstance(noise, str) or noise.lower() not in NOISE_MODES:
        raise ValueError(f"noise={noise!r} is not supported; choose one of "
                         f"{', '.join(repr(m) for m in NOISE_MODES)}")
    return noise.lower()


def _check_learnable(ls) -> Optional[str]:
    if ls is True:
        return "scalar"
    if ls in (False, None, "none", "false"):
        return None
    if ls in ("scalar", "channel"):
        return ls
    raise ValueError(f"learnable_sigma={ls!r} is not supported; choose False, 'scalar' or "
                     "'channel'")


def _num(v, name: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {v!r}")
    return float(v)


def _common_dtype(x: torch.Tensor, f: torch.Tensor):
    """x and f in one dtype (autocast can leave an fp32 shortcut next to a bf16 branch)."""
    if x.dtype == f.dtype:
        return x, f
    d = torch.promote_types(x.dtype, f.dtype)
    return x.to(d), f.to(d)


class PlainStep(nn.Module):
    """``x + dt*f``: the noise-free update (noise="none")."""

    def __init__(self, dt: float):
        super().__init__()
        self.dt = dt

    def forward(self, x, f):
        x, f = _common_dtype(x, f)
        return x + self.dt * f

    def extra_repr(self):
        return f"dt={self.dt}"


class EMStep(CDStep):
    """CDStep (noise="em") that also reconciles autocast dtypes."""

    def forward(self, x, f, seed=None):
        x, f = _common_dtype(x, f)
        return super().forward(x, f, seed)


class StdNoiseStep(nn.Module):
    """EnResNet-style update: noise std = coef * std(x + dt*f), recomputed every forward."""

    def __init__(self, dt: float, coef: float, learnable: Optional[str] = None,
                 channels: Optional[int] = None, noise_in_eval: bool = False):
        super().__init__()
        self.dt = _num(dt, "dt", positive=True)
        coef = _num(coef, "sigma")
        self.noise_in_eval = bool(noise_in_eval)
        shape = (channels,) if learnable == "channel" else ()
        value = torch.full(shape, coef, dtype=torch.float32)
        if learnable:
            self.coef = nn.Parameter(value)
        else:
            self.register_buffer("coef", value)
        self._inv_sqrt_dt = 1.0 / math.sqrt(self.dt)

    @property
    def noise_active(self) -> bool:
        return self.training or self.noise_in_eval

    def forward(self, x, f, seed=None):
        x, f = _common_dtype(x, f)
        if not self.noise_active:
            return x + self.dt * f
        # std over the whole block output, float64 sums of the float32 z, and the noisy write:
        # two passes in one op (cdkernels.cd_std_step), exact gradient through the std
        return cd_std_step(x, f, self.dt, self.coef, seed=seed)

    def extra_repr(self):
        kind = "learnable" if isinstance(self.coef, nn.Parameter) else "fixed"
        return (f"dt={self.dt}, coef={kind}{list(self.coef.shape) or ''}, "
                f"noise_in_eval={self.noise_in_eval}")


def make_step(noise: str, dt: float, sigma: float, learnable: Optional[str], channels: int,
              noise_in_eval: bool = False) -> nn.Module:
    noise = _check_noise(noise)
    if noise == "none":
        return PlainStep(_num(dt, "dt"))
    if noise == "std":
        return StdNoiseStep(dt, sigma, learnable, channels, noise_in_eval)
    return EMStep(_num(dt, "dt"), _num(sigma, "sigma"), learnable_sigma=bool(learnable),
                  per_channel=channels if learnable == "channel" else None,
                  noise_in_eval=noise_in_eval)


def _conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block; the residual update is one fused step module."""

    def __init__(self, cin: int, cout: int, stride: int, step: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3(cout, cout)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)
        self.step = step

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(a)
        f = self.conv2(self.drop(torch.relu(self.bn2(self.conv1(a)))))
        return self.step(sc, f)


class CDPreActResNet(nn.Module):
    """Pre-activation ResNet for small images: stem conv, three stages, BN-ReLU-pool-linear.

    ``widths`` are the channel counts of the three stages; ``blocks`` the blocks per stage.
    """

    def __init__(self, blocks: int, widths, num_classes: int = 10, in_channels: int = 3,
                 noise: str = "em", sigma: float = 0.1, dt: float = 1.0,
                 learnable_sigma: Union[bool, str] = False, stem_width: Optional[int] = None,
                 dropout: float = 0.0, noise_in_eval: bool = False):
        super().__init__()
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks per stage must be a positive int, got {blocks!r}")
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.noise = _check_noise(noise)
        learnable = _check_learnable(learnable_sigma)
        sigma = _num(sigma, "sigma")
        dt = _num(dt, "dt", positive=self.noise == "std")
        stem = stem_width or widths[0]
        self.stem = _conv3(in_channels, stem)
        layers, cin = [], stem
        for i, w in enumerate(widths):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                step = make_step(self.noise, dt, sigma, learnable, w, noise_in_eval)
                layers.append(PreActBlock(cin, w, stride, step, dropout))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.relu(self.bn(x))
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def cd_preact_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                     noise: str = "em", sigma: float = 0.1, dt: float = 1.0,
                     learnable_sigma: Union[bool, str] = False, width: int = 16,
                     noise_in_eval: bool = False) -> CDPreActResNet:
    """Pre-activation ResNet-``depth`` (depth = 6n+2, stages of width w, 2w, 4w)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                         f"got {depth!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    return CDPreActResNet((depth - 2) // 6, (width, 2 * width, 4 * width), num_classes,
                          in_channels, noise, sigma, dt, learnable_sigma,
                          noise_in_eval=noise_in_eval)


def cd_wide_resnet(depth: int = 16, widen: int = 4, num_classes: int = 10, in_channels: int = 3,
                   noise: str = "em", sigma: float = 0.1, dt: float = 1.0,
                   learnable_sigma: Union[bool, str] = False, dropout: float = 0.0,
                   noise_in_eval: bool = False) -> CDPreActResNet:
    """Wide ResNet WRN-``depth``-``widen`` (pre-activation; depth = 6n+4; widths 16k, 32k, 64k
    after a 16-channel stem)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), "
                         f"got {depth!r}")
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 1:
        raise ValueError(f"widen must be a positive int, got {widen!r}")
    return CDPreActResNet((depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen), num_classes,
                          in_channels, noise, sigma, dt, learnable_sigma, stem_width=16,
                          dropout=dropout, noise_in_eval=noise_in_eval)


def _mean_logits(outs):
    """Average the members' logits: cdkernels.ensemble_mean(space="logit") when present."""
    try:
        from ..ensemble_mean import ensemble_mean  # lazily: added alongside this module
    except ImportError:
        ensemble_mean = None
    if ensemble_mean is None:
        return torch.stack(outs, 0).mean(0)
    return ensemble_mean(torch.cat(outs, 0), replicas=len(outs), space="logit")


class EnResNet(nn.Module):
    """Ensemble of independent noisy ResNets whose logits are averaged (trained jointly on the
    averaged logits), after Wang et al., "ResNets Ensemble via the Feynman-Kac Formalism"."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes

    def forward(self, x):
        return _mean_logits([m(x) for m in self.members])


def enresnet(depth: int = 20, members: int = 2, noise: str = "std", sigma: float = 0.1,
             **kw) -> EnResNet:
    """``members`` independently initialised noisy pre-activation ResNet-``depth``s whose logits
    are averaged. Other keywords as :func:`cd_preact_resnet` (default noise: EnResNet's
    ``"std"`` with coefficient 0.1)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive int, got {members!r}")
    return EnResNet([cd_preact_resnet(depth, noise=noise, sigma=sigma, **kw)
                     for _ in range(members)])
