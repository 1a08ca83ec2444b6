"""Model zoo: pre-activation ResNets whose residual updates are fused ``cd_step`` calls.

The registry follows timm's conventions:

>>> from cdkernels import models
>>> models.list_models("cd_preact_resnet2*")
['cd_preact_resnet20']
>>> net = models.create_model("cd_preact_resnet20", num_classes=10, in_chans=1, noise="em",
...                           sigma=0.1)

Every model takes ``num_classes``, ``in_chans`` (or ``in_channels``), ``noise`` ("em" |
"std" | "none"), ``sigma``, ``dt`` and ``learnable_sigma`` (False | "scalar" | "channel"). See
:mod:`cdkernels.models.resnet` for what each noise mode means. ``models.create`` is the same as
``create_model``; ``models.list`` is a deprecated alias of ``list_models`` (it shadows a
builtin).
"""
from __future__ import annotations

import builtins
import fnmatch
import functools
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from .resnet import (CDPreActResNet, EnResNet, NOISE_MODES, cd_preact_resnet, cd_wide_resnet,
                     enresnet)

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register(name: str, fn: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn


def list_models(pattern: Union[str, Iterable[str], None] = None) -> List[str]:
    """Registered model names, sorted; with ``pattern`` (a shell wildcard such as
    ``"enresnet*"``, or several), only the names matching one of them (case-insensitive)."""
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    try:
        pats = [pattern] if isinstance(pattern, str) else builtins.list(pattern)
    except TypeError:
        pats = []
    if not pats or not all(isinstance(p, str) for p in pats):
        raise TypeError(f"pattern must be a string or an iterable of strings, got {pattern!r}")
    pats = [p.lower() for p in pats]
    return [n for n in names if any(fnmatch.fnmatchcase(n.lower(), p) for p in pats)]


def create_model(name: str, pretrained: bool = False, *, in_chans: Optional[int] = None,
                 **kwargs) -> nn.Module:
    """Build the registered model ``name``. ``in_chans`` is timm's name for ``in_channels``;
    the other keyword arguments go to the model's builder (num_classes, noise, sigma, ...).
    There are no pretrained weights: ``pretrained=True`` raises."""
    fn = _REGISTRY.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    if pretrained:
        raise ValueError(f"cdkernels ships no pretrained weights for {name!r}; train one with "
                         f"`cdk-train --model {name}` and load its checkpoint")
    if in_chans is not None:
        if "in_channels" in kwargs and kwargs["in_channels"] != in_chans:
            raise TypeError(f"in_chans={in_chans} and in_channels={kwargs['in_channels']} "
                            f"disagree; pass one of them")
        kwargs["in_channels"] = in_chans
    return fn(**kwargs)


def create(name: str, **kwargs) -> nn.Module:
    """Same as :func:`create_model`."""
    return create_model(name, **kwargs)


def list(pattern: Union[str, Iterable[str], None] = None) -> List[str]:  # noqa: A001
    """Deprecated alias of :func:`list_models` (``list`` shadows the builtin)."""
    warnings.warn("cdkernels.models.list() is deprecated; use cdkernels.models.list_models()",
                  DeprecationWarning, stacklevel=2)
    return list_models(pattern)


def _fixed(fn, **fixed):
    @functools.wraps(fn)
    def build(**kw):
        clash = builtins.sorted(set(kw) & set(fixed))
        if clash:
            raise TypeError(f"{', '.join(clash)} is fixed by the model name")
        return fn(**fixed, **kw)
    return build


for _d in (20, 32, 44, 56, 110):
    register(f"cd_preact_resnet{_d}", _fixed(cd_preact_resnet, depth=_d))
    register(f"enresnet{_d}", _fixed(enresnet, depth=_d))
for _d, _k in ((16, 4), (16, 8), (28, 10), (40, 4)):
    register(f"cd_wrn{_d}_{_k}", _fixed(cd_wide_resnet, depth=_d, widen=_k))
# Generic builders (depth / widen as keywords).
register("cd_preact_resnet", cd_preact_resnet)
register("cd_wide_resnet", cd_wide_resnet)
register("enresnet", enresnet)

__all__ = ["list", "create", "register", "cd_preact_resnet", "cd_wide_resnet", "enresnet",
           "CDPreActResNet", "EnResNet", "NOISE_MODES"]
