"""Ahead-of-time compilation of every Triton kernel TritonBackend launches (no GPU needed).

Used by tests/test_triton_compile.py; also runnable by hand:

    python tests/triton_compile_driver.py --out-dir /tmp/tc [--archs 90,80] [--jobs 2]

The interpreter (TRITON_INTERPRET=1, set by the test suite) turns ``@triton.jit`` functions into
Python at *definition* time and never exercises the real compiler, so this script must run in a
process without it: it removes the variable before importing triton and refuses to run if the
backend module was nevertheless imported in interpreter mode.

How the launches are found: the ``run`` method of every ``*_kernel`` JIT function of
cdkernels.backends.triton_backend is replaced by a recorder, and the real TritonBackend methods
are called with CPU tensors (expanded views, so 2^31-element "tensors" cost nothing) over the
specialisations the ops use: data dtypes, activations, sigma/channel modes, ensemble spaces and
row widths, plus the scalar values that change Triton's launch-time specialisation (ints equal to
1 become constexpr, ints and pointers divisible by 16 get a divisibility hint, ints >= 2^31 are
i64). Each recorded launch is then bound with Triton's own launch binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, i.e. exactly the signature,
constexprs, divisibility attributes and options a GPU launch would compile) and compiled with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)``. Register use / local memory come from
``cuobjdump -res-usage`` on the cubin; vector widths of global loads/stores from the PTX.

Output: ``<out-dir>/report.json`` ({"ok": bool, "error": str, "triton": version, "kernels":
[names of all *_kernel JIT functions], "results": [one dict per unique compilation]}) and the PTX
of a few representative kernels (``<out-dir>/*.ptx``). Exit status 0 when the report was
written (compile failures are in the report), 2 when compilation could not even start.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (see module docstring)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# label -> op of the compilations whose PTX is saved (<out-dir>/<op>_sm<arch>.ptx).
PTX_SAMPLES = {"fp32 sigma=none act=none n=aligned": "cd_step_fwd"}

ACTS = ("none", "relu", "gelu", "tanh", "sigmoid", "softplus")
SPACES = ("logit", "prob", "logprob")


# ------------------------------------------------------------------------------------------------
# the launches
# ------------------------------------------------------------------------------------------------
def _scenarios(torch, backend):
    """Call TritonBackend methods; yields a label before each call (the recorder attaches it)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    dname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

    def t(n, dtype=torch.float32, misaligned=False):
        # numel n without the memory; data_ptr 16-byte aligned unless misaligned
        base = torch.empty(8, dtype=dtype)
        return (base[1:2] if misaligned else base[:1]).expand(n)

    seed = torch.zeros(1, dtype=torch.int64)
    N_AL = 3 * 4096           # divisible by 16 -> divisibility hint on n (vector loads)
    N_GEN = 3001              # generic i32
    N_BIG = 2 ** 31 + 1024    # i64 n
    # (name, n, offset, sample): scalar specialisations of the stream kernels
    scal = [("aligned", N_AL, 0, 0), ("generic", N_GEN, 12345, 3), ("ones", 4, 1, 1),
            ("big", N_BIG, 2 ** 40, 2 ** 32 - 1)]

    # -- noise stream
    for nm, n, off, smp in scal:
        yield f"words n={nm}"
        backend.philox_words(t(n if n % 4 == 0 else n + 3, torch.int32), seed, off, smp)
        yield f"uniform n={nm}"
        backend.uniform(t(n), seed, off, smp)
        for dt in dtypes:
            yield f"normal {dname[dt]} n={nm}"
            backend.normal(t(n, dt), seed, off, smp)

    # sigma / channel modes: (name, sigma tensor or None, C, chan_stride)
    def sig_modes(n):
        return [("none", None, 1, 1),
                ("scalar-tensor", torch.ones(1), 1, 1),            # CH_MODE 1
                ("nchw", torch.ones(8), 8, 4096),                   # CH_MODE 2
                ("nhwc", torch.ones(8), 8, 1),                      # CH_MODE 3, stride 1
                ("chan-generic", torch.ones(3), 3, 100)]            # CH_MODE 3

    # -- cd_step forward: full product dtype x sigma mode x act
    for dt in dtypes:
        for sname, sig, C, cs in sig_modes(N_AL):
            for act in ("none", "relu"):
                x = t(N_AL, dt)
                yield f"{dname[dt]} sigma={sname} act={act} n=aligned"
                backend.cd_step_fwd(x, x, x, 0.01, sig, 0.5, C, cs, seed, 0, act)
    for dt, nm, mis in ((torch.float32, "generic", True), (torch.bfloat16, "big", False)):
        for act in ("none", "relu"):
            n = N_GEN if nm == "generic" else N_BIG
            x, f = t(n, dt, misaligned=mis), t(n, dt)
            yield f"{dname[dt]} sigma=nchw act={act} n={nm} misaligned_x={mis}"
            backend.cd_step_fwd(x, f, t(n, dt), 0.01, torch.ones(8), 0.5, 8, 4096, seed,
                                2 ** 40 + 3, act)

    # -- cd_step backward: every (relu, need_inputs, need_sigma) the op launches, x modes, dtypes
    for dt in dtypes:
        for act in ("none", "relu"):
            for need_inputs in (False, True):
                for sname, sig, C, cs in sig_modes(N_AL):
                    need_sigma = sig is not None
                    if not need_inputs and not need_sigma:
                        continue  # nothing to compute: no launch
                    if act == "none" and not need_sigma:
                        continue  # handled without a kernel by the op
                    g = t(N_AL, dt)
                    gx = t(N_AL, dt) if need_inputs else None
                    gs = torch.zeros(C) if need_sigma else None
                    yield f"{dname[dt]} act={act} inputs={need_inputs} sigma={sname} n=aligned"
                    backend.cd_step_bwd(g, t(N_AL, dt) if act == "relu" else None, gx, gx, gs,
                                        0.01, sig, 0.5, C, cs, seed, 0, act)
    for nm, n in (("generic", N_GEN), ("big", N_BIG)):
        yield f"fp16 act=relu inputs=True sigma=nhwc n={nm}"
        backend.cd_step_bwd(t(n, torch.float16), t(n, torch.float16), t(n, torch.float16),
                            t(n, torch.float16), torch.zeros(8), 0.01, torch.ones(8), 0.5, 8, 1,
                            seed, 2 ** 33, "relu")

    # -- cd_smooth: act x sigma mode in full, dtype rotating (each dtype meets each act and
    #    each sigma mode), samples K in {1 (constexpr), 7, 16 (divisible)} rotating.
    Ks = (16, 7, 1)
    for ai, act in enumerate(ACTS):
        for si, (sname, sig, C, cs) in enumerate(sig_modes(N_AL)):
            if sname == "chan-generic":
                continue
            dt = dtypes[(ai + si) % 3]
            K = Ks[(ai + 2 * si) % 3]
            x = t(N_AL, dt)
            yield f"{dname[dt]} act={act} sigma={sname} K={K} n=aligned"
            backend.cd_smooth_fwd(x, x, sig, 0.25, C, cs, K, seed, 0, act)
            for need_gs in ((False, True) if sig is not None else (False,)):
                yield f"{dname[dt]} act={act} sigma={sname} grad_sigma={need_gs} K={K} n=aligned"
                backend.cd_smooth_bwd(x, x, x, torch.zeros(C) if need_gs else None, sig, 0.25,
                                      C, cs, K, seed, 0, act)
    x = t(N_BIG, torch.float32)
    yield "fp32 act=gelu sigma=chan-generic K=7 n=big"
    backend.cd_smooth_fwd(x, x, torch.ones(3), 0.25, 3, 100, 7, seed, 2 ** 40, "gelu")
    yield "fp32 act=softplus sigma=chan-generic grad_sigma=True K=7 n=big"
    backend.cd_smooth_bwd(x, x, x, torch.zeros(3), torch.ones(3), 0.25, 3, 100, 7, seed, 2 ** 40,
                          "softplus")
    x = t(N_GEN, torch.bfloat16, misaligned=True)
    yield "bf16 act=tanh sigma=none K=16 n=generic misaligned"
    backend.cd_smooth_fwd(x, x, None, 0.25, 1, 1, 16, seed, 5, "tanh")
    yield "bf16 act=sigmoid sigma=nchw grad_sigma=True K=16 n=generic misaligned"
    backend.cd_smooth_bwd(x, x, x, torch.zeros(8), torch.ones(8), 0.25, 8, 4096, 16, seed, 5,
                          "sigmoid")

    # -- ensemble_mean: space x row width in full (block_c 16/1024/8192/16384 -> 4/4/8/16 warps),
    #    dtype rotating; K, B include 1 (constexpr) and C a non-multiple of 16.
    widths = ((10, 1, 1), (1000, 4, 3), (8192, 3, 64), (16384, 8, 5))  # (C, K, B)
    for si, space in enumerate(SPACES):
        for wi, (C, K, B) in enumerate(widths):
            dt = dtypes[(si + wi) % 3]
            inp, out = torch.empty(K, B, C, dtype=dt), torch.empty(B, C, dtype=dt)
            yield f"{dname[dt]} space={space} C={C} K={K} B={B}"
            backend.ensemble_mean_fwd(inp, out, space)
            yield f"{dname[dt]} space={space} C={C} K={K} B={B}"
            backend.ensemble_mean_bwd(out, inp, out, inp, space)

    # -- std-scaled step (cdkernels/std_step.py): z_stats and z_std_bwd, dtypes x n kinds,
    #    with and without grad_y
    st = torch.empty(2, dtype=torch.float64)
    coefs = torch.zeros(3, dtype=torch.float64)
    for dt in dtypes:
        for nm, n in (("aligned", N_AL), ("generic", N_GEN)):
            x = t(n, dt)
            yield f"{dname[dt]} z_stats n={nm}"
            backend.z_stats(x, x, 0.01, st)
            for has_gy in (True, False):
                yield f"{dname[dt]} z_std_bwd grad_y={has_gy} n={nm}"
                backend.z_std_bwd(x, x, x if has_gy else None, 0.01, coefs, x, x)
    x = t(N_BIG, torch.float32)
    yield "fp32 z_stats n=big"
    backend.z_stats(x, x, 0.01, st)
    yield "fp32 z_std_bwd grad_y=True n=big"
    backend.z_std_bwd(x, x, x, 0.01, coefs, x, x)


