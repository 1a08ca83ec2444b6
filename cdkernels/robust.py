"""Adversarial robustness of (noisy) cdkernels models: FGSM / PGD (L-inf, L2) with EOT,
frozen-noise white-box attacks, Wilson confidence intervals and gradient-masking checks.

Conventions
-----------
* Attacks work in **pixel space** ``[0, 1]``: every adversarial input is clipped there. The zoo's
  models consume normalised inputs ((x - mean) / std, see :mod:`cdkernels.data`), so wrap them
  in :class:`PixelModel`, which normalises inside the forward.
* The loss of an attack is the cross-entropy of the **true label only**; labels are never used
  to pick the evaluation noise, and predictions are made without them.
* ``eot=M`` (expectation over transformation): each gradient is the gradient of the loss summed
  over M noise draws, computed in ONE forward/backward on the batch replicated M times along
  dim 0 (``x.repeat(M, 1, 1, 1)``): every replica draws its own noise because cdkernels'
  Philox stream is indexed by the element position. ``eot_chunk`` bounds memory.
* Models may be wrapped in :class:`cdkernels.nn.MonteCarlo` (K samples averaged, noise on in
  eval). Its output lives in ``space`` ("prob" | "logit" | "logprob"); :func:`log_probs` turns
  any of them into log-probabilities for the loss and the prediction.
* :func:`frozen_noise` fixes the seed of every noisy cdkernels module (a forward pre-hook that
  passes ``seed=`` to the step modules' ``forward(x, f, seed=None)``), so the network is a
  deterministic function: the frozen-noise white-box attack.
* Evaluation noise: :func:`evaluate_attack` evaluates the natural and the adversarial
  prediction of a batch under the *same* frozen evaluation seed (common random numbers), drawn
  from the run's seed and the batch index and never shown to the attacker (except in the
  frozen-noise attack, whose point is exactly that the attacker knows it). So ``eps = 0`` gives
  exactly the natural accuracy, and an example counts as robust only if it is classified
  correctly both naturally and under attack.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

NORMS = ("linf", "l2")
# Attacks written here, and cross-check attacks from torchattacks (optional extra
# ``cdkernels[attacks]``): APGD with EOT, and AutoAttack's "rand" version for stochastic models.
INTERNAL_ATTACKS = ("none", "fgsm", "pgd")
EXTERNAL_ATTACKS = ("apgd", "apgd-dlr", "autoattack-rand")
ATTACKS = INTERNAL_ATTACKS + EXTERNAL_ATTACKS
LOSSES = ("ce", "cw", "dlr")
_U63 = (1 << 63) - 1


# -- input checks --------------------------------------------------------------------------------

def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_norm(norm) -> str:
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(map(repr, NORMS))}")
    return norm.lower()


def _check_int(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _check_step_size(step_size, eps: float, steps: int) -> float:
    if step_size is None:
        return 2.5 * eps / steps  # Madry et al.: lets PGD walk across the ball from the start
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) \
            or not math.isfinite(step_size) or step_size < 0:
        raise ValueError(f"step_size must be a finite number >= 0 or None, got {step_size!r}")
    return float(step_size)


def parse_eps(text: str) -> float:
    """'0.1', '8/255' -> float (for command lines)."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read eps {text!r} (a number like 0.1 or 8/255)") from None


# -- wrappers ------------------------------------------------------------------------------------

def output_space(model: nn.Module) -> str:
    """What ``model`` returns: "logit" (a plain classifier), or a MonteCarlo's ``space``."""
    return getattr(model, "space", None) or "logit"


def log_probs(out: torch.Tensor, space: str) -> torch.Tensor:
    out = out.float()
    if space == "logprob":
        return out
    if space == "prob":
        return torch.log(out.clamp_min(1e-30))
    return torch.log_softmax(out, -1)


class PixelModel(nn.Module):
    """``model((x - mean) / std)`` for pixel-space inputs x in [0, 1] (mean/std per channel)."""

    def __init__(self, model: nn.Module, mean=None, std=None):
        super().__init__()
        self.model = model
        mean = torch.zeros(1) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(1) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.space = output_space(model)

    def forward(self, x):
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def noisy_modules(model: nn.Module) -> List[nn.Module]:
    """The cdkernels step modules of ``model`` whose noise can be switched on (they have
    ``noise_in_eval`` and a ``forward(x, f, seed=None)``)."""
    return [m for m in model.modules() if hasattr(m, "noise_in_eval")
            and not isinstance(m, nn.ModuleList) and hasattr(m, "noise_active")]


