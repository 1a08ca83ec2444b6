"""Backend registry and dispatch.

Four backends compute the same documented noise stream (docs/noise.md):

==========  =====================================  =========================================
name        where it runs                          what it is
==========  =====================================  =========================================
reference   any device, any float dtype            pure PyTorch, the oracle for tests
cpu         CPU tensors                            csrc/cpu, multithreaded, SIMD at run time
cuda        CUDA tensors                           csrc/cuda, raw CUDA C++ kernels
triton      CUDA tensors (CPU with TRITON_INTERPRET=1)  Triton kernels
==========  =====================================  =========================================

Selection, in order: the ``backend=`` argument of an op, the innermost
``cdkernels.use_backend(name)`` context, the ``CDK_BACKEND`` environment variable, else an
automatic choice by device (CUDA: cuda, then triton; CPU: cpu). A backend that was asked for
by name and cannot run raises; an automatic choice that cannot load falls back to the next
candidate (finally ``reference``) with a one-time warning that says why.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import types
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .base import Backend

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
_MODULES = {
    "reference": ("cdkernels.backends.reference", "ReferenceBackend"),
    "cpu": ("cdkernels.backends.cpu", "CpuBackend"),
    "cuda": ("cdkernels.backends.cuda", "CudaBackend"),
    "triton": ("cdkernels.backends.triton_backend", "TritonBackend"),
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_instances: Dict[str, Tuple[Optional[Backend], str]] = {}
_lock = threading.Lock()
_local = threading.local()
_warned: set = set()


def _check_name(name: str, argname: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"{argname}={name!r} is not a cdkernels backend; choose one of "
                         f"{', '.join(BACKEND_NAMES)} or 'auto'")
    return name.lower()


def _load(name: str) -> Tuple[Optional[Backend], str]:
    """The backend instance (or None) and the reason it is (un)available. Cached."""
    with _lock:
        if name not in _instances:
            modname, clsname = _MODULES[name]
            try:
                inst = getattr(importlib.import_module(modname), clsname)()
                ok, why = inst.availability()
            except Exception as e:  # a broken backend must not break `import cdkernels`
                inst, ok, why = None, False, f"failed to load: {type(e).__name__}: {e}"
            _instances[name] = (inst if ok else None, why)
        return _instances[name]


def backends() -> Dict[str, Dict[str, object]]:
    """Each backend with ``available`` (bool) and ``reason`` (why, or what was found)."""
    out = {}
    for name in BACKEND_NAMES:
        inst, why = _load(name)
        out[name] = {"available": inst is not None, "reason": why}
    return out


_ENV_DATA = getattr(os.environ, "_data", None)  # posix: the bytes dict behind os.environ


def _env_backend() -> str:
    # os.environ.get costs ~2 us (key encoding); the raw dict lookup ~0.1 us. Both see
    # os.environ updates (monkeypatch.setenv), so the variable is still read on every call.
    if _ENV_DATA is not None and os.name == "posix":
        v = _ENV_DATA.get(b"CDK_BACKEND")
        return os.fsdecode(v).strip() if v else ""
    return os.environ.get("CDK_BACKEND", "").strip()


def _requested() -> Optional[str]:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = _env_backend()
    if env:
        name = _check_name(env, "CDK_BACKEND")
        return None if name == "auto" else name
    return None


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` ('auto' restores automatic choice)."""
    name = _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(None if name == "auto" else name)
    try:
        yield
    finally:
        stack.pop()


def _explicit(name: str, device: torch.device, dtype: Optional[torch.dtype]) -> Backend:
    inst, why = _load(name)
    if inst is None:
        raise RuntimeError(f"cdkernels backend {name!r} was requested but is unavailable: {why}")
    if not inst.supports(device):
        raise RuntimeError(f"cdkernels backend {name!r} cannot run on {device.type} tensors"
                           + (f" ({why})" if name == "triton" else ""))
    if dtype is not None and dtype not in NATIVE_DTYPES and name != "reference":
        raise TypeError(f"cdkernels backend {name!r} supports float32, float16 and bfloat16; "
                        f"got {dtype} (float64 runs on backend='reference')")
    return inst


# (device, dtype, backend argument, requested name) -> backend. Only successful lookups are
# cached (errors are raised again each time); the requested name (context / CDK_BACKEND) is part
# of the key, so changing either takes effect at once.
_cache: Dict[tuple, Backend] = {}


def get_backend(device: torch.device, dtype: Optional[torch.dtype] = None,
                backend: Optional[str] = None) -> Backend:
    """The backend an op on (device, dtype) runs on, following the rules in this module."""
    key = (device, dtype, backend or None, _requested())
    inst = _cache.get(key)
    if inst is None:
        inst = _cache[key] = _resolve(device, dtype, backend)
    return inst


def _resolve(device: torch.device, dtype: Optional[torch.dtype],
             backend: Optional[str]) -> Backend:
    name = _check_name(backend) if backend else None
    if name == "auto":
        name = None
    if name is None:
        name = _requested()
    if name is not None:
        return _explicit(name, device, dtype)
    if dtype is not None and dtype not in NATIVE_DTYPES:
        return _load("reference")[0]  # float64 (gradcheck) runs on the oracle
    order = _AUTO_ORDER.get(device.type, ("reference",))
    reasons: List[str] = []
    for cand in order:
        inst, why = _load(cand)
        if inst is not None and inst.supports(device):
            if reasons:
                key = (device.type, cand)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"cdkernels: using backend {cand!r} on {device.type}: "
                                  + "; ".join(reasons), RuntimeWarning, stacklevel=3)
            return inst
        reasons.append(f"{cand!r} unavailable ({why})" if inst is None
                       else f"{cand!r} does not run on {device.type}")
    raise RuntimeError("no cdkernels backend can run here: " + "; ".join(reasons))


class _CallableModule(types.ModuleType):
    """``cdkernels.backends`` is both this package (``cdkernels.backends.cpu`` ...) and the
    function that lists the backends: ``cdkernels.backends()``."""

    def __call__(self) -> Dict[str, Dict[str, object]]:
        return backends()


sys.modules[__name__].__class__ = _CallableModule
