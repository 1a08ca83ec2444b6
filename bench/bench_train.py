"""Training-step benchmark of cdkernels models (not a test).

For each model / batch / dtype it times one full training step (forward, backward, SGD update)
and reports the median step time and images/s over repeats, for

  torch-eager     a plain eager PyTorch implementation of the same network whose residual
                  update is ``x + dt*f + sigma*sqrt(dt)*torch.randn_like(x)``
  cdk-eager       cdkernels models (every update one fused ``cd_step``)
  cdk-compile     the same under ``torch.compile``
  cdk-cudagraph   the whole step captured in a CUDA graph and replayed (GPU only)

plus the same network with noise off (``noise="none"``: eager / compile / CUDA graph).
``--epochs N`` adds an end-to-end mode: ``cdkernels.train`` on real data (digits by default),
reporting epochs per second. ``--noise-cost`` times each noise mode's step against noise off
(interleaved repeats in one process), ``--noise-floor`` each mode's residual updates alone at
the blocks' shapes (what the noise costs when nothing else disturbs it).

    python bench/bench_train.py                       # CPU default, ~1-2 minutes
    python bench/bench_train.py --device cuda --models cd_preact_resnet20,cd_wrn16_4 \
        --batch 128,512 --dtype fp32,bf16 --size 32 --channels 3 --out results.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdkernels  # noqa: E402
from cdkernels import models  # noqa: E402
from cdkernels._common import steady_heap_wanted  # noqa: E402
from cdkernels import train as T  # noqa: E402

warnings.filterwarnings("ignore", message="cdkernels: using backend")


class TorchEMStep(nn.Module):
    """The unfused reference update with torch.randn_like noise."""

    def __init__(self, dt, sigma):
        super().__init__()
        self.dt, self.scale = dt, sigma * math.sqrt(dt)

    def forward(self, x, f):
        if x.dtype != f.dtype:
            d = torch.promote_types(x.dtype, f.dtype)
            x, f = x.to(d), f.to(d)
        return x + self.dt * f + self.scale * torch.randn_like(x)


# --noise-cost variants: (noise mode, learnable_sigma)
NOISE_VARIANTS = {"off": ("none", False), "em": ("em", False), "std": ("std", False),
                  "em-learn-channel": ("em", "channel"), "std-learn-channel": ("std", "channel")}


def build(model: str, variant: str, args, device):
    noise, learn = NOISE_VARIANTS.get(variant, ("none" if variant.startswith("off") else "em",
                                                False))
    kw = dict(num_classes=10, in_channels=args.channels, noise=noise, sigma=args.sigma,
              dt=args.dt, learnable_sigma=learn)
    if "wrn" not in model and "wide" not in model:
        kw["width"] = args.width
    m = models.create(model, **kw)
    if variant == "torch-eager":
        for blk in m.modules():
            if hasattr(blk, "step"):
                blk.step = TorchEMStep(args.dt, args.sigma)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    return m.to(device=device, memory_format=mf)


def _sync_fn(device):
    """What waits for the device's queued work before a clock is read (nothing on the CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _median_step(step, args, sync):
    """Median over args.repeats of the mean time of args.iters back-to-back steps (seconds);
    the device is idle on entry."""
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        times.append((time.perf_counter() - t) / args.iters)
    return statistics.median(times)


def time_variant(model_name, variant, batch, dtype, args, device):
    torch.manual_seed(0)
    m = build(model_name, variant, args, device)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, args.channels, args.size, args.size, device=device).to(memory_format=mf)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = T.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    crit = nn.CrossEntropyLoss()
    amp = None if dtype == "fp32" else dtype
    run_m = torch.compile(m) if variant.endswith("compile") else m
    graphed = variant.endswith("cudagraph")

    def step():
        opt.zero_grad(set_to_none=True)
        with T._autocast(device, amp, cache=not graphed):
            loss = crit(run_m(x).float(), y)
        loss.backward()
        opt.step()

    sync = _sync_fn(device)
    t0 = time.perf_counter()
    if graphed:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        ns = argparse.Namespace(amp=amp)
        g, _ = T._capture(run_m, opt, crit, x, y, device, ns, side)

        def step():  # noqa: F811
            opt.sync_lr()
            g.replay()
    for _ in range(args.warmup):
        step()
    sync()
    setup = time.perf_counter() - t0
    med = _median_step(step, args, sync)
    return {"model": model_name, "variant": variant, "batch": batch, "dtype": dtype,
            "size": args.size, "device": str(device), "step_ms": med * 1e3,
            "images_per_s": batch / med, "setup_s": setup,
            "backend": _backend_name(device)}