def is_stochastic(model: nn.Module) -> bool:
    """True if a forward of ``model`` (in its current mode) draws noise."""
    from .nn import MonteCarlo
    if any(isinstance(m, MonteCarlo) for m in model.modules()) and noisy_modules(model):
        return True
    return any(m.noise_active for m in noisy_modules(model))


def _module_seed(seed: int, i: int) -> int:
    # splitmix64-style mixing: distinct, well-spread keys per module.
    z = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) & _U63


@contextlib.contextmanager
def frozen_noise(model: nn.Module, seed: Optional[int] = 0):
    """Within the block every noisy cdkernels module of ``model`` uses a fixed, per-module seed
    derived from ``seed`` (``None``: do nothing, noise stays fresh). The network becomes a
    deterministic function of its input *for a given batch shape* (the noise is indexed by
    element position, so replica k of an ``x.repeat(K, ...)`` still gets its own draw).

    Implemented with forward pre-hooks that pass ``seed=`` to the step modules
    (``EMStep`` / ``CDStep`` / ``StdNoiseStep``); each module also gets ``frozen_seed`` set while
    the block runs (for inspection). No model code changes.
    """
    if seed is None:
        yield model
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"frozen-noise seed must be an int >= 0 or None, got {seed!r}")
    handles, mods = [], noisy_modules(model)
    for i, m in enumerate(mods):
        s = _module_seed(seed, i)

        def hook(mod, args, kwargs, s=s):
            if len(args) < 3 and kwargs.get("seed") is None:
                # Inside a MonteCarlo forward sample k gets its own stream (see MonteCarlo).
                k = mod.__dict__.get("frozen_sample")
                kwargs = dict(kwargs, seed=s if k is None else _module_seed(s, 1_000_003 + k))
            return args, kwargs

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        m.frozen_seed = s
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in mods:
            m.__dict__.pop("frozen_seed", None)


# -- gradients -----------------------------------------------------------------------------------

def _check_loss(loss) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(map(repr, LOSSES))}")
    return loss


