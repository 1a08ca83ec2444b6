"""CUDA backend: the raw CUDA C++ kernels of csrc/cuda, reached through ``cdkernels._C``.

The extension takes raw device pointers (``tensor.data_ptr()``, 0 for an absent tensor), sizes,
dtype/activation/space codes, the device index and the current stream as an integer; it never
sees a torch tensor and never reads the seed on the host (the kernels read it from device
memory, so CUDA-graph replays pick up new seeds). Launches are asynchronous on
``torch.cuda.current_stream(device)``.

Importing this module never raises; ``availability()`` says why the backend cannot run.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch

from .base import Backend, Tensor

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_STEP_ACT_CODE = {"none": 0, "relu": 1}
_ACT_CODE = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4, "softplus": 5}
_SPACE_CODE = {"prob": 0, "logit": 1, "logprob": 2}

_REQUIRED = ("cuda_device_count", "cuda_philox_words", "cuda_uniform", "cuda_normal",
             "cuda_cd_step_fwd", "cuda_cd_step_bwd", "cuda_cd_smooth_fwd", "cuda_cd_smooth_bwd",
             "cuda_ensemble_mean_fwd", "cuda_ensemble_mean_bwd")


def _load_ext():
    """(module, "") or (None, reason)."""
    try:
        from cdkernels import _C  # noqa: PLC0415 (lazy: a missing build must not break import)
    except Exception as e:  # ImportError, or a broken/mismatched shared object
        return None, f"cdkernels._C failed to import ({type(e).__name__}: {e})"
    if not getattr(_C, "with_cuda", False):
        return None, "cdkernels._C was built without CUDA (no nvcc at build time, or disabled)"
    missing = [f for f in _REQUIRED if not hasattr(_C, f)]
    if missing:
        return None, f"cdkernels._C lacks {', '.join(missing)} (stale build?)"
    return _C, ""


# cudaError_t values (driver_types.h; stable across CUDA releases)
_ERR_INSUFFICIENT_DRIVER = 35        # the driver is older than the runtime
_ERR_CALL_REQUIRES_NEWER_DRIVER = 36


def _ver(v: int) -> str:
    """CUDA version integer (12040) as text ('12.4')."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _device_name(i: int) -> str:
    try:
        return torch.cuda.get_device_name(i) + " "
    except Exception:
        return ""


def kernel_image_for(archs, capability) -> bool:
    """Whether a device of compute capability ``(major, minor)`` can run a module compiled for
    ``archs`` (build_info()['cuda_archs'], e.g. ['sm_80', 'sm_90', 'compute_90']).

    sm_XY (SASS) runs on X.z for z >= Y only (binary compatibility stays within a major);
    compute_XY (PTX) is JIT-compiled by the driver for any X'.Y' >= X.Y. An arch-specific
    'a' variant (sm_90a, compute_90a) runs on exactly X.Y; a family-specific 'f' variant
    (sm_100f) on X.z, z >= Y.
    """
    cap = (int(capability[0]), int(capability[1]))
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", str(arch).strip().lower())
        if not m:
            continue
        kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if suffix == "a":
            ok = cap == (major, minor)
        elif kind == "sm" or suffix == "f":
            ok = cap[0] == major and cap[1] >= minor
        else:
            ok = cap >= (major, minor)
        if ok:
            return True
    return False