def record_launches():
    """[(kernel name, label, args, kwargs)] of every launch the scenarios make."""
    import torch
    from cdkernels.backends import triton_backend as tb

    if tb._INTERPRET_AT_IMPORT:
        raise RuntimeError("cdkernels.backends.triton_backend was imported with "
                           "TRITON_INTERPRET=1: nothing to compile")
    launches, label = [], [None]

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            launches.append((name, label[0], args, kwargs))
        return run

    for name in kernel_names(tb):
        getattr(tb, name).run = recorder(name)
    for lab in _scenarios(torch, tb.TritonBackend()):
        label[0] = lab
    return launches


def kernel_names(tb):
    from triton.runtime.jit import JITFunction
    return sorted(n for n, v in vars(tb).items()
                  if isinstance(v, JITFunction) and n.endswith("_kernel"))


# ------------------------------------------------------------------------------------------------
# compilation
# ------------------------------------------------------------------------------------------------
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_MEM = re.compile(r"\b(ld|st)\.global((?:\.[a-z]+)*?)(?:\.v(\d))?\.([bfus]\d+)\b")


def _ptxas_resources(log: str):
    """Registers / stack / spills from the ``ptxas -v`` log of the compilation itself."""
    r, st = _PTXAS_REGS.search(log), _PTXAS_STACK.search(log)
    if not (r and st):
        return None
    stack, sp_st, sp_ld = map(int, st.groups())
    return dict(n_regs=int(r.group(1)), stack=stack, spill_stores=sp_st, spill_loads=sp_ld,
                source="ptxas -v")