def attack_loss(lp: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per-example loss the attacker maximises, from log-probabilities ``lp`` [N, C].

    "ce": cross-entropy of the true label. "cw": the margin max_{j != y} z_j - z_y (Carlini &
    Wagner), on log-probabilities, which for a plain classifier differ from the logits by a
    per-example constant, so the margin is the logit margin. "dlr": the margin divided by
    z_(1) - z_(3) (Croce & Hein's difference of logits ratio, shift and scale invariant).
    The margins keep pushing once the example is misclassified and do not saturate like the
    cross-entropy of a confident model."""
    _check_loss(loss)
    if loss == "ce":
        return -lp.gather(1, y[:, None]).squeeze(1)
    zy = lp.gather(1, y[:, None]).squeeze(1)
    other = lp.masked_fill(torch.nn.functional.one_hot(y, lp.shape[1]).bool(), float("-inf"))
    margin = other.amax(1) - zy
    if loss == "cw":
        return margin
    top = lp.topk(min(3, lp.shape[1]), dim=1).values
    return margin / (top[:, 0] - top[:, -1] + 1e-12)


def loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = 1,
                  eot_chunk: Optional[int] = None, loss: str = "ce"
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-example attack loss (``loss``: "ce" cross-entropy of the true label, "cw" / "dlr"
    margins, see :func:`attack_loss`) averaged over ``eot`` noise draws, and its gradient wrt
    ``x`` (same shape as x). The M draws run as ONE forward/backward of the batch replicated M
    times (``x.repeat(M, ...)``, per-copy losses summed), or ceil(M / eot_chunk) of them when
    ``eot_chunk`` bounds the memory."""
    eot = _check_int(eot, "eot (M)")
    loss = _check_loss(loss)
    chunk = eot if eot_chunk is None else min(_check_int(eot_chunk, "eot_chunk"), eot)
    space = output_space(model)
    x = x.detach()
    grad = torch.zeros_like(x)
    loss_sum = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    done = 0
    with torch.enable_grad():
        while done < eot:
            c = min(chunk, eot - done)
            xv = x.clone().requires_grad_(True)
            xr = xv.repeat(c, *([1] * (x.dim() - 1))) if c > 1 else xv
            lp = log_probs(model(xr), space)
            per = attack_loss(lp, y.repeat(c), loss)                 # [c*B]
            g, = torch.autograd.grad(per.sum(), xv)
            grad += g
            loss_sum += per.detach().view(c, -1).sum(0)
            done += c
    return loss_sum / eot, grad / eot


def _lp_ball_project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
    return delta * (eps / n).clamp(max=1.0)


def _step_dir(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
    return g / n


def random_perturbation(x: torch.Tensor, eps: float, norm: str, kind: str = "ball",
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random delta: ``kind="ball"`` uniform in the L-inf box / uniform in the L2 ball (PGD's
    random start); ``kind="surface"`` random sign * eps (L-inf) / random direction of norm eps
    (L2): the random-noise baseline."""
    norm = _check_norm(norm)
    if norm == "linf":
        if kind == "surface":
            r = torch.randint(0, 2, x.shape, device=x.device, generator=generator)
            return (2 * r - 1).to(x.dtype) * eps
        return (torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                * 2 - 1) * eps
    d = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    if kind == "surface":
        return d * eps
    u = torch.rand((x.shape[0],), device=x.device, dtype=x.dtype, generator=generator)
    r = eps * u.pow(1.0 / x[0].numel())
    return d * r.view(-1, *([1] * (x.dim() - 1)))


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
        step_size: Optional[float] = None, norm: str = "linf", random_start: bool = True,
        eot: int = 1, eot_chunk: Optional[int] = None,
        generator: Optional[torch.Generator] = None, clip: Tuple[float, float] = (0.0, 1.0),
        loss: str = "ce", restarts: int = 1) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) maximising the true label's cross-entropy in the
    ``norm`` ball of radius ``eps`` around x, intersected with ``clip`` (pixel range).

    ``step_size`` defaults to 2.5*eps/steps; ``random_start`` draws the start uniformly in the
    ball (from ``generator`` if given); ``eot=M`` averages every gradient over M noise draws in
    one batched forward/backward. The model is used in whatever mode it is in (eval for
    attacks, train for adversarial training). ``loss`` is "ce", "cw" or "dlr"
    (:func:`attack_loss`). ``restarts=R`` runs R random starts and keeps, per example, the one
    whose final loss (averaged over ``eot`` fresh draws) is highest. Returns the adversarial
    inputs (detached)."""
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    steps = _check_int(steps, "steps")
    eot = _check_int(eot, "eot (M)")
    restarts = _check_int(restarts, "restarts")
    loss = _check_loss(loss)
    alpha = _check_step_size(step_size, eps, steps)
    x = x.detach()
    lo, hi = clip
    if eps == 0:
        return x.clone()
    best, best_loss = None, None
    for r in range(restarts):
        delta = random_perturbation(x, eps, norm, "ball", generator) if random_start \
            else torch.zeros_like(x)
        xa = (x + delta).clamp(lo, hi)
        for _ in range(steps):
            _, g = loss_and_grad(model, xa, y, eot, eot_chunk, loss)
            delta = _lp_ball_project(xa + alpha * _step_dir(g, norm) - x, eps, norm)
            xa = (x + delta).clamp(lo, hi).detach()
        if restarts == 1:
            return xa
        with torch.no_grad():
            lv = _eval_loss(model, xa, y, eot, eot_chunk, loss)
        if best is None:
            best, best_loss = xa, lv
        else:
            take = lv > best_loss
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), xa, best)
            best_loss = torch.maximum(lv, best_loss)
    return best


def _eval_loss(model, x, y, eot, eot_chunk, loss) -> torch.Tensor:
    """Per-example attack loss averaged over ``eot`` draws, without gradients."""
    space = output_space(model)
    chunk = eot if eot_chunk is None else min(eot_chunk, eot)
    tot, done = torch.zeros(x.shape[0], device=x.device), 0
    while done < eot:
        c = min(chunk, eot - done)
        xr = x.repeat(c, *([1] * (x.dim() - 1))) if c > 1 else x
        tot += attack_loss(log_probs(model(xr), space), y.repeat(c), loss).view(c, -1).sum(0)
        done += c
    return tot / eot


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
         eot: int = 1, eot_chunk: Optional[int] = None, clip=(0.0, 1.0), loss: str = "ce",
         **_) -> torch.Tensor:
    """Fast gradient (sign) method: one step of size eps from x (no random start); for L2 the
    step is the normalised gradient times eps."""
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    return pgd(model, x, y, eps, steps=1, step_size=eps, norm=norm, random_start=False,
               eot=eot, eot_chunk=eot_chunk, clip=clip, loss=loss)


def attack(kind: str, model, x, y, **kw) -> torch.Tensor:
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(map(repr, ATTACKS))}")
    if kind == "none":
        _check_eps(kw.get("eps", 0.0))
        return x.detach().clone()
    if kind in EXTERNAL_ATTACKS:
        return external_attack(kind, model, x, y, **kw)
    if kind == "fgsm":
        kw = {k: v for k, v in kw.items() if k not in ("steps", "step_size", "random_start",
                                                         "generator", "restarts")}
        return fgsm(model, x, y, **kw)
    return pgd(model, x, y, **kw)


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


