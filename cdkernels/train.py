"""Training CLI: ``python -m cdkernels.train --model cd_preact_resnet20 --data digits ...``.

Small datasets live on the device (see :mod:`cdkernels.data`); batches are index slices of a
per-epoch permutation. Each epoch appends one JSON line to ``OUT/metrics.jsonl`` and writes
``OUT/checkpoint.pt`` atomically (temp file + ``os.replace``); ``--resume`` continues exactly
(model, optimizer, scheduler, epoch and every generator state are restored), and with a larger
``--epochs`` it extends a finished run. At the end: ``OUT/summary.json`` and ``OUT/curves.png``.

Model selection (``OUT/best.pt``) uses the validation split only; the test set is reported,
never selected on. A noisy model is used the way the method uses it, with the noise on: it is
selected and reported on its Monte-Carlo accuracy (``--mc-samples K`` noise draws averaged,
default 4; the evaluation noise is fixed across epochs, so epochs are compared on the same
draws). The noise-off accuracy is reported beside it, labelled ``*_noise_off``. An
adversarially trained run (``--adv-train pgd``) is selected on its robust validation accuracy
(PGD of the training strength on a fixed subset of ``--adv-val`` validation images).

Randomness: four separate streams. Data order (CPU generator) and augmentation (device
generator) come from ``--seed`` only, so two runs that differ in the noise arm but share a
seed see exactly the same batches (paired arms). The training noise comes from torch's global
generator (seeded from ``--seed`` and the rank); evaluations run in a forked RNG with a fixed
seed, so they neither consume nor depend on the training noise; the adversary of
``--adv-train`` has its own generator for random starts.

Checkpoints describe themselves: model name and keyword arguments, classes, input channels and
normalisation, cdkernels version (``cdkernels.models.from_checkpoint(path)`` rebuilds the
model without the dataset).

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU): each rank takes its shard of every global
batch, draws its own noise (cd_step mixes the rank into drawn seeds), metrics are all-reduced
and only rank 0 writes files or logs.

``--cuda-graph`` captures the whole training step (forward, backward, SGD update) once and
replays it; the seeds of the noise are drawn from the CUDA generator (an in-place
``random_()`` on a seed tensor) inside the captured region, so every replay uses fresh noise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch import nn

from . import _common as C
from . import data as D
from . import models as M

PROG = "python -m cdkernels.train"
CKPT_FORMAT = "cdkernels-train/2"
READ_FORMATS = ("cdkernels-train/1", CKPT_FORMAT)  # /1: no "arch" record (needs the data)
# Arguments a resumed run must share with the checkpoint (they define model, data, schedule and
# selection). --epochs may grow: that extends a run (the schedule is recomputed over the new
# total, so a cosine learning rate rises again from where the step count now sits).
CONFIG_KEYS = ("model", "data", "batch_size", "lr", "momentum", "nesterov",
               "weight_decay", "schedule", "warmup", "label_smoothing", "seed", "noise", "sigma",
               "dt", "learnable_sigma", "members", "width", "amp", "limit_train", "val_fraction",
               "augment", "world_size", "adv_train", "adv_eps", "adv_steps", "adv_step_size",
               "adv_mode", "adv_eot", "adv_val", "limit_eval", "mc_samples")
ADV_EPS_DEFAULT = {"cifar10": 8 / 255, "cifar100": 8 / 255, "fashion-mnist": 0.1, "digits": 0.1}
MC_DEFAULT = 4      # noise draws for evaluating / selecting a noisy model
EVAL_SEED = 0x5EED  # evaluation noise: the same draws every epoch (common random numbers)


class CLIError(Exception):
    """Bad user input: reported as ``PROG: error: message`` with exit status 2."""


def _version() -> str:
    from . import __version__
    return __version__


# -- arguments -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train a noisy (convection–diffusion) "
                                "ResNet from cdkernels.models on a small image dataset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--version", action="version", version=f"%(prog)s (cdkernels {_version()})")
    a("--model", default="cd_preact_resnet20", help="model name (cdkernels.models.list_models())")
    a("--data", default="digits", choices=D.DATASETS, help="dataset (never downloaded; digits "
      "needs scikit-learn: pip install cdkernels[train])")
    a("--data-dir", default=None, help="dataset folder (fashion-mnist default: "
      "/usr/share/datasets/fashion-mnist; required for CIFAR)")
    a("--val-fraction", type=float, default=0.1, help="share of the training set held out "
      "for validation (fixed, seed-independent)")
    a("--limit-train", type=int, default=None, metavar="N", help="use only N training images")
    a("--limit-eval", type=int, default=None, metavar="N", help="evaluate (and select on) only "
      "the first N validation and N test images (quick runs)")
    a("--no-augment", dest="augment", action="store_false", help="no random crop / flip")
    a("--epochs", type=int, default=10, help="total epochs (raise it with --resume to extend "
      "a run)")
    a("--batch-size", type=int, default=128, help="global batch size (split over ranks)")
    a("--lr", type=float, default=0.1, help="peak learning rate (SGD)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--nesterov", action="store_true", help="Nesterov momentum")
    a("--weight-decay", type=float, default=5e-4, help="L2 weight decay (not applied to "
      "learnable sigma)")
    a("--schedule", choices=("cosine", "step", "constant"), default="cosine",
      help="learning-rate schedule (step: x0.1 at 50%% and 75%% of the epochs)")
    a("--warmup", type=float, default=0.0, metavar="EPOCHS", help="linear warmup epochs")
    a("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    a("--seed", type=int, default=0, help="seed of weights, data order, augmentation and noise "
      "(runs of different noise arms with one seed see the same batches)")
    a("--noise", choices=("em", "std", "none"), default="em", help="em: Euler-Maruyama noise "
      "sigma*sqrt(dt); std: EnResNet-style coef*std(block output); none: plain ResNet")
    a("--sigma", type=float, default=0.1, help="noise coefficient (em: sigma; std: coef)")
    a("--dt", type=float, default=1.0, help="step size of every residual update")
    a("--learnable-sigma", choices=("none", "scalar", "channel"), default="none",
      help="learn the noise coefficient (one scalar or one per channel per block)")
    a("--width", type=int, default=None, help="base width of cd_preact_resnet / enresnet "
      "(default: the model's, 16)")
    a("--members", type=int, default=None, help="ensemble members (enresnet models)")
    a("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype (on CPUs without "
      "native bf16, e.g. AVX2-only, bf16 autocast is several times SLOWER than fp32)")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cuda-graph", action="store_true", help="capture and replay the whole training step "
      "(CUDA only)")
    a("--mc-samples", type=int, default=None, metavar="K", help="noise draws averaged "
      f"(Monte-Carlo, noise on) to evaluate and select a noisy model (default {MC_DEFAULT}; "
      "0: select on the noise-off network, the old behaviour)")
    a("--eval-batch-size", type=int, default=1024, help="images per evaluation batch")
    a("--adv-train", choices=("pgd",), default=None, help="adversarial training (Madry et al.): "
      "every batch is replaced by L-inf PGD examples (random start) generated on the fly with "
      "cdkernels.robust.pgd in pixel space [0, 1]; model selection on robust validation "
      "accuracy")
    a("--eps", dest="adv_eps", default=None, metavar="EPS", help="--adv-train radius in pixel "
      "units, e.g. 0.1 or 8/255 (default 8/255 for CIFAR, 0.1 for fashion-mnist and digits)")
    a("--adv-steps", type=int, default=None, help="--adv-train PGD iterations (default 7)")
    a("--adv-step-size", default=None, metavar="ALPHA", help="--adv-train PGD step (default "
      "2.5*eps/steps)")
    a("--adv-mode", choices=("eval", "train"), default=None, help="--adv-train generation: "
      "eval = model in eval mode (BN running statistics, noise on, nothing updated); train = "
      "train mode as in EnResNet (BN batch statistics), with the BN running statistics restored "
      "after every generation (default eval)")
    a("--adv-eot", type=int, default=None, metavar="M", help="--adv-train noise draws averaged "
      "per PGD gradient (EOT; default 1)")
    a("--adv-val", type=int, default=None, metavar="N", help="--adv-train: select on PGD "
      "accuracy of the first N validation images (default 500; 0: select on natural accuracy)")
    a("--out", default=None, help="output folder (default runs/MODEL_DATA_seedS)")
    a("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
      help="continue from CKPT (default OUT/checkpoint.pt); with a larger --epochs it extends "
      "a finished run")
    a("--overwrite", action="store_true", help="start afresh even if OUT has a checkpoint")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    a("--progress", dest="quiet", action="store_false", help=argparse.SUPPRESS)  # attack's word
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def _world() -> tuple:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def validate(args) -> None:
    """Raise CLIError (or DataError) for bad or conflicting options, before anything heavy."""
    names = M.list_models()
    if args.model not in names:
        raise CLIError(f"unknown model {args.model!r}; valid models: {', '.join(names)}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    for name in ("momentum", "weight_decay", "label_smoothing", "warmup", "sigma", "dt"):
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            raise CLIError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.label_smoothing >= 1:
        raise CLIError("--label-smoothing must be < 1")
    if args.nesterov and args.momentum == 0:
        raise CLIError("--nesterov needs --momentum > 0")
    if args.noise == "std" and args.dt == 0:
        raise CLIError("--noise std needs --dt > 0")
    if not 0 <= args.val_fraction < 1:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.limit_eval is not None and args.limit_eval < 1:
        raise CLIError(f"--limit-eval must be >= 1, got {args.limit_eval}")
    if args.limit_train is not None and args.limit_train < 1:
        raise CLIError(f"--limit-train must be >= 1, got {args.limit_train}")
    if args.mc_samples is not None and args.mc_samples < 0:
        raise CLIError(f"--mc-samples must be >= 1 (or 0: noise off), got {args.mc_samples}")
    if args.mc_samples and args.noise == "none":
        raise CLIError("--mc-samples needs a noisy model (--noise em or std)")
    # Resolved here so that it is part of the run's config (a resume must select the same way).
    args.mc_samples = (0 if args.noise == "none" else MC_DEFAULT) if args.mc_samples is None \
        else args.mc_samples
    is_en = args.model.startswith("enresnet")
    if args.members is not None and not is_en:
        raise CLIError(f"--members only applies to enresnet models, not {args.model}")
    if args.members is not None and args.members < 1:
        raise CLIError(f"--members must be >= 1, got {args.members}")
    if args.width is not None and ("wrn" in args.model or "wide" in args.model):
        raise CLIError("--width does not apply to wide ResNets (the widen factor is in the name)")
    if args.width is not None and args.width < 1:
        raise CLIError(f"--width must be >= 1, got {args.width}")
    if args.cuda_graph and args.compile:
        raise CLIError("--cuda-graph and --compile cannot be combined (pick one)")
    if args.cuda_graph and args.amp == "fp16":
        raise CLIError("--cuda-graph with --amp fp16 is not supported (the loss scaler syncs "
                       "with the host); use --amp bf16")
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite cannot be combined")
    adv_opts = ("adv_eps", "adv_steps", "adv_step_size", "adv_mode", "adv_eot", "adv_val")
    if args.adv_train is None and any(getattr(args, k) is not None for k in adv_opts):
        raise CLIError("--eps / --adv-steps / --adv-step-size / --adv-mode / --adv-eot / "
                       "--adv-val need --adv-train pgd")
    if args.adv_train:
        from .robust import parse_eps
        try:
            args.adv_eps = (ADV_EPS_DEFAULT[args.data] if args.adv_eps is None
                            else parse_eps(str(args.adv_eps)))
            if args.adv_step_size is not None:
                args.adv_step_size = parse_eps(str(args.adv_step_size))
        except ValueError as e:
            raise CLIError(str(e)) from None
        args.adv_steps = 7 if args.adv_steps is None else args.adv_steps
        args.adv_mode = args.adv_mode or "eval"
        args.adv_eot = 1 if args.adv_eot is None else args.adv_eot
        args.adv_val = 500 if args.adv_val is None else args.adv_val
        if not (math.isfinite(args.adv_eps) and args.adv_eps >= 0):
            raise CLIError(f"--eps must be a finite number >= 0, got {args.adv_eps}")
        if args.adv_steps < 1:
            raise CLIError(f"--adv-steps must be >= 1, got {args.adv_steps}")
        if args.adv_eot < 1:
            raise CLIError(f"--adv-eot must be >= 1, got {args.adv_eot}")
        if args.adv_val < 0:
            raise CLIError(f"--adv-val must be >= 0, got {args.adv_val}")
        if args.adv_step_size is not None and not (math.isfinite(args.adv_step_size)
                                                   and args.adv_step_size >= 0):
            raise CLIError(f"--adv-step-size must be a finite number >= 0, got "
                           f"{args.adv_step_size}")
    if args.stop_after is not None and args.stop_after < 1:
        raise CLIError("--stop-after must be >= 1")
    rank, world, local = _world()
    if args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} is not divisible by the world size "
                       f"{world}")
    dev = resolve_device(args.device, local, world)
    if args.cuda_graph and dev.type != "cuda":
        raise CLIError(f"--cuda-graph needs a CUDA device; this run is on {dev.type} "
                       "(drop --cuda-graph or use --device cuda)")
    if args.cuda_graph and world > 1:
        raise CLIError("--cuda-graph is not supported with several processes (DDP) yet")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        raise CLIError(f"--resume: no checkpoint file {args.resume!r}")
    D.check_available(args.data)  # e.g. digits without scikit-learn: fail now, not after setup


def resolve_device(name: Optional[str], local_rank: int = 0, world: int = 1) -> torch.device:
    """The torch.device for ``--device`` (CLIError, one line, for anything unusable)."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {str(e).splitlines()[0]} (use cpu, cuda or "
                       "cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for CUDA but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else 0)
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def config_of(args, world: int) -> Dict[str, object]:
    c = {k: getattr(args, k, None) for k in CONFIG_KEYS if k != "world_size"}
    c["world_size"] = world
    c["epochs"] = args.epochs  # recorded; not required to match on resume
    return c


