"""cd_smooth: Gaussian (heat-kernel) smoothing of a pointwise nonlinearity,
``mean_{k<K} act(x + sigma*eps_k)``, estimated with K samples inside the kernel.

The K noisy copies never exist in memory: each kernel thread loops over k, drawing eps_k from
stream (seed, offset, sample=k) (docs/noise.md). Backward regenerates the same K samples from
the saved seed; it saves only x, so forward+backward memory does not grow with K.

``samples=None`` (or ``mode="exact"``) evaluates the K -> infinity limit in closed form:
relu: x*Phi(x/s) + s*phi(x/s); gelu: x*Phi(x/r) + s^2*phi(x/r)/r with r = sqrt(1 + s^2).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _common as C
from .backends import get_backend
from .cd_step import _eager_ok

Tensor = torch.Tensor
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "softplus")
EXACT = ("relu", "gelu")


@torch.library.custom_op("cdkernels::cd_smooth", mutates_args=())
def cd_smooth_op(x: Tensor, sigma_value: float, sigma: Optional[Tensor], samples: int,
                 seed: Tensor, offset: int, activation: str, backend: str) -> Tensor:
    return _smooth_fwd(x, sigma_value, sigma, samples, seed, offset, activation, backend)


def _smooth_fwd(x, sigma_value, sigma, samples, seed, offset, activation, backend):
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    be = get_backend(x.device, x.dtype, backend or None)
    if x.is_contiguous() and be.accepts_contiguous_nd:
        xf, yf = x, y  # (as cd_step's _run_fwd: no views for a data_ptr-only backend)
    else:
        xf, yf = C.flat(C.like(C.dense_input(x), y)), C.flat(y)
    ch, cs = C.channel_map(y, sigma)
    be.cd_smooth_fwd(xf, yf, C.sigma_for_kernel(sigma, x.dtype), sigma_value, ch, cs, samples,
                     seed, offset, activation)
    return y


@cd_smooth_op.register_fake
def _(x, sigma_value, sigma, samples, seed, offset, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op("cdkernels::cd_smooth_backward", mutates_args=())
def cd_smooth_backward_op(grad_y: Tensor, x: Tensor, sigma_value: float,
                          sigma: Optional[Tensor], samples: int, seed: Tensor, offset: int,
                          activation: str, backend: str, need_sigma: bool
                          ) -> tuple[Tensor, Tensor]:
    """(grad_x, per-channel sum of g * mean_k act'(z_k) * eps_k, empty unless need_sigma)."""
    xd = C.dense_input(x)  # outputs follow x's dense layout
    g = C.like(C.dense_input(grad_y), xd)
    ch, cs = C.channel_map(xd, sigma)
    grad_x = torch.empty_like(xd)
    gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    gsig = torch.zeros(ch if need_sigma else 0, dtype=gdt, device=x.device)
    if x.numel():
        get_backend(x.device, x.dtype, backend or None).cd_smooth_bwd(
            C.flat(g), C.flat(xd), C.flat(grad_x), gsig if need_sigma else None,
            C.sigma_for_kernel(sigma, x.dtype), sigma_value, ch, cs, samples, seed, offset,
            activation)
    return grad_x, gsig


@cd_smooth_backward_op.register_fake
def _(grad_y, x, sigma_value, sigma, samples, seed, offset, activation, backend, need_sigma):
    ch = 1 if sigma is None or sigma.numel() == 1 else sigma.numel()
    gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty(ch if need_sigma else 0, dtype=gdt)


def _setup_context(ctx, inputs, output):
    x, sigma_value, sigma, samples, seed, offset, activation, backend = inputs
    ctx.args = (sigma_value, samples, offset, activation, backend)
    ctx.sigma_shape = None if sigma is None else sigma.shape
    ctx.sigma_dtype = None if sigma is None else sigma.dtype
    ctx.save_for_backward(x, sigma, seed)


def _backward(ctx, grad_y):
    x, sigma, seed = ctx.saved_tensors
    sigma_value, samples, offset, activation, backend = ctx.args
    need_sigma = sigma is not None and ctx.needs_input_grad[2]
    if not (ctx.needs_input_grad[0] or need_sigma):
        return (None,) * 8
    gx, gs = cd_smooth_backward_op(grad_y, x, sigma_value, sigma, samples, seed, offset,
                                   activation, backend, need_sigma)
    grad_sigma = gs.reshape(ctx.sigma_shape).to(ctx.sigma_dtype) if need_sigma else None
    return (gx if ctx.needs_input_grad[0] else None, None, grad_sigma) + (None,) * 5


cd_smooth_op.register_autograd(_backward, setup_context=_setup_context)


def _exact(x: Tensor, sigma, activation: str) -> Tensor:
    """Closed-form Gaussian smoothing E[act(x + s*eps)] (differentiable in x and sigma)."""
    if torch.is_tensor(sigma) and sigma.numel() > 1:
        shape = [1] * x.dim()
        shape[1] = -1
        s = sigma.reshape(shape).to(x.dtype)
    else:
        s = sigma.reshape(()).to(x.dtype) if torch.is_tensor(sigma) else sigma
    if not torch.is_tensor(s) and s == 0:
        return torch.relu(x) if activation == "relu" else torch.nn.functional.gelu(x)
    phi = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    if activation == "relu":
        # |s| clamped away from 0 so that sigma = 0 gives relu(x) instead of 0/0
        s = s.abs().clamp_min(torch.finfo(x.dtype).tiny) if torch.is_tensor(s) else abs(s)
        t = x / s
        return x * Phi(t) + s * phi(t)
    r = (1 + s * s) ** 0.5
    t = x / r
    return x * Phi(t) + (s * s) * phi(t) / r


def cd_smooth(x: Tensor, sigma: Union[float, Tensor], *, samples: Optional[int],
              activation: str = "relu", seed: Union[None, int, Tensor] = None,
              mode: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    """Gaussian smoothing ``mean_{k<K} act(x + sigma*eps_k)`` with K = ``samples`` in-kernel
    samples, or its K -> inf limit in closed form (``samples=None`` or ``mode="exact"``;
    relu and gelu).

    Args:
        x: float tensor (any layout; the output follows x's memory layout).
        sigma: float >= 0, or a tensor with 1 element or one per channel (x.shape[1]),
            learnable.
        samples: K >= 1, or None for the exact limit.
        activation: relu, gelu, tanh, sigmoid or softplus.
        seed: None (fresh, from x's device generator), an int in [0, 2^64) (sample k uses
            stream (seed, 0, k) of docs/noise.md), or an int64 device tensor.
        mode: "mc" (default when samples is given) or "exact".
    """
    C.check_float_tensor(x, "x")
    act = C.check_activation(activation, ACTIVATIONS)
    if mode is None:
        mode = "exact" if samples is None else "mc"
    if mode not in ("mc", "exact"):
        raise ValueError(f"mode={mode!r} must be 'mc' or 'exact'")
    sigma_value, sigma_t = C.sigma_args(sigma, x)
    if mode == "exact":
        if act not in EXACT:
            raise ValueError(f"mode='exact' has a closed form for {', '.join(EXACT)}; "
                             f"activation={act!r} needs samples=K")
        return _exact(x, sigma if sigma_t is None else sigma_t, act)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples < (1 << 32):
        raise ValueError(f"samples must be an int >= 1 (or None for the exact limit), "
                         f"got {samples!r}")
    if backend is not None:
        from .backends import _check_name
        _check_name(backend)
    if not (torch.is_grad_enabled() and (x.requires_grad or (
            sigma_t is not None and sigma_t.requires_grad))) and _eager_ok(x, x):
        # eager, nothing to differentiate: the op's body without the dispatcher (~20 us); on
        # the CPU the seed goes through the per-thread buffer (as cd_step's eager path)
        seed_t = C.eager_seed(seed, x, False)[0]
        return _smooth_fwd(x, sigma_value, sigma_t, samples, seed_t, 0, act, backend or "")
    return cd_smooth_op(x, sigma_value, sigma_t, samples, C.make_seed(seed, x.device), 0, act,
                        backend or "")
