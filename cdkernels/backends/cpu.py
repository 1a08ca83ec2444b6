"""CPU backend: the compiled kernels of ``csrc/cpu`` (module ``cdkernels._C``).

Multithreaded (``torch.get_num_threads()`` threads) and vectorised, with the SIMD level
(baseline / avx2 / avx512) picked at run time; ``CDK_CPU_SIMD`` forces one. Importing this
module never raises: if ``cdkernels._C`` is missing or broken, :meth:`CpuBackend.availability`
says why.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .._common import channel_map, cpu_seed_buffer_signed, sigma_for_kernel
from .base import Backend, Tensor

try:
    from cdkernels import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # ImportError, or an OSError from a bad build: keep the message
    _C = None
    _IMPORT_ERROR = f"cdkernels._C could not be imported ({type(e).__name__}: {e})"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _code(t: Tensor) -> int:
    try:
        return _DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"cdkernels cpu backend: unsupported dtype {t.dtype} "
                        "(float32, float16, bfloat16)") from None


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _seed_ptr(seed: Tensor) -> int:
    # the kernels read the int64 seed from memory (first element)
    if seed.dtype != torch.int64 or seed.device.type != "cpu":
        raise TypeError("cdkernels cpu backend: seed must be an int64 CPU tensor")
    return seed.data_ptr()


def _out(t: Optional[Tensor]) -> int:
    """Pointer of an output buffer, advised to use huge pages when large (see bindings.cpp:
    first-touch page faults otherwise cost more than the kernel)."""
    if t is None:
        return 0
    nbytes = t.numel() * t.element_size()
    if nbytes >= (8 << 20):
        _C.advise_huge_pages(t.data_ptr(), nbytes)
    return t.data_ptr()


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


class CpuBackend(Backend):
    name = "cpu"
    accepts_contiguous_nd = True  # every method reads data_ptr()/numel() only

    def availability(self):
        if _C is None:
            return False, _IMPORT_ERROR
        mode = os.environ.get("CDK_CPU_THREADS", "auto")
        if mode not in ("auto", "openmp", "pool"):
            return False, f"CDK_CPU_THREADS={mode!r} must be 'auto', 'openmp' or 'pool'"
        threads = _C.cpu_threading()
        if mode == "openmp" and not threads.startswith("openmp"):
            return False, ("CDK_CPU_THREADS=openmp, but no OpenMP runtime (libgomp, libiomp5, "
                           "libomp) is loaded in this process")
        return True, f"compiled module, SIMD level {_C.cpu_simd_level()}, threads: {threads}"

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    # -- noise ------------------------------------------------------------------------------
    def philox_words(self, out, seed, offset, sample):
        _C.philox_words(out.data_ptr(), out.numel() // 4, _seed_ptr(seed), int(offset),
                        int(sample), _nthreads())

    def uniform(self, out, seed, offset, sample):
        if out.dtype != torch.float32:
            raise TypeError("cdkernels cpu backend: uniform writes float32")
        _C.uniform(out.data_ptr(), out.numel(), _seed_ptr(seed), int(offset), int(sample),
                   _nthreads())

    def normal(self, out, seed, offset, sample):
        _C.normal(_out(out), out.numel(), _code(out), _seed_ptr(seed), int(offset),
                  int(sample), _nthreads())

    # -- cd_step ----------------------------------------------------------------------------
    def cd_step_fwd(self, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset, act):
        n = x.numel()
        # (inline for the per-call host time of tiny tensors: _out/_seed_ptr/_code add ~2 us)
        if seed.dtype != torch.int64 or seed.is_cuda:
            _seed_ptr(seed)  # raises
        code = _DTYPE_CODES.get(x.dtype)
        if code is None:
            _code(x)  # raises
        _C.cd_step_fwd(x.data_ptr(), f.data_ptr(), _out(y) if n >= (1 << 20) else y.data_ptr(),
                       n, code, float(dt), 0 if sigma is None else sigma.data_ptr(),
                       float(sigma_value), int(C), int(chan_stride), seed.data_ptr(),
                       int(offset), act, torch.get_num_threads())

    def cd_step_bwd(self, grad_y, y, grad_x, grad_f, grad_sigma, dt, sigma, sigma_value, C,
                    chan_stride, seed, offset, act):
        _C.cd_step_bwd(grad_y.data_ptr(), _ptr(y), _out(grad_x), _out(grad_f),
                       _ptr(grad_sigma), grad_y.numel(), _code(grad_y), float(dt), _ptr(sigma),
                       float(sigma_value), int(C), int(chan_stride), _seed_ptr(seed),
                       int(offset), act, _nthreads())

    def cd_step_bwd_sigma(self, grad_y, y, grad_x, grad_f, n_sigma, gs_dtype, dt, sigma,
                          sigma_value, C, chan_stride, seed, offset, act):
        if gs_dtype != torch.float32 or not math.sqrt(dt) > 1e-30:
            # (a zero scale would mean "add into" to the kernel: keep the generic path)
            return super().cd_step_bwd_sigma(grad_y, y, grad_x, grad_f, n_sigma, gs_dtype, dt,
                                             sigma, sigma_value, C, chan_stride, seed, offset,
                                             act)
        # the kernel writes float32(sum) * float32(sqrt(dt)) itself: no zero fill, no scale op
        gs = torch.empty(n_sigma, dtype=torch.float32)
        _C.cd_step_bwd(grad_y.data_ptr(), _ptr(y), _out(grad_x), _out(grad_f), gs.data_ptr(),
                       grad_y.numel(), _code(grad_y), float(dt), _ptr(sigma), float(sigma_value),
                       int(C), int(chan_stride), _seed_ptr(seed), int(offset), act, _nthreads(),
                       gs_scale=math.sqrt(dt))
        return gs

    def cd_step_sigma_grad(self, grad_y, sigma, seed_value, dt):
        """cd_step_bwd_sigma's result for act='none' from a dense grad_y laid out like y and
        the seed's value, with the host steps of a training backward cut to one kernel call
        (no layout work, no empty grad_x/grad_f; the seed goes into this thread's seed buffer,
        which the kernel reads on entry). None where that path does not apply (the caller
        then runs cd_step_bwd_sigma)."""
        if grad_y.dtype not in _DTYPE_CODES or not math.sqrt(dt) > 1e-30:
            return None  # (a zero scale means "add into" to the kernel)
        sig = sigma_for_kernel(sigma, grad_y.dtype)
        n_c, cs = channel_map(grad_y, sig)
        gs = torch.empty(n_c, dtype=torch.float32)
        seed = cpu_seed_buffer_signed(seed_value)
        _C.cd_step_bwd(grad_y.data_ptr(), 0, 0, 0, gs.data_ptr(), grad_y.numel(),
                       _DTYPE_CODES[grad_y.dtype], float(dt), sig.data_ptr(), 0.0, n_c, cs,
                       seed.data_ptr(), 0, "none", torch.get_num_threads(), math.sqrt(dt))
        return gs

    # -- std-scaled step ---------------------------------------------------------------------
    def z_stats(self, x, f, dt, out):
        _C.z_stats(x.data_ptr(), f.data_ptr(), x.numel(), _code(x), float(dt), out.data_ptr(),
                   _nthreads())

    def z_std_bwd(self, x, f, grad_y, dt, coefs, grad_x, grad_f):
        mean, a, b = coefs.tolist()  # CPU tensor: no device sync involved
        _C.z_std_bwd(x.data_ptr(), f.data_ptr(), _ptr(grad_y), _out(grad_x), _out(grad_f),
                     x.numel(), _code(x), float(dt), mean, a, b, _nthreads())

    # The whole std step per direction in one call each (fewer host round trips than
    # z_stats + cd_step_fwd and cd_step_bwd_sigma + z_std_bwd, which other backends run).
    # coef: float32 contiguous [C] (C = 1: one value); stats float64 [2] on the CPU.
    def std_step_fwd(self, x, f, y, dt, coef, C, chan_stride, seed, offset, stats):
        _C.std_step_fwd(x.data_ptr(), f.data_ptr(), _out(y), x.numel(), _code(x), float(dt),
                        coef.data_ptr(), int(C), int(chan_stride), _seed_ptr(seed), int(offset),
                        stats.data_ptr(), _nthreads())

    def std_step_bwd(self, grad_y, y, x, f, grad_x, grad_f, grad_coef, dt, coef, C,
                     chan_stride, seed, offset, mean, sd):
        _C.std_step_bwd(grad_y.data_ptr(), _ptr(y), x.data_ptr(), f.data_ptr(), _out(grad_x),
                        _out(grad_f), _ptr(grad_coef), x.numel(), _code(x), float(dt),
                        coef.data_ptr(), int(C), int(chan_stride), _seed_ptr(seed), int(offset),
                        float(mean), float(sd), _nthreads())

    # -- cd_smooth --------------------------------------------------------------------------
    def cd_smooth_fwd(self, x, y, sigma, sigma_value, C, chan_stride, samples, seed, offset,
                      act):
        _C.cd_smooth_fwd(x.data_ptr(), _out(y), x.numel(), _code(x), _ptr(sigma),
                         float(sigma_value), int(C), int(chan_stride), int(samples),
                         _seed_ptr(seed), int(offset), act, _nthreads())

    def cd_smooth_bwd(self, grad_y, x, grad_x, grad_sigma, sigma, sigma_value, C, chan_stride,
                      samples, seed, offset, act):
        _C.cd_smooth_bwd(grad_y.data_ptr(), x.data_ptr(), _out(grad_x), _ptr(grad_sigma),
                         x.numel(), _code(x), _ptr(sigma), float(sigma_value), int(C),
                         int(chan_stride), int(samples), _seed_ptr(seed), int(offset), act,
                         _nthreads())

    # -- ensemble_mean ----------------------------------------------------------------------
    def ensemble_mean_fwd(self, inp, out, space):
        K, B, C = inp.shape
        if inp.numel() == 0:
            return
        _C.ensemble_mean_fwd(inp.data_ptr(), out.data_ptr(), K, B, C, _code(inp), space,
                             _nthreads())

    def ensemble_mean_bwd(self, grad_out, inp, out, grad_in, space):
        K, B, C = inp.shape
        if inp.numel() == 0:
            return
        _C.ensemble_mean_bwd(grad_out.data_ptr(), inp.data_ptr(), out.data_ptr(),
                             _out(grad_in), K, B, C, _code(inp), space, _nthreads())