def require_torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise MissingExtra("the cross-check attacks (apgd, apgd-dlr, autoattack-rand) use "
                           "torchattacks, which is not installed: pip install "
                           "cdkernels[attacks] (or pip install torchattacks==3.5.1)") from None
    return torchattacks


class _LogProbModel(nn.Module):
    """Log-probabilities of ``model`` as "logits" for third-party attacks: their
    cross-entropy (log-softmax of the output) is then exactly -log p(y), whatever space a
    MonteCarlo model averages in, and argmax predictions are unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.space = model, output_space(model)

    def forward(self, x):
        return log_probs(self.model(x), self.space)


def external_attack(kind: str, model, x, y, eps: float, norm: str = "linf", steps: int = 10,
                    eot: int = 1, restarts: int = 1, seed: int = 0, **_) -> torch.Tensor:
    """A cross-check attack nobody in this project wrote (torchattacks 3.5.1):

    ``apgd``             APGD-CE with ``eot`` gradient samples per step, ``steps`` iterations,
                         ``restarts`` restarts.
    ``apgd-dlr``         the same with the DLR loss.
    ``autoattack-rand``  AutoAttack's version for randomised defences (APGD-CE + APGD-DLR, 100
                         iterations, EOT 20): expensive, use on a subset.
    """
    ta = require_torchattacks()
    # The wrapper is made in eval mode: torchattacks records the *wrapper's* mode before the
    # attack and calls .train() on it afterwards if it was training, which a fresh nn.Module
    # is. That switched the whole model (BatchNorm included) into training mode after every
    # cross-check batch, so its adversarial predictions used batch statistics and updated the
    # running ones. The caller's mode is restored explicitly as well.
    was_training = model.training
    net = _LogProbModel(model).train(was_training)
    tnorm = {"linf": "Linf", "l2": "L2"}[_check_norm(norm)]
    if kind == "autoattack-rand":
        atk = ta.AutoAttack(net, norm=tnorm, eps=eps, version="rand",
                            n_classes=int(net(x[:1]).shape[1]), seed=seed)
    else:
        atk = ta.APGD(net, norm=tnorm, eps=eps, steps=steps, n_restarts=restarts, seed=seed,
                      loss="dlr" if kind == "apgd-dlr" else "ce", eot_iter=eot)
    # torchattacks switches the model to train/eval itself; keep ours in eval.
    atk.set_model_training_mode(model_training=False)
    try:
        return atk(x.detach(), y).detach()
    finally:
        model.train(was_training)


def _check_adv(xa: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    """The adversarial batch stays in the pixel range and in the eps ball (else: a bug)."""
    d = (xa - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    if float(xa.min()) < 0 or float(xa.max()) > 1 or float(size.max()) > eps * (1 + 1e-5) + 1e-6:
        raise RuntimeError(f"adversarial inputs left [0, 1] or the {norm} ball of radius {eps}")


# -- statistics ----------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """Wilson score interval (95 % by default) for k successes out of n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def paired_bootstrap(a, b, iters: int = 2000, seed: int = 0, level: float = 0.95
                     ) -> Dict[str, float]:
    """Mean of ``a - b`` and its bootstrap interval, for 0/1 outcomes of two models on the SAME
    images and seeds: ``a``, ``b`` are [seeds][images] nested lists (or arrays).

    Each bootstrap replicate resamples seeds with replacement, then images with replacement
    (the same image indices for both models: the pairing removes the image-difficulty
    variance), and takes the mean difference. With one seed only the images are resampled, so
    the interval then says nothing about seed-to-seed variation."""
    import numpy as np
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"a and b must be equal-shaped [seeds, images] arrays, got {a.shape} "
                         f"and {b.shape}")
    d = a - b
    s, n = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, (iters, s))
    ii = rng.integers(0, n, (iters, s, n))
    reps = d[si[:, :, None], ii].mean(axis=(1, 2))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": int(s),
            "images": int(n), "iters": int(iters)}


