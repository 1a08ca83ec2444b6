"""Triton device helpers for the cdkernels noise stream (docs/noise.md, csrc/cdk_noise.h).

Everything is written out explicitly (Philox rounds with ``tl.umulhi``, the word -> uniform map,
Box-Muller with the exact quarter-turn reduction and polynomial log/sin/cos), so the stream does
not depend on ``tl.randint4x``/``tl.randn`` (whose offset conventions changed across Triton
versions) nor on the fast approximate ``lg2``/``sin``/``cos``/``sqrt`` instructions that Triton's
``tl.log``/``tl.sin``/``tl.cos``/``tl.sqrt`` may lower to on NVIDIA GPUs. The polynomials are the
ones of csrc/cdk_noise.h (fdlibm logf, cephes sinf/cosf); square root and the one division use
the IEEE-rounded ``tl.sqrt_rn``/``tl.div_rn``. Results stay within a few ulp of the float64 oracle.
The exceptions, by the spec: the 16-bit stream (``box_muller16``, docs/noise.md 3b) and
cd_smooth's Monte-Carlo normals (``box_muller_fast``, docs/noise.md 3c) use the hardware
approximations (libdevice fast_*, ``tl.sqrt``) in compiled kernels (``FAST``).

Only long-stable Triton APIs are used (tested with the interpreter of triton 3.9; the GPU target
is triton 3.6). Importing this module never raises: without Triton it defines nothing but
``HAVE_TRITON = False``.
"""
from __future__ import annotations

import os

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    TRITON_IMPORT_ERROR = ""
    try:  # the fast approximate transcendentals of the 16-bit stream (compiled kernels only)
        from triton.language.extra.cuda import libdevice
    except Exception:  # pragma: no cover - an install without the CUDA extras
        libdevice = None
    # Whether the kernels are compiled (False: TRITON_INTERPRET=1 at import, when triton.jit makes
    # interpreted functions; triton_backend decides the same way). Compiled kernels round
    # float32 -> bfloat16 with the hardware conversion (cvt.rn: nearest even, like
    # round_f32_to_bf16, which the interpreter's truncating cast needs).
    COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
except Exception as _e:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    HAVE_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


