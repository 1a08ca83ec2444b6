"""cd_std_step: the EnResNet ("std") noise step ``x + dt*f + coef * std(x + dt*f) * eps`` fused.

``std`` is the unbiased standard deviation of ``z = x + dt*f`` over the whole tensor, kept in the
autograd graph (its gradient is exact). Written eagerly this costs three extra passes over
memory (z, z.float(), z.std()) before the noisy write; here it is two: one read of x and f for
the moments of z (backend ``z_stats``, float64 sums), then the ordinary cd_step kernel with the
device tensor ``sigma = coef * std / sqrt(dt)`` (so its ``sigma*sqrt(dt)`` is ``coef*std``). The
noise is therefore exactly cd_step's stream for the same seed (docs/noise.md), and nothing is
synchronised with the host.

Backward: with g = dL/dy and eps regenerated from the seed,
    dL/dcoef_c = std * sum_{i in c} g_i eps_i
    dL/dstd    = sum_c coef_c sum_{i in c} g_i eps_i
    dL/dx_i    = g_i + dL/dstd * (z_i - mean) / ((n - 1) std),  dL/df_i = dt * dL/dx_i
computed as one reduction kernel (cd_step's grad_sigma pass) and one elementwise kernel
(backend ``z_std_bwd``).

The CPU backend runs each direction as one call (``std_step_fwd`` / ``std_step_bwd``: fewer host
round trips, which dominate at small sizes), and for float32 reads eps back from the saved output
y instead of regenerating it, tile by tile where the rounding bound of docs/noise.md 3d holds
(|eps~ - eps| < 5e-6); so y is saved for the backward (it costs no memory in a network, where the
next layer keeps it anyway) and changing it in place before the backward is an autograd error.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _common as C
from .backends import get_backend
from .cd_step import _PLAIN, _eager_ok, _run_bwd, _run_fwd, raw_apply

Tensor = torch.Tensor


def _dense_pair(x, f):
    """x and f laid out like ``torch.empty_like(x)`` (no copies when contiguous)."""
    if x.is_contiguous() and f.is_contiguous():
        return x, f
    ref = torch.empty_like(x)
    return C.like(C.dense_input(x), ref), C.like(f, ref)


def _flat(t):
    return t.view(-1) if t.is_contiguous() else C.flat(t)


def _sigma_eff(coef, stats, dt, dtype):
    kd = torch.float64 if dtype == torch.float64 else torch.float32
    return coef.detach().to(kd).reshape(-1) * (stats[1:2] / math.sqrt(dt)).to(kd)


def _sigma_eff_host(coef, sd, dt, dtype):
    """_sigma_eff for stats already on the host (CPU tensors: reading them is no sync): one
    multiply instead of five small ops (~5 us each), the same float32 rounding."""
    kd = torch.float64 if dtype == torch.float64 else torch.float32
    return coef.detach().reshape(-1).to(kd) * (sd / math.sqrt(dt))


def _std_fwd(x, f, dt, coef, seed, be):
    """(y, stats): stats float64 [2] = (mean, std) of z = x + dt*f."""
    stats = torch.empty(2, dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        stats.fill_(float("nan"))
        return torch.empty_like(x), stats
    xd, fd = _dense_pair(x, f)
    if _one_call(be, x):
        y = C.empty_output(xd)
        c = C.sigma_for_kernel(coef, x.dtype)
        ch, cs = C.channel_map(xd, c)
        be.std_step_fwd(xd, fd, y, dt, c, ch, cs, seed, 0, stats)
        return y, stats
    be.z_stats(_flat(xd), _flat(fd), dt, stats)
    sig = (_sigma_eff_host(coef, stats.tolist()[1], dt, x.dtype) if x.is_cpu
           else _sigma_eff(coef, stats, dt, x.dtype))
    y = _run_fwd(xd, fd, dt, 0.0, sig, seed, 0, "none", be)
    return y, stats


def _one_call(be, x):
    """True for a backend with the whole step in one call per direction (the CPU's)."""
    return x.dtype != torch.float64 and getattr(be, "std_step_fwd", None) is not None


def _std_bwd(grad_y, x, f, dt, coef, seed, stats, be, need_xf, need_coef, y=None):
    """(grad_x, grad_f, grad_coef as float32/float64 [C or 1]); None where not needed. y, the
    forward's output, lets the CPU backend read eps back instead of regenerating it."""
    n = x.numel()
    if n == 0:
        return (torch.zeros_like(x) if need_xf else None, torch.zeros_like(f) if need_xf else None,
                torch.zeros(coef.numel(), dtype=torch.float32, device=x.device)
                if need_coef else None)
    xd, fd = _dense_pair(x, f)
    g = C.with_strides(grad_y, xd.stride())
    if _one_call(be, x):
        mean, sd = stats.tolist()
        return _std_bwd_one_call(g, xd, fd, y, dt, coef, seed, mean, sd, be, need_xf, need_coef)
    if x.is_cpu:
        return _std_bwd_host(g, xd, fd, dt, coef, seed, stats, be, need_xf, need_coef)
    sig = _sigma_eff(coef, stats, dt, x.dtype)
    # gs[c] = sqrt(dt) * sum_{i in c} g_i eps_i = dL/dsigma_eff[c]
    _, _, gs = _run_bwd(g, None, dt, 0.0, sig, seed, 0, "none", be, False, True)
    inv = 1.0 / math.sqrt(dt)
    grad_coef = gs * (stats[1:2] * inv).to(gs.dtype) if need_coef else None
    gx = gf = None
    if need_xf:
        sd = stats[1]
        gstd = (gs.to(torch.float64) * coef.detach().reshape(-1).to(torch.float64)).sum() * inv
        a = gstd / ((n - 1) * sd)
        coefs = torch.stack([stats[0], a, torch.zeros_like(a)])
        gx = torch.empty_like(xd)
        gf = gx if dt == 1.0 else torch.empty_like(xd)  # (grad_f = dt*grad_x: one write)
        be.z_std_bwd(_flat(xd), _flat(fd), _flat(g), dt, coefs, _flat(gx),
                     None if gf is gx else _flat(gf))
    return gx, gf, grad_coef


def _std_bwd_host(g, xd, fd, dt, coef, seed, stats, be, need_xf, need_coef):
    """_std_bwd's arithmetic with the few scalars as Python floats (CPU: no sync to avoid), so
    a small tensor's backward is two kernels and two small ops instead of about fifteen ops;
    grad_f is grad_x itself when dt == 1."""
    n = xd.numel()
    mean, sd = stats.tolist()
    inv = 1.0 / math.sqrt(dt)
    _, _, gs = _run_bwd(g, None, dt, 0.0, _sigma_eff_host(coef, sd, dt, xd.dtype), seed, 0,
                        "none", be, False, True)
    grad_coef = gs * (sd * inv) if need_coef else None
    gx = gf = None
    if need_xf:
        c = coef.detach().reshape(-1)
        gsl = gs.tolist()
        cl = c.tolist() if c.numel() == len(gsl) else c.tolist() * len(gsl)
        gstd = math.fsum(a * b for a, b in zip(gsl, cl)) * inv
        a = gstd / ((n - 1) * sd)
        gx = torch.empty_like(xd)
        gf = gx if dt == 1.0 else torch.empty_like(xd)
        coefs = torch.tensor([mean, a, 0.0], dtype=torch.float64)  # (the backends' contract)
        be.z_std_bwd(_flat(xd), _flat(fd), _flat(g), dt, coefs, _flat(gx),
                     None if gf is gx else _flat(gf))
    return gx, gf, grad_coef


def _std_bwd_one_call(g, xd, fd, y, dt, coef, seed, mean, sd, be, need_xf, need_coef):
    """_std_bwd on a backend with std_step_bwd (one call: sum g eps, then the elementwise pass;
    grad_f is grad_x itself when dt == 1); g laid out like xd."""
    c = C.sigma_for_kernel(coef, xd.dtype)
    ch, cs = C.channel_map(xd, c)
    if y is not None and (y.dtype != xd.dtype or y.shape != xd.shape
                          or y.stride() != xd.stride()):
        y = None  # (not the forward's output layout: regenerate eps)
    gx = torch.empty_like(xd) if need_xf else None
    gf = (gx if dt == 1.0 else torch.empty_like(xd)) if need_xf else None
    gc = torch.empty(c.numel(), dtype=torch.float32) if need_coef else None
    be.std_step_bwd(g, y, xd, fd, gx, None if gf is gx else gf, gc, dt, c, ch, cs, seed, 0,
                    mean, sd)
    return gx, gf, gc


def _coef_grad(gc, coef):
    gc = gc if gc.shape == coef.shape else gc.reshape(coef.shape)
    return gc if gc.dtype == coef.dtype else gc.to(coef.dtype)


# -- the custom op (torch.compile / export) -----------------------------------------------------

@torch.library.custom_op("cdkernels::cd_std_step", mutates_args=())
def cd_std_step_op(x: Tensor, f: Tensor, dt: float, coef: Tensor, seed: Tensor,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(y, stats) with stats = float64 [mean(z), std(z)]."""
    return _std_fwd(x, f, dt, coef, seed, get_backend(x.device, x.dtype, backend or None))


@cd_std_step_op.register_fake
def _(x, f, dt, coef, seed, backend):
    return torch.empty_like(x), x.new_empty(2, dtype=torch.float64)


@torch.library.custom_op("cdkernels::cd_std_step_backward", mutates_args=())
def cd_std_step_backward_op(grad_y: Tensor, x: Tensor, f: Tensor, y: Optional[Tensor], dt: float,
                            coef: Tensor, seed: Tensor, stats: Tensor, backend: str,
                            need_xf: bool, need_coef: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_f, grad_coef); grad_f is empty when dt == 1 (it is grad_x: a custom op's
    outputs may not alias each other, and a copy would cost a pass), unneeded ones empty."""
    gx, gf, gc = _std_bwd(grad_y, x, f, dt, coef, seed, stats,
                          get_backend(x.device, x.dtype, backend or None), need_xf, need_coef, y)
    e = x.new_empty(0)
    gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if dt == 1.0:
        gf = None
    return (e if gx is None else gx, e.clone() if gf is None else gf,
            x.new_empty(0, dtype=gdt) if gc is None else gc)


@cd_std_step_backward_op.register_fake
def _(grad_y, x, f, y, dt, coef, seed, stats, backend, need_xf, need_coef):
    gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.empty_like(x) if need_xf else x.new_empty(0),
            torch.empty_like(x) if need_xf and dt != 1.0 else x.new_empty(0),
            x.new_empty(coef.numel() if need_coef else 0, dtype=gdt))


def _setup_context(ctx, inputs, output):
    x, f, dt, coef, seed, backend = inputs
    ctx.dt, ctx.backend = dt, backend
    # y too: the CPU backend reads eps back from it (no memory of its own in a network: the
    # next layer keeps it for its backward anyway)
    ctx.save_for_backward(x, f, coef, seed, output[1], output[0])


def _backward(ctx, grad_y, _grad_stats):
    x, f, coef, seed, stats, y = ctx.saved_tensors
    need_xf = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    need_coef = ctx.needs_input_grad[3]
    gx, gf, gc = cd_std_step_backward_op(grad_y, x, f, y, ctx.dt, coef, seed, stats,
                                         ctx.backend, need_xf, need_coef)
    if ctx.dt == 1.0:
        gf = gx  # (the op returns it once)
    return (gx if ctx.needs_input_grad[0] else None, gf if ctx.needs_input_grad[1] else None,
            None, _coef_grad(gc, coef) if need_coef else None, None, None)


cd_std_step_op.register_autograd(_backward, setup_context=_setup_context)


# -- the eager fast path (see cd_step.py) ------------------------------------------------------

class _StdStepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, coef, meta):
        dt, seed, seed_int, be = meta
        y, stats = _std_fwd(x, f, dt, coef, seed, be)
        ctx.dt, ctx.be, ctx.seed_int = dt, be, seed_int
        # y: as _setup_context; a CPU seed buffer is reused by the next call: keep its value
        # (seed_int) instead, as cd_step does
        ctx.save_for_backward(x, f, coef, seed if seed_int is None else None, stats, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, f, coef, seed, stats, y = ctx.saved_tensors
        need_xf = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_coef = ctx.needs_input_grad[2]
        if seed is None:
            seed = C.cpu_seed_buffer_signed(ctx.seed_int)
        gx, gf, gc = _std_bwd(grad_y, x, f, ctx.dt, coef, seed, stats, ctx.be, need_xf,
                              need_coef, y)
        return (gx if ctx.needs_input_grad[0] else None, gf if ctx.needs_input_grad[1] else None,
                _coef_grad(gc, coef) if need_coef else None, None)


_STD_APPLY = raw_apply(_StdStepFn)


def cd_std_step(x: Tensor, f: Tensor, dt: float, coef: Union[float, Tensor], *,
                seed: Union[None, int, Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """``x + dt*f + coef * std(x + dt*f) * eps``, eps ~ N(0, I) from cd_step's stream.

    Args:
        x, f: same shape, device and float dtype (float64 runs on the reference backend).
        dt: step size > 0.
        coef: float >= 0, or a tensor (1 element, or one value per channel = x.shape[1]),
            learnable: its gradient and the gradient through std are exact.
        seed, backend: as for :func:`cdkernels.cd_step` (the noise is cd_step's eps for that
            seed: ``cd_std_step(x, f, dt, c, seed=s) == cd_step(x, f, dt, c*std/sqrt(dt),
            seed=s)``).
    """
    C.check_float_tensor(x, "x")
    C.check_float_tensor(f, "f")
    C.check_same(x, f, "x", "f")
    dt = C.check_nonneg_number(dt, "dt")
    if dt == 0:
        raise ValueError("dt must be > 0 for cd_std_step (the noise is coef*std, sigma = "
                         "coef*std/sqrt(dt))")
    _, coef_t = C.sigma_args(coef, x)
    if coef_t is None:
        coef_t = torch.tensor(float(coef), device=x.device,
                              dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if backend is not None:
        from .backends import _check_name
        _check_name(backend)
    if _eager_ok(x, f) and type(coef_t) in _PLAIN:
        be = get_backend(x.device, x.dtype, backend)
        grad = torch.is_grad_enabled() and (x.requires_grad or f.requires_grad
                                            or coef_t.requires_grad)
        seed_t, seed_int = C.eager_seed(seed, x, grad)  # (as cd_step's eager path)
        if grad:
            return _STD_APPLY(x, f, coef_t, (dt, seed_t, seed_int, be))
        return _std_fwd(x, f, dt, coef_t, seed_t, be)[0]
    return cd_std_step_op(x, f, dt, coef_t, C.make_seed(seed, x.device), backend or "")[0]