@torch.no_grad()
def noise_to_signal(model: nn.Module, x: torch.Tensor, seed: int = 0) -> List[float]:
    """Realised noise-to-signal ratio of every noisy residual update of ``model`` on inputs x
    (normalised, as the model takes them), with the noise on: std(y - z) / std(z), where z is
    the update without noise (``shortcut + dt * F``, recomputed from the step module's (x, f)
    inputs) and y what the module returned. Measured with forward hooks, so it holds for any
    step implementation that takes (x, f) and adds zero-mean noise (em: sigma*sqrt(dt) against
    a signal whose scale the network learns; std: coef*std(z) by construction). Modules that
    apply an activation after the noise are skipped. Model mode is restored; the global RNG is
    forked (seeded with ``seed``) so the caller's stream is untouched."""
    from .nn import _NoiseOn
    mods = noisy_modules(model)
    ratios: List[float] = []

    def hook(mod, args, out):
        if len(args) < 2 or getattr(mod, "activation", None) not in (None, "none"):
            return
        xx, f = args[0].float(), args[1].float()
        z = xx + float(mod.dt) * f
        ratios.append(float((out.float() - z).std() / z.std().clamp_min(1e-12)))
    handles = [m.register_forward_hook(hook) for m in mods]
    was = model.training
    devs = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        model.eval()
        with _NoiseOn(model), torch.random.fork_rng(devices=devs):
            torch.manual_seed(seed)
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return ratios


# -- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(-1)


def evaluate_attack(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                    attack_kind: str = "pgd", eps: float = 0.0, norm: str = "linf",
                    steps: int = 10, step_size: Optional[float] = None,
                    random_start: bool = True, eot: int = 1, eot_chunk: Optional[int] = None,
                    frozen: bool = False, seed: int = 0, random_baseline: bool = True,
                    grad_check: bool = True, masking_tol: float = 0.01,
                    progress: bool = False, loss: str = "ce", restarts: int = 1,
                    per_example: bool = False) -> Dict[str, object]:
    """Natural and robust accuracy of ``model`` (pixel-space inputs; wrap with PixelModel)
    over ``batches`` of (x in [0, 1], y).

    Per batch b: evaluation seed s_b = f(seed, b). The natural and the adversarial predictions
    are both made with the noise frozen at s_b. The attack draws fresh noise (its own, from the
    torch generator seeded with ``seed``) unless ``frozen``: then it attacks the network frozen
    at s_b, the one it is evaluated on. Robust = correct naturally AND under attack.

    Also: accuracy under random noise of the same eps (``random_baseline``), the mean input-
    gradient norm at the clean inputs (``grad_check``, with the attack's EOT), and
    ``gradient_masking_suspected``: gradients ~0, or attack success lower than the random-noise
    baseline's by more than ``masking_tol``.

    ``loss`` ("ce" | "cw" | "dlr") and ``restarts`` configure PGD; ``per_example`` adds the 0/1
    vectors ``natural_ok`` / ``robust_ok`` (for paired statistics across models). Randomness
    (the attack's fresh noise, random starts) comes from ``seed`` inside a forked RNG: the
    caller's global torch RNG state is the same afterwards as before.
    """
    if attack_kind not in ATTACKS:
        raise ValueError(f"unknown attack {attack_kind!r}; choose one of "
                         f"{', '.join(map(repr, ATTACKS))}")
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    steps = _check_int(steps, "steps")
    eot = _check_int(eot, "eot (M)")
    alpha = _check_step_size(step_size, eps, steps)
    loss = _check_loss(loss)
    restarts = _check_int(restarts, "restarts")
    if attack_kind in EXTERNAL_ATTACKS:
        require_torchattacks()
    batches = list(batches)
    devs = sorted({x.device.index or 0 for x, _ in batches if x.device.type == "cuda"})
    # The fresh noise of cd_step (seed=None) comes from torch's global generator: fork it, so
    # a library call neither depends on nor changes the caller's RNG stream.
    with torch.random.fork_rng(devices=devs):
        torch.manual_seed(seed)
        return _evaluate_attack(model, batches, attack_kind, eps, norm, steps, alpha,
                                random_start, eot, eot_chunk, frozen, seed, random_baseline,
                                grad_check, masking_tol, progress, loss, restarts, per_example)