if HAVE_TRITON:

    @triton.jit
    def philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 counters (c0..c3, tensors of one shape) and uint32 key (k0, k1)
        (scalars or tensors). Returns the four uint32 output words."""
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            n0 = hi1 ^ c1 ^ k0
            n2 = hi0 ^ c3 ^ k1
            c0 = n0
            c1 = lo1
            c2 = n2
            c3 = lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def load_seed_key(seed_ptr):
        """(k0, k1) uint32 from the int64 seed in device memory (two's-complement bits)."""
        s = tl.load(seed_ptr).to(tl.int64)
        k0 = (s & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
        return k0, k1

    @triton.jit
    def stream_words(k0, k1, b, sample):
        """The four uint32 words of 64-bit block indices ``b`` (int64 tensor, >= 0) of stream
        (key, sample): counter = (lo32(b), hi32(b), sample, 0)."""
        c0 = (b & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((b >> 32) & 0xFFFFFFFF).to(tl.uint32)
        zero = tl.zeros(b.shape, dtype=tl.uint32)
        c2 = zero + tl.cast(sample, tl.uint32)  # tl.cast: sample may be a constexpr (0, 1)
        c3 = zero
        return philox4x32_10(c0, c1, c2, c3, k0, k1)

    @triton.jit
    def word_to_uniform(w):
        """U(w) = (2*(w >> 9) + 1) * 2^-24 as float32 (exact)."""
        m = ((w >> 9) << 1) | 1  # < 2^24, exact in float32
        return m.to(tl.int32).to(tl.float32) * 5.9604644775390625e-08

    @triton.jit
    def log_unit(x):
        """Natural log of positive normal float32 x (used on [2^-24, 2)), about 1 ulp
        (fdlibm logf's reduction and polynomial, as in csrc/cdk_noise.h::log_unit)."""
        bits = x.to(tl.uint32, bitcast=True)
        adj = bits + (0x3F800000 - 0x3F3504F3)
        e = (adj >> 23).to(tl.int32) - 127
        mbits = (adj & 0x007FFFFF) + 0x3F3504F3
        m = mbits.to(tl.float32, bitcast=True)
        f = m - 1.0
        s = tl.div_rn(f, 2.0 + f)
        z = s * s
        w = z * z
        # The multiply-adds are explicit tl.fma, in the order of csrc/cdk_noise.h (the GPU
        # build): the kernels are launched with enable_fp_fusion=False, so the compiler fuses
        # nothing else and the GPU computes exactly what the interpreter (which rounds tl.fma
        # once) validates.
        t1 = w * tl.fma(w, tl.fma(w, 1.5313838422e-01, 2.2222198546e-01), 4.0000000596e-01)
        t2 = z * tl.fma(w, tl.fma(w, tl.fma(w, 1.4798198640e-01, 1.8183572590e-01),
                                  2.8571429849e-01), 6.6666668653e-01)
        r = t1 + t2
        hfsq = (0.5 * f) * f
        ef = e.to(tl.float32)
        inner = tl.fma(s, hfsq + r, ef * 9.0580006145e-06)
        return tl.fma(ef, 6.9313812256e-01, -((hfsq - inner) - f))

    @triton.jit
    def sincos_2pi(t):
        """(sin 2*pi*t, cos 2*pi*t) for |t| <= 1/8, about 1 ulp.

        cephes sinf/cosf minimax polynomials (as csrc/cdk_noise.h), but the argument x = 2*pi*t
        is carried as x + x_lo (x_lo: the product's rounding error, exact via fma, plus
        t*(2*pi - float32(2*pi))), x*x likewise as z + z_lo, and both corrections are folded in
        before the last rounding. That halves the header's worst case near |x| = pi/4 (~1.8 ulp
        there); the extra cost is ~5 FMAs per word pair, nothing next to the Philox rounds."""
        x = t * 6.2831854820251465  # float32(2*pi)
        x_lo = tl.fma(t, 6.2831854820251465, -x) + t * -1.7484556000744883e-07
        z = x * x
        z_lo = tl.fma(x, x, -z)
        ps = z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
        s = x + (x * ps + x_lo)
        pc = z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
        h = 0.5 * z + ((0.5 * z_lo + x * x_lo) - pc)  # 1 - cos(x + x_lo), to first order in x_lo
        c = 1.0 - h
        return s, c

    @triton.jit
    def box_muller(wa, wb):
        """(r cos 2piU(wb), r sin 2piU(wb)), r = sqrt(-2 ln U(wa)), with the exact quarter-turn
        reduction of docs/noise.md section 3."""
        ua = word_to_uniform(wa)
        ub = word_to_uniform(wb)
        r = tl.sqrt_rn(-2.0 * log_unit(ua))
        q = (4.0 * ub + 0.5).to(tl.int32)  # round(4U) in 0..4, never a tie; 4U exact
        t = ub - 0.25 * q.to(tl.float32)  # exact, |t| <= 1/8
        s, c = sincos_2pi(t)
        qm = q & 3
        # rotate (c, s) by qm quarter turns: 0:(c,s) 1:(-s,c) 2:(-c,-s) 3:(s,-c)
        cr = tl.where(qm == 0, c, tl.where(qm == 1, -s, tl.where(qm == 2, -c, s)))
        sr = tl.where(qm == 0, s, tl.where(qm == 1, c, tl.where(qm == 2, -s, -c)))
        return r * cr, r * sr

    @triton.jit
    def box_muller_fast(wa, wb, FAST: tl.constexpr):
        """box_muller with fast transcendentals, for Monte-Carlo averaging (cd_smooth):
        docs/noise.md section 3c, the construction of csrc/cuda/fast_noise.cuh. Same words, same
        uniforms; |eps_fast - eps| <= 2^-18 * r on the GPU.

        U(wa) and d = 1 - U(wa) = U(~wa) are formed on the bits (exact); -ln U is the series
        d + d^2/2 + d^3/3 + d^4/4 + d^5/5 for d < 1/16, else -ln2 * log2(U); the angle is
        a = U(wb) - 1/2 (exact) and (cos, sin)(2piU) = -(cos, sin)(2pi a), the sign going into
        the radius. FAST (compiled): lg2.approx / sqrt.approx / sin.approx / cos.approx (MUFU);
        otherwise (the interpreter) numpy's float32 log2 / sqrt / sin / cos. The series' Horner
        steps are explicit fmas (what nvcc contracts fast_noise.cuh's expression into; the
        kernels are compiled without fp fusion)."""
        u = (0x3F800000 | (wa >> 9)).to(tl.float32, bitcast=True) - 0.999999940395355224609375
        d = (0x3F800000 | ((~wa) >> 9)).to(tl.float32, bitcast=True) \
            - 0.999999940395355224609375
        p = tl.fma(d, 0.2, 0.25)
        p = tl.fma(d, p, 0.333333343)
        p = tl.fma(d, p, 0.5)
        p = tl.fma(d, p, 1.0)
        if FAST:
            lg = libdevice.fast_log2f(u)
        else:
            lg = tl.log2(u)
        # t = 2 * (d < 1/16 ? d*p : lg * -0.693147182); the doubling is exact, folded in
        t = tl.where(d < 0.0625, (d + d) * p, lg * -1.38629436492919921875)
        a = ((0x3F800000 | (wb >> 9)).to(tl.float32, bitcast=True) - 1.5) \
            + 5.9604644775390625e-08
        x = a * 6.2831854820251465  # float32(2*pi)
        nr = -tl.sqrt(t)  # tl.sqrt: sqrt.approx (MUFU.SQRT) compiled
        if FAST:
            c = libdevice.fast_cosf(x)
            s = libdevice.fast_sinf(x)
        else:
            c = tl.cos(x)
            s = tl.sin(x)
        return nr * c, nr * s

    @triton.jit
    def stream_normals_fast_tile(k0, k1, b, sample, FAST: tl.constexpr):
        """[BLOCK, 4] float32 tile of the normals of blocks ``b`` with box_muller_fast
        (cd_smooth; see lanes_to_tile)."""
        w0, w1, w2, w3 = stream_words(k0, k1, b, sample)
        n0, n1 = box_muller_fast(w0, w1, FAST)
        n2, n3 = box_muller_fast(w2, w3, FAST)
        return lanes_to_tile(n0, n1, n2, n3)

    @triton.jit
    def stream_normals(k0, k1, b, sample):
        """The four float32 normals (lanes 0..3) of 64-bit block indices ``b`` of stream
        (key, sample)."""
        w0, w1, w2, w3 = stream_words(k0, k1, b, sample)
        n0, n1 = box_muller(w0, w1)
        n2, n3 = box_muller(w2, w3)
        return n0, n1, n2, n3

    @triton.jit
    def lanes_to_tile(v0, v1, v2, v3):
        """[BLOCK] x 4 lane vectors -> [BLOCK, 4] tile, row i = block i, column j = lane j, i.e.
        the tile of 4*BLOCK consecutive stream elements in memory order. On GPU, Triton keeps the
        per-block (1-D) Philox math in the slice layout of the 2-D tile, so this costs three
        selects per element and no data movement; loads/stores of the tile are contiguous
        (16-byte vectors for fp32), unlike four strided lane gathers."""
        j = tl.arange(0, 4)[None, :]
        return tl.where(j == 0, v0[:, None],
                        tl.where(j == 1, v1[:, None], tl.where(j == 2, v2[:, None], v3[:, None])))

    @triton.jit
    def stream_normals_tile(k0, k1, b, sample):
        """[BLOCK, 4] float32 tile of the normals of blocks ``b`` (see lanes_to_tile)."""
        n0, n1, n2, n3 = stream_normals(k0, k1, b, sample)
        return lanes_to_tile(n0, n1, n2, n3)

    @triton.jit
    def round_f32_to_bf16(v):
        """float32 -> bfloat16, round to nearest even, done on the bits. Triton's own cast does
        this on GPU, but the CPU interpreter truncates; this keeps both identical (NaN stays NaN).
        Costs a handful of integer ops per element (free in a memory-bound kernel)."""
        bits = v.to(tl.uint32, bitcast=True)
        r = bits + 0x7FFF + ((bits >> 16) & 1)
        hi = tl.where(v != v, 0x7FC0, r >> 16)
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def to_store_dtype(v, ptr):
        """Round float32 ``v`` to the element type of ``ptr`` (nearest even)."""
        if ptr.dtype.element_ty == tl.bfloat16:
            if COMPILED:
                return v.to(tl.bfloat16)  # cvt.rn.bf16.f32, two values per instruction
            else:
                return round_f32_to_bf16(v)
        else:
            return v.to(ptr.dtype.element_ty)

    # -------------------------------------------------------------------------------------------
    # The 16-bit stream (docs/noise.md section 3b): eight normals per Philox call, two per word.
    # -------------------------------------------------------------------------------------------
    @triton.jit
    def box_muller16(w, FAST: tl.constexpr):
        """(lane 2j, lane 2j+1) float32 normals of word ``w`` (uint32) of the 16-bit stream:
        r = sqrt(-2 ln U16(hr)), (r cos 2piU16(ha), r sin 2piU16(ha)), hr / ha the low / high
        16 bits, U16(h) = (2h + 1) * 2^-17.

        U16 is formed on the bits: 0x3F800000 | (h << 7) is 1 + h*2^-16, minus (1 - 2^-17)
        gives U16(h) exactly; for the angle, minus (3/2 - 2^-17) gives a = U16(ha) - 1/2 in
        (-1/2, 1/2) exactly, and (cos, sin)(2piU) = -(cos, sin)(2pi a): the sign goes into the
        radius. FAST (compiled kernels): the hardware approximations lg2.approx / sqrt.approx /
        sin.approx / cos.approx (MUFU), within the spec's 2^-14 + 2^-16|n| of the exact value.
        Otherwise (the interpreter, which cannot run libdevice) numpy's accurate float32
        log2 / sqrt / sin / cos."""
        ur = (((w << 7) & 0x7FFF80) | 0x3F800000).to(tl.float32, bitcast=True) \
            - 0.99999237060546875
        a = (((w >> 9) & 0x7FFF80) | 0x3F800000).to(tl.float32, bitcast=True) \
            - 1.49999237060546875
        x = a * 6.2831854820251465  # 2*pi*a, |x| < pi
        if FAST:
            # -r = -sqrt(log2(u) * (-2 ln 2))
            nr = -tl.sqrt(libdevice.fast_log2f(ur) * -1.3862943611198906)
            c = libdevice.fast_cosf(x)
            s = libdevice.fast_sinf(x)
        else:
            nr = -tl.sqrt(tl.log2(ur) * -1.3862943611198906)
            c = tl.cos(x)
            s = tl.sin(x)
        return nr * c, nr * s

    @triton.jit
    def lanes8_to_tile(c0, s0, c1, s1, c2, s2, c3, s3):
        """Eight [R] lane vectors (lane 2j = cj, lane 2j+1 = sj) -> [R, 8] tile, row i = block
        i, column l = lane l. Built with tl.join (no selects): the joined dimensions live in
        the registers of one thread, and the [R, 2, 2, 2] -> [R, 8] reshape is a relabelling
        (column l = 4*d1 + 2*d2 + d3, d3 the cos/sin parity, (d1, d2) the word's bits)."""
        cc = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # [R, 2, 2]: [i, d1, d2] = c_{2*d1+d2}
        ss = tl.join(tl.join(s0, s2), tl.join(s1, s3))
        t = tl.join(cc, ss)                              # [R, 2, 2, 2]
        return tl.reshape(t, (c0.shape[0], 8))

    @triton.jit
    def stream_normals16_tile(k0, k1, b, sample, FAST: tl.constexpr):
        """[R, 8] float32 tile of the 16-bit stream's values (before the 16-bit rounding) of
        blocks ``b`` ([R] int64): row i = block b[i], column l = lane l."""
        w0, w1, w2, w3 = stream_words(k0, k1, b, sample)
        c0, s0 = box_muller16(w0, FAST)
        c1, s1 = box_muller16(w1, FAST)
        c2, s2 = box_muller16(w2, FAST)
        c3, s3 = box_muller16(w3, FAST)
        return lanes8_to_tile(c0, s0, c1, s1, c2, s2, c3, s3)

    @triton.jit
    def round_f32_to_16(v, DT: tl.constexpr, FAST: tl.constexpr):
        """float32 -> DT (tl.float16 or tl.bfloat16), round to nearest even. The interpreter's
        bfloat16 cast truncates, so there it is done on the bits; compiled, the hardware
        conversion (cvt.rn, two values per instruction) rounds the same way."""
        if DT == tl.bfloat16:
            if FAST:
                r = v.to(tl.bfloat16)
            else:
                r = round_f32_to_bf16(v)
        else:
            r = v.to(tl.float16)  # nearest even (numpy's astype in the interpreter)
        return r

