"""The robustness table of docs/results.md (project issue 10): does the noise buy robustness,
and at what price?

Protocol (``--mode cpu``, the default; sized for a 2-core CPU VM): Fashion-MNIST, the full
54k/6k train/validation split, CD-PreActResNet-20 of width 16, five arms that differ only in
the noise (none; em sigma; em sigma 0.15, at about the dose of std 0.1; std coef 0.1; std coef
0.3), three paired seeds (the same seed gives
the same initial weights, data order and augmentation in every arm), 5 epochs, cosine
schedule. Each model is selected on validation only (noise on, Monte-Carlo K=4; see
``cdkernels.train``) and then evaluated on the first ``n_test`` test images in pixel space:

  natural    K-sample Monte-Carlo accuracy with noise on (K = 1 for noise none), beside every
             robust number; also the noise-off accuracy and the realised noise-to-signal
             ratio per block, from the training summary
  FGSM, PGD  L-inf, at every eps of the radius sweep; gradients through the K-sample model,
             averaged over M noise draws (EOT); PGD with random start
  frozen     PGD against the network with frozen noise (white box) at one eps
  cross-check  APGD-CE with EOT from torchattacks (optional extra cdkernels[attacks]) at one
             eps, on a subset, seed 0 only
  convergence  seed 0: K and EOT raised, PGD with more steps and restarts, at one eps on a
             subset; the table's number must not move by more than its interval

Statistics: Wilson 95 % intervals per cell (pooled over seeds); paired differences to the
noise-free arm (same seeds, same images) with bootstrap 95 % intervals over images and seeds.

Resumable and cached: every (arm, seed) is trained once (``--work``/ARM_sSEED, resumed from
its checkpoint if stopped) and evaluated once (eval_*.json keyed by the evaluation settings);
a rerun only does what is missing, then rebuilds the table. A progress line says what is done
and what remains. ``--records DIR`` also keeps each finished (arm, seed)'s records (the training
summary and the per-image evaluation, tens of kB, no weights) in a folder that can be committed,
so that a run spread over several machines continues where it stopped: a unit whose records are
there with the same settings is neither trained nor evaluated again.

    python bench/reproduce.py --quick            # CI smoke test: digits, tiny, ~1 min
    python bench/reproduce.py                    # the CPU protocol (hours on 2 cores)
    python bench/reproduce.py --mode gpu --device cuda   # the GPU protocol (see MODES)

Any setting can be overridden (``--seeds``, ``--epochs``, ``--limit-train``, ``--n-test``,
``--eps``, ...); the output states the settings actually used and which ones differ from the
protocol of the mode.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import hashlib
import json
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cdkernels  # noqa: E402
from cdkernels import attack as A  # noqa: E402
from cdkernels import data as D  # noqa: E402
from cdkernels import robust as R  # noqa: E402
from cdkernels import train as T  # noqa: E402

warnings.filterwarnings("ignore", message="cdkernels: using backend")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARMS = {  # name -> (label, train CLI arguments); the dose sweep
    "none": ("noise none", ["--noise", "none"]),
    "em": ("em σ={em_sigma}", ["--noise", "em", "--sigma", "{em_sigma}"]),
    # em at the dose of std 0.1: sigma 0.1 realised a noise-to-signal ratio of 0.069 per block
    # on average in the first full-scale run (about linear in sigma), so 0.15 puts em near 0.1
    "em0.15": ("em σ=0.15 (dose of std 0.1)", ["--noise", "em", "--sigma", "0.15"]),
    "std0.1": ("std coef 0.1", ["--noise", "std", "--sigma", "0.1"]),
    "std0.3": ("std coef 0.3", ["--noise", "std", "--sigma", "0.3"]),
    # GPU protocol only: an EnResNet ensemble and the noise-free ensemble of the same size
    "en5-std0.1": ("EnResNet-20 ×5, std 0.1", ["--model", "enresnet20", "--members", "5",
                                               "--noise", "std", "--sigma", "0.1"]),
    "en5-none": ("ResNet-20 ensemble ×5, noise none", ["--model", "enresnet20", "--members",
                                                      "5", "--noise", "none"]),
}

MODES = {
    # Issue 10 §3. bf16 autocast is not used: on this VM's AVX2-only CPU it measured 7x
    # SLOWER than fp32 (em, width 16, 1 thread: 53 vs 7.2 ms per training image).
    "cpu": dict(data="fashion-mnist", model="cd_preact_resnet20", width=16, limit_train=None,
                epochs=5, batch_size=128, lr=0.1, amp=None,
                arms=["none", "em", "em0.15", "std0.1", "std0.3"], seeds=3, em_sigma=0.1,
                select_k=4, limit_eval=None, n_test=1000,
                eps=[0.01, 0.02, 0.03, 0.05, 0.1], K=2, M=2, steps=10, frozen_eps=0.03,
                cross_eps=0.03, cross_n=100, cross_steps=20, conv_eps=0.03, conv_n=200,
                conv_K=8, conv_M=8, conv_steps=50, conv_restarts=3, adv=False, train_extra=[]),
    # CI smoke test: every code path, digits (embedded), seconds per unit. Numbers mean nothing.
    "quick": dict(data="digits", model="cd_preact_resnet20", width=4, limit_train=256,
                  epochs=1, batch_size=64, lr=0.05, amp=None, arms=["none", "em", "std0.1",
                                                                    "std0.3"],
                  seeds=1, em_sigma=0.1, select_k=2, limit_eval=100, n_test=40,
                  eps=[0.05, 0.1], K=2, M=2, steps=3, frozen_eps=0.1, cross_eps=0.1,
                  cross_n=20, cross_steps=3, conv_eps=0.1, conv_n=20, conv_K=3, conv_M=3,
                  conv_steps=4, conv_restarts=2, adv=False, train_extra=[]),
    # GPU protocol (not run yet): more seeds, the ensembles, adversarial training of every arm.
    "gpu": dict(data="fashion-mnist", model="cd_preact_resnet20", width=16, limit_train=None,
                epochs=10, batch_size=256, lr=0.1, amp="bf16",
                arms=["none", "em", "em0.15", "std0.1", "std0.3", "en5-std0.1", "en5-none"],
                seeds=5,
                em_sigma=0.1, select_k=8, limit_eval=None, n_test=10000,
                eps=[0.01, 0.02, 0.03, 0.05, 0.1], K=8, M=8, steps=20, frozen_eps=0.03,
                cross_eps=0.03, cross_n=1000, cross_steps=50, conv_eps=0.03, conv_n=1000,
                conv_K=16, conv_M=16, conv_steps=100, conv_restarts=5, adv=True, adv_steps=7,
                adv_eps=0.1, train_extra=["--cuda-graph"]),
}
OVERRIDABLE = ("seeds", "epochs", "limit_train", "n_test", "width", "batch_size", "lr",
               "em_sigma", "K", "M", "steps", "limit_eval", "select_k", "cross_n",
               "cross_steps", "conv_n", "conv_K", "conv_M", "conv_steps", "conv_restarts")


def _cached_load():
    """D.load cached per arguments (a shallow copy each time: train mutates pad/flip/splits)."""
    orig = D.load

    @functools.lru_cache(maxsize=2)
    def cached(name, data_dir, device, val_fraction, limit_train):
        return orig(name, data_dir, device=device, val_fraction=val_fraction,
                    limit_train=limit_train)

    def load(name, data_dir=None, device="cpu", val_fraction=0.1, limit_train=None):
        return copy.copy(cached(name, data_dir, str(device), val_fraction, limit_train))
    return load


def arm_args(cfg, arm):
    label, a = ARMS[arm]
    label = label.format(em_sigma=cfg["em_sigma"])
    a = [x.format(em_sigma=cfg["em_sigma"]) for x in a]
    if "--model" not in a:
        a = ["--model", cfg["model"]] + a
    return label, a


def _hash(d) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


class Progress:
    """One line per step: what is done, what runs now, what remains, and a rough ETA."""

    def __init__(self, units, log):
        self.units, self.done, self.log, self.t0 = list(units), [], log, time.time()

    def start(self, unit, cached=False):
        el = time.time() - self.t0
        run_done = [u for u in self.done if not u[1]]
        eta = ""
        if run_done:
            left = len(self.units) - len(self.done)
            eta = f", ~{el / len(run_done) * left / 60:.0f} min left at this pace"
        self.log(f"[{len(self.done)}/{len(self.units)} done, {el / 60:.1f} min{eta}] "
                 f"{'cached' if cached else 'now'}: {unit}")

    def finish(self, unit, cached=False):
        self.done.append((unit, cached))


def train_argv(cfg, arm, seed, device, out, data_dir):
    _, margs = arm_args(cfg, arm)
    argv = margs + ["--data", cfg["data"], "--width", str(cfg["width"]), "--epochs",
                    str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]), "--lr",
                    str(cfg["lr"]), "--seed", str(seed), "--out", out, "--quiet",
                    "--device", device]
    if margs[margs.index("--noise") + 1] != "none":  # selection on K noise-on samples
        argv += ["--mc-samples", str(cfg["select_k"])]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if cfg["amp"]:
        argv += ["--amp", cfg["amp"]]
    if cfg["limit_train"]:
        argv += ["--limit-train", str(cfg["limit_train"])]
    if cfg["limit_eval"]:
        argv += ["--limit-eval", str(cfg["limit_eval"])]
    if cfg.get("adv"):
        argv += ["--adv-train", "pgd", "--eps", str(cfg["adv_eps"]), "--adv-steps",
                 str(cfg["adv_steps"]), "--adv-eot", "2"]
    argv += cfg["train_extra"] if device.startswith("cuda") else []
    return argv


def _same_run(ck_path, argv) -> bool:
    """Was ck_path made with these training settings (all but --epochs, which may grow)?"""
    try:
        old = torch.load(ck_path, map_location="cpu", weights_only=True)["config"]
    except Exception:
        return False
    args = T.build_parser().parse_args(argv)
    T.validate(args)
    new = T.config_of(args, 1)
    return all(old.get(k) == v for k, v in new.items() if k != "epochs") \
        and old.get("epochs", 0) <= new["epochs"]


def train_unit(cfg, arm, seed, device, work, data_dir):
    """Train the model of (arm, seed), or resume it, or reuse it when it is finished; the
    checkpoint's recorded settings must match, else it is trained afresh."""
    out = os.path.join(work, f"{arm}_s{seed}")
    summ = os.path.join(out, "summary.json")
    ck = os.path.join(out, "checkpoint.pt")
    argv = train_argv(cfg, arm, seed, device, out, data_dir)
    same = os.path.isfile(ck) and _same_run(ck, argv)
    if same and os.path.isfile(summ):
        s = json.load(open(summ))
        if s.get("finished") and s.get("epochs_done") == cfg["epochs"]:
            return s, True
    rc = T.main(argv + (["--resume"] if same else ["--overwrite"]))
    if rc != 0:
        raise RuntimeError(f"training failed ({rc}): python -m cdkernels.train "
                           + " ".join(argv))
    return json.load(open(summ)), False


