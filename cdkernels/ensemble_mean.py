"""ensemble_mean: average K replicas' predictions in one pass over the input.

Input (K*B, C) with the K replicas stacked along dim 0 (replica k is rows k*B .. k*B+B-1, as
``x.repeat(K, ...)`` produces), or (K, B, C). Output (B, C) in the input's dtype, accumulated in
float32:
    prob:    mean_k softmax(z_k)
    logit:   mean_k z_k
    logprob: log(mean_k softmax(z_k)), evaluated with log-sum-exp (never overflows; the
             natural target for NLL training of an averaged prediction).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as C
from .backends import get_backend
from .cd_step import _eager_ok

Tensor = torch.Tensor
SPACES = ("prob", "logit", "logprob")


@torch.library.custom_op("cdkernels::ensemble_mean", mutates_args=())
def ensemble_mean_op(inp: Tensor, space: str, backend: str) -> Tensor:
    return _ens_fwd(inp, space, backend)


def _ens_fwd(inp, space, backend):
    K, B, Cn = inp.shape
    out = inp.new_empty((B, Cn))
    if out.numel():
        get_backend(inp.device, inp.dtype, backend or None).ensemble_mean_fwd(
            inp.contiguous(), out, space)
    return out


@ensemble_mean_op.register_fake
def _(inp, space, backend):
    return inp.new_empty(inp.shape[1:])


@torch.library.custom_op("cdkernels::ensemble_mean_backward", mutates_args=())
def ensemble_mean_backward_op(grad_out: Tensor, inp: Tensor, out: Tensor, space: str,
                              backend: str) -> Tensor:
    grad_in = torch.empty_like(inp, memory_format=torch.contiguous_format)
    if grad_in.numel():
        get_backend(inp.device, inp.dtype, backend or None).ensemble_mean_bwd(
            grad_out.contiguous(), inp.contiguous(), out.contiguous(), grad_in, space)
    return grad_in


@ensemble_mean_backward_op.register_fake
def _(grad_out, inp, out, space, backend):
    return torch.empty_like(inp, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    inp, space, backend = inputs
    ctx.space, ctx.backend = space, backend
    ctx.save_for_backward(inp, output)


def _backward(ctx, grad_out):
    inp, out = ctx.saved_tensors
    return ensemble_mean_backward_op(grad_out, inp, out, ctx.space, ctx.backend), None, None


ensemble_mean_op.register_autograd(_backward, setup_context=_setup_context)


def ensemble_mean(outputs: Tensor, *, replicas: int, space: str = "prob",
                  backend: Optional[str] = None) -> Tensor:
    """Mean over ``replicas`` stacked predictions: (K*B, C) or (K, B, C) -> (B, C).

    ``space``: "prob" (mean of softmax), "logit" (mean of logits) or "logprob" (log of the
    mean probability, stable for any logits)."""
    C.check_float_tensor(outputs, "outputs")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if space not in SPACES:
        raise ValueError(f"space={space!r} must be one of {', '.join(map(repr, SPACES))}")
    if outputs.dim() == 3:
        if outputs.shape[0] != replicas:
            raise ValueError(f"outputs of shape {tuple(outputs.shape)} hold "
                             f"{outputs.shape[0]} replicas along dim 0, but replicas={replicas}")
        inp = outputs
    elif outputs.dim() == 2:
        if outputs.shape[0] % replicas:
            raise ValueError(f"the batch dimension of outputs ({outputs.shape[0]}) is not "
                             f"divisible by replicas={replicas}")
        inp = outputs.reshape(replicas, outputs.shape[0] // replicas, outputs.shape[1])
    else:
        raise ValueError(f"outputs must be (K*B, C) or (K, B, C), got shape "
                         f"{tuple(outputs.shape)}")
    if backend is not None:
        from .backends import _check_name
        _check_name(backend)
    if not (torch.is_grad_enabled() and inp.requires_grad) and _eager_ok(inp, inp):
        # eager, nothing to differentiate: the op's body without the dispatcher (~20 us, as
        # much as the kernel for small ensembles)
        return _ens_fwd(inp, space, backend or "")
    return ensemble_mean_op(inp, space, backend or "")
