"""Attack CLI: ``python -m cdkernels.attack --checkpoint runs/x/best.pt --attack pgd --eps 0.1``.

Loads a ``cdkernels.train`` checkpoint (best.pt or checkpoint.pt), rebuilds the model and the
data normalisation it was trained with, and reports natural and robust accuracy (95 % Wilson
intervals) on the test split (or --split val) for FGSM / PGD (L-inf or L2; cross-entropy or
margin loss, restarts), the cross-check attacks of torchattacks (APGD with EOT, AutoAttack
"rand"; optional extra ``pip install cdkernels[attacks]``), and the frozen-noise white-box
attack (--frozen-noise).

A noisy checkpoint is attacked as the method uses it: the Monte-Carlo model with its noise on
(--mc-samples K, default 4) and EOT gradients (--eot M, default 4). ``--noise-off`` attacks
the deterministic network instead; asking for --eot 1 on a stochastic model warns, since one
noise draw per gradient is a weak attack on a randomised defence. Writes JSON (--out) and
prints a Markdown table. Attacks run in pixel space [0, 1]; the model normalises inside.
Gradient masking is flagged when input gradients are ~0 or the attack is weaker than random
noise of the same eps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional

import torch

from . import data as D
from . import models as M
from . import robust as R
from .nn import MonteCarlo

PROG = "python -m cdkernels.attack"
MC_DEFAULT = 4   # Monte-Carlo samples of a noisy model (the training CLI selects with 4)
EOT_DEFAULT = 4  # noise draws per gradient against a noisy model


class CLIError(Exception):
    """Bad user input: one line ``PROG: error: ...``, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--version", action="version", version=f"%(prog)s (cdkernels {__version__})")
    a("--checkpoint", required=True, help="best.pt / checkpoint.pt of cdkernels.train")
    a("--data", default=None, choices=D.DATASETS, help="dataset (default: the checkpoint's)")
    a("--data-dir", default=None, help="dataset folder (as for cdkernels.train)")
    a("--split", choices=("test", "val"), default="test", help="which split to attack")
    a("--limit-eval", type=int, default=None, metavar="N", help="attack the first N images "
      "only (the same option name as in cdkernels.train)")
    a("--limit", dest="limit_eval", type=int, help=argparse.SUPPRESS)  # old spelling
    a("--attack", default="pgd", choices=R.ATTACKS, help="none, fgsm, pgd (written here) or "
      "a torchattacks cross-check: apgd (APGD-CE + EOT), apgd-dlr, autoattack-rand")
    a("--norm", default="linf", choices=R.NORMS, help="threat model")
    a("--eps", default="0.1", help="radius in pixel units [0, 1] (e.g. 0.1 or 8/255)")
    a("--steps", type=int, default=20, help="PGD / APGD iterations")
    a("--step-size", default=None, help="PGD step (default 2.5*eps/steps)")
    a("--loss", default="ce", choices=R.LOSSES, help="PGD / FGSM loss: cross-entropy, or the "
      "CW / DLR margin")
    a("--restarts", type=int, default=1, help="PGD / APGD random restarts (the worst case per "
      "image is kept)")
    a("--no-random-start", dest="random_start", action="store_false",
      help="PGD starts at the clean image")
    a("--eot", type=int, default=None, metavar="M", help="noise draws per gradient (batched); "
      f"default {EOT_DEFAULT} for a stochastic model, 1 otherwise")
    a("--eot-chunk", type=int, default=None, help="at most this many EOT draws per pass "
      "(memory bound; default all)")
    a("--mc-samples", type=int, default=None, metavar="K", help="Monte-Carlo inference with K "
      f"noise samples, noise on (default {MC_DEFAULT} for a noisy checkpoint)")
    a("--noise-off", action="store_true", help="attack the deterministic (noise-off) network "
      "of a noisy checkpoint instead of the Monte-Carlo model")
    a("--mc-space", choices=("prob", "logit", "logprob"), default="prob",
      help="space in which the K samples are averaged")
    a("--frozen-noise", nargs="?", const=0, default=None, type=int, metavar="SEED",
      help="white-box attack on the network with frozen noise (per-batch seeds derived from "
      "--seed; SEED is added to them)")
    a("--seed", type=int, default=0, help="seed of the evaluation and attack randomness")
    a("--batch-size", type=int, default=500, help="images per batch")
    a("--sanity", action="store_true", help="also run eps=0, half the steps and half the EOT "
      "draws and check the expected orderings")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--out", default=None, help="JSON output file")
    a("--md", default=None, help="also write the Markdown table to this file")
    a("--quiet", action="store_true", help="no progress bar")
    a("--progress", dest="quiet", action="store_false", help=argparse.SUPPRESS)  # old spelling
    return p


