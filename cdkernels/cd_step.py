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


def _run_fwd(x, f, dt, sigma_value, sigma, seed, offset, activation, be):
    """Allocate y like x and run the forward kernel of backend instance ``be``."""
    y = C.empty_output(x)
    if x.numel() == 0:
        return y
    if x.is_contiguous() and f.is_contiguous() and y.is_contiguous():
        # the common case: no layout work; plain 1-D views, or the tensors themselves for a
        # backend that only reads data_ptr/numel (a view costs ~1 us of host time each)
        if be.accepts_contiguous_nd:
            xf, ff, yf = x, f, y
        else:
            xf, ff, yf = x.view(-1), f.view(-1), y.view(-1)
    else:
        xf, ff, yf = C.flat(C.like(C.dense_input(x), y)), C.flat(C.like(f, y)), C.flat(y)
    ch, cs = C.channel_map(y, sigma)
    be.cd_step_fwd(xf, ff, yf, dt, C.sigma_for_kernel(sigma, x.dtype), sigma_value, ch, cs,
                   seed, offset, activation)
    return y


def _run_bwd(grad_y, y, dt, sigma_value, sigma, seed, offset, activation, be, need_inputs,
             need_sigma):
    """(grad_x, grad_f, grad_sigma): grad_sigma is the finished [C] gradient (times sqrt(dt)),
    float32 (float64 for float64 data); unneeded outputs are empty tensors."""
    # outputs follow y's layout (dense: the forward allocated it), else grad_y's dense layout
    if y is not None and grad_y.stride() == y.stride() and y.is_contiguous():
        g, ref = grad_y, y
    else:
        g = C.dense_input(grad_y)
        ref = g if y is None else y
        g = C.like(g, ref)
    ch, cs = C.channel_map(ref, sigma)
    grad_x = C.empty_output(ref) if need_inputs else grad_y.new_empty(0)
    grad_f = C.empty_output(ref) if need_inputs else grad_y.new_empty(0)
    gdt = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    if grad_y.numel() == 0:
        return grad_x, grad_f, grad_y.new_zeros(ch if need_sigma else 0, dtype=gdt)
    # dense tensors as they are for a backend that reads data_ptr/numel only (as _run_fwd)
    fl = (lambda t: t) if be.accepts_contiguous_nd and g.is_contiguous() else C.flat
    args = (fl(g), None if y is None else fl(y),
            fl(grad_x) if need_inputs else None, fl(grad_f) if need_inputs else None)
    rest = (dt, C.sigma_for_kernel(sigma, grad_y.dtype), sigma_value, ch, cs, seed, offset,
            activation)
    if need_sigma:
        gsig = be.cd_step_bwd_sigma(*args, ch, gdt, *rest)
    else:
        be.cd_step_bwd(*args, None, *rest)
        gsig = grad_y.new_empty(0, dtype=gdt)
    return grad_x, grad_f, gsig


@torch.library.custom_op("cdkernels::cd_step", mutates_args=())
def cd_step_op(x: Tensor, f: Tensor, dt: float, sigma_value: float, sigma: Optional[Tensor],
               seed: Tensor, offset: int, activation: str, backend: str) -> Tensor:
    return _run_fwd(x, f, dt, sigma_value, sigma, seed, offset, activation,
                    get_backend(x.device, x.dtype, backend or None))