def _train_key(argv):
    """A unit's training settings without where it writes or reads (--out, --data-dir)."""
    key, it = [], iter(argv)
    for x in it:
        if x in ("--out", "--data-dir"):
            next(it, None)
        else:
            key.append(x)
    return key


def _write_json(path, obj):
    """Write obj to path through a temporary name, so a stopped run never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, separators=(",", ":"))
    os.replace(tmp, path)


def _record_unit(records, cfg, arm, seed, device, data_dir):
    """(folder of the unit's records, its training key)."""
    return (os.path.join(records, f"{arm}_s{seed}"),
            _train_key(train_argv(cfg, arm, seed, device, "", data_dir)))


def load_records(records, cfg, arm, seed, device, data_dir):
    """The archived (summary, evaluation) of a finished unit with these exact settings, or None."""
    if not records:
        return None
    rdir, key = _record_unit(records, cfg, arm, seed, device, data_dir)
    paths = [os.path.join(rdir, f) for f in
             ("train_key.json", "summary.json", f"eval_{_hash(eval_settings(cfg, seed))}.json")]
    old_key = json.load(open(paths[0])) if os.path.isfile(paths[0]) else None
    if old_key is not None and old_key != key:
        raise SystemExit(f"reproduce: error: {rdir} holds a unit trained with other settings "
                         f"({' '.join(old_key)}); give this protocol its own --records folder")
    if not all(os.path.isfile(q) for q in paths):
        return None
    summ, ev = json.load(open(paths[1])), json.load(open(paths[2]))
    if not (summ.get("finished") and summ.get("epochs_done") == cfg["epochs"]):
        return None
    return summ, ev


def save_records(records, cfg, arm, seed, device, data_dir, summ, ev):
    """Archive a finished unit's records."""
    rdir, key = _record_unit(records, cfg, arm, seed, device, data_dir)
    os.makedirs(rdir, exist_ok=True)
    old = os.path.join(rdir, "summary.json")
    if os.path.isfile(old) and json.load(open(old)) != summ:  # retrained: old evals are stale
        for f in os.listdir(rdir):
            if f.startswith("eval_"):
                os.remove(os.path.join(rdir, f))
    for name, obj in (("summary.json", summ), (f"eval_{_hash(ev['settings'])}.json", ev),
                      ("train_key.json", key)):
        _write_json(os.path.join(rdir, name), obj)


def eval_settings(cfg, seed):
    keys = ("n_test", "eps", "K", "M", "steps", "frozen_eps", "cross_eps", "cross_n",
            "cross_steps", "conv_eps", "conv_n", "conv_K", "conv_M", "conv_steps",
            "conv_restarts")
    return {k: cfg[k] for k in keys} | {"seed": seed}


def _keep(r):
    return {k: r[k] for k in ("attack", "eps", "steps", "eot", "loss", "restarts",
                              "frozen_noise", "n", "natural_acc", "robust_acc", "natural_ci95",
                              "robust_ci95", "gradient_masking_suspected",
                              "gradient_masking_reasons", "random_noise_acc", "grad_l1_mean",
                              "natural_ok", "robust_ok", "time_s") if k in r}


def eval_unit(cfg, arm, seed, device, work, data_dir, log):
    """Attack the selected model of (arm, seed); cached in eval_HASH.json."""
    out = os.path.join(work, f"{arm}_s{seed}")
    es = eval_settings(cfg, seed)
    path = os.path.join(out, f"eval_{_hash(es)}.json")
    best = os.path.join(out, "best.pt")
    if os.path.isfile(path) and os.path.getmtime(path) < os.path.getmtime(best):
        os.remove(path)  # the model was retrained since: evaluate the new one
    if os.path.isfile(path):
        return json.load(open(path)), True
    model, data, tcfg = A.load_model(best, torch.device(device),
                                     data_dir=data_dir)
    noisy = tcfg["noise"] != "none"
    K, M = (cfg["K"], cfg["M"]) if noisy else (None, 1)
    net = A.wrap(model, data, K, "prob")
    batches = A.pixel_batches(data, data.test, 250, cfg["n_test"])
    ev = functools.partial(R.evaluate_attack, seed=1000 + seed, per_example=True)
    t0 = time.time()
    res = {"settings": es, "arm": arm, "seed": seed, "K": K, "M": M, "noisy": noisy}
    res["natural"] = _keep(ev(net, batches, "none", random_baseline=False, grad_check=False))
    res["fgsm"], res["pgd"] = {}, {}
    for eps in cfg["eps"]:
        res["fgsm"][str(eps)] = _keep(ev(net, batches, "fgsm", eps=eps, eot=M,
                                         random_baseline=False, grad_check=False))
        res["pgd"][str(eps)] = _keep(ev(net, batches, "pgd", eps=eps, steps=cfg["steps"],
                                        eot=M))
        log(f"    {arm} s{seed} eps {eps}: FGSM {res['fgsm'][str(eps)]['robust_acc']:.3f} "
            f"PGD {res['pgd'][str(eps)]['robust_acc']:.3f} ({time.time() - t0:.0f}s)")
    if noisy:
        res["frozen"] = _keep(ev(net, batches, "pgd", eps=cfg["frozen_eps"],
                                 steps=cfg["steps"], frozen=True, random_baseline=False))
    if seed == 0:
        sub = A.pixel_batches(data, data.test, 250, cfg["cross_n"])
        try:
            R.require_torchattacks()
            res["cross"] = _keep(ev(net, sub, "apgd", eps=cfg["cross_eps"],
                                    steps=cfg["cross_steps"], eot=M, random_baseline=False,
                                    grad_check=False))
        except R.MissingExtra as e:
            res["cross"] = {"skipped": str(e)}
        sub = A.pixel_batches(data, data.test, 250, cfg["conv_n"])
        strong = A.wrap(model, data, cfg["conv_K"] if noisy else None, "prob")
        res["conv"] = _keep(ev(strong, sub, "pgd", eps=cfg["conv_eps"], steps=cfg["conv_steps"],
                               eot=cfg["conv_M"] if noisy else 1,
                               restarts=cfg["conv_restarts"], random_baseline=False,
                               grad_check=False))
        res["conv"].update(K=cfg["conv_K"] if noisy else None, M=cfg["conv_M"] if noisy else 1)
    res["eval_time_s"] = time.time() - t0
    _write_json(path, res)
    return res, False


# -- tables --------------------------------------------------------------------------------------

def _pct(v):
    return f"{100 * v:.1f}"


def _cell(oks):
    """Pooled accuracy over seeds with its Wilson 95 % interval."""
    k, n = sum(sum(o) for o in oks), sum(len(o) for o in oks)
    lo, hi = R.wilson(k, n)
    return f"{_pct(k / max(n, 1))} [{_pct(lo)}, {_pct(hi)}]"


def _diff(a, b, seed=0):
    d = R.paired_bootstrap(a, b, iters=2000, seed=seed)
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def tables(cfg, arms, seeds, summaries, evals) -> str:
    lines = []
    lab = {a: arm_args(cfg, a)[0] for a in arms}
    # 1. natural accuracy, price of the noise, dose
    lines += ["**Natural accuracy and dose** (test images of the attack evaluation; Wilson 95 % "
              "intervals pooled over seeds; noise-off and noise-to-signal from the training "
              "summaries, mean over seeds)", "",
              f"| arm | natural % (K={cfg['K']}, noise on) | Δ natural vs none (paired, boot. "
              "95 %) | natural % noise off (training's test evaluation) | realised noise/signal per "
              "block "
              "(mean; min–max) | best epoch | train min |", "|---|---|---|---|---|---|---|"]
    for a in arms:
        ok = [evals[(a, s)]["natural"]["natural_ok"] for s in seeds]
        d = "—" if a == "none" or "none" not in arms else _diff(
            ok, [evals[("none", s)]["natural"]["natural_ok"] for s in seeds])
        sm = [summaries[(a, s)] for s in seeds]
        off = sum(s["test_acc_noise_off_at_best_val"] for s in sm) / len(sm)
        nsr = [v for s in sm for v in s.get("noise_to_signal", [])]
        nsr_s = (f"{sum(s['noise_to_signal_mean'] for s in sm) / len(sm):.3f}; "
                 f"{min(nsr):.3f}–{max(nsr):.3f}") if nsr else "0"
        ep = ", ".join(str(s["best_epoch"]) for s in sm)
        tm = sum(s["time_s"] for s in sm) / len(sm) / 60
        lines.append(f"| {lab[a]} | {_cell(ok)} | {d} | {_pct(off)} | {nsr_s} | {ep} | "
                     f"{tm:.1f} |")
    # 2. robust accuracy over the radius sweep
    for kind, name in (("pgd", f"PGD-{cfg['steps']}"), ("fgsm", "FGSM")):
        lines += ["", f"**{name} robust accuracy %** (L∞, EOT M={cfg['M']} through the "
                  f"K={cfg['K']} Monte-Carlo model; noise none: M=1, K=1; Wilson 95 %)", "",
                  "| arm | natural | " + " | ".join(f"ε={e}" for e in cfg["eps"]) + " |",
                  "|---|---|" + "---|" * len(cfg["eps"])]
        for a in arms:
            nat = _cell([evals[(a, s)]["natural"]["natural_ok"] for s in seeds])
            cells = [_cell([evals[(a, s)][kind][str(e)]["robust_ok"] for s in seeds])
                     for e in cfg["eps"]]
            lines.append(f"| {lab[a]} | {nat} | " + " | ".join(cells) + " |")
    # 3. paired differences to the noise-free arm
    if "none" in arms and len(arms) > 1:
        lines += ["", f"**Paired difference to noise none, PGD-{cfg['steps']} robust accuracy "
                  "(points)**: same seeds, same images; bootstrap 95 % interval over images "
                  f"{'and seeds' if len(seeds) > 1 else '(one seed: image resampling only)'}",
                  "", "| arm | " + " | ".join(f"ε={e}" for e in cfg["eps"]) + " |",
                  "|---|" + "---|" * len(cfg["eps"])]
        for a in arms:
            if a == "none":
                continue
            cells = [_diff([evals[(a, s)]["pgd"][str(e)]["robust_ok"] for s in seeds],
                           [evals[("none", s)]["pgd"][str(e)]["robust_ok"] for s in seeds])
                     for e in cfg["eps"]]
            lines.append(f"| {lab[a]} | " + " | ".join(cells) + " |")
    # 4. frozen noise, cross-check, convergence, masking flags
    lines += ["", "**Attack checks** (frozen: white-box PGD on the frozen-noise network, all "
              "seeds; cross-check and convergence: seed 0 only, the first images of the test "
              "subset)", "",
              f"| arm | PGD-{cfg['steps']} EOT at ε={cfg['frozen_eps']} | frozen-noise PGD | "
              f"APGD-CE+EOT (torchattacks) ε={cfg['cross_eps']}, {cfg['cross_n']} img | table "
              f"PGD on the same {cfg['conv_n']} img (ε={cfg['conv_eps']}) | strong PGD: "
              f"K={cfg['conv_K']}, EOT {cfg['conv_M']}, {cfg['conv_steps']} steps × "
              f"{cfg['conv_restarts']} restarts | moved within interval? | masking flags |",
              "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        e0 = evals[(a, seeds[0])]
        base = _cell([evals[(a, s)]["pgd"][str(cfg["frozen_eps"])]["robust_ok"] for s in seeds]) \
            if str(cfg["frozen_eps"]) in e0["pgd"] else "—"
        fr = _cell([evals[(a, s)]["frozen"]["robust_ok"] for s in seeds]) \
            if "frozen" in e0 else "— (deterministic)"
        cr = e0.get("cross", {})
        cr_s = ("not run" if not cr else "skipped (torchattacks not installed)"
                if "skipped" in cr else f"{_cell([cr['robust_ok']])} (nat "
                f"{_pct(cr['natural_acc'])})")
        cv = e0.get("conv")
        if cv and str(cfg["conv_eps"]) in e0["pgd"]:
            tbl_ok = e0["pgd"][str(cfg["conv_eps"])]["robust_ok"][:cv["n"]]
            k = sum(tbl_ok)
            lo, hi = R.wilson(k, len(tbl_ok))
            moved = cv["robust_acc"] - k / len(tbl_ok)
            within = lo <= cv["robust_acc"] <= hi
            cv_s = (f"{_cell([tbl_ok])} | {_cell([cv['robust_ok']])} | "
                    f"{100 * moved:+.1f} pts: {'yes' if within else '**no**'}")
        else:
            cv_s = "— | — | —"
        flags = sum(bool(evals[(a, s)]["pgd"][str(e)].get("gradient_masking_suspected"))
                    for s in seeds for e in cfg["eps"])
        lines.append(f"| {lab[a]} | {base} | {fr} | {cr_s} | {cv_s} | "
                     f"{flags}/{len(seeds) * len(cfg['eps'])} |")
    return "\n".join(lines) + "\n"


def write_md(path, tag, text):
    begin, end = f"<!-- reproduce:{tag}:begin -->", f"<!-- reproduce:{tag}:end -->"
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    with open(path, "w") as fh:
        fh.write(new)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"%(prog)s (cdkernels {cdkernels.__version__})")
    p.add_argument("--mode", choices=sorted(MODES), default="cpu", help="protocol (see MODES)")
    p.add_argument("--quick", action="store_const", dest="mode", const="quick",
                   help="same as --mode quick: the CI smoke test")
    p.add_argument("--arms", default=None, help="comma-separated subset of " + ", ".join(ARMS))
    for k in OVERRIDABLE:
        typ = float if k in ("lr", "em_sigma") else int
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=typ, default=None,
                       help=f"override the mode's {k}")
    p.add_argument("--eps", default=None, help="override the radius sweep: comma-separated")
    p.add_argument("--seed-list", default=None, help="run only these seeds (comma-separated, "
                   "each < --seeds), e.g. to split a run over parallel processes that share "
                   "--work/--records; the table then covers only them")
    p.add_argument("--data-dir", default=None, help="dataset folder (as for cdkernels.train)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--work", default=None, help="cache folder (default runs/reproduce_TAG): "
                   "rerunning continues there")
    p.add_argument("--tag", default=None, help="name of the result (default: the mode); "
                   "the table goes between <!-- reproduce:TAG:begin/end --> in --md")
    p.add_argument("--records", default=None, help="folder of finished units' records (no "
                   "weights; commit it): units found there are reused, new ones are added")
    p.add_argument("--json", default=None, help="all records (default WORK/results.json)")
    p.add_argument("--md", default=os.path.join(ROOT, "docs", "results.md"),
                   help="Markdown file that receives the table")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--train-only", action="store_true", help="stop after training every unit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = copy.deepcopy(MODES[args.mode])
    changed = {}
    for k in OVERRIDABLE:
        v = getattr(args, k)
        if v is not None and v != cfg.get(k):
            changed[k] = (cfg.get(k), v)
            cfg[k] = v
    if args.eps:
        eps = [float(e) for e in args.eps.split(",")]
        changed["eps"] = (cfg["eps"], eps)
        cfg["eps"] = eps
        for k in ("frozen_eps", "cross_eps", "conv_eps"):
            if cfg[k] not in eps:
                cfg[k] = min(eps, key=lambda e: abs(e - cfg[k]))
    if args.arms:
        arms = args.arms.split(",")
        bad = [a for a in arms if a not in ARMS]
        if bad:
            print(f"reproduce: error: unknown arm(s) {bad}; choose from {list(ARMS)}",
                  file=sys.stderr)
            return 2
        changed["arms"] = (cfg["arms"], arms)
        cfg["arms"] = arms
    tag = args.tag or args.mode
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    D.load = _cached_load()
    work = args.work or os.path.join(ROOT, "runs", f"reproduce_{tag}")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    logf = open(os.path.join(work, "log.txt"), "a")

    def log(m):
        line = f"[{datetime.datetime.now():%H:%M:%S}] {m}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()
    seeds = list(range(cfg["seeds"]))
    if args.seed_list:
        only = [int(v) for v in args.seed_list.split(",")]
        bad = [v for v in only if v not in seeds]
        if bad:
            print(f"reproduce: error: --seed-list {bad} outside range({cfg['seeds']})",
                  file=sys.stderr)
            return 2
        seeds = only
    arms = cfg["arms"]
    log(f"mode {args.mode} (tag {tag}), work {work}, device {device}, "
        f"{torch.get_num_threads()} threads; changed from the protocol: {changed or 'nothing'}")
    units = [(k, a, s) for s in seeds for a in arms for k in ("train", "eval")]
    prog = Progress([f"{k} {a} seed {s}" for k, a, s in units], log)
    summaries, evals = {}, {}
    archived = {}
    for kind, a, s in units:
        name = f"{kind} {a} seed {s}"
        if kind == "eval" and args.train_only:
            continue
        if kind == "train" and (a, s) not in archived:
            archived[(a, s)] = load_records(args.records, cfg, a, s, device, args.data_dir)
        if archived[(a, s)] is not None:  # finished on some machine: its records, as they are
            prog.start(name + f" (records in {args.records})", True)
            if kind == "train":
                summaries[(a, s)] = archived[(a, s)][0]
            else:
                evals[(a, s)] = archived[(a, s)][1]
            prog.finish(name, True)
            continue
        out = os.path.join(work, f"{a}_s{s}")
        cached = (os.path.isfile(os.path.join(out, "summary.json")) if kind == "train"
                  else os.path.isfile(os.path.join(
                      out, f"eval_{_hash(eval_settings(cfg, s))}.json")))
        prog.start(name, cached)
        if kind == "train":
            summaries[(a, s)], cached = train_unit(cfg, a, s, device, work, args.data_dir)
            log(f"    {a} s{s}: selected epoch {summaries[(a, s)]['best_epoch']}, test acc "
                f"{summaries[(a, s)]['test_acc_at_best_val']:.4f} (noise off "
                f"{summaries[(a, s)]['test_acc_noise_off_at_best_val']:.4f}), "
                f"{summaries[(a, s)]['time_s'] / 60:.1f} min")
        else:
            evals[(a, s)], cached = eval_unit(cfg, a, s, device, work, args.data_dir, log)
            if args.records:
                save_records(args.records, cfg, a, s, device, args.data_dir,
                             summaries[(a, s)], evals[(a, s)])
        prog.finish(name, cached)
    if args.train_only:
        log("trained every unit (--train-only)")
        return 0
    total = time.time() - t0
    cmd = "python bench/reproduce.py" + (" " + " ".join(sys.argv[1:] if argv is None
                                                        else argv)).rstrip()
    dev_name = (torch.cuda.get_device_name() if device.startswith("cuda")
                else f"{platform.machine()} CPU ({os.cpu_count()} cores), "
                f"{torch.get_num_threads()} torch threads")
    meta = {"mode": args.mode, "tag": tag, "config": cfg, "changed_from_protocol":
            {k: list(v) for k, v in changed.items()}, "device": dev_name,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": cmd,
            "this_invocation_s": total, "torch": torch.__version__,
            "cdkernels": cdkernels.__version__, "python": platform.python_version()}
    js = args.json or os.path.join(work, "results.json")
    with open(js, "w") as fh:
        json.dump({"meta": meta, "summaries": {f"{a}_s{s}": v for (a, s), v in summaries.items()},
                   "evals": {f"{a}_s{s}": v for (a, s), v in evals.items()}}, fh)
    tbl = tables(cfg, arms, seeds, summaries, evals)
    train_min = sum(v["time_s"] for v in summaries.values()) / 60
    eval_min = sum(v["eval_time_s"] for v in evals.values()) / 60
    head = (f"`{cmd}` — {dev_name}; {meta['date']}; torch {torch.__version__}, cdkernels "
            f"{cdkernels.__version__}, Python {meta['python']}. Compute: {train_min:.0f} min "
            f"training + {eval_min:.0f} min evaluation (summed over units, possibly over "
            f"several invocations). {cfg['data']}, {cfg['model']} width {cfg['width']}, "
            f"{cfg['limit_train'] or 'all'} training images, {cfg['epochs']} epochs, batch "
            f"{cfg['batch_size']}, lr {cfg['lr']} cosine, {'autocast ' + cfg['amp'] if cfg['amp'] else 'fp32'}; "
            f"selection on {cfg['limit_eval'] or 'all'} validation images (K={cfg['select_k']}); "
            f"{len(seeds)} seed(s); first {cfg['n_test']} test images. Changed from the "
            f"`{args.mode}` protocol: "
            + (", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items()) or "nothing")
            + ".\n\n")
    write_md(args.md, tag, head + tbl)
    print(tbl)
    log(f"done; table in {args.md} (tag {tag}), records in {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
