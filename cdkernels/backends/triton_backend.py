"""Triton backend: fused kernels with the in-kernel Philox noise of docs/noise.md.

Runs on CUDA tensors (compiled) and, with ``TRITON_INTERPRET=1`` set *before* this module is
imported, on CPU tensors through Triton's interpreter (slow; used by the tests on CPU-only
machines). Importing this module never raises; without Triton ``availability()`` says why.

Layout of the elementwise kernels
---------------------------------
A program owns ``BLOCK`` consecutive Philox blocks, i.e. the ``4*BLOCK`` consecutive elements
``[pid*4*BLOCK, (pid+1)*4*BLOCK)``. It computes the block indices ``b = offset + i`` (int64), the
four normals of each block as four [BLOCK] vectors, and arranges them as a [BLOCK, 4] tile whose
row ``i`` holds elements ``4*i .. 4*i+3`` (``triton_noise.lanes_to_tile``). Data is loaded and
stored as that contiguous tile, so on GPU each thread moves 4 consecutive elements (16-byte
vectors for fp32) and the Philox work is done once per 4 elements. All index math is int64.

float16 / bfloat16 data use the 16-bit stream (docs/noise.md section 3b, ``NOISE16``): the same
``4*BLOCK`` elements per program as ``BLOCK // 2`` Philox blocks of 8, a [BLOCK // 2, 8] tile
(16-byte vectors of 16-bit data; ``triton_noise.stream_normals16_tile``). Compiled kernels
evaluate it with the hardware approximations (``FAST``: lg2/sqrt/sin/cos.approx), the
interpreter with numpy's accurate functions. cd_smooth keeps the float32 stream for every dtype,
evaluated with the fast transcendentals of docs/noise.md 3c when compiled
(``triton_noise.box_muller_fast``; the interpreter runs the same construction with numpy's).
cd_step addresses its tiles as ``ptr + start + loc`` with int32 in-tile positions and an int32
mask (``_step_tile``).

Per-channel sigma / grad_sigma (element p -> channel (p // chan_stride) % C) uses one of three
compile-time strategies (``_chan_mode``):
  1  C == 1: sigma[0]; grad_sigma reduced with tl.sum, one atomic per program.
  2  chan_stride >= 4*BLOCK (e.g. contiguous NCHW with H*W >= tile): a tile spans at most two
     channel runs, so no per-element division; two tl.sum and two atomics per program.
  4  chan_stride == 1 and C a power of two <= 4*BLOCK (channels_last): the tile starts at a
     multiple of C, so channel = position in the tile & (C - 1) (C constexpr, int32, no
     division); grad_sigma summed per channel in the tile (a reshape) and C atomics per program.
  5  cd_step's mode 2 when n + 2*chan_stride + 4*BLOCK < 2^31: the same two channel runs, but
     the program's run and channel are found in int32 without an integer division (a
     multiply-high by a magic number made on the host, exact for 31-bit values), and each element is
     placed by an int32 compare of its position in the tile.
  6  mode 5 when moreover chan_stride is a multiple of the tile's row width (4, or 8 for the
     16-bit stream): runs end between rows, so the channel is chosen per row and grad_sigma is
     split over the row sums (summed in registers first), not per element.
  3  otherwise (e.g. channels_last with C not a power of two): per-element int64 div/mod,
     gathered sigma, and one fp32 atomic per element for grad_sigma. Correct but slow on GPU
     (atomic contention on C addresses).
grad_sigma accumulation order is not deterministic on GPU (fp32 atomics).
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import torch

from .base import Backend, Tensor
from .triton_noise import HAVE_TRITON, TRITON_IMPORT_ERROR

# Whether triton.jit produced interpreted functions (it decides when the kernels are defined).
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK = 256  # Philox blocks per program -> 1024 elements per program
NUM_WARPS = 4
# cd_step runs its 4*BLOCK-element programs on one warp: 32 elements per thread, so the
# per-program work (seed, channel runs, sigma loads, the grad_sigma reduction: warp shuffles,
# no shared memory or barrier) is spread over 4x the elements of NUM_WARPS (bench/sass_budget.py).
# Not CH_MODE 3 (per-element int64 div/mod): 32 elements of it per thread spill registers.
STEP_WARPS = 1


def _step_warps(mode: int) -> int:
    return NUM_WARPS if mode == 3 else STEP_WARPS
# No floating-point contraction on the GPU: every multiply-add the kernels want is an explicit
# tl.fma, and the rest rounds each product and sum on its own, as the reference and the
# interpreter (which never fuses) do. Without this, the NVIDIA backend's default (fusion on,
# TRITON_DEFAULT_FP_FUSION) would contract x + dt*f and the noise polynomials differently from
# what the tests validate.
FP_FUSION = False

_ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4, "softplus": 5}
_SPACE_CODES = {"logit": 0, "prob": 1, "logprob": 2}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_noise import (load_seed_key, log_unit, round_f32_to_16, stream_normals_tile,
                               stream_normals16_tile, stream_normals_fast_tile, stream_words,
                               lanes_to_tile,
                               to_store_dtype, word_to_uniform)

    # ---------------------------------------------------------------------------------------
    # shared helpers
    # ---------------------------------------------------------------------------------------
    @triton.jit
    def _tile_index(offset, BLOCK: tl.constexpr):
        """(b, e, start): block indices [BLOCK] (int64, offset included), element positions
        [BLOCK, 4] (int64, relative to the stream start) and the tile's first element."""
        pid = tl.program_id(0).to(tl.int64)
        i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        e = 4 * i[:, None] + tl.arange(0, 4).to(tl.int64)[None, :]
        b = tl.cast(offset, tl.int64) + i  # tl.cast, not .to: ints equal to 1 arrive as constexpr
        return b, e, pid * (4 * BLOCK)

    @triton.jit
    def _tile_index16(offset, BLOCK: tl.constexpr):
        """_tile_index for the 16-bit stream: the program's 4*BLOCK elements are BLOCK // 2
        Philox blocks of 8; b [BLOCK // 2] int64, e [BLOCK // 2, 8] int64, start."""
        R: tl.constexpr = BLOCK // 2
        pid = tl.program_id(0).to(tl.int64)
        i = pid * R + tl.arange(0, R).to(tl.int64)
        e = 8 * i[:, None] + tl.arange(0, 8).to(tl.int64)[None, :]
        b = tl.cast(offset, tl.int64) + i
        return b, e, pid * (4 * BLOCK)

    @triton.jit
    def _step_tile(offset, n, NOISE16: tl.constexpr, BLOCK: tl.constexpr):
        """(b, e, start, loc, mask) of the tile layout of the noise stream the op uses:
        [BLOCK, 4] for the float32 stream, [BLOCK // 2, 8] for the 16-bit stream (NOISE16).
        loc: int32 positions in the tile (e = start + loc); mask: loc < n - start, an int32
        compare. Address tiles as ``ptr + start + loc`` (one 64-bit scalar add, then 32-bit
        offsets) rather than ``ptr + e``: e's 64-bit arithmetic costs instructions per row."""
        if NOISE16:
            b, e, start = _tile_index16(offset, BLOCK)
        else:
            b, e, start = _tile_index(offset, BLOCK)
        W: tl.constexpr = e.shape[1]
        loc = W * tl.arange(0, e.shape[0])[:, None] + tl.arange(0, W)[None, :]
        lim = tl.minimum(n - start, 4 * BLOCK).to(tl.int32)  # start < n: in [1, 4*BLOCK]
        return b, e, start, loc, loc < lim

    @triton.jit
    def _step_noise(k0, k1, b, DT: tl.constexpr, NOISE16: tl.constexpr, FAST: tl.constexpr):
        """float32 tile of the epsilon cd_step adds (sample 0): the float32 stream, or (NOISE16)
        the 16-bit stream's element, i.e. rounded to the data's 16-bit dtype DT and widened."""
        if NOISE16:
            eps = round_f32_to_16(stream_normals16_tile(k0, k1, b, 0, FAST), DT, FAST)
            eps = eps.to(tl.float32)
        else:
            eps = stream_normals_tile(k0, k1, b, 0)
        return eps

    @triton.jit
    def _tile_chan_pow2(ROWS: tl.constexpr, W: tl.constexpr, CC: tl.constexpr):
        """CH_MODE 4 (chan_stride 1, C = CC a power of two dividing the tile): the channel of
        each element of a [ROWS, W] tile, (position in the tile) & (CC - 1) in int32. A tile
        starts at a multiple of 4*BLOCK, hence of CC, so this is (p // 1) % C with no division."""
        q = W * tl.arange(0, ROWS)[:, None] + tl.arange(0, W)[None, :]
        return q & (CC - 1)

    @triton.jit
    def _divmod_i32(a, d, mag, sh):
        """(a // d, a % d) of int32 scalars 0 <= a < 2^31, 2 <= d < 2^31, without an integer
        division: a // d = umulhi(a, mag) >> sh with the round-up magic number of _magic (exact
        for every 31-bit a; Granlund & Montgomery 1994)."""
        q = (tl.umulhi(a.to(tl.uint32), mag.to(tl.uint32)) >> sh.to(tl.uint32)).to(tl.int32)
        return q, a - q * d

    @triton.jit
    def _two_runs_i32(e, C, chan_stride, chan_div, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """CH_MODE 5 / 6: (c0, c1, first) of the program's tile: its elements are in channel c0
        where ``first`` (int32 positions in the tile below the end of the first run), else c1.
        ROWS (mode 6: chan_stride a multiple of the row width W, so the run ends between rows):
        ``first`` is per row, shape [ROWS] (row i is in c0 iff W*i < end); else [ROWS, W]."""
        start = tl.program_id(0) * (4 * BLOCK)  # int32: n < 2^31
        mag_cs, sh_cs, mag_c, sh_c = chan_div
        run, _r = _divmod_i32(start, chan_stride, mag_cs, sh_cs)
        _q, c0 = _divmod_i32(run, C, mag_c, sh_c)
        c1 = tl.where(c0 + 1 == C, 0, c0 + 1)
        end = (run + 1) * chan_stride - start  # in [1, chan_stride]
        W: tl.constexpr = e.shape[1]
        if ROWS:
            first = W * tl.arange(0, e.shape[0]) < end
        else:
            first = W * tl.arange(0, e.shape[0])[:, None] + tl.arange(0, W)[None, :] < end
        return c0, c1, first

    @triton.jit
    def _sigma_tile(sigma_ptr, sigma_value, e, start, mask, C, chan_stride, chan_div,
                    scale, HAS_SIGMA: tl.constexpr, CH_MODE: tl.constexpr, CC: tl.constexpr,
                    BLOCK: tl.constexpr):
        """sigma * scale of each element of the tile (float32; each sigma rounded to float32,
        then one float32 multiply, formed once per channel where the mode allows)."""
        if HAS_SIGMA:
            if CH_MODE == 1:
                s = (tl.load(sigma_ptr).to(tl.float32) * scale) + tl.zeros(e.shape, dtype=tl.float32)
            elif CH_MODE == 5:
                c0, c1, first = _two_runs_i32(e, C, chan_stride, chan_div, False, BLOCK)
                s0 = tl.load(sigma_ptr + c0).to(tl.float32) * scale
                s1 = tl.load(sigma_ptr + c1).to(tl.float32) * scale
                s = tl.where(first, s0, s1)
            elif CH_MODE == 6:
                c0, c1, first = _two_runs_i32(e, C, chan_stride, chan_div, True, BLOCK)
                s0 = tl.load(sigma_ptr + c0).to(tl.float32) * scale
                s1 = tl.load(sigma_ptr + c1).to(tl.float32) * scale
                s = tl.where(first[:, None], s0, s1)  # [ROWS, 1]: broadcast by the caller
            elif CH_MODE == 2:
                run = start // chan_stride
                c0 = run % C
                c1 = tl.where(c0 + 1 == C, 0, c0 + 1)  # (run + 1) % C without a third division
                s0 = tl.load(sigma_ptr + c0).to(tl.float32) * scale
                s1 = tl.load(sigma_ptr + c1).to(tl.float32) * scale
                s = tl.where(e < (run + 1) * chan_stride, s0, s1)
            elif CH_MODE == 4:
                s = tl.load(sigma_ptr + _tile_chan_pow2(e.shape[0], e.shape[1], CC)).to(tl.float32)
                s = s * scale
            else:
                c = (e // chan_stride) % C
                s = tl.load(sigma_ptr + c, mask=mask, other=0.0).to(tl.float32) * scale
        else:
            s = tl.zeros(e.shape, dtype=tl.float32) + sigma_value
        return s

    @triton.jit
    def _add2(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _sum2(t0, t1):
        """(sum of t0, sum of t1) over 2-D tiles in one tuple reduction (shared barriers)."""
        r0, r1 = tl.reduce((t0, t1), 1, _add2)
        return tl.reduce((r0, r1), 0, _add2)

    @triton.jit
    def _add_grad_sigma(gs_ptr, v, e, start, mask, C, chan_stride, chan_div,
                        CH_MODE: tl.constexpr, CC: tl.constexpr, BLOCK: tl.constexpr):
        """grad_sigma[(p // chan_stride) % C] += v[p] over the tile. v must be 0 where masked
        (the callers' masked loads give 0 there). The atomics are relaxed: only their sum
        matters, nothing is ordered by them."""
        if CH_MODE == 1:
            tl.atomic_add(gs_ptr, tl.sum(tl.sum(v, axis=1), axis=0), sem="relaxed")
        elif CH_MODE == 5:
            c0, c1, first = _two_runs_i32(e, C, chan_stride, chan_div, False, BLOCK)
            t0 = tl.where(first, v, 0.0)
            v0, v1 = _sum2(t0, v - t0)
            tl.atomic_add(gs_ptr + c0, v0, sem="relaxed")
            tl.atomic_add(gs_ptr + c1, v1, sem="relaxed")
        elif CH_MODE == 6:
            # whole rows per channel: sum the rows in registers, then split the row sums
            c0, c1, first = _two_runs_i32(e, C, chan_stride, chan_div, True, BLOCK)
            rs = tl.sum(v, axis=1)
            r0 = tl.where(first, rs, 0.0)
            v0, v1 = tl.reduce((r0, rs - r0), 0, _add2)  # rs - r0: rs or 0, exactly
            tl.atomic_add(gs_ptr + c0, v0, sem="relaxed")
            tl.atomic_add(gs_ptr + c1, v1, sem="relaxed")
        elif CH_MODE == 2:
            run = start // chan_stride
            first = e < (run + 1) * chan_stride
            t0 = tl.where(first, v, 0.0)
            v0, v1 = _sum2(t0, v - t0)
            c0 = run % C
            tl.atomic_add(gs_ptr + c0, v0, sem="relaxed")
            tl.atomic_add(gs_ptr + tl.where(c0 + 1 == C, 0, c0 + 1), v1, sem="relaxed")
        elif CH_MODE == 4:
            # tile element q has channel q % CC: rows of CC consecutive elements, summed per
            # column in the tile, then CC atomics per program (not one per element)
            per_chan = tl.sum(tl.reshape(v, (v.shape[0] * v.shape[1] // CC, CC)), axis=0)
            tl.atomic_add(gs_ptr + tl.arange(0, CC), per_chan, sem="relaxed")
        else:
            # TODO(perf): reduce in-tile per channel before the atomics (e.g. reshape to
            # [rows, C] when C * chan_stride divides 4*BLOCK), instead of one atomic per element.
            c = (e // chan_stride) % C
            tl.atomic_add(gs_ptr + c, v, mask=mask, sem="relaxed")

    @triton.jit
    def _tanh(z):
        a = tl.abs(z)
        # |z| < 0.625: cephes tanhf polynomial (no cancellation); else 1 - 2/(exp(2|z|)+1).
        q = z * z
        small = z + z * q * ((((-5.70498872745e-3 * q + 2.06390887954e-2) * q - 5.37397155531e-2) * q
                              + 1.33314422036e-1) * q - 3.33332819422e-1)
        big = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(a, 20.0)) + 1.0)  # tanh(20) == 1 in fp32
        big = tl.where(z < 0, -big, big)
        return tl.where(a < 0.625, small, big)

    @triton.jit
    def _sigmoid(z):
        ez = tl.exp(-tl.abs(z))
        d = 1.0 + ez
        return tl.where(z >= 0, 1.0 / d, ez / d)

    @triton.jit
    def _log1p_unit(u):
        """log1p(u) for u in [0, 1], accurate (Goldberg's trick on an accurate log)."""
        w = 1.0 + u
        d = w - 1.0  # exact
        return tl.where(d == 0.0, u, log_unit(w) * (u / tl.where(d == 0.0, 1.0, d)))

    @triton.jit
    def _act_fwd(z, ACT: tl.constexpr):
        if ACT == 0:
            r = z
        elif ACT == 1:
            r = tl.maximum(z, 0.0)
        elif ACT == 2:
            r = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        elif ACT == 3:
            r = _tanh(z)
        elif ACT == 4:
            r = _sigmoid(z)
        else:
            r = tl.maximum(z, 0.0) + _log1p_unit(tl.exp(-tl.abs(z)))
        return r

    @triton.jit
    def _act_grad(z, ACT: tl.constexpr):
        if ACT == 0:
            r = tl.full(z.shape, 1.0, tl.float32)
        elif ACT == 1:
            r = tl.where(z > 0, 1.0, 0.0)
        elif ACT == 2:
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            r = cdf + z * pdf
        elif ACT == 3:
            t = _tanh(z)
            r = 1.0 - t * t
        elif ACT == 4:
            s = _sigmoid(z)
            r = s * (1.0 - s)
        else:
            r = _sigmoid(z)
        return r

    # ---------------------------------------------------------------------------------------
    # noise stream
    # ---------------------------------------------------------------------------------------
    @triton.jit
    def _words_kernel(out_ptr, seed_ptr, offset, sample, nb, BLOCK: tl.constexpr):
        b, e, start = _tile_index(offset, BLOCK)
        k0, k1 = load_seed_key(seed_ptr)
        w0, w1, w2, w3 = stream_words(k0, k1, b, sample)
        w = lanes_to_tile(w0, w1, w2, w3).to(tl.int32, bitcast=True)
        tl.store(out_ptr + e, w, mask=e < 4 * nb)

    @triton.jit
    def _uniform_kernel(out_ptr, seed_ptr, offset, sample, n, BLOCK: tl.constexpr):
        b, e, start = _tile_index(offset, BLOCK)
        k0, k1 = load_seed_key(seed_ptr)
        w0, w1, w2, w3 = stream_words(k0, k1, b, sample)
        u = lanes_to_tile(word_to_uniform(w0), word_to_uniform(w1), word_to_uniform(w2),
                          word_to_uniform(w3))
        tl.store(out_ptr + e, u, mask=e < n)

    @triton.jit
    def _normal_kernel(out_ptr, seed_ptr, offset, sample, n, NOISE16: tl.constexpr,
                       FAST: tl.constexpr, BLOCK: tl.constexpr):
        k0, k1 = load_seed_key(seed_ptr)
        if NOISE16:  # float16 / bfloat16 out: the 16-bit stream, rounded to out's dtype
            b, e, start = _tile_index16(offset, BLOCK)
            eps = stream_normals16_tile(k0, k1, b, sample, FAST)
            tl.store(out_ptr + e, round_f32_to_16(eps, out_ptr.dtype.element_ty, FAST),
                     mask=e < n)
        else:
            b, e, start = _tile_index(offset, BLOCK)
            eps = stream_normals_tile(k0, k1, b, sample)
            tl.store(out_ptr + e, to_store_dtype(eps, out_ptr), mask=e < n)

    # ---------------------------------------------------------------------------------------
    # cd_step
    # ---------------------------------------------------------------------------------------
    @triton.jit
    def _cd_step_fwd_kernel(x_ptr, f_ptr, y_ptr, n, dt, sqrt_dt, sigma_ptr, coef_value, C,
                            chan_stride, mag_cs, sh_cs, mag_c, sh_c, seed_ptr, offset,
                            HAS_SIGMA: tl.constexpr,
                            CH_MODE: tl.constexpr, CC: tl.constexpr, RELU: tl.constexpr,
                            NOISE16: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        b, e, start, loc, mask = _step_tile(offset, n, NOISE16, BLOCK)
        k0, k1 = load_seed_key(seed_ptr)
        eps = _step_noise(k0, k1, b, x_ptr.dtype.element_ty, NOISE16, FAST)
        x = tl.load(x_ptr + start + loc, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + start + loc, mask=mask, other=0.0).to(tl.float32)
        if HAS_SIGMA:
            coef = _sigma_tile(sigma_ptr, 0.0, e, start, mask, C, chan_stride,
                               (mag_cs, sh_cs, mag_c, sh_c),
                               sqrt_dt, True, CH_MODE, CC, BLOCK)
        else:
            coef = coef_value  # sigma_value * sqrt(dt), formed on the host in float64
        z = x + dt * f + coef * eps
        if RELU:
            z = tl.maximum(z, 0.0)
        tl.store(y_ptr + start + loc, to_store_dtype(z, y_ptr), mask=mask)

    @triton.jit
    def _cd_step_bwd_kernel(gy_ptr, y_ptr, gx_ptr, gf_ptr, gs_ptr, n, dt, C, chan_stride,
                            mag_cs, sh_cs, mag_c, sh_c, seed_ptr, offset, RELU: tl.constexpr,
                            HAS_GX: tl.constexpr,
                            HAS_GF: tl.constexpr, HAS_GS: tl.constexpr, CH_MODE: tl.constexpr, CC: tl.constexpr,
                            NOISE16: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        b, e, start, loc, mask = _step_tile(offset, n, NOISE16, BLOCK)
        gz = tl.load(gy_ptr + start + loc, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + start + loc, mask=mask, other=0.0).to(tl.float32)
            gz = tl.where(y > 0, gz, 0.0)
        if HAS_GX:
            tl.store(gx_ptr + start + loc, to_store_dtype(gz, gx_ptr), mask=mask)
        if HAS_GF:
            tl.store(gf_ptr + start + loc, to_store_dtype(dt * gz, gf_ptr), mask=mask)
        if HAS_GS:
            k0, k1 = load_seed_key(seed_ptr)
            eps = _step_noise(k0, k1, b, gy_ptr.dtype.element_ty, NOISE16, FAST)
            _add_grad_sigma(gs_ptr, gz * eps, e, start, mask, C, chan_stride,
                            (mag_cs, sh_cs, mag_c, sh_c),
                            CH_MODE, CC, BLOCK)

    # ---------------------------------------------------------------------------------------
    # cd_smooth (K samples looped in the kernel: x read once, y written once)
    # ---------------------------------------------------------------------------------------
    @triton.jit
    def _cd_smooth_fwd_kernel(x_ptr, y_ptr, n, sigma_ptr, sigma_value, C, chan_stride, K,
                              seed_ptr, offset, HAS_SIGMA: tl.constexpr, CH_MODE: tl.constexpr, CC: tl.constexpr,
                              ACT: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        b, e, start = _tile_index(offset, BLOCK)
        mask = e < n
        k0, k1 = load_seed_key(seed_ptr)
        x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
        s = _sigma_tile(sigma_ptr, sigma_value, e, start, mask, C, chan_stride, (1, 0, 1, 0), 1.0,
                        HAS_SIGMA, CH_MODE, CC, BLOCK)
        acc = tl.zeros(e.shape, dtype=tl.float32)
        for k in range(K):
            eps = stream_normals_fast_tile(k0, k1, b, k, FAST)
            acc += _act_fwd(x + s * eps, ACT)
        tl.store(y_ptr + e, to_store_dtype(acc / K, y_ptr), mask=mask)

    @triton.jit
    def _cd_smooth_bwd_kernel(gy_ptr, x_ptr, gx_ptr, gs_ptr, n, sigma_ptr, sigma_value, C,
                              chan_stride, K, seed_ptr, offset, HAS_SIGMA: tl.constexpr,
                              HAS_GS: tl.constexpr, CH_MODE: tl.constexpr, CC: tl.constexpr, ACT: tl.constexpr,
                              FAST: tl.constexpr, BLOCK: tl.constexpr):
        b, e, start = _tile_index(offset, BLOCK)
        mask = e < n
        k0, k1 = load_seed_key(seed_ptr)
        x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gy_ptr + e, mask=mask, other=0.0).to(tl.float32)
        s = _sigma_tile(sigma_ptr, sigma_value, e, start, mask, C, chan_stride, (1, 0, 1, 0), 1.0,
                        HAS_SIGMA, CH_MODE, CC, BLOCK)
        dx = tl.zeros(e.shape, dtype=tl.float32)
        ds = tl.zeros(e.shape, dtype=tl.float32)
        for k in range(K):
            eps = stream_normals_fast_tile(k0, k1, b, k, FAST)
            d = _act_grad(x + s * eps, ACT)
            dx += d
            if HAS_GS:
                ds += d * eps
        tl.store(gx_ptr + e, to_store_dtype(g * dx / K, gx_ptr), mask=mask)
        if HAS_GS:
            _add_grad_sigma(gs_ptr, tl.where(mask, g * ds / K, 0.0), e, start, mask, C, chan_stride, (1, 0, 1, 0), CH_MODE,
                            CC, BLOCK)

    # ---------------------------------------------------------------------------------------
    # ensemble_mean: one program per row b, loop over the K replicas, whole row in registers.
    # ---------------------------------------------------------------------------------------
    @triton.jit
    def _softmax_row(z):
        """(max, sum of exp(z - max), exp(z - max)) of a row with -inf on masked lanes."""
        m = tl.max(z, axis=0)
        ex = tl.exp(z - m)  # 0 on masked lanes
        return m, tl.sum(ex, axis=0), ex

    @triton.jit
    def _logprob_row(base, BC, K, mask):
        """log((1/K) sum_k softmax(z_k)) of one row (float32), as a running log-sum-exp over k
        of the log-softmax values: never forms a probability that could underflow."""
        acc = tl.zeros(mask.shape, dtype=tl.float32)
        run_m = tl.full(mask.shape, -3.0e38, tl.float32)  # running max over k of log p_kc
        nans = tl.zeros(mask.shape, dtype=tl.float32)  # > 0 once a replica's row held a nan
        for k in range(K):
            z = tl.load(base + k * BC, mask=mask, other=float("-inf")).to(tl.float32)
            m, ssum, ex = _softmax_row(z)
            # log_unit's bit tricks and tl.maximum would both drop a nan: count it instead
            nans += tl.where(ssum != ssum, 1.0, 0.0)
            a = tl.where(mask, z - (m + log_unit(ssum)), 0.0)  # log softmax
            m_new = tl.maximum(run_m, a)
            acc = acc * tl.exp(run_m - m_new) + tl.exp(a - m_new)
            run_m = m_new
        # acc == 0: p_kc == 0 for every k (all inputs -inf) -> log 0 = -inf
        r = tl.where(acc > 0.0, run_m + log_unit(tl.where(acc > 0.0, acc, 1.0))
                     - log_unit(tl.cast(K, tl.float32)), float("-inf"))
        return tl.where(nans > 0.0, float("nan"), r)

    @triton.jit
    def _ensemble_fwd_kernel(inp_ptr, out_ptr, K, B, C, SPACE: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        BC = tl.cast(B, tl.int64) * C
        base = inp_ptr + row * C + cols
        if SPACE == 2:
            r = _logprob_row(base, BC, K, mask)
        else:
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k in range(K):
                z = tl.load(base + k * BC, mask=mask, other=float("-inf")).to(tl.float32)
                if SPACE == 0:
                    acc += tl.where(mask, z, 0.0)
                else:
                    m, ssum, ex = _softmax_row(z)
                    acc += ex / ssum
            r = acc / K
        tl.store(out_ptr + row * C + cols, to_store_dtype(r, out_ptr), mask=mask)

    @triton.jit
    def _ensemble_bwd_kernel(gout_ptr, inp_ptr, out_ptr, gin_ptr, K, B, C, SPACE: tl.constexpr,
                             RECOMPUTE_OUT: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        BC = tl.cast(B, tl.int64) * C
        g = tl.load(gout_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if SPACE == 2:
            if RECOMPUTE_OUT:
                # 16-bit out: its rounding error would be amplified by the cancellation in
                # q - p * sum(q); recompute it in float32 (one more read of the K rows).
                o = _logprob_row(inp_ptr + row * C + cols, BC, K, mask)
            else:
                o = tl.load(out_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        for k in range(K):
            off = k * BC + row * C + cols
            if SPACE == 0:
                gi = g / K
            else:
                z = tl.load(inp_ptr + off, mask=mask, other=float("-inf")).to(tl.float32)
                m, ssum, ex = _softmax_row(z)
                p = ex / ssum
                if SPACE == 1:
                    gi = p * (g - tl.sum(g * p, axis=0)) / K
                else:
                    lse = m + log_unit(ssum)
                    q = tl.where(mask, g * tl.exp(z - lse - o), 0.0)
                    gi = (q - p * tl.sum(q, axis=0)) / K
            tl.store(gin_ptr + off, to_store_dtype(gi, gin_ptr), mask=mask)


def _chan_mode(C: int, chan_stride: int) -> int:
    if C == 1:
        return 1
    if chan_stride >= 4 * BLOCK:
        return 2
    if chan_stride == 1 and C & (C - 1) == 0 and C <= 4 * BLOCK:
        return 4  # channels_last with a power-of-two C: channel = tile position & (C - 1)
    return 3


def _chan_cc(C: int, chan_stride: int) -> int:
    """The constexpr C of CH_MODE 4 (1 otherwise, so other modes compile once)."""
    return C if _chan_mode(C, chan_stride) == 4 else 1


def _magic(d: int):
    """(m, s) with a // d == (a * m) >> (32 + s) for all 0 <= a < 2^31 (2 <= d < 2^31):
    l = ceil(log2 d), m = ceil(2^(31 + l) / d) < 2^32, s = l - 1 (Granlund & Montgomery)."""
    l = (d - 1).bit_length()
    return -(-(1 << (31 + l)) // d), l - 1


def _step_chan(n: int, C: int, chan_stride: int, noise16: bool):
    """cd_step's (CH_MODE, CC, (mag_cs, sh_cs, mag_c, sh_c)): mode 2 becomes the int32 mode 5
    when the positions, the channel-run boundaries and their quotients fit, and mode 6 when
    moreover chan_stride is a multiple of the tile's row width (see the module docstring)."""
    mode = _chan_mode(C, chan_stride)
    if mode == 2 and n + 2 * chan_stride + 4 * BLOCK < 2 ** 31:
        mode = 6 if chan_stride % (8 if noise16 else 4) == 0 else 5
        return mode, 1, _magic(chan_stride) + _magic(C)
    return mode, _chan_cc(C, chan_stride), (1, 0, 1, 0)


def _noise16(dtype) -> bool:
    """Whether data of this dtype uses the 16-bit stream (docs/noise.md section 3b)."""
    return dtype in (torch.float16, torch.bfloat16)


# Compiled kernels evaluate the 16-bit stream with the hardware approximations (MUFU); the
# interpreter cannot run libdevice and uses numpy's accurate functions (docs/noise.md, 3b).
FAST16 = not _INTERPRET_AT_IMPORT


def _grid(n_elements: int):
    return (triton.cdiv(n_elements, 4 * BLOCK),)


def _check_offset(offset: int) -> int:
    offset = int(offset)
    if not 0 <= offset < 2 ** 63:
        raise ValueError(f"triton backend: offset must be in [0, 2^63), got {offset}")
    return offset


class TritonBackend(Backend):
    name = "triton"

    # -- availability -------------------------------------------------------------------------
    def availability(self) -> Tuple[bool, str]:
        if not HAVE_TRITON:
            return False, f"triton cannot be imported ({TRITON_IMPORT_ERROR})"
        ver = getattr(triton, "__version__", "?")
        if _INTERPRET_AT_IMPORT:
            return True, (f"triton {ver} interpreter (TRITON_INTERPRET=1): runs on CPU tensors, "
                          "slowly")
        if torch.cuda.is_available():
            return True, f"triton {ver} on CUDA ({torch.cuda.get_device_name()})"
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return False, ("TRITON_INTERPRET=1 was set after cdkernels.backends.triton_backend "
                           "was imported; set it before importing")
        return False, (f"triton {ver}: no CUDA device, and CPU tensors need TRITON_INTERPRET=1 "
                       "(set before import)")

    def supports(self, device: torch.device) -> bool:
        if not HAVE_TRITON:
            return False
        device = torch.device(device)
        if device.type == "cuda":
            return _INTERPRET_AT_IMPORT or torch.cuda.is_available()
        if device.type == "cpu":
            return _INTERPRET_AT_IMPORT
        return False

    # -- noise stream -------------------------------------------------------------------------
    def philox_words(self, out, seed, offset, sample):
        nb = out.numel() // 4
        if nb == 0:
            return
        _words_kernel[_grid(4 * nb)](out, seed, _check_offset(offset), int(sample), nb,
                                     BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def uniform(self, out, seed, offset, sample):
        n = out.numel()
        if n == 0:
            return
        _uniform_kernel[_grid(n)](out, seed, _check_offset(offset), int(sample), n,
                                  BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def normal(self, out, seed, offset, sample):
        n = out.numel()
        if n == 0:
            return
        _normal_kernel[_grid(n)](out, seed, _check_offset(offset), int(sample), n,
                                 NOISE16=_noise16(out.dtype), FAST=FAST16, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    # -- cd_step ------------------------------------------------------------------------------
    def cd_step_fwd(self, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset, act):
        n = x.numel()
        if n == 0:
            return
        if act not in ("none", "relu"):
            raise ValueError(f"cd_step: unknown activation {act!r}")
        has_sigma = sigma is not None
        coef_value = 0.0 if has_sigma else float(sigma_value) * math.sqrt(dt)
        mode, cc, div = _step_chan(n, int(C), int(chan_stride), _noise16(x.dtype))
        _cd_step_fwd_kernel[_grid(n)](
            x, f, y, n, float(dt), math.sqrt(dt), sigma if has_sigma else x, coef_value,
            int(C), int(chan_stride), *div, seed, _check_offset(offset),
            HAS_SIGMA=has_sigma, CH_MODE=mode, CC=cc,
            RELU=(act == "relu"), NOISE16=_noise16(x.dtype), FAST=FAST16, BLOCK=BLOCK, num_warps=_step_warps(mode), enable_fp_fusion=FP_FUSION)

    def cd_step_bwd(self, grad_y, y, grad_x, grad_f, grad_sigma, dt, sigma, sigma_value, C,
                    chan_stride, seed, offset, act):
        n = grad_y.numel()
        if n == 0 or (grad_x is None and grad_f is None and grad_sigma is None):
            return
        if act not in ("none", "relu"):
            raise ValueError(f"cd_step: unknown activation {act!r}")
        relu = act == "relu"
        dummy = grad_y
        mode, cc, div = _step_chan(n, int(C), int(chan_stride), _noise16(grad_y.dtype))
        _cd_step_bwd_kernel[_grid(n)](
            grad_y, y if relu else dummy, grad_x if grad_x is not None else dummy,
            grad_f if grad_f is not None else dummy,
            grad_sigma if grad_sigma is not None else dummy, n, float(dt), int(C),
            int(chan_stride), *div, seed, _check_offset(offset), RELU=relu,
            HAS_GX=grad_x is not None, HAS_GF=grad_f is not None,
            HAS_GS=grad_sigma is not None, CH_MODE=mode, CC=cc,
            NOISE16=_noise16(grad_y.dtype), FAST=FAST16, BLOCK=BLOCK, num_warps=_step_warps(mode), enable_fp_fusion=FP_FUSION)

    # -- cd_smooth ----------------------------------------------------------------------------
    def cd_smooth_fwd(self, x, y, sigma, sigma_value, C, chan_stride, samples, seed, offset, act):
        n = x.numel()
        if n == 0:
            return
        has_sigma = sigma is not None
        _cd_smooth_fwd_kernel[_grid(n)](
            x, y, n, sigma if has_sigma else x, float(sigma_value), int(C), int(chan_stride),
            int(samples), seed, _check_offset(offset), HAS_SIGMA=has_sigma,
            CH_MODE=_chan_mode(int(C), int(chan_stride)), CC=_chan_cc(int(C), int(chan_stride)), ACT=_ACT_CODES[act], FAST=FAST16, BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)

    def cd_smooth_bwd(self, grad_y, x, grad_x, grad_sigma, sigma, sigma_value, C, chan_stride,
                      samples, seed, offset, act):
        n = x.numel()
        if n == 0:
            return
        has_sigma = sigma is not None
        _cd_smooth_bwd_kernel[_grid(n)](
            grad_y, x, grad_x, grad_sigma if grad_sigma is not None else x, n,
            sigma if has_sigma else x, float(sigma_value), int(C), int(chan_stride),
            int(samples), seed, _check_offset(offset), HAS_SIGMA=has_sigma,
            HAS_GS=grad_sigma is not None, CH_MODE=_chan_mode(int(C), int(chan_stride)), CC=_chan_cc(int(C), int(chan_stride)),
            ACT=_ACT_CODES[act], FAST=FAST16, BLOCK=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=FP_FUSION)

    # -- ensemble_mean ------------------------------------------------------------------------
    @staticmethod
    def _ens_dims(inp: Tensor, out: Tensor):
        K = inp.shape[0]
        C = out.shape[-1]
        B = out.numel() // C if C else 0
        block_c = triton.next_power_of_2(max(C, 1))
        # TODO(perf): rows wider than ~16K classes spill registers; tile over C then.
        num_warps = 4 if block_c <= 2048 else (8 if block_c <= 8192 else 16)
        return K, B, C, block_c, num_warps

    def ensemble_mean_fwd(self, inp, out, space):
        K, B, C, block_c, nw = self._ens_dims(inp, out)
        if B == 0 or C == 0:
            return
        _ensemble_fwd_kernel[(B,)](inp, out, K, B, C, SPACE=_SPACE_CODES[space],
                                   BLOCK_C=block_c, num_warps=nw, enable_fp_fusion=FP_FUSION)

    def ensemble_mean_bwd(self, grad_out, inp, out, grad_in, space):
        K, B, C, block_c, nw = self._ens_dims(inp, out)
        if B == 0 or C == 0:
            return
        _ensemble_bwd_kernel[(B,)](grad_out, inp, out, grad_in, K, B, C,
                                   SPACE=_SPACE_CODES[space],
                                   RECOMPUTE_OUT=out.dtype != torch.float32,
                                   BLOCK_C=block_c, num_warps=nw, enable_fp_fusion=FP_FUSION)


# -------------------------------------------------------------------------------------------------
# std-scaled step (cdkernels/std_step.py): moments of z = x + dt*f and the gradient through std.
# Appended as a unit (kernels + methods attached to TritonBackend) so it stays independent of
# the cd_step / cd_smooth / ensemble kernels above.
# -------------------------------------------------------------------------------------------------
Z_BLOCK = 1024  # elements per program

if HAVE_TRITON:
    @triton.jit
    def _z_moments_kernel(x_ptr, f_ptr, part_ptr, n, dt, BLOCK: tl.constexpr):
        """part[2*pid], part[2*pid+1] = float32 sums of (z - z[0]) and (z - z[0])^2 over the
        program's BLOCK elements (the shift keeps the sums well conditioned)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        k = tl.load(x_ptr).to(tl.float32) + dt * tl.load(f_ptr).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, (x + dt * f) - k, 0.0)
        tl.store(part_ptr + 2 * pid, tl.sum(d, axis=0))
        tl.store(part_ptr + 2 * pid + 1, tl.sum(d * d, axis=0))

    @triton.jit
    def _z_std_bwd_kernel(x_ptr, f_ptr, gy_ptr, gx_ptr, gf_ptr, coef_ptr, n, dt,
                          HAS_GY: tl.constexpr, HAS_GF: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        m = tl.load(coef_ptr).to(tl.float32)
        a = tl.load(coef_ptr + 1).to(tl.float32)
        b = tl.load(coef_ptr + 2).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = a * ((x + dt * f) - m) + b
        if HAS_GY:
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32) + g
        tl.store(gx_ptr + offs, to_store_dtype(g, gx_ptr), mask=mask)
        if HAS_GF:
            tl.store(gf_ptr + offs, to_store_dtype(dt * g, gf_ptr), mask=mask)


def _triton_z_stats(self, x, f, dt, out):
    n = x.numel()
    nprog = triton.cdiv(n, Z_BLOCK)
    part = torch.empty(2 * nprog, dtype=torch.float32, device=x.device)
    _z_moments_kernel[(nprog,)](x, f, part, n, float(dt), BLOCK=Z_BLOCK, num_warps=NUM_WARPS,
                               enable_fp_fusion=FP_FUSION)
    s = part.view(nprog, 2).to(torch.float64).sum(0)  # float64 across programs, on the device
    k = (x[:1].to(torch.float32) + float(dt) * f[:1].to(torch.float32)).to(torch.float64)
    out[0:1] = k + s[0] / n
    if n > 1:
        out[1:2] = ((s[1] - s[0] * s[0] / n).clamp_min(0) / (n - 1)).sqrt()
    else:
        out[1] = float("nan")


def _triton_z_std_bwd(self, x, f, grad_y, dt, coefs, grad_x, grad_f):
    n = x.numel()
    if n == 0:
        return
    _z_std_bwd_kernel[(triton.cdiv(n, Z_BLOCK),)](
        x, f, x if grad_y is None else grad_y, grad_x, grad_x if grad_f is None else grad_f,
        coefs, n, float(dt), HAS_GY=grad_y is not None, HAS_GF=grad_f is not None,
        BLOCK=Z_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION)


if HAVE_TRITON:
    TritonBackend.z_stats = _triton_z_stats
    TritonBackend.z_std_bwd = _triton_z_std_bwd