def _evaluate_attack(model, batches, attack_kind, eps, norm, steps, alpha, random_start, eot,
                     eot_chunk, frozen, seed, random_baseline, grad_check, masking_tol,
                     progress, loss, restarts, per_example):
    was_training = model.training
    model.eval()
    gen_dev = None
    n = nat = rob = rnd = 0
    nat_v: List[int] = []
    rob_v: List[int] = []
    gnorm_sum, gzero, gcount = 0.0, 0, 0
    t0 = time.time()
    from tqdm.auto import tqdm
    for b, (x, y) in enumerate(tqdm(batches, disable=not progress, leave=False, desc="attack")):
        if gen_dev is None:
            gen_dev = torch.Generator(device=x.device).manual_seed(seed + 1)
        s_b = _module_seed(seed + 7919, b)
        with frozen_noise(model, s_b):
            ok_nat = predict(model, x) == y
        kw = dict(eps=eps, norm=norm, steps=steps, step_size=alpha, random_start=random_start,
                  eot=1 if frozen else eot, eot_chunk=eot_chunk, generator=gen_dev,
                  loss=loss, restarts=restarts)
        if attack_kind in EXTERNAL_ATTACKS:
            kw = dict(eps=eps, norm=norm, steps=steps, eot=1 if frozen else eot,
                      restarts=restarts, seed=seed + b)
        with frozen_noise(model, s_b if frozen else None):
            xa = attack(attack_kind, model, x, y, **kw)
            if grad_check:
                _, g = loss_and_grad(model, x, y, 1 if frozen else eot, eot_chunk)
                gn = g.flatten(1).abs().sum(1)
                gnorm_sum += gn.sum().item()
                gzero += (gn == 0).sum().item()
                gcount += gn.numel()
        _check_adv(xa, x, eps, norm)
        with frozen_noise(model, s_b):
            ok_adv = predict(model, xa) == y
            if random_baseline:
                xr = (x + random_perturbation(x, eps, norm, "surface", gen_dev)).clamp(0, 1)
                ok_rnd = predict(model, xr) == y
                rnd += int((ok_nat & ok_rnd).sum())
        n += int(y.numel())
        nat += int(ok_nat.sum())
        rob += int((ok_nat & ok_adv).sum())
        if per_example:
            nat_v += ok_nat.int().tolist()
            rob_v += (ok_nat & ok_adv).int().tolist()
    model.train(was_training)
    ext = attack_kind in EXTERNAL_ATTACKS
    res: Dict[str, object] = {
        "attack": attack_kind, "norm": norm, "eps": eps,
        "steps": 0 if attack_kind == "none" else (1 if attack_kind == "fgsm" else steps),
        "step_size": eps if attack_kind == "fgsm" else (alpha if attack_kind == "pgd" else 0.0),
        "random_start": bool(random_start and attack_kind == "pgd") or ext,
        "loss": {"apgd": "ce", "apgd-dlr": "dlr", "autoattack-rand": "ce+dlr"}.get(
            attack_kind, loss if attack_kind in ("pgd", "fgsm") else "-"),
        "restarts": restarts if attack_kind in ("pgd", "apgd", "apgd-dlr") else 1,
        "eot": 1 if frozen else eot, "frozen_noise": bool(frozen), "seed": seed,
        "stochastic": is_stochastic(model), "n": n,
        "natural_correct": nat, "robust_correct": rob,
        "natural_acc": nat / max(n, 1), "natural_ci95": wilson(nat, n),
        "robust_acc": rob / max(n, 1), "robust_ci95": wilson(rob, n),
        "attack_success_rate": (nat - rob) / max(nat, 1),
        "time_s": time.time() - t0,
    }
    if per_example:
        res["natural_ok"], res["robust_ok"] = nat_v, rob_v
    suspected, why = False, []
    if random_baseline:
        res["random_noise_acc"] = rnd / max(n, 1)
        res["random_noise_ci95"] = wilson(rnd, n)
        rnd_success = (nat - rnd) / max(nat, 1)
        res["random_noise_success_rate"] = rnd_success
        if eps > 0 and attack_kind != "none" and \
                res["attack_success_rate"] + masking_tol < rnd_success:
            suspected = True
            why.append("attack is weaker than random noise of the same eps")
    if grad_check and gcount:
        res["grad_l1_mean"] = gnorm_sum / gcount
        res["grad_zero_fraction"] = gzero / gcount
        if res["grad_l1_mean"] < 1e-12 or res["grad_zero_fraction"] > 0.5:
            suspected = True
            why.append("input gradients are ~0 (mean L1 norm "
                       f"{res['grad_l1_mean']:.3g}, {gzero}/{gcount} exactly zero)")
    res["gradient_masking_suspected"] = suspected
    res["gradient_masking_reasons"] = why
    return res


