"""Op benchmark: fused cdkernels ops vs eager PyTorch vs torch.compile vs a copy roofline, and
the targets table of issue 9 (ratios vs eager measured in the same run).

    python bench/bench_ops.py                      # CPU: every target row (or GPU defaults)
    python bench/bench_ops.py --processes 3        # also: each big row in 3 fresh processes
    python bench/bench_ops.py --device cuda --csv out.csv --png out.png
    python bench/bench_ops.py --quick              # 262K shapes, host-time rows (< 1 min)

How it times (so that the numbers mean what they say):
* Implementations of one row are measured interleaved: repeat r times eager, then each
  cdkernels backend, then torch.compile, so load changes hit them alike. Each measurement is
  ``inner`` back-to-back calls; the row reports the median per call and the spread (min-max of
  the per-measurement medians), and the ratio is median(eager) / median(impl).
* forward+backward clears every ``.grad`` before each call (no gradient accumulation kernels).
* GPU, "as called from Python": CUDA events around ``inner`` back-to-back Python calls, so
  launch overhead counts where the GPU would wait for the CPU. When the inputs fit in L2 (under
  2x its size) the L2 is flushed (a 256 MiB write) before each batch.
* GPU, "kernel only": the same calls captured in a CUDA graph (with an L2 flush before each call
  when the inputs fit), replayed; the flush-only graph's time is subtracted. Falls back to "n/a"
  if a call cannot be captured.
* Host time: per-call wall time of tiny (4x4) calls, forward only, with and without grad.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdkernels  # noqa: E402

DT, SIGMA = 0.1, 0.5
SQDT = math.sqrt(DT)

# issue 9: (row key, target ratio vs eager). Host-time targets are in microseconds.
TARGETS = {
    "cd_step fwd 4x16x64x64": 3.0,
    "cd_step fwd+bwd 4x16x64x64": 2.0,
    "cd_step fwd 16x64x128x128": 10.0,
    "cd_step fwd+bwd 16x64x128x128": 6.0,
    "cd_smooth K=8 4x16x64x64": 10.0,
    "cd_smooth K=8 4x64x128x128": 10.0,
    "ensemble_mean prob K=8 512x100": 1.5,
    "ensemble_mean logprob K=8 512x100": 1.5,
    "ensemble_mean logit K=8 512x100": 1.0,
    "ensemble_mean prob K=16 256x1000": 1.5,
    "ensemble_mean logprob K=16 256x1000": 1.5,
    "ensemble_mean logit K=16 256x1000": 1.0,
}
HOST_TARGETS_US = {"host cd_step fwd, no grad": 15.0, "host cd_step fwd, with grad": 40.0}


# -- timers ----------------------------------------------------------------------------------

class L2Flush:
    """Writes a 256 MiB buffer: evicts everything from an H100/H200 L2 (50/60 MiB)."""

    def __init__(self, device):
        self.buf = torch.empty(64 << 20, dtype=torch.int32, device=device)
        props = torch.cuda.get_device_properties(device)
        self.l2 = getattr(props, "L2_cache_size", 50 << 20)

    def needed(self, nbytes):
        return nbytes < 2 * self.l2

    def __call__(self):
        self.buf.zero_()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_once(fn, device, inner, flush=None):
    """Seconds per call of ``inner`` back-to-back calls, as called from Python."""
    if device.type == "cuda":
        if flush is not None:
            flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / inner
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def graph_kernel_time(fn, device, inner, repeats, flush=None):
    """Median seconds per call of CUDA-graph replays (kernel time without Python), or None."""
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        g, gf = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                if flush is not None:
                    flush()
                fn()
        if flush is not None:
            with torch.cuda.graph(gf):
                for _ in range(inner):
                    flush()
    except Exception:  # noqa: BLE001 - not capturable: reported as n/a
        torch.cuda.synchronize(device)
        return None
    out = []
    for _ in range(repeats):
        t_all = measure_once(g.replay, device, 1)
        t_fl = measure_once(gf.replay, device, 1) if flush is not None else 0.0
        out.append(max(t_all - t_fl, 0.0) / inner)
    return statistics.median(out)


def inner_for(fn, device, budget_s):
    """Calls per measurement so that one measurement takes about ``budget_s``."""
    fn()
    _sync(device)
    t = measure_once(fn, device, 1)
    return max(1, min(2000, int(budget_s / max(t, 1e-7))))


def measure_group(impls, device, repeats, budget_s, nbytes, flush=None):
    """impls: {name: fn}. Interleaved measurements -> {name: dict(med, lo, hi, kernel)}."""
    use_flush = flush if (flush is not None and flush.needed(nbytes)) else None
    inners = {k: inner_for(fn, device, budget_s) for k, fn in impls.items()}
    for k, fn in impls.items():  # warm-up
        measure_once(fn, device, min(inners[k], 3))
    times = {k: [] for k in impls}
    for _ in range(repeats):
        for k, fn in impls.items():
            times[k].append(measure_once(fn, device, inners[k], use_flush))
    res = {}
    for k, ts in times.items():
        res[k] = dict(med=statistics.median(ts), lo=min(ts), hi=max(ts), kernel=None)
        if device.type == "cuda":
            res[k]["kernel"] = graph_kernel_time(impls[k], device, min(inners[k], 20), repeats,
                                                 use_flush)
    return res


def host_time_us(fn, repeats=9, calls=1000):
    for _ in range(200):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(ts), min(ts), max(ts)


# -- the eager baselines (what a user writes without cdkernels) -----------------------------------

def eager_step(x, f):
    return x + DT * f + (SIGMA * SQDT) * torch.randn_like(x)


def eager_std_step(x, f, coef):
    # EnResNet's noise: scaled by the std of the block output, its gradient kept
    z = x + DT * f
    return z + coef.reshape((1, -1) + (1,) * (x.dim() - 2)) * z.float().std().to(z.dtype) \
        * torch.randn_like(z)


def eager_smooth(x, K):
    # the K noisy copies materialised at once, as a naive Monte-Carlo estimate does
    xs = x.unsqueeze(0) + SIGMA * torch.randn((K,) + x.shape, device=x.device, dtype=x.dtype)
    return torch.relu(xs).mean(0)


def eager_ensemble(z, K, space):
    z = z.float().reshape(K, -1, z.shape[-1])
    if space == "prob":
        return torch.softmax(z, -1).mean(0)
    if space == "logit":
        return z.mean(0)
    return torch.logsumexp(torch.log_softmax(z, -1), 0) - math.log(K)


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


# -- the rows ---------------------------------------------------------------------------------

def run(args):
    device = torch.device(args.device)
    rows = []
    flush = L2Flush(device) if device.type == "cuda" else None
    names = backends_for(device)
    if args.backends:
        names = [b for b in names if b in args.backends.split(",")]
    compile_ok = not args.no_compile
    print(f"# device: {describe(device)}; torch {torch.__version__}; backends: {names}; "
          f"load average at start: {load()}", flush=True)

    def group(op, shape, dtype, impls, traffic, copy_s, nbytes, note=None):
        res = measure_group(impls, device, args.repeats, args.budget, nbytes, flush)
        eager = res["eager"]["med"]
        comp = res.get("torch.compile", {}).get("med")
        copy_gbs = copy_s and (2 * nbytes / copy_s / 1e9)
        for impl, r in res.items():
            gbs = traffic / r["med"] / 1e9
            rows.append(dict(
                op=op, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1],
                impl=impl, us=r["med"] * 1e6, lo_us=r["lo"] * 1e6, hi_us=r["hi"] * 1e6,
                kernel_us=(r["kernel"] * 1e6 if r["kernel"] is not None else float("nan")),
                GBps=gbs, pct_roofline=100 * gbs / copy_gbs if copy_gbs else float("nan"),
                vs_eager=eager / r["med"], vs_compile=(comp / r["med"]) if comp else float("nan"),
                note=(note or {}).get(impl, "")))
        print_table(rows[-len(res):], header=False)

    def copy_time(x):
        out = torch.empty_like(x)
        r = measure_group({"copy": lambda: out.copy_(x)}, device, args.repeats, args.budget,
                          x.numel() * x.element_size(), flush)["copy"]
        rows.append(dict(op="copy", shape="x".join(map(str, x.shape)),
                         dtype=str(x.dtype).split(".")[-1], impl="copy_ (roofline)",
                         us=r["med"] * 1e6, lo_us=r["lo"] * 1e6, hi_us=r["hi"] * 1e6,
                         kernel_us=float("nan"), GBps=2 * x.numel() * x.element_size()
                         / r["med"] / 1e9, pct_roofline=100.0, vs_eager=float("nan"),
                         vs_compile=float("nan"), note=""))
        return r["med"]

    print_table([], header=True)
    for shape in args.step_shapes:
        for dtype in args.dtypes:
            x = torch.randn(shape, device=device, dtype=dtype)
            f = torch.randn(shape, device=device, dtype=dtype)
            g = torch.randn(shape, device=device, dtype=dtype)
            nbytes = x.numel() * x.element_size()
            copy_s = copy_time(x)
            impls = {"eager": lambda: eager_step(x, f)}
            for b in names:
                impls[f"cdkernels[{b}]"] = (
                    lambda b=b: cdkernels.cd_step(x, f, DT, SIGMA, backend=b))
            if compile_ok:
                cfn = torch.compile(eager_step)
                impls["torch.compile"] = lambda: cfn(x, f)
            group("cd_step fwd", shape, dtype, impls, 3 * nbytes, copy_s, 3 * nbytes)
            # forward + backward: relu, learnable per-channel sigma; grads cleared every call
            xr, fr = x.clone().requires_grad_(), f.clone().requires_grad_()
            sig = torch.full((shape[1],), SIGMA, device=device, requires_grad=True)
            bshape = (1, -1) + (1,) * (len(shape) - 2)

            def clear():
                xr.grad = fr.grad = sig.grad = None

            def eager_fb():
                clear()
                torch.relu(xr + DT * fr + sig.reshape(bshape) * SQDT
                           * torch.randn_like(xr)).backward(g)
            impls = {"eager": eager_fb}
            for b in names:
                def fb(b=b):
                    clear()
                    cdkernels.cd_step(xr, fr, DT, sig, activation="relu", backend=b).backward(g)
                impls[f"cdkernels[{b}]"] = fb
            if compile_ok:
                cf = torch.compile(lambda a, c, s: torch.relu(
                    a + DT * c + s.reshape(bshape) * SQDT * torch.randn_like(a)))

                def comp_fb():
                    clear()
                    cf(xr, fr, sig).backward(g)
                impls["torch.compile"] = comp_fb
            # fwd: x, f -> y; bwd: g, y -> grad_x, grad_f
            group("cd_step fwd+bwd", shape, dtype, impls, 7 * nbytes, copy_s, 7 * nbytes)
            # the std step (EnResNet), forward + backward, learnable per-channel coef
            impls = {"eager": lambda: (clear(), eager_std_step(xr, fr, sig).backward(g))}
            for b in names:
                impls[f"cdkernels[{b}]"] = lambda b=b: (
                    clear(), cdkernels.cd_std_step(xr, fr, DT, sig, backend=b).backward(g))
            if compile_ok:
                cstd = torch.compile(eager_std_step)
                impls["torch.compile"] = lambda: (clear(), cstd(xr, fr, sig).backward(g))
            # at least: fwd x, f -> y; bwd g, x, f -> grad_x (grad_f = dt*grad_x)
            group("cd_std_step fwd+bwd", shape, dtype, impls, 7 * nbytes, copy_s, 7 * nbytes)

    for shape in args.smooth_shapes:
        dtype, K = torch.float32, args.samples
        x = torch.randn(shape, device=device, dtype=dtype)
        nbytes = x.numel() * x.element_size()
        copy_s = copy_time(x)
        impls = {"eager": lambda: eager_smooth(x, K)}
        for b in names:
            impls[f"cdkernels[{b}]"] = (
                lambda b=b: cdkernels.cd_smooth(x, SIGMA, samples=K, backend=b))
        if compile_ok:
            cfn = torch.compile(eager_smooth)
            impls["torch.compile"] = lambda: cfn(x, K)
        group(f"cd_smooth K={K}", shape, dtype, impls, 2 * nbytes, copy_s, 2 * nbytes)

    for (K, B, Cn) in args.ensemble_shapes:
        z = torch.randn(K * B, Cn, device=device)
        nbytes = z.numel() * 4
        copy_s = copy_time(z)
        for space in args.spaces:
            impls = {"eager": lambda space=space: eager_ensemble(z, K, space)}
            for b in names:
                impls[f"cdkernels[{b}]"] = (lambda b=b, space=space: cdkernels.ensemble_mean(
                    z, replicas=K, space=space, backend=b))
            if compile_ok:
                cfn = torch.compile(eager_ensemble)
                impls["torch.compile"] = lambda space=space: cfn(z, K, space)
            group(f"ensemble_mean {space} K={K}", (B, Cn), torch.float32, impls,
                  nbytes + B * Cn * 4, copy_s, nbytes)

    host = []
    if not args.no_host:
        host = host_rows(device, names[0] if names else None)
    return rows, host


def host_rows(device, backend):
    """Per-call host time of tiny calls (forward only), next to the eager equivalent."""
    x = torch.randn(4, 4, device=device)
    f = torch.randn(4, 4, device=device)
    xg = x.clone().requires_grad_()
    out = []
    for label, fn in (
            ("host cd_step fwd, no grad", lambda: cdkernels.cd_step(x, f, DT, SIGMA)),
            ("host cd_step fwd, with grad", lambda: cdkernels.cd_step(xg, f, DT, SIGMA)),
            ("host eager x+dt*f+s*randn_like, no grad", lambda: eager_step(x, f)),
            ("host eager x+dt*f+s*randn_like, with grad", lambda: eager_step(xg, f)),
            ("host torch.empty_like (load gauge)", lambda: torch.empty_like(x))):
        med, lo, hi = host_time_us(fn)
        out.append(dict(what=label, us=med, lo_us=lo, hi_us=hi,
                        target_us=HOST_TARGETS_US.get(label, float("nan"))))
    _sync(device)
    return out


# -- reporting --------------------------------------------------------------------------------

def load():
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                         "unknown CPU")
    except OSError:
        model = "unknown CPU"
    simd = ""
    try:
        from cdkernels import _C
        simd = f", SIMD {_C.cpu_simd_level()}"
    except Exception:  # noqa: BLE001
        pass
    return f"{model}, {torch.get_num_threads()} threads{simd}"


_HDR = (f"{'op':<26}{'shape':<16}{'dtype':<9}{'impl':<18}{'time us':>13}{'spread us':>21}"
        f"{'kernel us':>10}{'GB/s':>8}{'%copy':>7}{'xeager':>8}{'xcompile':>9}")


def print_table(rows, header=True):
    if header:
        print(_HDR)
        print("-" * len(_HDR), flush=True)
    for r in rows:
        spread = f"{r['lo_us']:.1f}-{r['hi_us']:.1f}"
        print(f"{r['op']:<26}{r['shape']:<16}{r['dtype']:<9}{r['impl']:<18}{r['us']:>13.1f}"
              f"{spread:>21}{r['kernel_us']:>10.1f}{r['GBps']:>8.1f}{r['pct_roofline']:>7.1f}"
              f"{r['vs_eager']:>8.2f}{r['vs_compile']:>9.2f}  {r.get('note', '')}", flush=True)


def target_table(rows, host, extra=None):
    """The issue's targets with the measured ratio of the best native backend."""
    print("\n# targets (issue 9): ratio = median eager / median cdkernels, same run")
    print(f"{'row':<40}{'target':>8}{'measured':>10}{'processes':>26}  status")
    best = {}
    for r in rows:
        if not r["impl"].startswith("cdkernels"):
            continue
        key = f"{r['op']} {r['shape']}"
        if r["dtype"] != "float32":
            continue
        best[key] = max(best.get(key, 0.0), r["vs_eager"])
    for key, tgt in TARGETS.items():
        if key not in best:
            continue
        per_proc = (extra or {}).get(key)
        val = statistics.median(per_proc) if per_proc else best[key]
        procs = ", ".join(f"{v:.2f}" for v in per_proc) if per_proc else "-"
        print(f"{key:<40}{tgt:>8.1f}{val:>10.2f}{procs:>26}  "
              f"{'met' if val >= tgt else 'NOT met'}")
    for h in host:
        t = h["target_us"]
        status = "" if t != t else ("met" if h["us"] <= t else "NOT met")
        tgt = f"<={t:.0f}us" if t == t else ""
        spread = f"{h['lo_us']:.1f}-{h['hi_us']:.1f}us"
        print(f"{h['what']:<40}{tgt:>8}{h['us']:>9.1f}u{spread:>26}  {status}")


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