def load_model(path: str, device, data_name: Optional[str] = None,
               data_dir: Optional[str] = None):
    """(model in eval mode, ImageData, config) from a cdkernels.train checkpoint. The model is
    rebuilt from the checkpoint's own record (format 2) or, for format-1 checkpoints, from its
    config and the dataset; the input normalisation is the training one either way."""
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
    arch = ck.get("arch")
    if arch:
        kw = dict(arch["kwargs"])
        data.mean = torch.tensor(arch["mean"], dtype=torch.float32, device=data.device)
        data.std = torch.tensor(arch["std"], dtype=torch.float32, device=data.device)
    else:
        ls = cfg.get("learnable_sigma", "none")
        kw = dict(num_classes=data.num_classes, in_channels=data.in_channels,
                  noise=cfg["noise"], sigma=cfg["sigma"], dt=cfg["dt"],
                  learnable_sigma=False if ls == "none" else ls)
        if cfg.get("width") is not None:
            kw["width"] = cfg["width"]
        if cfg.get("members") is not None:
            kw["members"] = cfg["members"]
    if kw.get("in_channels") != data.in_channels or kw.get("num_classes") != data.num_classes:
        raise CLIError(f"{path} is a model for {kw.get('in_channels')}-channel images and "
                       f"{kw.get('num_classes')} classes, not {name}")
    try:
        model = M.create(cfg["model"], **kw)
        model.load_state_dict(ck["model"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise CLIError(f"{path}: the weights do not fit {cfg['model']} "
                       f"({str(e).splitlines()[0][:200]})") from None
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


def resolve(args, noisy: bool):
    """(K, M) actually used: a noisy model is attacked with its noise on and EOT unless
    --noise-off; a deterministic one with K = None and M = 1."""
    if not noisy or args.noise_off:
        if args.mc_samples:
            raise CLIError("--mc-samples needs a noisy checkpoint without --noise-off")
        return None, 1 if args.eot is None else args.eot
    k = MC_DEFAULT if args.mc_samples is None else args.mc_samples
    m = EOT_DEFAULT if args.eot is None else args.eot
    if m == 1 and args.frozen_noise is None and args.attack not in ("none", "autoattack-rand"):
        warnings.warn("--eot 1 on a stochastic model: every gradient sees one noise draw, a weak "
                      "attack on a randomised defence (robust accuracy will be over-estimated); "
                      f"use --eot {EOT_DEFAULT} or more", stacklevel=2)
    return k, m


def _check_args(args):
    for name in ("steps", "batch_size", "restarts"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eot", "mc_samples", "limit_eval", "eot_chunk"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    try:
        eps = R._check_eps(R.parse_eps(args.eps))
        step = None if args.step_size is None else R.parse_eps(args.step_size)
    except ValueError as e:
        raise CLIError(f"--eps / --step-size: {e}") from None
    if args.attack in R.EXTERNAL_ATTACKS:
        try:
            R.require_torchattacks()
        except R.MissingExtra as e:
            raise CLIError(str(e)) from None
    return eps, step


def run(args) -> dict:
    from .train import resolve_device, CLIError as TrainCLIError
    eps, step = _check_args(args)
    try:
        device = resolve_device(args.device)
    except TrainCLIError as e:
        raise CLIError(str(e)) from None
    if not os.path.isfile(args.checkpoint):
        raise CLIError(f"no checkpoint file {args.checkpoint!r}")
    model, data, cfg = load_model(args.checkpoint, device, args.data, args.data_dir)
    k, m = resolve(args, cfg["noise"] != "none")
    net = wrap(model, data, k, args.mc_space)
    batches = pixel_batches(data, getattr(data, args.split), args.batch_size, args.limit_eval)
    seed = args.seed + (args.frozen_noise or 0)
    kw = dict(attack_kind=args.attack, eps=eps, norm=args.norm, steps=args.steps,
              step_size=step, random_start=args.random_start, eot=m,
              eot_chunk=args.eot_chunk, frozen=args.frozen_noise is not None, seed=seed,
              loss=args.loss, restarts=args.restarts)
    res = R.evaluate_attack(net, batches, progress=not args.quiet, **kw)
    res.update(mc_samples=k, mc_space=args.mc_space if k else None, checkpoint=args.checkpoint,
               model=cfg["model"], noise=cfg["noise"], data=cfg["data"], split=args.split,
               device=str(device), noise_off=bool(args.noise_off and cfg["noise"] != "none"))
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
    except (CLIError, D.DataError) as e:
        # User errors only: one line, exit 2. Internal errors keep their traceback.
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