def sanity_checks(model, batches, result: Dict[str, object], **kw) -> Dict[str, object]:
    """Re-run the attack of ``result`` with eps=0 (must equal natural accuracy), with half the
    PGD steps and with half the EOT draws (neither may be stronger beyond the Wilson CIs)."""
    batches = list(batches)
    base = dict(kw)
    out: Dict[str, object] = {}
    r0 = evaluate_attack(model, batches, **dict(base, eps=0.0, random_baseline=False,
                                                grad_check=False))
    out["eps0_robust_acc"] = r0["robust_acc"]
    out["eps0_equals_natural"] = r0["robust_acc"] == r0["natural_acc"] == result["natural_acc"]
    out["robust_le_natural"] = result["robust_acc"] <= result["natural_acc"]

    def weaker_ok(r):  # the weaker attack (fewer steps / draws) may not win beyond its CI
        return result["robust_acc"] <= r["robust_ci95"][1]
    if result["attack"] == "pgd" and int(result["steps"]) > 1:
        r = evaluate_attack(model, batches, **dict(base, steps=max(1, int(result["steps"]) // 2),
                                                   random_baseline=False, grad_check=False))
        out["half_steps_robust_acc"] = r["robust_acc"]
        out["more_steps_not_weaker"] = weaker_ok(r)
    if int(result["eot"]) > 1:
        r = evaluate_attack(model, batches, **dict(base, eot=max(1, int(result["eot"]) // 2),
                                                   random_baseline=False, grad_check=False))
        out["half_eot_robust_acc"] = r["robust_acc"]
        out["more_eot_not_weaker"] = weaker_ok(r)
    out["passed"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out


# -- reporting -----------------------------------------------------------------------------------

def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown_table(results: Sequence[Dict[str, object]]) -> str:
    rows = ["| attack | norm | eps | steps | EOT M | K | frozen | natural % [95% CI] | "
            "robust % [95% CI] | random-noise % | masking? | n |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        nl, nh = r["natural_ci95"]
        rl, rh = r["robust_ci95"]
        rows.append(
            f"| {r['attack']} | {r['norm']} | {r['eps']:.4g} | {r['steps']} | {r['eot']} | "
            f"{r.get('mc_samples') or '-'} | {'yes' if r['frozen_noise'] else 'no'} | "
            f"{_pct(r['natural_acc'])} [{_pct(nl)}, {_pct(nh)}] | "
            f"{_pct(r['robust_acc'])} [{_pct(rl)}, {_pct(rh)}] | "
            f"{_pct(r['random_noise_acc']) if 'random_noise_acc' in r else '-'} | "
            f"{'**yes**' if r['gradient_masking_suspected'] else 'no'} | {r['n']} |")
    return "\n".join(rows) + "\n"
