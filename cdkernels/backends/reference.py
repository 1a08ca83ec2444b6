"""Pure-PyTorch reference backend: the oracle every other backend is tested against.

It follows docs/noise.md literally: Philox in exact int64 arithmetic, normals evaluated in
float64 and rounded once to float32. It runs on any device and any float dtype (float64
included, which is how ``gradcheck`` exercises the ops), and favours clarity over speed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .base import Backend, Tensor

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32), without overflow:
    m is split in 16-bit halves so every partial product stays below 2^49."""
    p1 = a * (m >> 16)
    p0 = a * (m & 0xFFFF)
    t = ((p1 & 0xFFFF) << 16) + p0
    return (p1 >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor):
    """Philox4x32-10 on int64 tensors holding 32-bit unsigned values (broadcasting)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _seed_key(seed: Tensor) -> Tuple[Tensor, Tensor]:
    s = seed.reshape(-1)[:1].to(torch.int64)
    return s & _MASK32, (s >> 32) & _MASK32


def stream_words(seed: Tensor, offset: int, sample: int, n_blocks: int, device) -> Tensor:
    """int64 [n_blocks, 4]: the words of blocks offset .. offset+n_blocks-1."""
    k0, k1 = _seed_key(seed.to(device))
    # block = offset + i as (lo, hi) words; offset may exceed 2^63 - 2^32 only in theory.
    i = torch.arange(n_blocks, device=device, dtype=torch.int64)
    off_lo, off_hi = offset & _MASK32, offset >> 32
    lo = i + off_lo  # < 2^33
    c0 = lo & _MASK32
    c1 = ((lo >> 32) + off_hi) & _MASK32
    c2 = torch.full_like(c0, sample & _MASK32)
    c3 = torch.zeros_like(c0)
    w = philox4x32_10(c0, c1, c2, c3, k0, k1)
    return torch.stack(w, dim=1)


def words_to_uniform64(w: Tensor) -> Tensor:
    """U(w) = (2*(w>>9)+1) * 2^-24, exactly, as float64."""
    return ((w >> 9) * 2 + 1).to(torch.float64) * 2.0 ** -24


def stream_normals64(seed: Tensor, offset: int, sample: int, n: int, device) -> Tensor:
    """float64 [n]: the exact (float64) Box-Muller values of stream elements 0..n-1."""
    nb = (n + 3) // 4
    u = words_to_uniform64(stream_words(seed, offset, sample, nb, device))
    r01 = torch.sqrt(-2.0 * torch.log(u[:, 0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[:, 2]))
    a01 = (2.0 * math.pi) * u[:, 1]
    a23 = (2.0 * math.pi) * u[:, 3]
    out = torch.stack([r01 * torch.cos(a01), r01 * torch.sin(a01),
                       r23 * torch.cos(a23), r23 * torch.sin(a23)], dim=1)
    return out.reshape(-1)[:n]


def stream_normals(seed: Tensor, offset: int, sample: int, n: int, device, dtype) -> Tensor:
    """The spec's float32 stream (section 3): float64 values rounded once to float32 (then to a
    16-bit dtype: only cd_smooth uses this stream for 16-bit data). For float64 callers the
    float32 values are widened, so every dtype sees one stream."""
    eps = stream_normals64(seed, offset, sample, n, device).to(torch.float32)
    return eps.to(dtype)


IS_16BIT = (torch.float16, torch.bfloat16)


def stream_normals16_64(seed: Tensor, offset: int, sample: int, n: int, device) -> Tensor:
    """float64 [n]: the exact values of the 16-bit stream (docs/noise.md section 3b): eight
    per block, two per word; the low half of word j sets the radius of lanes 2j and 2j+1, the
    high half their angle; U16(h) = (2h+1) * 2^-17."""
    nb = (n + 7) // 8
    w = stream_words(seed, offset, sample, nb, device)        # [nb, 4]
    ur = ((w & 0xFFFF) * 2 + 1).to(torch.float64) * 2.0 ** -17
    ua = ((w >> 16) * 2 + 1).to(torch.float64) * 2.0 ** -17
    r = torch.sqrt(-2.0 * torch.log(ur))
    a = (2.0 * math.pi) * ua
    out = torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=2)  # [nb, 4 words, 2]
    return out.reshape(-1)[:n]


def stream_normals16(seed: Tensor, offset: int, sample: int, n: int, device,
                     dtype) -> Tensor:
    """The 16-bit stream's elements: float64 values rounded to float32, then to ``dtype``
    (float16 or bfloat16; nearest even both times)."""
    if dtype not in IS_16BIT:
        raise ValueError(f"the 16-bit stream is defined for float16/bfloat16, not {dtype}")
    return stream_normals16_64(seed, offset, sample, n, device).to(torch.float32).to(dtype)


def step_normals(seed: Tensor, offset: int, n: int, device, data_dtype, compute_dtype):
    """The ε that cd_step / cd_std_step add to data of ``data_dtype`` (and that
    ``cdkernels.normal(..., dtype=data_dtype)`` returns), in ``compute_dtype``: the 16-bit
    stream for 16-bit data, the float32 stream otherwise."""
    if data_dtype in IS_16BIT:
        return stream_normals16(seed, offset, 0, n, device, data_dtype).to(compute_dtype)
    return stream_normals(seed, offset, 0, n, device, compute_dtype)


# -- activations, on the compute dtype -----------------------------------------------------------

def act_fwd(z: Tensor, act: str) -> Tensor:
    if act == "none":
        return z
    if act == "relu":
        return torch.clamp_min(z, 0)
    if act == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "softplus":
        return torch.clamp_min(z, 0) + torch.log1p(torch.exp(-z.abs()))
    raise ValueError(f"unknown activation {act!r}")


def act_grad(z: Tensor, act: str) -> Tensor:
    if act == "none":
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if act == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s)
    if act == "softplus":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {act!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sigma_per_element(n: int, sigma: Optional[Tensor], sigma_value: float, C: int,
                       chan_stride: int, device, dtype):
    if sigma is None:
        return sigma_value
    p = torch.arange(n, device=device, dtype=torch.int64)
    return sigma.to(device=device, dtype=dtype)[(p // chan_stride) % C]


def _channel_sum(v: Tensor, C: int, chan_stride: int) -> Tensor:
    """Sum of v (flat, float64) per channel c = (p // chan_stride) % C -> float64 [C]."""
    p = torch.arange(v.numel(), device=v.device, dtype=torch.int64)
    out = torch.zeros(C, device=v.device, dtype=torch.float64)
    return out.index_add_(0, (p // chan_stride) % C, v.to(torch.float64))


class ReferenceBackend(Backend):
    name = "reference"

    def availability(self):
        return True, "pure PyTorch (the oracle; slow)"

    def supports(self, device: torch.device) -> bool:
        return True

    # -- noise ------------------------------------------------------------------------------
    def philox_words(self, out, seed, offset, sample):
        w = stream_words(seed, offset, sample, out.numel() // 4, out.device).reshape(-1)
        out.copy_(torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32))

    def uniform(self, out, seed, offset, sample):
        n = out.numel()
        w = stream_words(seed, offset, sample, (n + 3) // 4, out.device).reshape(-1)[:n]
        out.copy_(words_to_uniform64(w).to(torch.float32))

    def normal(self, out, seed, offset, sample):
        if out.dtype in IS_16BIT:
            out.copy_(stream_normals16(seed, offset, sample, out.numel(), out.device, out.dtype))
        else:
            out.copy_(stream_normals(seed, offset, sample, out.numel(), out.device, out.dtype))

    # -- cd_step ----------------------------------------------------------------------------
    def cd_step_fwd(self, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset, act):
        cdt = _compute_dtype(x.dtype)
        n = x.numel()
        eps = step_normals(seed, offset, n, x.device, x.dtype, cdt)
        s = _sigma_per_element(n, sigma, sigma_value, C, chan_stride, x.device, cdt)
        z = x.to(cdt) + dt * f.to(cdt) + (s * math.sqrt(dt)) * eps
        y.copy_(act_fwd(z, act))

    def cd_step_bwd(self, grad_y, y, grad_x, grad_f, grad_sigma, dt, sigma, sigma_value, C,
                    chan_stride, seed, offset, act):
        cdt = _compute_dtype(grad_y.dtype)
        gz = grad_y.to(cdt)
        if act == "relu":
            gz = gz * (y > 0).to(cdt)
        if grad_x is not None:
            grad_x.copy_(gz)
        if grad_f is not None:
            grad_f.copy_(dt * gz)
        if grad_sigma is not None:
            eps = step_normals(seed, offset, gz.numel(), gz.device, grad_y.dtype, cdt)
            grad_sigma.add_(_channel_sum(gz * eps, C, chan_stride).to(grad_sigma.dtype))

    # -- cd_smooth --------------------------------------------------------------------------
    def cd_smooth_fwd(self, x, y, sigma, sigma_value, C, chan_stride, samples, seed, offset, act):
        cdt = _compute_dtype(x.dtype)
        n = x.numel()
        s = _sigma_per_element(n, sigma, sigma_value, C, chan_stride, x.device, cdt)
        xc = x.to(cdt)
        acc = torch.zeros_like(xc)
        for k in range(samples):
            acc += act_fwd(xc + s * stream_normals(seed, offset, k, n, x.device, cdt), act)
        y.copy_(acc / samples)

    def cd_smooth_bwd(self, grad_y, x, grad_x, grad_sigma, sigma, sigma_value, C, chan_stride,
                      samples, seed, offset, act):
        cdt = _compute_dtype(x.dtype)
        n = x.numel()
        s = _sigma_per_element(n, sigma, sigma_value, C, chan_stride, x.device, cdt)
        xc, g = x.to(cdt), grad_y.to(cdt)
        dx = torch.zeros_like(xc)
        ds = torch.zeros_like(xc) if grad_sigma is not None else None
        for k in range(samples):
            eps = stream_normals(seed, offset, k, n, x.device, cdt)
            d = act_grad(xc + s * eps, act)
            dx += d
            if ds is not None:
                ds += d * eps
        grad_x.copy_(g * dx / samples)
        if grad_sigma is not None:
            grad_sigma.add_(_channel_sum(g * ds / samples, C, chan_stride).to(grad_sigma.dtype))

    # -- ensemble_mean ----------------------------------------------------------------------
    def ensemble_mean_fwd(self, inp, out, space):
        z = inp.to(_compute_dtype(inp.dtype))
        K = z.shape[0]
        if space == "logit":
            r = z.mean(0)
        elif space == "prob":
            r = torch.softmax(z, dim=-1).mean(0)
        elif space == "logprob":
            r = torch.logsumexp(torch.log_softmax(z, dim=-1), dim=0) - math.log(K)
        else:
            raise ValueError(f"unknown space {space!r}")
        out.copy_(r)

    def ensemble_mean_bwd(self, grad_out, inp, out, grad_in, space):
        cdt = _compute_dtype(inp.dtype)
        z, g = inp.to(cdt), grad_out.to(cdt).unsqueeze(0)
        K = z.shape[0]
        if space == "logit":
            grad_in.copy_((g / K).expand_as(z))
            return
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        p = torch.exp(z - lse)
        if space == "prob":
            gi = p * (g - (g * p).sum(-1, keepdim=True)) / K
        elif space == "logprob":
            # a 16-bit `out` is rounded: recompute log(mean p) in the compute dtype instead
            out_c = out.to(cdt) if out.dtype == cdt else (
                torch.logsumexp(z - lse, dim=0) - math.log(K))
            q = g * torch.exp(z - lse - out_c.unsqueeze(0))
            gi = (q - p * q.sum(-1, keepdim=True)) / K
        else:
            raise ValueError(f"unknown space {space!r}")
        grad_in.copy_(gi)
