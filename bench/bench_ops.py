"""Op benchmark: fused cdkernels ops vs eager PyTorch vs torch.compile vs a copy roofline.

For each op/shape/dtype and each backend that runs on the device it prints the median time,
the GB/s of the op's minimal memory traffic, that bandwidth as a % of a copy (``copy_`` into a
preallocated buffer) measured in the same run, and the speedup over eager PyTorch and
torch.compile of the same function.

    python bench/bench_ops.py                     # CPU defaults (or GPU defaults on CUDA)
    python bench/bench_ops.py --device cuda --csv out.csv --png out.png
    python bench/bench_ops.py --quick             # small shapes, few repeats (smoke run)
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdkernels  # noqa: E402

DT, SIGMA = 0.1, 0.5


def timeit(fn, device, repeats, warmup=3, inner=1):
    """Median seconds per call over ``repeats`` measurements (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / inner)
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def copy_time(x, device, repeats):
    """The copy roofline: ``out.copy_(x)`` into a preallocated buffer (memory bandwidth alone,
    no allocation or first-touch page faults)."""
    out = torch.empty_like(x)
    return timeit(lambda: out.copy_(x), device, repeats)


def peak_extra_mib(fn, device):
    """Extra device memory (MiB) above what was allocated before ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# -- the eager baselines (what a user writes without cdkernels) -----------------------------------

def eager_step(x, f):
    return x + DT * f + (SIGMA * math.sqrt(DT)) * torch.randn_like(x)


def eager_step_relu(x, f):
    return torch.relu(x + DT * f + (SIGMA * math.sqrt(DT)) * torch.randn_like(x))


def eager_smooth(x, K):
    # the K noisy copies materialised at once, as a naive Monte-Carlo estimate does
    xs = x.unsqueeze(0) + SIGMA * torch.randn((K,) + x.shape, device=x.device, dtype=x.dtype)
    return torch.relu(xs).mean(0)


def eager_ensemble(z, K):
    return torch.softmax(z.float().reshape(K, -1, z.shape[-1]), -1).mean(0)


def backends_for(device):
    """Native backends that run on ``device`` here (the reference is the oracle, not timed)."""
    out = []
    for name, info in cdkernels.backends().items():
        if name == "reference" or not info["available"]:
            continue
        try:
            cdkernels.get_backend(device, torch.float32, name)
        except (RuntimeError, TypeError):
            continue
        out.append(name)
    return out


def run(args):
    device = torch.device(args.device)
    rows = []
    reps = args.repeats

    def add(op, shape, dtype, impl, sec, traffic, copy_s, eager_s, comp_s, extra=""):
        gbs = traffic / sec / 1e9
        copy_gbs = copy_s and (copy_traffic(shape, dtype) / copy_s / 1e9)
        rows.append(dict(op=op, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1],
                         impl=impl, us=sec * 1e6, GBps=gbs,
                         pct_roofline=100 * gbs / copy_gbs if copy_gbs else float("nan"),
                         vs_eager=eager_s / sec if eager_s else float("nan"),
                         vs_compile=comp_s / sec if comp_s else float("nan"), note=extra))

    def copy_traffic(shape, dtype):
        return 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    compile_ok = not args.no_compile
    names = backends_for(device)
    if args.backends:
        names = [b for b in names if b in args.backends.split(",")]
    print(f"# device: {describe(device)}; torch {torch.__version__}; backends: {names}",
          flush=True)

    for shape in args.step_shapes:
        for dtype in args.dtypes:
            x = torch.randn(shape, device=device, dtype=dtype)
            f = torch.randn(shape, device=device, dtype=dtype)
            g = torch.randn(shape, device=device, dtype=dtype)
            nbytes = x.numel() * x.element_size()
            copy_s = copy_time(x, device, reps)
            add("copy", shape, dtype, "copy_ (roofline)", copy_s, 2 * nbytes, copy_s, None, None)
            # forward
            eager_s = timeit(lambda: eager_step(x, f), device, reps)
            comp_s = None
            if compile_ok:
                cfn = torch.compile(eager_step)
                comp_s = timeit(lambda: cfn(x, f), device, reps)
            add("cd_step fwd", shape, dtype, "eager", eager_s, 3 * nbytes, copy_s, eager_s, comp_s)
            if comp_s:
                add("cd_step fwd", shape, dtype, "torch.compile", comp_s, 3 * nbytes, copy_s,
                    eager_s, comp_s)
            for b in names:
                s = timeit(lambda: cdkernels.cd_step(x, f, DT, SIGMA, backend=b), device, reps)
                add("cd_step fwd", shape, dtype, f"cdkernels[{b}]", s, 3 * nbytes, copy_s,
                    eager_s, comp_s)
            # forward + backward with relu and a learnable scalar sigma
            xr, fr = x.clone().requires_grad_(), f.clone().requires_grad_()
            sig = torch.tensor(SIGMA, device=device, requires_grad=True)

            def eager_fb():
                y = torch.relu(xr + DT * fr + sig * math.sqrt(DT) * torch.randn_like(xr))
                y.backward(g)
            eager_fb_s = timeit(eager_fb, device, reps)
            comp_fb_s = None
            if compile_ok:
                cf = torch.compile(lambda a, b, s: torch.relu(
                    a + DT * b + s * math.sqrt(DT) * torch.randn_like(a)))
                comp_fb_s = timeit(lambda: cf(xr, fr, sig).backward(g), device, reps)
            traffic_fb = 7 * nbytes  # fwd: x, f -> y; bwd: g, y -> grad_x, grad_f
            add("cd_step fwd+bwd", shape, dtype, "eager", eager_fb_s, traffic_fb, copy_s,
                eager_fb_s, comp_fb_s)
            if comp_fb_s:
                add("cd_step fwd+bwd", shape, dtype, "torch.compile", comp_fb_s, traffic_fb,
                    copy_s, eager_fb_s, comp_fb_s)
            for b in names:
                def fb():
                    cdkernels.cd_step(xr, fr, DT, sig, activation="relu", backend=b).backward(g)
                s = timeit(fb, device, reps)
                add("cd_step fwd+bwd", shape, dtype, f"cdkernels[{b}]", s, traffic_fb, copy_s,
                    eager_fb_s, comp_fb_s)

    for shape in args.smooth_shapes:
        dtype, K = torch.float32, args.samples
        x = torch.randn(shape, device=device, dtype=dtype)
        nbytes = x.numel() * x.element_size()
        copy_s = copy_time(x, device, reps)
        eager_s = timeit(lambda: eager_smooth(x, K), device, reps)
        mem_e = peak_extra_mib(lambda: eager_smooth(x, K), device)
        comp_s = None
        if compile_ok:
            cfn = torch.compile(eager_smooth)
            comp_s = timeit(lambda: cfn(x, K), device, reps)
        add(f"cd_smooth K={K}", shape, dtype, "eager", eager_s, 2 * nbytes, copy_s, eager_s,
            comp_s, f"+{mem_e:.0f} MiB" if mem_e == mem_e else "")
        if comp_s:
            add(f"cd_smooth K={K}", shape, dtype, "torch.compile", comp_s, 2 * nbytes, copy_s,
                eager_s, comp_s)
        for b in names:
            fn = lambda: cdkernels.cd_smooth(x, SIGMA, samples=K, backend=b)  # noqa: E731
            s = timeit(fn, device, reps)
            mem = peak_extra_mib(fn, device)
            normals_per_s = K * x.numel() / s
            frac = int_fraction(normals_per_s, device)
            add(f"cd_smooth K={K}", shape, dtype, f"cdkernels[{b}]", s, 2 * nbytes, copy_s,
                eager_s, comp_s, f"{normals_per_s / 1e9:.1f} Gnormal/s"
                + (f" = {100 * frac:.0f}% of int32 peak" if frac else "")
                + (f", +{mem:.0f} MiB" if mem == mem else ""))

    for (K, B, Cn) in args.ensemble_shapes:
        z = torch.randn(K * B, Cn, device=device)
        nbytes = z.numel() * 4
        shape = (K * B, Cn)
        copy_s = copy_time(z, device, reps)
        eager_s = timeit(lambda: eager_ensemble(z, K), device, reps)
        comp_s = None
        if compile_ok:
            cfn = torch.compile(eager_ensemble)
            comp_s = timeit(lambda: cfn(z, K), device, reps)
        traffic = nbytes + B * Cn * 4
        add(f"ensemble_mean K={K}", shape, torch.float32, "eager", eager_s, traffic, copy_s,
            eager_s, comp_s)
        if comp_s:
            add(f"ensemble_mean K={K}", shape, torch.float32, "torch.compile", comp_s, traffic,
                copy_s, eager_s, comp_s)
        for b in names:
            s = timeit(lambda: cdkernels.ensemble_mean(z, replicas=K, backend=b), device, reps)
            add(f"ensemble_mean K={K}", shape, torch.float32, f"cdkernels[{b}]", s, traffic,
                copy_s, eager_s, comp_s)
    return rows


# Philox4x32-10 costs per call 10 rounds x (2 mul.hi + 2 mul.lo + 4 xor + 2 key adds) = 100
# integer ops for 4 normals. Per-SM int32 lanes and boost clocks of cards we report on.
_INT_OPS_PER_NORMAL = 25
_CARDS = {"H200": (132, 64, 1.98e9), "H100": (132, 64, 1.98e9), "A100": (108, 64, 1.41e9)}


def int_fraction(normals_per_s, device):
    """Fraction of the GPU's int32 throughput the Philox part of the noise implies."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (sms, lanes, clock) in _CARDS.items():
        if key in name:
            return normals_per_s * _INT_OPS_PER_NORMAL / (sms * lanes * clock)
    return None


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                         "unknown CPU")
    except OSError:
        model = "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def print_table(rows):
    hdr = f"{'op':<22}{'shape':<18}{'dtype':<10}{'impl':<20}{'time us':>11}{'GB/s':>9}" \
          f"{'%copy':>7}{'xeager':>8}{'xcompile':>9}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['op']:<22}{r['shape']:<18}{r['dtype']:<10}{r['impl']:<20}{r['us']:>11.1f}"
              f"{r['GBps']:>9.1f}{r['pct_roofline']:>7.1f}{r['vs_eager']:>8.2f}"
              f"{r['vs_compile']:>9.2f}  {r['note']}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["op"], r["shape"], r["dtype"]) for r in rows if r["op"] != "copy"})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    impls = sorted({r["impl"] for r in rows if r["op"] != "copy"})
    w = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = [next((r["pct_roofline"] for r in rows if (r["op"], r["shape"], r["dtype"]) == gk
                      and r["impl"] == impl), 0) for gk in groups]
        ax.bar([j + i * w for j in range(len(groups))], vals, w, label=impl)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{o}\n{s} {d}" for o, s, d in groups], fontsize=7)
    ax.set_ylabel("% of copy bandwidth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_shape(s):
    return tuple(int(v) for v in s.split("x"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16,float16")
    p.add_argument("--step-shape", action="append", default=None, help="e.g. 256x64x56x56")
    p.add_argument("--smooth-shape", action="append", default=None)
    p.add_argument("--ensemble", action="append", default=None, help="KxBxC, e.g. 16x4096x1000")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--backends", default=None, help="comma list of backends to time")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--csv", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    if a.quick:
        a.step_shape = a.step_shape or ["64x64x32x32" if gpu else "4x16x64x64"]
        a.smooth_shape = a.smooth_shape or ["16x64x32x32" if gpu else "4x16x64x64"]
        a.ensemble = a.ensemble or ["16x512x1000" if gpu else "8x64x100"]
        a.repeats = a.repeats or 5
    a.step_shapes = [parse_shape(s) for s in (a.step_shape or (
        ["256x64x56x56"] if gpu else ["16x64x128x128"]))]  # CPU: 16M elements
    a.smooth_shapes = [parse_shape(s) for s in (a.smooth_shape or (
        ["64x64x56x56"] if gpu else ["4x64x128x128"]))]  # CPU: 4M elements
    a.ensemble_shapes = [parse_shape(s) for s in (a.ensemble or (
        ["16x4096x1000"] if gpu else ["16x256x1000"]))]
    a.dtypes = [getattr(torch, d) for d in (a.dtypes or (
        "float32,bfloat16" if gpu else "float32")).split(",")]
    a.repeats = a.repeats or (50 if gpu else 7)
    warnings.simplefilter("ignore")
    rows = run(a)
    print_table(rows)
    if a.csv:
        with open(a.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if a.png:
        plot(rows, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