@cd_step_op.register_fake
def _(x, f, dt, sigma_value, sigma, seed, offset, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op("cdkernels::cd_step_backward", mutates_args=())
def cd_step_backward_op(grad_y: Tensor, y: Optional[Tensor], dt: float, sigma_value: float,
                        sigma: Optional[Tensor], seed: Tensor, offset: int, activation: str,
                        backend: str, need_inputs: bool, need_sigma: bool
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_f, grad_sigma as float32 [C], already times sqrt(dt)); unneeded ones are
    empty."""
    return _run_bwd(grad_y, y, dt, sigma_value, sigma, seed, offset, activation,
                    get_backend(grad_y.device, grad_y.dtype, backend or None), need_inputs,
                    need_sigma)


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
    ctx.y_stride = output.stride()
    ctx.save_for_backward(output if activation == "relu" else None, sigma, seed)


def _backward(ctx, grad_y):
    y, sigma, seed = ctx.saved_tensors
    need_x, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_sigma = sigma is not None and ctx.needs_input_grad[4]
    grad_x = grad_f = grad_sigma = None
    if ctx.activation == "none":
        # d/dx = identity, d/df = dt: no kernel writes for these (only grad_sigma needs one)
        grad_x, grad_f = _identity_grads(grad_y, ctx.dt, need_x, need_f)
        if not need_sigma:
            return grad_x, grad_f, None, None, None, None, None, None, None
        need_x = need_f = False
        # eps is indexed by the output's memory order, and without a saved y the kernel takes
        # grad_y's: give it y's layout (y.sum().backward() sends an expanded, then contiguous,
        # grad_y for a channels_last y)
        grad_y = C.with_strides(grad_y, ctx.y_stride)
    gx, gf, gs = cd_step_backward_op(grad_y, y, ctx.dt, ctx.sigma_value, sigma, seed, ctx.offset,
                                     ctx.activation, ctx.backend, need_x or need_f, need_sigma)
    if need_x:
        grad_x = gx
    if need_f:
        grad_f = gf
    if need_sigma:
        grad_sigma = _sigma_grad(gs, ctx.sigma_shape, ctx.sigma_dtype)
    return grad_x, grad_f, None, None, grad_sigma, None, None, None, None


def _identity_grads(grad_y, dt, need_x, need_f):
    """(grad_x, grad_f) of x + dt*f + noise: grad_y itself and dt*grad_y (grad_y again when
    dt == 1, as autograd does for x + f): no copies, at most one multiply."""
    grad_f = None
    if need_f:
        grad_f = grad_y if dt == 1.0 else grad_y * dt
    return (grad_y if need_x else None), grad_f


def _sigma_grad(gs, shape, dtype):
    """The kernel's [C] float32 sigma gradient in sigma's shape and dtype (views/no-ops when
    they already match)."""
    gs = gs if gs.shape == shape else gs.reshape(shape)
    return gs if gs.dtype == dtype else gs.to(dtype)


cd_step_op.register_autograd(_backward, setup_context=_setup_context)


# -- the eager fast path ---------------------------------------------------------------------
# The custom op above is what torch.compile / export / opcheck see. Called eagerly, its
# dispatcher layers (custom_op wrapper, autograd registration, schema checks) cost ~20 us per
# call, more than a small tensor's kernel. So an eager call with plain tensors goes straight to
# the backend (no grad needed) or through this autograd.Function (grad needed). Both run
# _run_fwd/_run_bwd, the same code the op runs: outputs and gradients are identical
# (tests/test_fast_path.py checks it).

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_jit_tracing = torch._C._get_tracing_state


def _eager_ok(x, f) -> bool:
    """True when nothing but plain eager autograd is watching: not tracing/compiling (dynamo,
    torch.jit.trace), no functorch transform (vmap, grad), no dispatch or function mode, no
    tensor subclass."""
    return (type(x) in _PLAIN and type(f) in _PLAIN and not _is_compiling()
            and _peek_functorch() is None and not _dispatch_modes() and not _function_mode()
            and not _jit_tracing())


class _CDStepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, sigma, meta):
        dt, sigma_value, seed, seed_int, act, be = meta
        y = _run_fwd(x, f, dt, sigma_value, sigma, seed, 0, act, be)
        ctx.dt, ctx.sigma_value, ctx.act, ctx.be = dt, sigma_value, act, be
        ctx.seed_int = seed_int
        ctx.sigma_shape = None if sigma is None else sigma.shape
        ctx.sigma_dtype = None if sigma is None else sigma.dtype
        ctx.y_stride = y.stride()
        # a CPU seed buffer is reused by the next call: keep its value (seed_int) instead
        ctx.save_for_backward(y if act == "relu" else None, sigma,
                              seed if seed_int is None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, sigma, seed = ctx.saved_tensors
        need_x, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_sigma = sigma is not None and ctx.needs_input_grad[2]
        grad_x = grad_f = None
        if ctx.act == "none":  # as _backward: identity grads, a kernel for grad_sigma only
            grad_x, grad_f = _identity_grads(grad_y, ctx.dt, need_x, need_f)
            if not need_sigma:
                return grad_x, grad_f, None, None
            need_x = need_f = False
            grad_y = C.with_strides(grad_y, ctx.y_stride)  # (as _backward)
            lean = getattr(ctx.be, "cd_step_sigma_grad", None)
            if lean is not None and seed is None:
                # the learnable-sigma training case on the CPU: one kernel call, few host steps
                gs = lean(grad_y, sigma, ctx.seed_int, ctx.dt)
                if gs is not None:
                    return (grad_x, grad_f, _sigma_grad(gs, ctx.sigma_shape, ctx.sigma_dtype),
                            None)
        if seed is None:  # (a CPU call: its seed's value into this thread's seed buffer)
            seed = C.cpu_seed_buffer_signed(ctx.seed_int)
        gx, gf, gs = _run_bwd(grad_y, y, ctx.dt, ctx.sigma_value, sigma, seed, 0, ctx.act,
                              ctx.be, need_x or need_f, need_sigma)
        return (gx if need_x else grad_x, gf if need_f else grad_f,
                _sigma_grad(gs, ctx.sigma_shape, ctx.sigma_dtype) if need_sigma else None, None)


_INF = float("inf")


def raw_apply(fn_cls):
    """The C++ ``apply`` of an autograd.Function, skipping Function.apply's Python wrapper
    (functorch bookkeeping: ~30 us per call on the dev VM). Only valid where _eager_ok holds
    (no functorch transform active), which is where the fast paths call it."""
    return super(torch.autograd.Function, fn_cls).apply


_CDSTEP_APPLY = raw_apply(_CDStepFn)


def _cd_step_eager(x, f, dt, sigma, act, seed, backend):
    # The common argument kinds are checked inline (attribute reads cost ~0.3 us each here);
    # anything unusual goes through the full checks, which raise the documented errors.
    dtype, dev = x.dtype, x.device
    if not (f.dtype == dtype and dtype in C.FLOAT_DTYPES and f.shape == x.shape
            and f.device == dev):
        C.check_float_tensor(x, "x")
        C.check_float_tensor(f, "f")
        C.check_same(x, f, "x", "f")
    if not (type(dt) is float and 0.0 <= dt < _INF):
        dt = C.check_nonneg_number(dt, "dt")
    if type(sigma) is float and 0.0 <= sigma < _INF:
        sigma_value, sigma_t = sigma, None
    else:
        sigma_value, sigma_t = C.sigma_args(sigma, x)
    act = "none" if act is None else act if act in ACTIVATIONS else C.check_activation(
        act, ACTIVATIONS)
    be = get_backend(dev, dtype, backend)
    grad = torch.is_grad_enabled() and (x.requires_grad or f.requires_grad or (
        sigma_t is not None and sigma_t.requires_grad))
    # (CPU: the per-thread seed buffer; backward rebuilds it from seed_int)
    seed_t, seed_int = C.eager_seed(seed, x, grad)
    if not grad:
        return _run_fwd(x, f, dt, sigma_value, sigma_t, seed_t, 0, act, be)
    # non-tensor arguments packed in one tuple: apply() walks its arguments (~1 us each)
    return _CDSTEP_APPLY(x, f, sigma_t, (dt, sigma_value, seed_t, seed_int, act, be))


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
    if _eager_ok(x, f) and (not isinstance(sigma, torch.Tensor) or type(sigma) in _PLAIN):
        return _cd_step_eager(x, f, dt, sigma, activation, seed, backend)
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
