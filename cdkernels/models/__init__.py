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


# -- self-describing checkpoints (cdkernels.train) -----------------------------------------------

def from_checkpoint(path: str, map_location="cpu") -> nn.Module:
    """The model of a ``cdkernels.train`` checkpoint (best.pt or checkpoint.pt), weights
    loaded, in eval mode, without the dataset: the checkpoint records the model name and
    keyword arguments. ``model.checkpoint_info`` holds the rest of that record: num_classes,
    in_channels, the input normalisation ``mean`` / ``std`` (per channel, of [0, 1] pixels),
    dataset, classes, epoch and the cdkernels version that wrote it.

    Loads with ``torch.load(weights_only=True)``. Raises ValueError for a file that is not a
    cdkernels checkpoint, is truncated, or predates the record (format 1: rebuild it with
    ``cdkernels.attack.load_model``, which reads the dataset)."""
    import torch
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                         ) from None
    if not isinstance(ck, dict) or not str(ck.get("format", "")).startswith("cdkernels-train/"):
        raise ValueError(f"{path} is not a cdkernels training checkpoint")
    arch = ck.get("arch")
    if not arch:
        raise ValueError(f"{path} has no model record (older checkpoint format 1); rebuild "
                         "it with cdkernels.attack.load_model, which reads the dataset")
    model = create(arch["name"], **arch["kwargs"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit {arch['name']}: "
                         f"{str(e).splitlines()[0]}") from None
    info = {k: v for k, v in arch.items() if k != "kwargs"}
    info.update(kwargs=dict(arch["kwargs"]), epoch=ck.get("epoch"),
                cdkernels_version=ck.get("cdkernels_version"), config=ck.get("config"))
    model.checkpoint_info = info
    return model.to(map_location).eval()