def model_kwargs(args, data: D.ImageData) -> Dict[str, object]:
    """Keyword arguments of ``cdkernels.models.create`` for this run (stored in checkpoints)."""
    kw = dict(num_classes=data.num_classes, in_channels=data.in_channels, noise=args.noise,
              sigma=args.sigma, dt=args.dt,
              learnable_sigma=False if args.learnable_sigma == "none" else args.learnable_sigma)
    if args.width is not None:
        kw["width"] = args.width
    if args.members is not None:
        kw["members"] = args.members
    return kw


# -- optimizer and schedule ----------------------------------------------------------------------

class SGD(torch.optim.Optimizer):
    """SGD with momentum / Nesterov / weight decay whose update reads the learning rate from a
    device tensor, so the update can be captured in a CUDA graph (``torch.optim.SGD`` turns a
    tensor lr into a host sync). ``step()`` = ``sync_lr()`` (host: copy each group's lr to its
    device tensor) + ``apply()`` (device only: capturable)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay))
        self._lr_t: Dict[int, torch.Tensor] = {}

    def _lr_tensor(self, i: int, group) -> torch.Tensor:
        t = self._lr_t.get(i)
        if t is None:
            p = group["params"][0]
            t = self._lr_t[i] = torch.zeros((), dtype=torch.float32, device=p.device)
        return t

    @torch.no_grad()
    def sync_lr(self) -> None:
        for i, g in enumerate(self.param_groups):
            if g["params"]:
                self._lr_tensor(i, g).fill_(float(g["lr"]))

    @torch.no_grad()
    def apply(self) -> None:
        for i, g in enumerate(self.param_groups):
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, mom = g["weight_decay"], g["momentum"]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if mom:
                bufs = []
                for p in params:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(st["momentum_buffer"])
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                grads = torch._foreach_add(grads, bufs, alpha=mom) if g["nesterov"] else bufs
            torch._foreach_sub_(params, torch._foreach_mul(grads, self._lr_tensor(i, g)))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync_lr()
        self.apply()
        return loss


def lr_factor(schedule: str, epochs: int, warmup: float, steps_per_epoch: int):
    total = max(epochs * steps_per_epoch, 1)
    warm = int(round(warmup * steps_per_epoch))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if schedule == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0
    return f


# -- checkpoints ---------------------------------------------------------------------------------

def _torch_save(obj, path):  # indirection: tests make it fail half-way
    torch.save(obj, path)


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` to ``path`` via a temp file in the same folder and ``os.replace``: a crash
    at any point leaves either the old file or the new one, never a partial one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        _torch_save(obj, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    """A cdkernels.train checkpoint as a dict (``weights_only=True``: tensors and plain data
    only). CLIError, one line, for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise CLIError(f"no checkpoint file {path!r}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe pickle: all user errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CLIError(f"cannot load checkpoint {path}: {type(e).__name__}: {first[:200]} "
                       "(truncated or not a cdkernels checkpoint?)") from None
    if not isinstance(ck, dict) or ck.get("format") not in READ_FORMATS:
        raise CLIError(f"{path} is not a cdkernels training checkpoint ({CKPT_FORMAT})")
    return ck


