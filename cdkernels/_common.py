"""Argument checks, memory layout and seeds shared by the ops."""
from __future__ import annotations

import math
import os
import threading
from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_U64 = 1 << 64
# Odd constant (2^64 / golden ratio) that spreads process-group ranks over the seed space.
_RANK_MIX = 0x9E3779B97F4A7C15


# -- checks --------------------------------------------------------------------------------------

def check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
                        f"float64), got {t.dtype}")


def check_same(x: Tensor, other: Tensor, xname: str, name: str) -> None:
    if other.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {xname} {tuple(x.shape)}, "
                         f"got {tuple(other.shape)}")
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but {xname} is on {x.device}")
    if other.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {other.dtype} but {xname} has {x.dtype}")


def check_nonneg_number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


def sigma_args(sigma, x: Tensor) -> Tuple[float, Optional[Tensor]]:
    """(sigma_value, sigma_tensor). A tensor sigma is 0-d/1-element (scalar) or has x.shape[1]
    elements (one per channel). Its sign is not checked (that would need a device sync); the
    noise is symmetric, so -sigma and sigma draw from the same distribution."""
    if isinstance(sigma, torch.Tensor):
        check_float_tensor(sigma, "sigma")
        if sigma.device != x.device:
            raise ValueError(f"sigma is on {sigma.device} but x is on {x.device}")
        if sigma.numel() != 1:
            C = x.shape[1] if x.dim() >= 2 else None
            if sigma.dim() != 1 or C is None or sigma.numel() != C:
                raise ValueError(
                    "sigma must be a float, a 1-element tensor or a 1-D tensor with one value per "
                    f"channel (x.shape[1] = {C}); got shape {tuple(sigma.shape)} for x of shape "
                    f"{tuple(x.shape)}")
        return 0.0, sigma
    return check_nonneg_number(sigma, "sigma"), None


def check_activation(activation, allowed) -> str:
    a = "none" if activation is None else activation
    if not isinstance(a, str) or a.lower() not in allowed:
        raise ValueError(f"activation={activation!r} is not supported; choose one of "
                         f"{', '.join(repr(v) for v in allowed)}"
                         + (" or None" if "none" in allowed else ""))
    return a.lower()


# -- layout --------------------------------------------------------------------------------------

