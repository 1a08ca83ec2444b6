"""Attack CLI: ``python -m cdkernels.attack --checkpoint runs/x/best.pt --attack pgd --eps 0.1``.

Loads a ``cdkernels.train`` checkpoint (best.pt or checkpoint.pt), rebuilds the model and the
data normalisation it was trained with, and reports natural and robust accuracy (95 % Wilson
intervals) on the test split (or --split val) for FGSM / PGD (L-inf or L2), optionally with
EOT (--eot M), Monte-Carlo inference (--mc-samples K) and the frozen-noise white-box attack
(--frozen-noise). Writes JSON (--out) and prints a Markdown table. Attacks run in pixel space
[0, 1]; the model normalises inside. Gradient masking is flagged (``gradient_masking_suspected``)
when input gradients are ~0 or the attack is weaker than random noise of the same eps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from . import data as D
from . import models as M
from . import robust as R
from .nn import MonteCarlo

PROG = "python -m cdkernels.attack"


class CLIError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="best.pt / checkpoint.pt of cdkernels.train")
    a("--data", default=None, choices=D.DATASETS, help="dataset (default: the checkpoint's)")
    a("--data-dir", default=None)
    a("--split", choices=("test", "val"), default="test")
    a("--limit", type=int, default=None, metavar="N", help="evaluate the first N images only")
    a("--attack", default="pgd", help="none | fgsm | pgd")
    a("--norm", default="linf", help="linf | l2")
    a("--eps", default="0.1", help="radius in pixel units [0, 1] (e.g. 0.1 or 8/255)")
    a("--steps", type=int, default=20, help="PGD iterations")
    a("--step-size", default=None, help="PGD step (default 2.5*eps/steps)")
    a("--no-random-start", dest="random_start", action="store_false")
    a("--eot", type=int, default=1, metavar="M", help="noise draws per gradient (batched)")
    a("--eot-chunk", type=int, default=None, help="at most this many EOT draws per pass")
    a("--mc-samples", type=int, default=None, metavar="K", help="Monte-Carlo inference with K "
      "noise samples (default: the model in eval mode, noise off)")
    a("--mc-space", choices=("prob", "logit", "logprob"), default="prob")
    a("--frozen-noise", nargs="?", const=0, default=None, type=int, metavar="SEED",
      help="white-box attack on the network with frozen noise (per-batch seeds derived from "
      "--seed; SEED is added to them)")
    a("--seed", type=int, default=0)
    a("--batch-size", type=int, default=500)
    a("--sanity", action="store_true", help="also run eps=0, half the steps and half the EOT "
      "draws and check the expected orderings")
    a("--device", default=None)
    a("--out", default=None, help="JSON output file")
    a("--md", default=None, help="also write the Markdown table to this file")
    a("--progress", action="store_true")
    return p


def load_model(path: str, device, data_name: Optional[str] = None,
               data_dir: Optional[str] = None):
    """(model in eval mode, ImageData, config) from a cdkernels.train checkpoint."""
    from .train import load_checkpoint, CLIError as TrainCLIError
    try:
        ck = load_checkpoint(path)
    except TrainCLIError as e:
        raise CLIError(str(e)) from None
    cfg = ck["config"]
    name = data_name or cfg["data"]
    if name != cfg["data"]:
        raise CLIError(f"--data {name} but the checkpoint was trained on {cfg['data']}")
    data = D.load(name, data_dir, device=device, val_fraction=cfg["val_fraction"],
                  limit_train=cfg["limit_train"])  # same split and normalisation as training
    ls = cfg.get("learnable_sigma", "none")
    kw = dict(num_classes=data.num_classes, in_channels=data.in_channels, noise=cfg["noise"],
              sigma=cfg["sigma"], dt=cfg["dt"], learnable_sigma=False if ls == "none" else ls)
    if cfg.get("width") is not None:
        kw["width"] = cfg["width"]
    if cfg.get("members") is not None:
        kw["members"] = cfg["members"]
    model = M.create(cfg["model"], **kw)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), data, cfg


def pixel_batches(data: D.ImageData, split: D.Split, batch_size: int, limit: Optional[int]):
    n = len(split) if limit is None else min(limit, len(split))
    out = []
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n), device=split.images.device)
        x = split.images.index_select(0, idx).float() * data.scale
        out.append((x, split.labels.index_select(0, idx)))
    return out


def wrap(model, data: D.ImageData, mc_samples: Optional[int], space: str = "prob"):
    """Pixel-space model (normalisation inside), Monte-Carlo averaged if ``mc_samples``."""
    inner = MonteCarlo(model, samples=mc_samples, space=space) if mc_samples else model
    return R.PixelModel(inner, data.mean, data.std).eval()


def run(args) -> dict:
    for name in ("steps", "eot", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    eps = R._check_eps(R.parse_eps(args.eps))
    step = None if args.step_size is None else R.parse_eps(args.step_size)
    R._check_norm(args.norm)
    if args.attack not in R.ATTACKS:
        raise ValueError(f"unknown attack {args.attack!r}; choose one of {', '.join(R.ATTACKS)}")
    if args.mc_samples is not None and args.mc_samples < 1:
        raise ValueError(f"--mc-samples must be >= 1, got {args.mc_samples}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, data, cfg = load_model(args.checkpoint, device, args.data, args.data_dir)
    k = args.mc_samples if cfg["noise"] != "none" else None
    net = wrap(model, data, k, args.mc_space)
    batches = pixel_batches(data, getattr(data, args.split), args.batch_size, args.limit)
    seed = args.seed + (args.frozen_noise or 0)
    kw = dict(attack_kind=args.attack, eps=eps, norm=args.norm, steps=args.steps,
              step_size=step, random_start=args.random_start, eot=args.eot,
              eot_chunk=args.eot_chunk, frozen=args.frozen_noise is not None, seed=seed)
    res = R.evaluate_attack(net, batches, progress=args.progress, **kw)
    res.update(mc_samples=k, mc_space=args.mc_space if k else None, checkpoint=args.checkpoint,
               model=cfg["model"], noise=cfg["noise"], data=cfg["data"], split=args.split,
               device=str(device))
    if args.sanity:
        res["sanity"] = R.sanity_checks(net, batches, res, **kw)
    table = R.markdown_table([res])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table)
    print(table, end="")
    if res["gradient_masking_suspected"]:
        print("WARNING: gradient masking suspected: " + "; ".join(res["gradient_masking_reasons"]))
    if args.sanity and not res["sanity"]["passed"]:
        print(f"WARNING: sanity checks failed: {res['sanity']}")
    return res


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        run(args)
    except (CLIError, D.DataError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