def _unwrap(model: nn.Module) -> nn.Module:
    m = getattr(model, "_orig_mod", model)
    m = getattr(m, "module", m) if isinstance(m, nn.parallel.DistributedDataParallel) else m
    return getattr(m, "_orig_mod", m)


# -- helpers -------------------------------------------------------------------------------------

class _Log:
    def __init__(self, enabled: bool, quiet: bool):
        self.enabled, self.quiet = enabled, quiet

    def __call__(self, msg: str, always: bool = False) -> None:
        if self.enabled and (always or not self.quiet):
            print(msg, file=sys.stderr if not always else sys.stdout, flush=True)


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def _autocast(device: torch.device, amp: Optional[str], cache: bool = True):
    if amp is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


@contextlib.contextmanager
def _fixed_rng(device: torch.device, seed: int = EVAL_SEED):
    """Run a block on a forked global RNG seeded with ``seed``: evaluations see the same noise
    every epoch and leave the training noise stream exactly where it was."""
    devs = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devs):
        torch.manual_seed(seed)
        yield


def mc_probs(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Class probabilities averaged over ``samples`` noise realisations (noise on in eval)."""
    from .nn import MonteCarlo
    return MonteCarlo(model, samples=samples, space="prob")(x)


@torch.no_grad()
def evaluate(model, data: D.ImageData, split: D.Split, args, device, rank: int, world: int,
             memory_format, mc: Optional[int] = None) -> Dict[str, float]:
    """Loss and accuracy on ``split`` (each rank takes every world-th image; sums all-reduced).
    ``mc=K``: the K-sample Monte-Carlo prediction with the noise on (loss = NLL of the averaged
    probabilities); otherwise the model as it is in eval mode (noise off). Runs on a forked RNG
    with a fixed seed (see :func:`_fixed_rng`)."""
    was = model.training
    model.eval()
    idx_all = torch.arange(rank, len(split), world, device=device)
    crit = nn.CrossEntropyLoss(reduction="sum")
    acc = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    with _fixed_rng(device):
        for i in range(0, len(idx_all), args.eval_batch_size):
            idx = idx_all[i:i + args.eval_batch_size]
            x, y = data.batch(split, idx, False, memory_format)
            with _autocast(device, args.amp):
                if mc:
                    p = mc_probs(model, x, mc).float()
                    loss = nn.functional.nll_loss(torch.log(p.clamp_min(1e-30)), y,
                                                  reduction="sum")
                    pred = p.argmax(1)
                else:
                    out = model(x).float()
                    loss = crit(out, y)
                    pred = out.argmax(1)
            acc += torch.stack([loss.double(), (pred == y).sum().double(),
                                torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    model.train(was)
    acc = _all_reduce(acc, world).tolist()
    n = max(acc[2], 1.0)
    return {"loss": acc[0] / n, "acc": acc[1] / n, "n": int(acc[2])}


_PLOT_WARNED = False


def _plot(history: List[dict], path: str, log=None) -> bool:
    """curves.png; without matplotlib (an optional extra) say so once and carry on."""
    global _PLOT_WARNED
    try:
        import matplotlib
    except ImportError:
        if not _PLOT_WARNED:
            _PLOT_WARNED = True
            msg = (f"matplotlib is not installed: skipping {path} (pip install "
                   "cdkernels[train] to get the plot)")
            (log or (lambda m, always=False: print(m, file=sys.stderr)))(msg, always=True)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("loss"), ax[0].legend()
    for label, k in (("train", "train_acc"), ("val (selection metric)", "val_acc"),
                     ("val, noise off", "val_acc_noise_off"),
                     ("test, noise off", "test_acc_noise_off")):
        ax[1].plot(ep, [h.get(k, float("nan")) for h in history], label=label)
    if any("val_robust_acc" in h for h in history):
        ax[1].plot(ep, [h.get("val_robust_acc", float("nan")) for h in history],
                   label="val robust")
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("accuracy"), ax[1].legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# -- the run: setup, data, model, step, epoch loop, selection, final evaluation, write-out ------

def run(args) -> dict:
    """Train as ``args`` says (already validated). Returns {"summary", "history", "model"}."""
    import torch.distributed as dist
    rank, world, local = _world()
    created_pg = False
    device = resolve_device(args.device, local, world)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created_pg = True
    try:
        return _run(args, rank, world, device)
    finally:
        if created_pg:
            dist.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> dict:
    st = _setup(args, rank, world, device)
    _load_data(st)
    _build_model(st)
    _build_step(st)
    _epoch_loop(st)
    summary = _final_evaluation(st)
    _write_out(st, summary)
    return {"summary": summary, "history": st.history, "model": st.base}


def _setup(args, rank, world, device) -> SimpleNamespace:
    """Output folder, checkpoint path, what to resume from, logging."""
    st = SimpleNamespace(args=args, rank=rank, world=world, device=device,
                         log=_Log(rank == 0, args.quiet), t_start=time.time())
    st.out = args.out or os.path.join("runs", f"{args.model}_{args.data}_seed{args.seed}")
    st.ckpt_path = os.path.join(st.out, "checkpoint.pt")
    args._ckpt_path = st.ckpt_path  # for the Ctrl-C message in main()
    st.resume_path = None
    if args.resume:
        st.resume_path = st.ckpt_path if args.resume == "auto" else args.resume
        if not os.path.isfile(st.resume_path):
            raise CLIError(f"--resume: no checkpoint at {st.resume_path}")
    elif os.path.exists(st.ckpt_path) and not args.overwrite:
        raise CLIError(f"{st.ckpt_path} exists; pass --resume to continue it, --overwrite to "
                       "start afresh, or another --out")
    if rank == 0:
        os.makedirs(st.out, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "cpu" and C.steady_heap_wanted():
        # every step then reuses already-mapped memory instead of a process-dependent share of
        # fresh page faults (cdkernels.steady_heap); CDK_STEADY_HEAP=0 leaves malloc alone
        C.steady_heap()
    return st


def _load_data(st) -> None:
    """The dataset on the device; evaluation limits; batches per epoch."""
    args = st.args
    data = D.load(args.data, args.data_dir, device=st.device, val_fraction=args.val_fraction,
                  limit_train=args.limit_train)
    if not args.augment:
        data.pad, data.flip = 0, False
    if args.limit_eval is not None:
        n = args.limit_eval
        data.val = D.Split(data.val.images[:n], data.val.labels[:n])
        data.test = D.Split(data.test.images[:n], data.test.labels[:n])
    if len(data.train) < args.batch_size:
        raise CLIError(f"--batch-size {args.batch_size} is larger than the training set "
                       f"({len(data.train)} images)")
    st.data = data
    st.per_rank = args.batch_size // st.world
    st.steps_per_epoch = len(data.train) // args.batch_size  # drop_last: static shapes


def _build_model(st) -> None:
    """Model (same initial weights on every rank and every noise arm of a seed), optimizer,
    schedule, the separate generators, and the state of a resumed run."""
    args, device, rank = st.args, st.device, st.rank
    torch.manual_seed(args.seed)
    st.kw = model_kwargs(args, st.data)
    try:
        model = M.create(args.model, **st.kw)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot build {args.model}: {e}") from None
    st.mf = torch.channels_last if args.channels_last else torch.contiguous_format
    st.base = model.to(device=device, memory_format=st.mf)
    # Training noise: torch's global generator, per rank.
    torch.manual_seed(args.seed + 1_000_003 * (rank + 1))
    # Data order (CPU, same on every rank) and augmentation (device, per rank): their own
    # generators, so the noise arm never changes which batches a seed sees.
    st.data_gen = torch.Generator().manual_seed(args.seed)
    st.aug_gen = torch.Generator(device=device).manual_seed(
        (args.seed * 7919 + 104_729 * (rank + 1)) % (1 << 62))
    sig = [p for n, p in st.base.named_parameters() if n.endswith("step.sigma")
           or n.endswith("step.coef")]
    st.sig = sig
    sig_ids = {id(p) for p in sig}
    rest = [p for p in st.base.parameters() if id(p) not in sig_ids]
    groups = [{"params": rest}] + ([{"params": sig, "weight_decay": 0.0}] if sig else [])
    st.opt = SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                 weight_decay=args.weight_decay)
    st.sched = torch.optim.lr_scheduler.LambdaLR(
        st.opt, lr_factor(args.schedule, args.epochs, args.warmup, st.steps_per_epoch))
    st.config = config_of(args, st.world)
    st.arch = {"name": args.model, "kwargs": dict(st.kw), "num_classes": st.data.num_classes,
               "in_channels": st.data.in_channels, "mean": st.data.mean.float().tolist(),
               "std": st.data.std.float().tolist(), "scale": float(st.data.scale),
               "data": args.data, "classes": st.data.classes}
    st.history, st.start_epoch, st.elapsed0, st.ck = [], 0, 0.0, None
    st.best = {"val_acc": -1.0, "score": -1.0, "epoch": 0}
    if st.resume_path:
        _restore(st)
    if rank == 0 and not st.resume_path:
        open(os.path.join(st.out, "metrics.jsonl"), "w").close()


def _restore(st) -> None:
    args, rank, device = st.args, st.rank, st.device
    ck = st.ck = load_checkpoint(st.resume_path)
    if "optimizer" not in ck:
        raise CLIError(f"{st.resume_path} is a best.pt (weights only); resume from "
                       "checkpoint.pt")
    old = ck["config"]
    diff = {k: (old.get(k), v) for k, v in st.config.items()
            if k != "epochs" and k in old and old.get(k) != v}
    if diff:
        raise CLIError(f"checkpoint {st.resume_path} was made with different settings: "
                       + ", ".join(f"{k}={a!r} there vs {b!r} now"
                                   for k, (a, b) in diff.items()))
    if ck["epoch"] > args.epochs:
        raise CLIError(f"checkpoint {st.resume_path} is at epoch {ck['epoch']}, beyond "
                       f"--epochs {args.epochs}")
    try:
        st.base.load_state_dict(ck["model"])
        st.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CLIError(f"checkpoint {st.resume_path} does not fit {args.model}: "
                       f"{str(e).splitlines()[0]}") from None
    st.sched.load_state_dict(ck["scheduler"])
    rng = ck["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and len(rng["cuda"]):
        torch.cuda.set_rng_state(rng["cuda"], device)
    st.data_gen.set_state(rng["data"])
    if "aug" in rng:
        st.aug_gen.set_state(rng["aug"])
    st.start_epoch, st.history = ck["epoch"], list(ck["history"])
    st.best = dict(ck["best"])
    st.best.setdefault("score", st.best["val_acc"])
    st.elapsed0 = float(ck.get("elapsed", 0.0))
    args._saved_epoch = ck["epoch"]
    extend = f" (extending to {args.epochs} epochs)" if old.get("epochs") != args.epochs else ""
    st.log(f"resumed from {st.resume_path} after epoch {st.start_epoch}{extend}")


def _build_step(st) -> None:
    """Wrappers (DDP / compile), loss, the adversary, and the training step (eager or graph)."""
    args, device = st.args, st.device
    st.train_model = st.base
    if st.world > 1:
        st.train_model = nn.parallel.DistributedDataParallel(
            st.base, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        st.train_model = torch.compile(st.train_model)
    st.eval_model = st.train_model if st.world == 1 else st.base
    st.crit = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    # PGD examples come from the plain module (not the DDP / compiled wrapper: the attack's
    # input-only backward must not trigger DDP's gradient reduction).
    st.adv = _adv_maker(args, st.base, st.data, device) if args.adv_train else None
    if st.adv is not None and st.ck is not None and "adv" in st.ck["rng"][st.rank]:
        st.adv.gen.set_state(st.ck["rng"][st.rank]["adv"])
    st.scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    st.graph, st.static = None, {}
    st.warm_left = 3 if args.cuda_graph else 0
    st.side = torch.cuda.Stream(device) if args.cuda_graph else None


def _step_eager(st, x, y, cache=True):
    with _autocast(st.device, st.args.amp, cache):
        out_ = st.train_model(x)
        loss = st.crit(out_.float(), y)
    if st.scaler is not None:
        st.scaler.scale(loss).backward()
        st.scaler.unscale_(st.opt)
        st.scaler.step(st.opt)
        st.scaler.update()
    else:
        loss.backward()
        st.opt.step()
    return loss.detach(), (out_.argmax(1) == y).sum()


def _train_step(st, x, y):
    args, device = st.args, st.device
    if args.cuda_graph and st.graph is None and st.warm_left == 0:
        st.graph, st.static = _capture(st.train_model, st.opt, st.crit, x, y, device, args,
                                       st.side)
        st.log("cuda-graph: captured forward + backward + SGD step; every replay draws fresh "
               "noise seeds from the CUDA generator inside the graph (its "
               "offset advances per replay), so the noise differs per step")
    if st.graph is not None:
        st.static["x"].copy_(x)
        st.static["y"].copy_(y)
        st.opt.sync_lr()
        st.graph.replay()
        return st.static["loss"], st.static["correct"]
    if args.cuda_graph:  # warm-up steps on a side stream before capture
        st.side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(st.side):
            st.opt.zero_grad(set_to_none=True)
            out = _step_eager(st, x, y, cache=False)
        torch.cuda.current_stream(device).wait_stream(st.side)
        st.warm_left -= 1
        return out
    st.opt.zero_grad(set_to_none=True)
    return _step_eager(st, x, y)


def _train_epoch(st, epoch: int) -> List[float]:
    """One pass over the training set; returns [loss sum, correct, images] over all ranks."""
    from tqdm import tqdm
    args, device, rank = st.args, st.device, st.rank
    st.train_model.train()
    batches = D.batch_indices(len(st.data.train), args.batch_size, st.data_gen, device)
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    bar = tqdm(total=len(batches) * args.batch_size, unit="img", unit_scale=True,
               desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or args.quiet,
               leave=False, file=sys.stderr)
    for bi, idx in enumerate(batches):
        idx = idx[rank * st.per_rank:(rank + 1) * st.per_rank]
        x, y = st.data.batch(st.data.train, idx, True, st.mf, generator=st.aug_gen)
        if st.adv is not None:
            x = st.adv(x, y).contiguous(memory_format=st.mf)
        loss, correct = _train_step(st, x, y)
        stats += torch.stack([loss.double() * len(y), correct.double(),
                              torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        st.sched.step()
        bar.update(args.batch_size)
        if bi % 20 == 0 and rank == 0 and not args.quiet:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return _all_reduce(stats, st.world).tolist()


def _robust_val(st, model: nn.Module) -> Optional[Dict[str, object]]:
    """PGD (the training adversary's eps / steps / EOT) on the first --adv-val validation
    images, through the model as it is evaluated (Monte-Carlo, noise on, for noisy models),
    with fixed seeds: the same attack every epoch."""
    args = st.args
    if not args.adv_train or not args.adv_val or not len(st.data.val):
        return None
    from . import robust as R
    from .attack import pixel_batches, wrap
    net = wrap(model, st.data, args.mc_samples or None)
    batches = pixel_batches(st.data, st.data.val, args.eval_batch_size, args.adv_val)
    return R.evaluate_attack(net, batches, "pgd", eps=args.adv_eps, steps=args.adv_steps,
                             step_size=args.adv_step_size,
                             eot=args.adv_eot if args.mc_samples else 1, seed=EVAL_SEED,
                             random_baseline=False, grad_check=False)


def _noise_to_signal(st, model: nn.Module) -> Optional[List[float]]:
    if st.args.noise == "none" or not len(st.data.val):
        return None
    from .robust import noise_to_signal
    idx = torch.arange(min(256, len(st.data.val)), device=st.device)
    x, _ = st.data.batch(st.data.val, idx, False, st.mf)
    return noise_to_signal(model, x, seed=EVAL_SEED)


def _evaluate_epoch(st, epoch: int, stats: List[float], t0: float, t_train: float) -> dict:
    """Validation (the selection metric: Monte-Carlo with noise on for noisy models; robust
    accuracy for adversarial training), labelled noise-off numbers, test noise-off (curves
    only), realised noise-to-signal ratios."""
    args, data = st.args, st.data
    ev = lambda split, mc=None: evaluate(st.eval_model, data, split, args, st.device,  # noqa
                                         st.rank, st.world, st.mf, mc=mc)
    nan = {"loss": float("nan"), "acc": float("nan"), "n": 0}
    val_off = ev(data.val) if len(data.val) else nan
    val = (ev(data.val, args.mc_samples) if args.mc_samples else val_off) if len(data.val) \
        else nan
    test_off = ev(data.test)
    rec = {"epoch": epoch + 1, "train_loss": stats[0] / stats[2],
           "train_acc": stats[1] / stats[2], "train_images": int(stats[2]),
           "val_loss": val["loss"], "val_acc": val["acc"],
           "val_metric": f"mc{args.mc_samples}_noise_on" if args.mc_samples else "deterministic",
           "val_acc_noise_off": val_off["acc"], "test_loss_noise_off": test_off["loss"],
           "test_acc_noise_off": test_off["acc"], "lr": st.opt.param_groups[0]["lr"],
           "images_per_s": stats[2] / max(t_train, 1e-9)}
    rv = _robust_val(st, st.base)
    if rv is not None:
        rec["val_robust_acc"] = rv["robust_acc"]
        rec["val_robust_n"] = rv["n"]
    nsr = _noise_to_signal(st, st.base)
    if nsr:
        rec["noise_to_signal"] = nsr
        rec["noise_to_signal_mean"] = sum(nsr) / len(nsr)
    sig_vals = [float(p.detach().float().abs().mean()) for p in st.sig]
    if sig_vals:
        rec["sigma_mean"] = sum(sig_vals) / len(sig_vals)
    rec["epoch_time_s"] = time.time() - t0
    return rec


def _select(st, rec: dict) -> bool:
    """Model selection on validation only: robust accuracy for adversarial training (ties:
    natural), else the (Monte-Carlo) validation accuracy."""
    if not len(st.data.val):
        return False
    score = rec.get("val_robust_acc", rec["val_acc"])
    key = (score, rec["val_acc"])
    if key > (st.best["score"], st.best["val_acc"]):
        st.best = {"val_acc": rec["val_acc"], "score": score, "epoch": rec["epoch"],
                   "val_acc_noise_off": rec["val_acc_noise_off"]}
        if "val_robust_acc" in rec:
            st.best["val_robust_acc"] = rec["val_robust_acc"]
        return True
    return False


def _meta(st) -> dict:
    return {"format": CKPT_FORMAT, "config": st.config, "arch": st.arch,
            "cdkernels_version": _version()}


def _checkpoint(st, epoch: int, rec: dict, improved: bool) -> None:
    """metrics.jsonl line, best.pt when improved, checkpoint.pt (every rank's RNG states)."""
    rng = {"cpu": torch.get_rng_state(), "data": st.data_gen.get_state(),
           "aug": st.aug_gen.get_state(),
           "cuda": torch.cuda.get_rng_state(st.device) if st.device.type == "cuda"
           else torch.zeros(0, dtype=torch.uint8)}
    if st.adv is not None:
        rng["adv"] = st.adv.gen.get_state()
    rngs = [rng]
    if st.world > 1:
        import torch.distributed as dist
        rngs = [None] * st.world
        dist.all_gather_object(rngs, rng)
    if st.rank == 0:
        with open(os.path.join(st.out, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if improved:
            save_atomic(dict(_meta(st), epoch=epoch + 1, model=st.base.state_dict()),
                        os.path.join(st.out, "best.pt"))
        save_atomic(dict(_meta(st), epoch=epoch + 1, model=st.base.state_dict(),
                         optimizer=st.opt.state_dict(), scheduler=st.sched.state_dict(),
                         rng=rngs, history=st.history, best=st.best,
                         elapsed=st.elapsed0 + time.time() - st.t_start), st.ckpt_path)
    st.args._saved_epoch = epoch + 1


def _epoch_loop(st) -> None:
    args = st.args
    st.stop = args.epochs if args.stop_after is None else min(args.epochs,
                                                              st.start_epoch + args.stop_after)
    st.log(f"{args.model} on {args.data} ({len(st.data.train)} train / {len(st.data.val)} val / "
           f"{len(st.data.test)} test, {st.data.num_classes} classes), {st.device}, world "
           f"{st.world}, {sum(p.numel() for p in st.base.parameters())} parameters, noise="
           f"{args.noise}, selection on "
           + ("robust val accuracy" if args.adv_train and args.adv_val else
              f"Monte-Carlo val accuracy (K={args.mc_samples}, noise on)" if args.mc_samples
              else "val accuracy"))
    for epoch in range(st.start_epoch, st.stop):
        t0 = time.time()
        stats = _train_epoch(st, epoch)
        rec = _evaluate_epoch(st, epoch, stats, t0, time.time() - t0)
        st.history.append(rec)
        improved = _select(st, rec)
        _checkpoint(st, epoch, rec, improved)
        rob = f" robust {rec['val_robust_acc']:.4f}" if "val_robust_acc" in rec else ""
        off = f" (noise off {rec['val_acc_noise_off']:.4f})" if args.mc_samples else ""
        st.log(f"epoch {epoch + 1}/{args.epochs}: train loss {rec['train_loss']:.4f} acc "
               f"{rec['train_acc']:.4f} | val loss {rec['val_loss']:.4f} acc "
               f"{rec['val_acc']:.4f}{off}{rob} | {rec['images_per_s']:.0f} img/s, "
               f"{rec['epoch_time_s']:.1f}s")
    if st.world > 1:
        import torch.distributed as dist
        dist.barrier()


def _final_evaluation(st) -> dict:
    """The selected model (best.pt) on the test set: the method's prediction (Monte-Carlo with
    noise on for noisy models) and, labelled, the noise-off network; its noise-to-signal
    ratios."""
    args = st.args
    finished = st.stop == args.epochs
    best = st.best
    summary = {"model": args.model, "data": args.data, "noise": args.noise,
               "epochs_done": len(st.history), "finished": finished,
               "selection": ("robust val accuracy (PGD, --adv-val images)"
                             if args.adv_train and args.adv_val else
                             f"val accuracy, Monte-Carlo K={args.mc_samples}, noise on"
                             if args.mc_samples else "val accuracy (deterministic)"),
               "mc_samples": args.mc_samples,
               "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
               "best_val_acc_noise_off": best.get("val_acc_noise_off"),
               "test_acc_at_best_val": None, "test_acc_noise_off_at_best_val": None,
               "final_test_acc_noise_off": (st.history[-1]["test_acc_noise_off"]
                                            if st.history else None)}
    if "val_robust_acc" in best:
        summary["best_val_robust_acc"] = best["val_robust_acc"]
    if finished and best["epoch"]:
        if st.rank == 0 or st.world == 1:
            state = load_checkpoint(os.path.join(st.out, "best.pt"))["model"]
        else:
            state = None
        if st.world > 1:
            import torch.distributed as dist
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        sel = M.create(args.model, **st.kw).to(device=st.device, memory_format=st.mf)
        sel.load_state_dict(state)
        ev = lambda split, mc=None: evaluate(sel, st.data, split, args, st.device,  # noqa
                                             st.rank, st.world, st.mf, mc=mc)
        off = ev(st.data.test)
        summary["test_acc_noise_off_at_best_val"] = off["acc"]
        summary["test_acc_at_best_val"] = off["acc"]
        if args.mc_samples:
            on = ev(st.data.test, args.mc_samples)
            summary["test_acc_at_best_val"] = on["acc"]
            summary[f"mc{args.mc_samples}_test_acc"] = on["acc"]
            summary[f"mc{args.mc_samples}_val_acc"] = best["val_acc"]
        nsr = _noise_to_signal(st, sel)
        if nsr:
            summary["noise_to_signal"] = nsr
            summary["noise_to_signal_mean"] = sum(nsr) / len(nsr)
    summary["time_s"] = st.elapsed0 + time.time() - st.t_start
    summary["out"] = st.out
    summary["cdkernels_version"] = _version()
    return summary


def _write_out(st, summary: dict) -> None:
    args = st.args
    if st.rank != 0 or not summary["finished"]:
        return
    with open(os.path.join(st.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    if st.history:
        _plot(st.history, os.path.join(st.out, "curves.png"), st.log)
    t = summary["test_acc_at_best_val"]
    off = summary["test_acc_noise_off_at_best_val"]
    what = (f"Monte-Carlo (K={args.mc_samples}, noise on) test acc {t:.4f}, noise off "
            f"{off:.4f}" if args.mc_samples and t is not None else
            f"test acc {t:.4f}" if t is not None else "no test accuracy")
    st.log(f"best val acc {st.best['val_acc']:.4f} at epoch {st.best['epoch']}; that model: "
           f"{what}; {summary['time_s']:.1f}s; files in {st.out}", always=True)


def _adv_maker(args, model, data: D.ImageData, device):
    """x (normalised) -> PGD examples (normalised) for --adv-train, in pixel space:
    un-normalise, attack with cdkernels.robust.pgd clipped to [0, 1], normalise again.

    --adv-mode eval: the model in eval mode with its noise on (as it is evaluated; BN uses the
    running statistics and nothing is updated). --adv-mode train: train mode (BN batch
    statistics, noise on, as in EnResNet), and every buffer (the BN running statistics) is put
    back after the generation, so the attack's forwards do not count as training data.
    --adv-eot M averages every gradient over M noise draws. Random starts come from a
    generator seeded with --seed."""
    from .nn import _NoiseOn
    from .robust import PixelModel, pgd
    net = PixelModel(model, data.mean, data.std).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 99991)
    mean = data.mean.view(1, -1, 1, 1)
    std = data.std.view(1, -1, 1, 1)
    noisy = args.noise != "none"

    def make(x, y):
        was = model.training
        saved = None
        if args.adv_mode == "train":
            saved = [b.detach().clone() for b in model.buffers()]
        else:
            model.eval()
        try:
            with (_NoiseOn(model) if noisy else contextlib.nullcontext()), \
                    _autocast(device, args.amp):
                xp = (x.float() * std + mean).clamp(0, 1)
                xa = pgd(net, xp, y, args.adv_eps, steps=args.adv_steps,
                         step_size=args.adv_step_size, norm="linf", random_start=True,
                         eot=args.adv_eot if noisy else 1, generator=gen)
        finally:
            model.train(was)
            if saved is not None:
                with torch.no_grad():
                    for b, v in zip(model.buffers(), saved):
                        b.copy_(v)
        return ((xa - mean) / std).to(x.dtype)
    make.gen = gen
    return make


def _capture(train_model, opt: SGD, crit, x, y, device, args, side):
    """Capture forward + backward + optimizer update of one step into a CUDA graph."""
    static = {"x": x.clone(), "y": y.clone()}
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    opt.sync_lr()
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        with torch.cuda.graph(g, stream=side):
            with _autocast(device, args.amp, cache=False):
                out = train_model(static["x"])
                loss = crit(out.float(), static["y"])
            loss.backward()
            opt.apply()
            static["loss"] = loss.detach()
            static["correct"] = (out.argmax(1) == static["y"]).sum()
    torch.cuda.current_stream(device).wait_stream(side)
    return g, static


def _resume_command(argv: List[str], out: str) -> str:
    """The command line that continues an interrupted run: the same arguments, --resume."""
    keep, skip = [], False
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if skip:
            skip = False
            continue
        if a in ("--overwrite",):
            continue
        if a == "--stop-after":
            skip = True
            continue
        if a.startswith("--stop-after=") or a.startswith("--resume="):
            continue
        if a == "--resume":
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                skip = True
            continue
        keep.append(a)
    if "--out" not in keep and not any(a.startswith("--out=") for a in keep):
        keep += ["--out", out]
    return " ".join([PROG] + [shlex.quote(a) for a in keep] + ["--resume"])


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message (or --version)
        return int(e.code or 0)
    try:
        validate(args)
        run(args)
    except (CLIError, D.DataError) as e:
        # User errors: one line, exit 2. Anything else is a bug and keeps its traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        ck = getattr(args, "_ckpt_path", None)
        msg = f"{parser.prog}: interrupted"
        if ck and os.path.isfile(ck):
            ep = getattr(args, "_saved_epoch", None)
            at = f" (after epoch {ep})" if ep else ""
            msg += (f"; the last complete checkpoint {ck}{at} is intact. Continue with:\n  "
                    + _resume_command(argv, os.path.dirname(ck)))
        else:
            msg += " before the first checkpoint was written; nothing to resume"
        print(msg, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
