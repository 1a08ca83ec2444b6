"""cd_step: one fused Euler–Maruyama residual update ``act(x + dt*f + sigma*sqrt(dt)*eps)``.

The op is a ``torch.library`` custom op (``cdkernels::cd_step``) with a fake (meta) kernel and
an autograd formula. Noise is never stored: forward draws eps in-kernel from the Philox stream
of a seed tensor, backward regenerates the same eps from the saved seed (only when sigma needs a
gradient). With relu the output y is saved (relu'(z) = y > 0): one tensor of x's size.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _common as C
from .backends import get_backend

Tensor = torch.Tensor
ACTIVATIONS = ("none", "relu")


def _run_fwd(x, f, dt, sigma_value, sigma, seed, offset, activation, backend):
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    xd = C.like(C.dense_input(x), y)
    fd = C.like(f, y)
    ch, cs = C.channel_map(y, sigma)
    get_backend(x.device, x.dtype, backend or None).cd_step_fwd(
        C.flat(xd), C.flat(fd), C.flat(y), dt, C.sigma_for_kernel(sigma, x.dtype), sigma_value,
        ch, cs, seed, offset, activation)
    return y


@torch.library.custom_op("cdkernels::cd_step", mutates_args=())
def cd_step_op(x: Tensor, f: Tensor, dt: float, sigma_value: float, sigma: Optional[Tensor],
               seed: Tensor, offset: int, activation: str, backend: str) -> Tensor:
    return _run_fwd(x, f, dt, sigma_value, sigma, seed, offset, activation, backend)


@cd_step_op.register_fake
def _(x, f, dt, sigma_value, sigma, seed, offset, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op("cdkernels::cd_step_backward", mutates_args=())
def cd_step_backward_op(grad_y: Tensor, y: Optional[Tensor], dt: float, sigma_value: float,
                        sigma: Optional[Tensor], seed: Tensor, offset: int, activation: str,
                        backend: str, need_inputs: bool, need_sigma: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_f, sum_per_channel(grad_z * eps) as float32 [C]); unneeded ones are empty."""
    # outputs follow y's layout (dense: the forward allocated it), else grad_y's dense layout
    g = C.dense_input(grad_y)
    ref = g if y is None else y
    g = C.like(g, ref)
    ch, cs = C.channel_map(ref, sigma)
    grad_x = torch.empty_like(ref) if need_inputs else grad_y.new_empty(0)
    grad_f = torch.empty_like(ref) if need_inputs else grad_y.new_empty(0)
    gdt = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    gsig = torch.zeros(ch if need_sigma else 0, dtype=gdt, device=grad_y.device)
    if grad_y.numel():
        get_backend(grad_y.device, grad_y.dtype, backend or None).cd_step_bwd(
            C.flat(g), None if y is None else C.flat(y),
            C.flat(grad_x) if need_inputs else None, C.flat(grad_f) if need_inputs else None,
            gsig if need_sigma else None, dt, C.sigma_for_kernel(sigma, grad_y.dtype),
            sigma_value, ch, cs, seed, offset, activation)
    return grad_x, grad_f, gsig


@cd_step_backward_op.register_fake
def _(grad_y, y, dt, sigma_value, sigma, seed, offset, activation, backend, need_inputs,
      need_sigma):
    ref = grad_y if y is None else y
    ch = 1 if sigma is None or sigma.numel() == 1 else sigma.numel()
    e = lambda: ref.new_empty(0)  # noqa: E731
    return (torch.empty_like(ref) if need_inputs else e(),
            torch.empty_like(ref) if need_inputs else e(),
            ref.new_empty(ch if need_sigma else 0,
                          dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32))


def _setup_context(ctx, inputs, output):
    x, f, dt, sigma_value, sigma, seed, offset, activation, backend = inputs
    ctx.dt, ctx.sigma_value, ctx.offset = dt, sigma_value, offset
    ctx.activation, ctx.backend = activation, backend
    ctx.sigma_shape = None if sigma is None else sigma.shape
    ctx.sigma_dtype = None if sigma is None else sigma.dtype
    ctx.save_for_backward(output if activation == "relu" else None, sigma, seed)


def _backward(ctx, grad_y):
    y, sigma, seed = ctx.saved_tensors
    need_x, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_sigma = sigma is not None and ctx.needs_input_grad[4]
    grad_x = grad_f = grad_sigma = None
    if ctx.activation == "none" and not need_sigma:
        # d/dx = identity, d/df = dt: no kernel, no noise needed.
        grad_x = grad_y if need_x else None
        grad_f = grad_y * ctx.dt if need_f else None
        return grad_x, grad_f, None, None, None, None, None, None, None
    gx, gf, gs = cd_step_backward_op(grad_y, y, ctx.dt, ctx.sigma_value, sigma, seed, ctx.offset,
                                     ctx.activation, ctx.backend, need_x or need_f, need_sigma)
    if need_x:
        grad_x = gx
    if need_f:
        grad_f = gf
    if need_sigma:
        grad_sigma = (gs * math.sqrt(ctx.dt)).reshape(ctx.sigma_shape).to(ctx.sigma_dtype)
    return grad_x, grad_f, None, None, grad_sigma, None, None, None, None


cd_step_op.register_autograd(_backward, setup_context=_setup_context)


def cd_step(x: Tensor, f: Tensor, dt: float, sigma: Union[float, Tensor], *,
            activation: Optional[str] = None, seed: Union[None, int, Tensor] = None,
            backend: Optional[str] = None) -> Tensor:
    """``act(x + dt*f + sigma*sqrt(dt)*eps)``, eps ~ N(0, I) drawn inside the kernel.

    Args:
        x, f: same shape, device and float dtype (float32/float16/bfloat16; float64 runs on
            the reference backend). Any strides; outputs follow x's memory layout.
        dt: step size >= 0.
        sigma: float >= 0, or a tensor (1 element, or one value per channel = x.shape[1]),
            learnable: its gradient is exact.
        activation: None or "relu".
        seed: None (fresh seed from x's device generator, on device, CUDA-graph safe), an int in
            [0, 2^64) (the exact documented stream: eps = cdkernels.normal(x.shape, seed)
            for contiguous x), or an int64 device tensor with one element.
        backend: force a backend ("reference", "cpu", "cuda", "triton").
    """
    C.check_float_tensor(x, "x")
    C.check_float_tensor(f, "f")
    C.check_same(x, f, "x", "f")
    dt = C.check_nonneg_number(dt, "dt")
    sigma_value, sigma_t = C.sigma_args(sigma, x)
    act = C.check_activation(activation, ACTIVATIONS)
    if backend is not None:
        from .backends import _check_name
        _check_name(backend)
    seed_t = C.make_seed(seed, x.device)
    return cd_step_op(x, f, dt, sigma_value, sigma_t, seed_t, 0, act, backend or "")