def is_dense(t: Tensor) -> bool:
    """True if t's elements fill a gap-free, non-overlapping block of memory (any dim order)."""
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def like(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's strides (a copy only when they differ); ref must be dense."""
    return with_strides(t, ref.stride())


def with_strides(t: Tensor, stride) -> Tensor:
    """t laid out with ``stride`` (a dense layout of t's shape; a copy only when it differs,
    from any layout of t, expanded ones included)."""
    if t.stride() == stride or t.numel() <= 1:
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def dense_input(x: Tensor) -> Tensor:
    """x itself when dense, else a copy laid out like ``torch.empty_like(x)``."""
    if x.is_contiguous() or is_dense(x):  # (is_contiguous: one C call, the common case)
        return x
    out = torch.empty_like(x)
    out.copy_(x)
    return out


def flat(t: Tensor) -> Tensor:
    """The 1-D view of a dense tensor's memory (memory order)."""
    return t.as_strided((t.numel(),), (1,))


def channel_map(x: Tensor, sigma: Optional[Tensor]) -> Tuple[int, int]:
    """(C, chan_stride) with channel(p) = (p // chan_stride) % C for dense x (docs/noise.md)."""
    if sigma is None or sigma.numel() == 1:
        return 1, 1
    C = x.shape[1]
    return C, max(int(x.stride(1)), 1)


def sigma_for_kernel(sigma: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """sigma as the flat contiguous float32 tensor kernels read (float64 for float64 data,
    which only the reference backend handles). Converted only when it needs converting: a
    float32 contiguous sigma is passed as a (detached) view, no copy and no kernel."""
    if sigma is None:
        return None
    kd = torch.float64 if dtype == torch.float64 else torch.float32
    if sigma.dtype == kd and sigma.is_contiguous():
        s = sigma.detach() if sigma.requires_grad else sigma
        return s if s.dim() == 1 else s.view(-1)
    return sigma.detach().reshape(-1).to(kd).contiguous()


# -- seeds ---------------------------------------------------------------------------------------

try:
    import torch.distributed as _dist
    _DIST_OK = _dist.is_available()
except Exception:  # pragma: no cover - builds without distributed support
    _dist, _DIST_OK = None, False


def _rank() -> int:
    if _DIST_OK:
        try:
            if _dist.is_initialized():
                return _dist.get_rank()
        except Exception:
            pass
    return 0


def draw_seed_(buf: Tensor) -> Tensor:
    """Fill the int64 [1] tensor ``buf`` with a fresh seed from the torch generator of its device
    (docs/noise.md section 5): ``random_()`` gives 63 random bits, XOR-ed with the rank mix so
    DDP ranks get different noise. On CUDA this is one graph-safe kernel, so a replayed graph
    draws new seeds."""
    buf.random_()
    r = _rank()
    if r:
        buf.bitwise_xor_(_to_signed64(_RANK_MIX * r % _U64))
    return buf


_seed_local = threading.local()


def cpu_seed_buffer(seed: Union[None, int]) -> Tensor:
    """A per-thread reusable int64 [1] CPU tensor holding the seed of one CPU call: the same value
    ``make_seed(seed, cpu)`` gives (a fresh draw for None, the key for an int), without
    allocating a tensor (allocation is most of make_seed's host time). CPU kernels read the seed
    from memory when they are called, so the buffer may be refilled by the next call; callers
    that need the seed later (backward) keep ``int(buf)`` instead."""
    buf = _seed_buffer()
    if seed is None:
        return draw_seed_(buf)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be None, an int or an int64 tensor, got {type(seed).__name__}")
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    buf.fill_(_to_signed64(seed))
    return buf


def cpu_seed_buffer_signed(value: int) -> Tensor:
    """cpu_seed_buffer holding a seed already known as its signed int64 value (a backward
    replaying its forward's seed; no range checks, no draw)."""
    return _seed_buffer().fill_(value)


def eager_seed(seed: Union[None, int, Tensor], x: Tensor, keep_value: bool):
    """(seed tensor, its int64 value or None) for an op called eagerly on x. On the CPU an int or
    None goes through this thread's seed buffer (no allocation; the kernels read it on entry), and
    with ``keep_value`` its value comes back too, for a backward that runs after the buffer has
    been refilled (cpu_seed_buffer_signed replays it). Elsewhere, or for a seed tensor:
    make_seed's tensor, which the op keeps itself."""
    if x.is_cpu and not isinstance(seed, torch.Tensor):  # (is_cpu: device.type costs ~2 us)
        buf = cpu_seed_buffer(seed)
        return buf, (buf.item() if keep_value else None)
    return make_seed(seed, x.device), None


def _seed_buffer() -> Tensor:
    """This thread's reusable int64 [1] CPU seed tensor."""
    buf = getattr(_seed_local, "buf", None)
    if buf is None:
        buf = _seed_local.buf = torch.empty((1,), dtype=torch.int64)
    return buf


def make_seed(seed: Union[None, int, Tensor], device: torch.device) -> Tensor:
    """The int64 [1] seed tensor on ``device`` that kernels read.

    None: drawn from the torch generator of ``device`` (see :func:`draw_seed_`; so
    ``torch.manual_seed`` reproduces a run, successive calls differ, and a CUDA graph replays
    with fresh seeds), mixed with the process-group rank so DDP ranks get different noise.
    int in [0, 2^64): that exact key. Tensor: an int64 tensor with one element on ``device``,
    used as given.
    """
    if seed is None:
        if torch.compiler.is_compiling():
            # Dynamo cannot trace in-place random_(); a traced randint is graph-safe too (under
            # compile the draw comes from the compiler's RNG anyway, as for torch.randn)
            s = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device)
            r = _rank()
            return torch.bitwise_xor(s, _to_signed64(_RANK_MIX * r % _U64)) if r else s
        return draw_seed_(torch.empty((1,), dtype=torch.int64, device=device))
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed tensor must be int64 with one element, got {seed.dtype} "
                             f"of shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed tensor is on {seed.device} but the data is on {device}")
        return seed.reshape(1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be None, an int or an int64 tensor, got {type(seed).__name__}")
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.full((1,), _to_signed64(seed), dtype=torch.int64, device=device)


def _to_signed64(v: int) -> int:
    return v - _U64 if v >= (1 << 63) else v


def check_offset(offset, name: str = "offset") -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{name} must be an int, got {type(offset).__name__}")
    if not 0 <= offset < (1 << 63):
        raise ValueError(f"{name} must be in [0, 2**63), got {offset}")
    return offset


# -- big CPU outputs ------------------------------------------------------------------------------

class _OutputCache:
    """Reuses the memory of big CPU outputs (>= 8 MiB) once the caller has dropped them.

    A fresh 64 MiB tensor is first touched by our kernel: 16K page faults (or 32 huge-page faults
    that may stall on compaction), 20-100 ms on the dev VM against a 15 ms kernel, and different
    in every process. This cache keeps the storages of the last few big outputs; a storage whose
    only owner is the cache (use count 1) is handed out again as the next output of that size,
    already faulted in, so repeated calls (inference loops, benchmarks, the next training step)
    run at kernel speed every time. At most ``max_bufs`` storages and ``max_bytes`` in all; a
    storage still in use is never evicted and never reused. ``CDK_CPU_OUTPUT_CACHE=0`` turns it
    off; :func:`cdkernels.empty_cache` releases what it holds.
    """

    MIN_BYTES = 8 << 20

    def __init__(self, max_bufs: int = 6, max_bytes: int = 1 << 30):
        self.max_bufs, self.max_bytes = max_bufs, max_bytes
        self.bufs = []  # UntypedStorage objects, least recently used first
        self.lock = threading.Lock()
        self.enabled = (hasattr(torch._C, "_storage_Use_Count")
                        and os.environ.get("CDK_CPU_OUTPUT_CACHE", "1") != "0")

    @staticmethod
    def _free(st) -> bool:
        return torch._C._storage_Use_Count(st._cdata) == 1

    def empty_like(self, x: Tensor) -> Tensor:
        """``torch.empty_like(x)`` for a contiguous CPU x."""
        nbytes = x.numel() * x.element_size()
        if not self.enabled or nbytes < self.MIN_BYTES:
            return torch.empty_like(x)
        with self.lock:
            for i, st in enumerate(self.bufs):
                if st.nbytes() == nbytes and self._free(st):
                    self.bufs.append(self.bufs.pop(i))
                    return torch.empty(0, dtype=x.dtype).set_(st, 0, x.shape, x.stride())
            out = torch.empty_like(x)
            self.bufs.append(out.untyped_storage())
            while (len(self.bufs) > self.max_bufs
                   or sum(b.nbytes() for b in self.bufs) > self.max_bytes):
                victim = next((j for j, b in enumerate(self.bufs[:-1]) if self._free(b)), None)
                if victim is None:
                    self.bufs.pop()  # everything else is in use: do not keep the new one
                    break
                self.bufs.pop(victim)
            return out

    def clear(self) -> None:
        with self.lock:
            self.bufs.clear()


output_cache = _OutputCache()


def empty_output(x: Tensor) -> Tensor:
    """A new output laid out like ``torch.empty_like(x)``; big contiguous CPU outputs come from
    :data:`output_cache` (already faulted-in memory)."""
    if x.is_cpu and x.is_contiguous() and output_cache.enabled:
        return output_cache.empty_like(x)
    return torch.empty_like(x)


# -- the process heap (CPU training) ----------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def steady_heap(trim_bytes: int = 512 << 20, mmap_bytes: int = 256 << 20) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A CPU training step allocates and frees the same multi-MiB activations every time. With
    glibc's defaults (allocations above a dynamic threshold of at most 32 MiB are mmap'd, and the
    heap top is trimmed beyond twice that threshold), whether a step gets already-mapped memory
    or fresh pages that fault in on first touch depends on how the heap happens to be laid out,
    which differs from process to process: on the 2-core VM the same 28x28 CD-PreActResNet-20
    step ran with 0 page faults in one process and 7900 (+15 % step time) in another.
    Allocations below ``mmap_bytes`` then come from the heap, and up to ``trim_bytes`` of freed
    heap top stays mapped, so every step after the first reuses the same pages.

    Process-wide, and only for glibc (returns False, changing nothing, elsewhere); True when both
    settings took. The training CLI and bench/bench_train.py call it for CPU runs unless
    ``CDK_STEADY_HEAP=0``.
    """
    for v, name in ((trim_bytes, "trim_bytes"), (mmap_bytes, "mmap_bytes")):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2 ** 31:
            raise ValueError(f"{name} must be an int in (0, 2**31), got {v!r}")
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes)) and bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_bytes))


def steady_heap_wanted() -> bool:
    """False when the environment says CDK_STEADY_HEAP=0 (the CLIs then leave malloc alone)."""
    return os.environ.get("CDK_STEADY_HEAP", "1") != "0"