def _cuobjdump_resources(cubin: bytes):
    """Fallback (cache hit, no ptxas log): registers and stack from the cubin."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             timeout=60).stdout
    finally:
        os.unlink(f.name)
    m = _RES.search(out)
    if not m:
        return None
    reg, stack, _shared, local = map(int, m.groups())
    # no spill counts here: any stack or local memory counts as a spill (the kernels use none)
    return dict(n_regs=reg, stack=stack, spill_stores=stack + local, spill_loads=None,
                source="cuobjdump -res-usage")


def _mem_ops(ptx: str):
    """{"ld.v4.b32": count, ...} of the global loads/stores in the PTX."""
    ops = {}
    for op, _mods, vec, ty in _MEM.findall(ptx):
        key = f"{op}{'.v' + vec if vec else ''}.{ty}"
        ops[key] = ops.get(key, 0) + 1
    return ops


def _compile_one(kernel, args, kwargs, arch, binders):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    if (id(kernel), arch) not in binders:
        backend = make_backend(target)
        binders[(id(kernel), arch)] = (
            backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    backend, binder = binders[(id(kernel), arch)]
    kw = dict(kwargs)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    names = list(signature)
    desc = dict(
        signature={k: v for k, v in signature.items() if v != "constexpr"},
        constexprs={names[p[0]]: (v if isinstance(v, (int, float, bool, str)) else repr(v))
                    for p, v in constexprs.items()},
        divisible=[names[p[0]] for p, a in attrs.items() if a],
        num_warps=options.num_warps)
    key = json.dumps(desc, sort_keys=True)
    return key, desc, (lambda: triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                              target=target, options=options.__dict__))


def compile_all(archs, shard=0, nshards=1, ptx_dir=None):
    from triton import knobs
    from cdkernels.backends import triton_backend as tb

    knobs.nvidia.dump_ptxas_log = True  # this process only compiles

    launches = record_launches()
    binders, seen, jobs = {}, {}, []
    for arch in archs:
        for name, label, args, kwargs in launches:
            key, desc, build = _compile_one(getattr(tb, name), args, kwargs, arch, binders)
            k = (name, arch, key)
            if k in seen:
                seen[k]["labels"].append(label)
                continue
            seen[k] = dict(kernel=name, arch=arch, label=label, labels=[label], **desc)
            jobs.append((seen[k], build))
    results = []
    for i, (rec, build) in enumerate(jobs):
        if i % nshards != shard:
            continue
        t0 = time.perf_counter()
        try:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # ptxas -v log, printed by make_cubin
                ck = build()
            rec["ok"] = "cubin" in ck.asm and len(ck.asm["cubin"]) > 0
            rec["error"] = "" if rec["ok"] else "no cubin produced"
            if rec["ok"]:
                rec["resources"] = (_ptxas_resources(log.getvalue())
                                    or _cuobjdump_resources(ck.asm["cubin"]))
                rec["mem_ops"] = _mem_ops(ck.asm["ptx"])
                sample = PTX_SAMPLES.get(rec["label"])
                if ptx_dir and sample and rec["kernel"] == f"_{sample}_kernel":
                    with open(os.path.join(ptx_dir, f"{sample}_sm{rec['arch']}.ptx"), "w") as f:
                        f.write(ck.asm["ptx"])
        except Exception as e:  # a compile error: recorded, the test reports it per kernel
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"[-4000:]
        rec["compile_s"] = round(time.perf_counter() - t0, 3)
        results.append(rec)
    return kernel_names(tb), results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--archs", default="90,80")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/n", internal
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    archs = [int(s) for s in a.archs.split(",") if s]
    report = dict(ok=False, error="", triton=None, kernels=[], results=[])
    try:
        import triton
        report["triton"] = triton.__version__
        t0 = time.perf_counter()
        if a.shard is not None:  # worker: compile one shard (written below as shard<i>.json)
            i, n = map(int, a.shard.split("/"))
            report["kernels"], report["results"] = compile_all(archs, i, n, a.out_dir)
        elif a.jobs <= 1:
            report["kernels"], report["results"] = compile_all(archs, 0, 1, a.out_dir)
        else:
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out-dir",
                                       a.out_dir, "--archs", a.archs, "--shard", f"{i}/{a.jobs}"])
                     for i in range(a.jobs)]
            rcs = [q.wait() for q in procs]
            for i, rc in enumerate(rcs):
                path = os.path.join(a.out_dir, f"shard{i}.json")
                if not os.path.exists(path):
                    raise RuntimeError(f"compile worker {i} failed (exit status {rc})")
                with open(path) as f:
                    part = json.load(f)
                if not part["ok"]:
                    raise RuntimeError(f"compile worker {i}: {part['error']}")
                report["kernels"] = part["kernels"]
                report["results"] += part["results"]
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        report["ok"] = True
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    name = "report.json" if a.shard is None else f"shard{a.shard.split('/')[0]}.json"
    with open(os.path.join(a.out_dir, name), "w") as f:
        json.dump(report, f, indent=1)
    return 0 if report["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
