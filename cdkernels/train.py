"""Training CLI: ``python -m cdkernels.train --model cd_preact_resnet20 --data digits ...``.

Small datasets live on the device (see :mod:`cdkernels.data`); batches are index slices of a
per-epoch permutation. Each epoch appends one JSON line to ``OUT/metrics.jsonl`` and writes
``OUT/checkpoint.pt`` atomically (temp file + ``os.replace``); ``--resume`` continues exactly
(model, optimizer, scheduler, epoch, CPU/CUDA generator states and the data-order generator
are restored). The model with the best validation accuracy is kept in ``OUT/best.pt``; its
test accuracy is the one reported (the test set is evaluated, never selected on). At the end:
``OUT/summary.json`` and ``OUT/curves.png``.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU): each rank takes its shard of every global
batch, draws its own noise (cd_step mixes the rank into drawn seeds), metrics are all-reduced
and only rank 0 writes files or logs.

``--cuda-graph`` captures the whole training step (forward, backward, SGD update) once and
replays it; the seeds of the noise are drawn by ``torch.randint`` on the CUDA generator inside
the captured region, so every replay uses fresh noise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from . import data as D
from . import models as M

PROG = "python -m cdkernels.train"
CKPT_FORMAT = "cdkernels-train/1"
# Arguments a resumed run must share with the checkpoint (they define model, data and schedule).
CONFIG_KEYS = ("model", "data", "epochs", "batch_size", "lr", "momentum", "nesterov",
               "weight_decay", "schedule", "warmup", "label_smoothing", "seed", "noise", "sigma",
               "dt", "learnable_sigma", "members", "width", "amp", "limit_train", "val_fraction",
               "augment", "world_size", "adv_train", "adv_eps", "adv_steps", "adv_step_size",
               "limit_eval")
ADV_EPS_DEFAULT = {"cifar10": 8 / 255, "cifar100": 8 / 255, "fashion-mnist": 0.1, "digits": 0.1}


class CLIError(Exception):
    """Bad user input: reported as ``PROG: error: message`` with exit status 2."""


# -- arguments -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train a noisy (convection–diffusion) "
                                "ResNet from cdkernels.models on a small image dataset.")
    a = p.add_argument
    a("--model", default="cd_preact_resnet20", help="model name (cdkernels.models.list())")
    a("--data", default="digits", choices=D.DATASETS)
    a("--data-dir", default=None, help="dataset folder (fashion-mnist default: "
      "/usr/share/datasets/fashion-mnist; required for CIFAR)")
    a("--val-fraction", type=float, default=0.1, help="share of the training set held out "
      "for validation (fixed, seed-independent)")
    a("--limit-train", type=int, default=None, metavar="N", help="use only N training images")
    a("--limit-eval", type=int, default=None, metavar="N", help="evaluate (and select on) only "
      "the first N validation and N test images per epoch (quick runs)")
    a("--no-augment", dest="augment", action="store_false", help="no random crop / flip")
    a("--epochs", type=int, default=10)
    a("--batch-size", type=int, default=128, help="global batch size (split over ranks)")
    a("--lr", type=float, default=0.1)
    a("--momentum", type=float, default=0.9)
    a("--nesterov", action="store_true")
    a("--weight-decay", type=float, default=5e-4, help="(not applied to learnable sigma)")
    a("--schedule", choices=("cosine", "step", "constant"), default="cosine",
      help="step: x0.1 at 50%% and 75%% of the epochs")
    a("--warmup", type=float, default=0.0, metavar="EPOCHS", help="linear warmup epochs")
    a("--label-smoothing", type=float, default=0.0)
    a("--seed", type=int, default=0)
    a("--noise", choices=("em", "std", "none"), default="em")
    a("--sigma", type=float, default=0.1, help="noise coefficient (em: sigma; std: coef)")
    a("--dt", type=float, default=1.0)
    a("--learnable-sigma", choices=("none", "scalar", "channel"), default="none")
    a("--width", type=int, default=None, help="base width of cd_preact_resnet / enresnet")
    a("--members", type=int, default=None, help="ensemble members (enresnet models)")
    a("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype")
    a("--channels-last", action="store_true")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cuda-graph", action="store_true", help="capture and replay the whole training step "
      "(CUDA only)")
    a("--mc-samples", type=int, default=None, metavar="K", help="also evaluate the selected "
      "model by averaging K noise realisations (Monte-Carlo)")
    a("--eval-batch-size", type=int, default=1024)
    a("--adv-train", choices=("pgd",), default=None, help="adversarial training (Madry et al.): "
      "every batch is replaced by PGD examples (L-inf, random start) generated on the fly with "
      "cdkernels.robust.pgd in pixel space [0, 1]. As in EnResNet, the model stays in TRAIN "
      "mode while the examples are generated (noise on, batch-norm batch statistics; the "
      "attack's forwards also update the BN running statistics); generation runs eagerly, "
      "also with --cuda-graph (only the training step itself is captured)")
    a("--eps", dest="adv_eps", default=None, metavar="EPS", help="--adv-train radius in pixel "
      "units, e.g. 0.1 or 8/255 (default 8/255 for CIFAR, 0.1 for fashion-mnist and digits)")
    a("--adv-steps", type=int, default=None, help="--adv-train PGD iterations (default 7)")
    a("--adv-step-size", default=None, metavar="ALPHA", help="--adv-train PGD step (default "
      "2.5*eps/steps)")
    a("--out", default=None, help="output folder (default runs/MODEL_DATA_seedS)")
    a("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
      help="continue from CKPT (default OUT/checkpoint.pt)")
    a("--overwrite", action="store_true", help="start afresh even if OUT has a checkpoint")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def _world() -> tuple:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def validate(args) -> None:
    """Raise CLIError for bad or conflicting options (before anything heavy happens)."""
    names = M.list()
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
    if args.mc_samples is not None and args.mc_samples < 1:
        raise CLIError(f"--mc-samples must be >= 1, got {args.mc_samples}")
    if args.mc_samples is not None and args.noise == "none":
        raise CLIError("--mc-samples needs a noisy model (--noise em or std)")
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
    if args.adv_train is None and (args.adv_eps is not None or args.adv_steps is not None
                                   or args.adv_step_size is not None):
        raise CLIError("--eps / --adv-steps / --adv-step-size need --adv-train pgd")
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
        if not (math.isfinite(args.adv_eps) and args.adv_eps >= 0):
            raise CLIError(f"--eps must be a finite number >= 0, got {args.adv_eps}")
        if args.adv_steps < 1:
            raise CLIError(f"--adv-steps must be >= 1, got {args.adv_steps}")
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device} asked for CUDA but no CUDA device is available")
    if args.cuda_graph and dev.type != "cuda":
        raise CLIError(f"--cuda-graph needs a CUDA device; this run is on {dev.type} "
                       "(drop --cuda-graph or use --device cuda)")
    if args.cuda_graph and world > 1:
        raise CLIError("--cuda-graph is not supported with several processes (DDP) yet")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        raise CLIError(f"--resume: no checkpoint file {args.resume!r}")


def resolve_device(name: Optional[str], local_rank: int = 0, world: int = 1) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local_rank)
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda[:N], got {name!r}")
    return dev


def config_of(args, world: int) -> Dict[str, object]:
    c = {k: getattr(args, k) for k in CONFIG_KEYS if k != "world_size"}
    c["world_size"] = world
    return c


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
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
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


def mc_probs(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Class scores averaged over ``samples`` noise realisations (noise on in eval).

    Uses ``cdkernels.nn.MonteCarlo`` (space="prob") when it is available, otherwise the same
    thing in plain PyTorch (mean of the softmax probabilities)."""
    try:
        from .nn import MonteCarlo  # type: ignore[attr-defined]
    except ImportError:
        MonteCarlo = None
    if MonteCarlo is not None:
        return MonteCarlo(model, samples=samples, space="prob")(x)
    from .nn import set_noise_in_eval
    set_noise_in_eval(model, True)
    try:
        p = torch.zeros((), device=x.device)
        for _ in range(samples):
            p = p + torch.softmax(model(x).float(), dim=1)
        return p / samples
    finally:
        set_noise_in_eval(model, False)