def _noise_configs(args):
    """(args for one image size, model, batch, dtype) of the --noise-cost/--noise-floor runs:
    every size of --noise-sizes and model of --models, the first batch and dtype."""
    for size in map(int, args.noise_sizes.split(",")):
        a = argparse.Namespace(**vars(args))
        a.size = size
        for model in args.models.split(","):
            yield a, model, int(args.batch.split(",")[0]), args.dtype.split(",")[0]


def _training_step(model, variant, a, batch, dtype, device):
    """(network, step): one SGD step on a fixed random batch of a.size images, in autocast
    for a 16-bit dtype, as the noise-cost and noise-floor runs time it."""
    torch.manual_seed(0)
    m = build(model, variant, a, device)
    x = torch.randn(batch, a.channels, a.size, a.size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = T.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    crit = nn.CrossEntropyLoss()
    amp = None if dtype == "fp32" else dtype

    def step():
        opt.zero_grad(set_to_none=True)
        with T._autocast(device, amp, cache=True):
            loss = crit(m(x).float(), y)
        loss.backward()
        opt.step()
    return m, step


def noise_cost(args, device):
    """Step time of each noise mode against noise off, measured interleaved (every repeat times
    all variants back to back, so load changes hit them alike). Target (issue 9): <= 5 %."""
    variants = args.noise_variants.split(",")
    rows = []
    for a, model, batch, dtype in _noise_configs(args):
        size = a.size
        steps = {}
        for v in variants:
            step = _training_step(model, v, a, batch, dtype, device)[1]
            for _ in range(args.warmup):
                step()
            steps[v] = step
        times = {v: [] for v in variants}
        sync = _sync_fn(device)
        for _ in range(args.repeats):
            for v in variants:
                t = time.perf_counter()
                for _ in range(args.iters):
                    steps[v]()
                sync()
                times[v].append((time.perf_counter() - t) / args.iters)
        off = statistics.median(times["off"]) if "off" in times else None
        for v in variants:
            med = statistics.median(times[v])
            # per-repeat ratios give the spread of the cost, not just of the times
            ratios = [t / o for t, o in zip(times[v], times["off"])] if off else []
            rows.append({"mode": "noise-cost", "model": model, "size": size,
                         "batch": batch, "dtype": dtype, "variant": v,
                         "step_ms": med * 1e3,
                         "cost_pct": 100 * (med / off - 1) if off else float("nan"),
                         "cost_pct_lo": 100 * (min(ratios) - 1) if ratios else float("nan"),
                         "cost_pct_hi": 100 * (max(ratios) - 1) if ratios else float("nan")})
    return rows


def _updates(model):
    """The residual-update modules of a cdkernels network (each block's ``step``), in order."""
    return [mod.step for mod in model.modules()
            if isinstance(getattr(mod, "step", None), nn.Module)]


def noise_floor(args, device):
    """Each noise mode's step modules timed alone: forward + backward of the residual update at
    the shapes and dtypes the network's blocks see (warm caches, back-to-back calls), the
    difference to noise off's update summed over the blocks, over the off network's step time.
    This is what the noise would cost in a step that did not disturb it; in the real step the
    convolutions evict the kernels' code and data and the Python around them between calls,
    so --noise-cost measures more. A floor for it, not a prediction."""
    variants = [v for v in args.noise_variants.split(",") if v != "off"]
    rows = []
    for a, model, batch, dtype in _noise_configs(args):
        size = a.size
        m, step = _training_step(model, "off", a, batch, dtype, device)
        seen = []  # (x, f) shapes and dtypes of each block's update
        off_mods = _updates(m)
        hooks = [u.register_forward_hook(
            lambda mod, inp, out: seen.append([(t.shape, t.dtype) for t in inp[:2]]))
            for u in off_mods]
        step()
        for h in hooks:
            h.remove()
        blocks = list(seen)
        sync = _sync_fn(device)
        for _ in range(args.warmup):
            step()
        sync()
        off_step = _median_step(step, args, sync)

        def update_time(mod, shapes, n=40):
            (xs, xd), (fs, fd) = shapes
            xb = torch.randn(xs, device=device).to(xd).requires_grad_()
            fb = torch.randn(fs, device=device).to(fd).requires_grad_()
            g = torch.randn(xs, device=device).to(torch.promote_types(xd, fd))
            mod.train()
            ts = []
            for _ in range(n + 5):
                sync()
                t = time.perf_counter()
                mod(xb, fb).backward(g)
                sync()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts[5:])
        base = [update_time(mod, sh) for mod, sh in zip(off_mods, blocks)]
        for v in variants:
            torch.manual_seed(0)
            mv = build(model, v, a, device)
            mods = _updates(mv)
            if len(mods) != len(blocks):
                raise RuntimeError(f"{v}: {len(mods)} update modules, {len(blocks)} blocks")
            extra = sum(update_time(mod, sh) - b for mod, sh, b in zip(mods, blocks, base))
            rows.append({"mode": "noise-floor", "model": model, "size": size, "batch": batch,
                         "dtype": dtype, "variant": v, "off_step_ms": off_step * 1e3,
                         "blocks": len(mods), "extra_ms": extra * 1e3,
                         "floor_pct": 100 * extra / off_step})
    return rows


