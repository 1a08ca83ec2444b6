"""The noise stream itself (docs/noise.md), so users and tests can see exactly what the ops add."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._common import check_offset, make_seed
from .backends import get_backend

Tensor = torch.Tensor


def _shape(shape) -> tuple:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    return shape


def _sample(sample) -> int:
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < (1 << 32):
        raise ValueError(f"sample must be an int in [0, 2**32), got {sample!r}")
    return sample


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def normal(shape: Union[int, Sequence[int]], seed: Union[int, Tensor], *, offset: int = 0,
           sample: int = 0, dtype: torch.dtype = torch.float32, device=None,
           backend: Optional[str] = None) -> Tensor:
    """Standard normals of stream (seed, offset, sample), elements 0..numel-1 in row-major order.

    ``cd_step(x, ..., seed=s)`` on a contiguous x adds exactly ``normal(x.shape, s, dtype=x.dtype)``
    (times sigma*sqrt(dt)). float16/bfloat16 select the 16-bit stream (docs/noise.md 3b: eight
    normals per Philox call, cut at 4.855 sigma); float32/float64 the float32 stream (section 3).
    ``offset`` counts Philox blocks: 4 elements each in the float32 stream, 8 in the 16-bit one."""
    shape, device = _shape(shape), _device(device)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        get_backend(device, dtype, backend).normal(
            out.view(-1), make_seed(seed, device), check_offset(offset), _sample(sample))
    return out


def uniform(shape, seed, *, offset: int = 0, sample: int = 0, device=None,
            backend: Optional[str] = None) -> Tensor:
    """The float32 uniforms U(w) = (2*(w >> 9) + 1) * 2^-24 of the stream's words (one per
    element, word e % 4 of block offset + e // 4)."""
    shape, device = _shape(shape), _device(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel():
        get_backend(device, torch.float32, backend).uniform(
            out.view(-1), make_seed(seed, device), check_offset(offset), _sample(sample))
    return out


def philox_words(blocks: int, seed, *, offset: int = 0, sample: int = 0, device=None,
                 backend: Optional[str] = None) -> Tensor:
    """int64 [blocks, 4]: the raw Philox4x32-10 words (as unsigned values) of blocks
    offset .. offset + blocks - 1 of stream (seed, sample)."""
    device = _device(device)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"blocks must be a non-negative int, got {blocks!r}")
    out = torch.empty(4 * blocks, dtype=torch.int32, device=device)
    if blocks:
        get_backend(device, torch.float32, backend).philox_words(
            out, make_seed(seed, device), check_offset(offset), _sample(sample))
    return (out.to(torch.int64) & 0xFFFFFFFF).reshape(blocks, 4)