@torch.no_grad()
def evaluate(model, data: D.ImageData, split: D.Split, args, device, rank: int, world: int,
             memory_format, mc: Optional[int] = None) -> Dict[str, float]:
    """Loss and accuracy on ``split`` (each rank takes every world-th image; sums all-reduced)."""
    was = model.training
    model.eval()
    idx_all = torch.arange(rank, len(split), world, device=device)
    crit = nn.CrossEntropyLoss(reduction="sum")
    acc = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    for i in range(0, len(idx_all), args.eval_batch_size):
        idx = idx_all[i:i + args.eval_batch_size]
        x, y = data.batch(split, idx, False, memory_format)
        with _autocast(device, args.amp):
            if mc:
                p = mc_probs(model, x, mc).float()
                loss = torch.zeros((), device=device)
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


def _plot(history: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("loss"), ax[0].legend()
    for k in ("train", "val", "test"):
        ax[1].plot(ep, [h[f"{k}_acc"] for h in history], label=k)
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("accuracy"), ax[1].legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# -- the run -------------------------------------------------------------------------------------

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
    log = _Log(rank == 0, args.quiet)
    t_start = time.time()
    out = args.out or os.path.join("runs", f"{args.model}_{args.data}_seed{args.seed}")
    ckpt_path = os.path.join(out, "checkpoint.pt")
    resume_path = None
    if args.resume:
        resume_path = ckpt_path if args.resume == "auto" else args.resume
        if not os.path.isfile(resume_path):
            raise CLIError(f"--resume: no checkpoint at {resume_path}")
    elif os.path.exists(ckpt_path) and not args.overwrite:
        raise CLIError(f"{ckpt_path} exists; pass --resume to continue it, --overwrite to start "
                       "afresh, or another --out")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    data = D.load(args.data, args.data_dir, device=device, val_fraction=args.val_fraction,
                  limit_train=args.limit_train)
    if not args.augment:
        data.pad, data.flip = 0, False
    if args.limit_eval is not None:
        n = args.limit_eval
        data.val = D.Split(data.val.images[:n], data.val.labels[:n])
        data.test = D.Split(data.test.images[:n], data.test.labels[:n])
    per_rank = args.batch_size // world
    if len(data.train) < args.batch_size:
        raise CLIError(f"--batch-size {args.batch_size} is larger than the training set "
                       f"({len(data.train)} images)")
    steps_per_epoch = len(data.train) // args.batch_size  # drop_last: static shapes

    # Same initial weights on every rank; then per-rank augmentation streams.
    torch.manual_seed(args.seed)
    kw = dict(num_classes=data.num_classes, in_channels=data.in_channels, noise=args.noise,
              sigma=args.sigma, dt=args.dt,
              learnable_sigma=False if args.learnable_sigma == "none" else args.learnable_sigma)
    if args.width is not None:
        kw["width"] = args.width
    if args.members is not None:
        kw["members"] = args.members
    try:
        model = M.create(args.model, **kw)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot build {args.model}: {e}") from None
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=mf)
    torch.manual_seed(args.seed + 1_000_003 * (rank + 1))
    data_gen = torch.Generator().manual_seed(args.seed)  # same order on every rank

    sig = [p for n, p in model.named_parameters() if n.endswith("step.sigma")
           or n.endswith("step.coef")]
    sig_ids = {id(p) for p in sig}
    rest = [p for p in model.parameters() if id(p) not in sig_ids]
    groups = [{"params": rest}] + ([{"params": sig, "weight_decay": 0.0}] if sig else [])
    opt = SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
              weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(args.schedule, args.epochs, args.warmup, steps_per_epoch))
    config = config_of(args, world)

    history: List[dict] = []
    best = {"val_acc": -1.0, "epoch": 0, "test_acc": None}
    start_epoch, elapsed0 = 0, 0.0
    if resume_path:
        ck = load_checkpoint(resume_path)
        diff = {k: (ck["config"].get(k), v) for k, v in config.items()
                if ck["config"].get(k) != v}
        if diff:
            raise CLIError(f"checkpoint {resume_path} was made with different settings: "
                           + ", ".join(f"{k}={a!r} there vs {b!r} now"
                                       for k, (a, b) in diff.items()))
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CLIError(f"checkpoint {resume_path} does not fit {args.model}: {e}") from None
        sched.load_state_dict(ck["scheduler"])
        rng = ck["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and len(rng["cuda"]):
            torch.cuda.set_rng_state(rng["cuda"], device)
        data_gen.set_state(rng["data"])
        start_epoch, history, best = ck["epoch"], list(ck["history"]), dict(ck["best"])
        elapsed0 = float(ck.get("elapsed", 0.0))
        log(f"resumed from {resume_path} after epoch {start_epoch}")
    if rank == 0 and not resume_path:
        open(os.path.join(out, "metrics.jsonl"), "w").close()

    base = model
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    eval_model = train_model if world == 1 else base
    crit = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    # PGD examples come from the plain module (not the DDP / compiled wrapper: the attack's
    # input-only backward must not trigger DDP's gradient reduction).
    adv = _adv_maker(args, base, data, device) if getattr(args, "adv_train", None) else None
    if adv is not None and resume_path and "adv" in ck["rng"][rank]:
        adv.gen.set_state(ck["rng"][rank]["adv"])

    def step_eager(x, y, cache=True):
        with _autocast(device, args.amp, cache):
            out_ = train_model(x)
            loss = crit(out_.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.detach(), (out_.argmax(1) == y).sum()

    scaler = None
    if args.amp == "fp16":
        scaler = torch.amp.GradScaler(device.type)

    graph = None
    static: Dict[str, torch.Tensor] = {}
    warm_left = 3 if args.cuda_graph else 0
    side = torch.cuda.Stream(device) if args.cuda_graph else None

    from tqdm import tqdm
    stop = args.epochs if args.stop_after is None else min(args.epochs,
                                                           start_epoch + args.stop_after)
    log(f"{args.model} on {args.data} ({len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test, {data.num_classes} classes), {device}, world {world}, "
        f"{sum(p.numel() for p in base.parameters())} parameters, noise={args.noise}")
    for epoch in range(start_epoch, stop):
        t0 = time.time()
        train_model.train()
        batches = D.batch_indices(len(data.train), args.batch_size, data_gen, device)
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        bar = tqdm(total=len(batches) * args.batch_size, unit="img", unit_scale=True,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or args.quiet,
                   leave=False, file=sys.stderr)
        for bi, idx in enumerate(batches):
            idx = idx[rank * per_rank:(rank + 1) * per_rank]
            x, y = data.batch(data.train, idx, True, mf)
            if adv is not None:
                x = adv(x, y).contiguous(memory_format=mf)
            if args.cuda_graph and graph is None and warm_left == 0:
                graph, static = _capture(train_model, opt, crit, x, y, device, args, side)
                log("cuda-graph: captured forward + backward + SGD step; every replay draws "
                    "fresh noise seeds with torch.randint from the CUDA generator inside the "
                    "graph (its offset advances per replay), so the noise differs per step")
            if graph is not None:
                static["x"].copy_(x)
                static["y"].copy_(y)
                opt.sync_lr()
                graph.replay()
                loss, correct = static["loss"], static["correct"]
            elif args.cuda_graph:  # warm-up steps on a side stream before capture
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    opt.zero_grad(set_to_none=True)
                    loss, correct = step_eager(x, y, cache=False)
                torch.cuda.current_stream(device).wait_stream(side)
                warm_left -= 1
            else:
                opt.zero_grad(set_to_none=True)
                loss, correct = step_eager(x, y)
            stats += torch.stack([loss.double() * len(y), correct.double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            sched.step()
            bar.update(args.batch_size)
            if bi % 20 == 0 and rank == 0 and not args.quiet:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        stats = _all_reduce(stats, world).tolist()
        t_train = time.time() - t0
        val = evaluate(eval_model, data, data.val, args, device, rank, world, mf) \
            if len(data.val) else {"loss": float("nan"), "acc": float("nan"), "n": 0}
        test = evaluate(eval_model, data, data.test, args, device, rank, world, mf)
        rec = {"epoch": epoch + 1, "train_loss": stats[0] / stats[2],
               "train_acc": stats[1] / stats[2], "train_images": int(stats[2]),
               "val_loss": val["loss"], "val_acc": val["acc"], "test_loss": test["loss"],
               "test_acc": test["acc"], "lr": opt.param_groups[0]["lr"],
               "epoch_time_s": time.time() - t0, "images_per_s": stats[2] / max(t_train, 1e-9)}
        sig_vals = [float(p.detach().float().abs().mean()) for p in sig]
        if sig_vals:
            rec["sigma_mean"] = sum(sig_vals) / len(sig_vals)
        history.append(rec)
        improved = len(data.val) and rec["val_acc"] > best["val_acc"]
        if improved:
            best = {"val_acc": rec["val_acc"], "epoch": epoch + 1, "test_acc": rec["test_acc"]}
        # Checkpoint: every rank's RNG states travel to rank 0.
        rng = {"cpu": torch.get_rng_state(), "data": data_gen.get_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
               else torch.zeros(0, dtype=torch.uint8)}
        if adv is not None:
            rng["adv"] = adv.gen.get_state()
        rngs = [rng]
        if world > 1:
            import torch.distributed as dist
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if rank == 0:
            with open(os.path.join(out, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if improved:
                save_atomic({"format": CKPT_FORMAT, "config": config, "epoch": epoch + 1,
                             "model": base.state_dict()}, os.path.join(out, "best.pt"))
            save_atomic({"format": CKPT_FORMAT, "config": config, "epoch": epoch + 1,
                         "model": base.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": rngs, "history": history,
                         "best": best, "elapsed": elapsed0 + time.time() - t_start}, ckpt_path)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {rec['train_loss']:.4f} acc "
            f"{rec['train_acc']:.4f} | val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f} "
            f"| {rec['images_per_s']:.0f} img/s, {rec['epoch_time_s']:.1f}s")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()

    finished = stop == args.epochs
    summary = {"model": args.model, "data": args.data, "epochs_done": len(history),
               "finished": finished, "best_val_acc": best["val_acc"],
               "best_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
               "final_test_acc": history[-1]["test_acc"] if history else None,
               "time_s": elapsed0 + time.time() - t_start, "out": out}
    if finished and args.mc_samples and best["epoch"]:
        sel = load_checkpoint(os.path.join(out, "best.pt")) if rank == 0 or world == 1 else None
        if world > 1:
            import torch.distributed as dist
            box = [sel["model"] if sel else None]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        else:
            state = sel["model"]
        mc_model = M.create(args.model, **kw).to(device=device, memory_format=mf)
        mc_model.load_state_dict(state)
        for split in ("val", "test"):
            r = evaluate(mc_model, data, getattr(data, split), args, device, rank, world, mf,
                         mc=args.mc_samples)
            summary[f"mc{args.mc_samples}_{split}_acc"] = r["acc"]
    if rank == 0 and finished:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        if history:
            _plot(history, os.path.join(out, "curves.png"))
        mc = (f"; Monte-Carlo ({args.mc_samples}) test acc "
              f"{summary[f'mc{args.mc_samples}_test_acc']:.4f}"
              if f"mc{args.mc_samples}_test_acc" in summary else "")
        log(f"best val acc {best['val_acc']:.4f} at epoch {best['epoch']}; test acc of that "
            f"model {best['test_acc']:.4f}{mc}; {summary['time_s']:.1f}s; files in {out}",
            always=True)
    return {"summary": summary, "history": history, "model": base}


def _adv_maker(args, train_model, data: D.ImageData, device):
    """x (normalised) -> PGD examples (normalised) for --adv-train, with the model as it is
    (train mode), in pixel space: un-normalise, attack with cdkernels.robust.pgd clipped to
    [0, 1], normalise again. Random starts come from a generator seeded with --seed."""
    from .robust import PixelModel, pgd
    net = PixelModel(train_model, data.mean, data.std).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 99991)
    mean = data.mean.view(1, -1, 1, 1)
    std = data.std.view(1, -1, 1, 1)

    def make(x, y):
        with _autocast(device, args.amp):
            xp = (x.float() * std + mean).clamp(0, 1)
            xa = pgd(net, xp, y, args.adv_eps, steps=args.adv_steps,
                     step_size=args.adv_step_size, norm="linf", random_start=True,
                     generator=gen)
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


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message
        return int(e.code or 0)
    try:
        validate(args)
        run(args)
    except (CLIError, D.DataError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