def _backend_name(device):
    try:
        from cdkernels.backends import get_backend
        return get_backend(device, torch.float32).name
    except Exception as e:  # pragma: no cover
        return f"? ({e})"


def epochs_mode(args, device):
    rows = []
    for variant in args.epoch_variants.split(","):
        with tempfile.TemporaryDirectory() as out:
            argv = ["--model", args.models.split(",")[0], "--data", args.data, "--epochs",
                    str(args.epochs), "--batch-size", str(args.batch.split(",")[0]), "--out", out,
                    "--quiet", "--device", str(device)]
            if "wrn" not in argv[1]:
                argv += ["--width", str(args.width)]
            if args.data_dir:
                argv += ["--data-dir", args.data_dir]
            argv += {"eager": [], "compile": ["--compile"], "cudagraph": ["--cuda-graph"],
                     "off": ["--noise", "none"], "em": ["--noise", "em"],
                     "std": ["--noise", "std"],
                     "em-learn-channel": ["--noise", "em", "--learnable-sigma", "channel"],
                     "std-learn-channel": ["--noise", "std", "--learnable-sigma", "channel"],
                     }[variant]
            dtype = args.dtype.split(",")[0]
            if dtype != "fp32":
                argv += ["--amp", dtype]
            t = time.perf_counter()
            a = T.build_parser().parse_args(argv)
            T.validate(a)
            res = T.run(a)
            total = time.perf_counter() - t
            ep = [h["epoch_time_s"] for h in res["history"]]
            steady = statistics.median(ep[1:]) if len(ep) > 1 else ep[0]
            rows.append({"mode": "epochs", "variant": variant, "data": args.data,
                         "epochs": args.epochs, "total_s": total,
                         "epochs_per_s_steady": 1.0 / steady,
                         "images_per_s": statistics.median(h["images_per_s"]
                                                           for h in res["history"]),
                         "val_acc": res["history"][-1]["val_acc"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cd_preact_resnet20")
    p.add_argument("--batch", default="64", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="fp32", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--variants", default=None,
                   help="default: all that run on the device; 'none': only --epochs")
    p.add_argument("--size", type=int, default=8, help="image side (8 = digits, 28, 32)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--dt", type=float, default=1.0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=0, help="also run N epochs end to end")
    p.add_argument("--epoch-variants", default="eager,off",
                   help="comma list of eager, compile, cudagraph (noise em) or off, em, std, "
                        "em-learn-channel, std-learn-channel; --dtype bf16 trains in autocast")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write results (.json or .csv)")
    p.add_argument("--noise-cost", action="store_true",
                   help="only the cost of each noise mode vs noise off (issue 9: <= 5 %%)")
    p.add_argument("--noise-floor", action="store_true",
                   help="each noise mode's updates timed alone at the blocks' shapes, summed "
                        "over the blocks, vs the off step: a floor for --noise-cost")
    p.add_argument("--noise-variants", default="off,em,std,em-learn-channel,std-learn-channel")
    p.add_argument("--noise-sizes", default="8,28", help="image sides for --noise-cost")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # as the training CLI does on the CPU: without it, whether a variant's steps page-fault their
    # activations in afresh depends on the process's heap layout (cdkernels.steady_heap)
    heap = ("steady" if device.type == "cpu" and steady_heap_wanted() and cdkernels.steady_heap()
            else "glibc defaults" if device.type == "cpu" else "n/a")
    if args.noise_floor or args.noise_cost:
        what = ("noise floor: the updates alone (median of 40 forward+backward calls per block) "
                "vs the off step" if args.noise_floor else
                f"noise cost vs off (median of {args.repeats} interleaved repeats x "
                f"{args.iters} steps)")
        print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"load {os.getloadavg()[0]:.2f}, heap {heap}; {what}", flush=True)
        rows = noise_floor(args, device) if args.noise_floor else noise_cost(args, device)
        for r in rows:
            label = (f"{r['model']:22} {r['size']:>3}x{r['size']:<3} b{r['batch']} "
                     f"{r['dtype']:>5} {r['variant']:18}")
            if args.noise_floor:
                print(f"{label} off step {r['off_step_ms']:7.2f} ms, updates "
                      f"{r['extra_ms']:+6.2f} ms = floor {r['floor_pct']:+5.1f} %", flush=True)
                continue
            status = "" if r["variant"] == "off" else (
                "met" if r["cost_pct"] <= 5.0 else "NOT met")
            print(f"{label} {r['step_ms']:8.2f} ms  cost {r['cost_pct']:+6.1f} % "
                  f"(per repeat {r['cost_pct_lo']:+.1f}..{r['cost_pct_hi']:+.1f})  {status}",
                  flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        return 0
    variants = ([] if args.variants == "none" else args.variants.split(",") if args.variants else
                ["torch-eager", "cdk-eager", "cdk-compile", "off-eager", "off-compile"]
                + (["cdk-cudagraph", "off-cudagraph"] if device.type == "cuda" else []))
    if device.type != "cuda" and any(v.endswith("cudagraph") for v in variants):
        p.error("cudagraph variants need --device cuda")
    rows = []
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cd_step backend {_backend_name(device)}, heap {heap}", flush=True)
    hdr = f"{'model':22} {'variant':14} {'batch':>5} {'dtype':>5} {'ms/step':>9} {'img/s':>9}"
    print(hdr + f" {'vs torch':>9}\n" + "-" * (len(hdr) + 10))
    for model in args.models.split(","):
        for batch in map(int, args.batch.split(",")):
            for dtype in args.dtype.split(","):
                base = None
                for v in variants:
                    r = time_variant(model, v, batch, dtype, args, device)
                    rows.append(r)
                    base = r["step_ms"] if v == "torch-eager" else base
                    rel = f"{base / r['step_ms']:8.2f}x" if base else ""
                    print(f"{model:22} {v:14} {batch:5} {dtype:>5} {r['step_ms']:9.2f} "
                          f"{r['images_per_s']:9.0f} {rel}", flush=True)
    if args.epochs:
        print(f"\nend to end (cdkernels.train, {args.dtype.split(',')[0]}):")
        ep_rows = epochs_mode(args, device)
        off = next((r for r in ep_rows if r["variant"] == "off"), None)
        for r in ep_rows:
            rows.append(r)
            cost = ("" if off is None or r is off else
                    f", noise cost {100 * (off['images_per_s'] / r['images_per_s'] - 1):+.1f} %")
            print(f"  {r['variant']:18} {r['epochs']} epochs of {r['data']}: "
                  f"{r['epochs_per_s_steady']:.3f} epochs/s steady, {r['images_per_s']:.0f} img/s,"
                  f" total {r['total_s']:.1f}s, val acc {r['val_acc']:.3f}{cost}", flush=True)
    if args.out:
        if args.out.endswith(".csv"):
            keys = sorted({k for r in rows for k in r})
            with open(args.out, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        else:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