def subprocess_ratios(argv_rows, n):
    """Each row run in ``n`` fresh processes (the big rows' first-touch and THP state differs
    per process): {target key: [ratio per process]}."""
    out = {}
    for _ in range(n):
        cmd = [sys.executable, os.path.abspath(__file__), "--json-out", "-", "--no-compile",
               "--no-host"] + argv_rows
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), None)
        if line is None:
            print(res.stdout[-2000:], res.stderr[-2000:])
            continue
        for k, v in json.loads(line).items():
            out.setdefault(k, []).append(v)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16,float16")
    p.add_argument("--step-shape", action="append", default=None, help="e.g. 256x64x56x56")
    p.add_argument("--smooth-shape", action="append", default=None)
    p.add_argument("--ensemble", action="append", default=None, help="KxBxC, e.g. 16x4096x1000")
    p.add_argument("--spaces", default="prob,logprob,logit")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per measurement (sets the back-to-back calls per measurement)")
    p.add_argument("--backends", default=None, help="comma list of backends to time")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-host", action="store_true", help="skip the host-time rows")
    p.add_argument("--processes", type=int, default=1,
                   help="also run the 16M/4M rows in N fresh processes; targets use the median")
    p.add_argument("--quick", action="store_true", help="262K shapes, few repeats")
    p.add_argument("--csv", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    if a.quick:
        a.step_shape = a.step_shape or ["64x64x32x32" if gpu else "4x16x64x64"]
        a.smooth_shape = a.smooth_shape or ["16x64x32x32" if gpu else "4x16x64x64"]
        a.ensemble = a.ensemble or ["16x512x1000" if gpu else "8x512x100"]
        a.repeats = a.repeats or 5
        a.budget = a.budget or 0.02
        a.no_compile = True
    a.step_shapes = [parse_shape(s) for s in (a.step_shape or (
        ["256x64x56x56"] if gpu else ["4x16x64x64", "16x64x128x128"]))]
    a.smooth_shapes = [parse_shape(s) for s in (a.smooth_shape or (
        ["64x64x56x56"] if gpu else ["4x16x64x64", "4x64x128x128"]))]
    a.ensemble_shapes = [parse_shape(s) for s in (a.ensemble or (
        ["16x4096x1000"] if gpu else ["8x512x100", "16x256x1000"]))]
    a.spaces = a.spaces.split(",")
    a.dtypes = [getattr(torch, d) for d in (a.dtypes or (
        "float32,bfloat16" if gpu else "float32")).split(",")]
    a.repeats = a.repeats or (20 if gpu else 7)
    a.budget = a.budget or (0.02 if gpu else 0.05)
    warnings.simplefilter("ignore")
    rows, host = run(a)
    if a.json_out:
        ratios = {}
        for r in rows:
            if r["impl"].startswith("cdkernels"):
                key = f"{r['op']} {r['shape']}"
                ratios[key] = max(ratios.get(key, 0.0), r["vs_eager"])
        print(json.dumps(ratios))
        return 0
    extra = None
    if a.processes > 1 and not gpu:
        big = ["--step-shape", "16x64x128x128", "--smooth-shape", "4x64x128x128",
               "--ensemble", "16x256x1000", "--repeats", str(a.repeats)]
        print(f"\n# {a.processes} fresh processes for the big rows ...", flush=True)
        extra = subprocess_ratios(big, a.processes)
    target_table(rows, host, extra)
    print(f"# load average at end: {load()}")
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