def _code(table, key, what):
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"cdkernels cuda backend: unsupported {what} {key!r}") from None


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _dev_stream(t: Tensor) -> Tuple[int, int]:
    dev = t.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(dev).cuda_stream


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._C, self._why = _load_ext()

    # -- availability -------------------------------------------------------------------------
    def availability(self) -> Tuple[bool, str]:
        if self._C is None:
            return False, self._why
        try:
            if not torch.cuda.is_available():
                return False, "torch.cuda.is_available() is False"
            n_torch = torch.cuda.device_count()
            n_ext = int(self._C.cuda_device_count())
        except Exception as e:
            return False, f"CUDA query failed ({type(e).__name__}: {e})"
        rt = int(getattr(self._C, "cuda_runtime_version", lambda: 0)())
        drv = int(getattr(self._C, "cuda_driver_version", lambda: 0)())
        if n_torch == 0 or n_ext == 0:
            return False, self._no_device_reason(n_torch, n_ext, rt, drv)
        try:
            archs = [str(a) for a in self._C.build_info().get("cuda_archs", [])]
            caps = [tuple(torch.cuda.get_device_capability(i)) for i in range(n_torch)]
        except Exception as e:
            return False, f"CUDA capability query failed ({type(e).__name__}: {e})"
        # A device none of the compiled archs runs on would fail every launch with "no kernel
        # image is available"; the backend must not be picked at all (all visible devices
        # must be covered: availability is per process, not per device).
        bad = [f"cuda:{i} {_device_name(i)}(compute capability {c[0]}.{c[1]})"
               for i, c in enumerate(caps) if not kernel_image_for(archs, c)]
        if bad:
            want = ";".join(sorted({f"{c[0]}.{c[1]}" for c in caps}))
            return False, (f"no kernel image for {', '.join(bad)}: cdkernels._C was compiled "
                           f"for {', '.join(archs) or 'no architecture'}. Rebuild with "
                           f"CDK_CUDA_ARCHS=native (or CDK_CUDA_ARCHS='{want}'), or hide that "
                           f"GPU with CUDA_VISIBLE_DEVICES")
        return True, (f"raw CUDA kernels (built with CUDA runtime {_ver(rt)}, driver "
                      f"{_ver(drv)}, {n_ext} device(s), archs {', '.join(archs)})")

    def _no_device_reason(self, n_torch: int, n_ext: int, rt: int, drv: int) -> str:
        code, what = 0, ""
        query = getattr(self._C, "cuda_device_error", None)  # absent in builds before it
        if query is not None:
            try:
                code, what = query()
            except Exception:  # a diagnostic must never make availability() raise
                code, what = 0, ""
        if code == _ERR_INSUFFICIENT_DRIVER and drv == 0:
            # the runtime reports a missing libcuda.so with the same code as an old one
            return (f"the extension's CUDA runtime finds no NVIDIA driver ({what}; torch sees "
                    f"{n_torch} device(s))")
        # without the error code (a build before cuda_device_error), an older driver *major*
        # is the tell: within a major, CUDA's minor-version compatibility makes it work
        if code in (_ERR_INSUFFICIENT_DRIVER, _ERR_CALL_REQUIRES_NEWER_DRIVER) or (
                not code and n_torch > 0 and 0 < drv and drv // 1000 < rt // 1000):
            return (f"the NVIDIA driver is too old for this build: cdkernels._C links the CUDA "
                    f"{_ver(rt)} runtime statically, and the installed driver supports CUDA "
                    f"{_ver(drv) if drv else 'unknown'}"
                    + (f" ({what})" if what else "")
                    + f". Update the driver to one for CUDA {_ver(rt)} or newer, or rebuild "
                    f"cdkernels with a CUDA toolkit (nvcc) no newer than the driver's CUDA "
                    f"version. torch sees {n_torch} device(s)")
        return (f"no CUDA device visible (torch sees {n_torch}, the extension's CUDA runtime "
                f"sees {n_ext}" + (f": {what}" if what else "") + ")")

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    # -- noise stream -------------------------------------------------------------------------
    def philox_words(self, out: Tensor, seed: Tensor, offset: int, sample: int) -> None:
        dev, st = _dev_stream(out)
        self._C.cuda_philox_words(dev, st, out.data_ptr(), out.numel(), seed.data_ptr(),
                                  int(offset), int(sample))

    def uniform(self, out: Tensor, seed: Tensor, offset: int, sample: int) -> None:
        dev, st = _dev_stream(out)
        self._C.cuda_uniform(dev, st, out.data_ptr(), out.numel(), seed.data_ptr(), int(offset),
                             int(sample))

    def normal(self, out: Tensor, seed: Tensor, offset: int, sample: int) -> None:
        dev, st = _dev_stream(out)
        self._C.cuda_normal(dev, st, _code(_DTYPE_CODE, out.dtype, "dtype"), out.data_ptr(),
                            out.numel(), seed.data_ptr(), int(offset), int(sample))

    # -- cd_step ------------------------------------------------------------------------------
    def cd_step_fwd(self, x, f, y, dt, sigma, sigma_value, C, chan_stride, seed, offset, act):
        dev, st = _dev_stream(x)
        self._C.cuda_cd_step_fwd(dev, st, _code(_DTYPE_CODE, x.dtype, "dtype"), x.numel(),
                                 x.data_ptr(), f.data_ptr(), y.data_ptr(), float(dt),
                                 _ptr(sigma), float(sigma_value), int(C), int(chan_stride),
                                 seed.data_ptr(), int(offset),
                                 _code(_STEP_ACT_CODE, act, "cd_step activation"))

    def cd_step_bwd(self, grad_y, y, grad_x, grad_f, grad_sigma, dt, sigma, sigma_value, C,
                    chan_stride, seed, offset, act):
        dev, st = _dev_stream(grad_y)
        self._C.cuda_cd_step_bwd(dev, st, _code(_DTYPE_CODE, grad_y.dtype, "dtype"),
                                 grad_y.numel(), grad_y.data_ptr(), _ptr(y), _ptr(grad_x),
                                 _ptr(grad_f), _ptr(grad_sigma), float(dt), int(C),
                                 int(chan_stride), seed.data_ptr(), int(offset),
                                 _code(_STEP_ACT_CODE, act, "cd_step activation"))

    # -- cd_smooth ----------------------------------------------------------------------------
    def cd_smooth_fwd(self, x, y, sigma, sigma_value, C, chan_stride, samples, seed, offset, act):
        dev, st = _dev_stream(x)
        self._C.cuda_cd_smooth_fwd(dev, st, _code(_DTYPE_CODE, x.dtype, "dtype"), x.numel(),
                                   x.data_ptr(), y.data_ptr(), _ptr(sigma), float(sigma_value),
                                   int(C), int(chan_stride), int(samples), seed.data_ptr(),
                                   int(offset), _code(_ACT_CODE, act, "activation"))

    def cd_smooth_bwd(self, grad_y, x, grad_x, grad_sigma, sigma, sigma_value, C, chan_stride,
                      samples, seed, offset, act):
        dev, st = _dev_stream(x)
        self._C.cuda_cd_smooth_bwd(dev, st, _code(_DTYPE_CODE, x.dtype, "dtype"), x.numel(),
                                   grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr(),
                                   _ptr(grad_sigma), _ptr(sigma), float(sigma_value), int(C),
                                   int(chan_stride), int(samples), seed.data_ptr(), int(offset),
                                   _code(_ACT_CODE, act, "activation"))

    # -- ensemble_mean ------------------------------------------------------------------------
    @staticmethod
    def _kbc(inp: Tensor) -> Tuple[int, int, int]:
        """(K, B, C) of inp [K, B, C] (leading dim K, softmax over the last dim)."""
        K = inp.shape[0] if inp.dim() >= 1 else 1
        C = inp.shape[-1] if inp.dim() >= 2 else 1
        B = inp.numel() // (K * C) if K * C > 0 else 0
        return K, B, C

    def ensemble_mean_fwd(self, inp, out, space):
        K, B, C = self._kbc(inp)
        dev, st = _dev_stream(inp)
        self._C.cuda_ensemble_mean_fwd(dev, st, _code(_DTYPE_CODE, inp.dtype, "dtype"),
                                       inp.data_ptr(), out.data_ptr(), K, B, C,
                                       _code(_SPACE_CODE, space, "space"))

    def ensemble_mean_bwd(self, grad_out, inp, out, grad_in, space):
        K, B, C = self._kbc(inp)
        dev, st = _dev_stream(inp)
        self._C.cuda_ensemble_mean_bwd(dev, st, _code(_DTYPE_CODE, inp.dtype, "dtype"),
                                       grad_out.data_ptr(), inp.data_ptr(), _ptr(out),
                                       grad_in.data_ptr(), K, B, C,
                                       _code(_SPACE_CODE, space, "space"))


# -- std-scaled step (csrc/cuda/std_step.cu), attached as a unit ------------------------------
def _cuda_z_stats(self, x, f, dt, out):
    dev, st = _dev_stream(x)
    ws = torch.empty(self._C.cuda_z_stats_workspace_doubles(), dtype=torch.float64,
                     device=x.device)
    self._C.cuda_z_stats(dev, st, _code(_DTYPE_CODE, x.dtype, "dtype"), x.numel(),
                         x.data_ptr(), f.data_ptr(), float(dt), ws.data_ptr(), out.data_ptr())


def _cuda_z_std_bwd(self, x, f, grad_y, dt, coefs, grad_x, grad_f):
    dev, st = _dev_stream(x)
    self._C.cuda_z_std_bwd(dev, st, _code(_DTYPE_CODE, x.dtype, "dtype"), x.numel(),
                           x.data_ptr(), f.data_ptr(), _ptr(grad_y), grad_x.data_ptr(),
                           _ptr(grad_f), float(dt), coefs.contiguous().data_ptr())


CudaBackend.z_stats = _cuda_z_stats
CudaBackend.z_std_bwd = _cuda_z_std_bwd
