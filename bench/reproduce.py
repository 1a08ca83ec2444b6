"""Reproduce the robustness table of docs/results.md (project issue #5).

Fashion-MNIST (real, offline). Models: CD-PreActResNet-20 with noise none / em / std and a
5-member EnResNet-20 (std noise); standard training and (full run) PGD adversarial training;
several seeds each, mean ± std over seeds. Every model is trained with ``cdkernels.train``
(model selection on the validation split only: best.pt) and attacked with ``cdkernels.robust``
in pixel space [0, 1]:

  natural   K-sample Monte-Carlo inference (noise on; K = 1 for noise "none")
  FGSM      L-inf, eps, gradient averaged over M noise draws (EOT), through the K-sample model
  PGD+EOT   L-inf PGD (random start), S steps, EOT M, through the K-sample model
  PGD-frozen the same PGD on the network with frozen noise (white box), evaluated frozen

    python bench/reproduce.py --quick          # reduced CPU version (< 15 min on 2 cores)
    python bench/reproduce.py --device cuda    # full version (GPU; --cuda-graph, bf16)

``--quick`` shrinks width, epochs, training subset and test subset (never the number of seeds)
and labels every output "REDUCED". Results: ``--json`` (per-seed records) and the Markdown
table written into ``--md`` (docs/results.md) between the markers of the chosen mode.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cdkernels import attack as A  # noqa: E402
from cdkernels import data as D  # noqa: E402
from cdkernels import robust as R  # noqa: E402
from cdkernels import train as T  # noqa: E402

warnings.filterwarnings("ignore", message="cdkernels: using backend")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = [  # (label, train CLI arguments)
    ("CD-PreActResNet-20, noise none", ["--model", "cd_preact_resnet20", "--noise", "none"]),
    ("CD-PreActResNet-20, noise em (σ=0.1)", ["--model", "cd_preact_resnet20", "--noise", "em",
                                              "--sigma", "0.1"]),
    ("CD-PreActResNet-20, noise std (coef 0.1)", ["--model", "cd_preact_resnet20", "--noise",
                                                  "std", "--sigma", "0.1"]),
    ("EnResNet-20 ×5 (std, coef 0.1)", ["--model", "enresnet20", "--members", "5", "--noise",
                                        "std", "--sigma", "0.1"]),
]

CONFIGS = {
    # Reduced CPU version: width 4, 3 000 training images, 3 epochs, 200 test images.
    # PGD-3 adversarial training for the single networks only: the 5-member ensemble's
    # adversarial training would push the run past 15 minutes on 2 cores.
    "quick": dict(width=4, limit_train=3000, epochs=3, batch_size=64, lr=0.1,
                  limit_eval=500, n_test=200, K=2, M=2, steps=10, eps=0.1, adv=True,
                  adv_ensembles=False, adv_steps=3, train_extra=[]),
    # Full version (GPU): width 16, all 54 000 training images, 10 epochs, CUDA graph + bf16,
    # 1 000 test images, K=8, M=4, PGD-20; adversarial training with PGD-5.
    "full": dict(width=16, limit_train=None, epochs=10, batch_size=256, lr=0.1,
                 limit_eval=2000, n_test=1000, K=8, M=4, steps=20, eps=0.1, adv=True,
                 adv_ensembles=True, adv_steps=5, train_extra=["--cuda-graph", "--amp", "bf16"]),
}


def _cached_load():
    """D.load cached per arguments (a shallow copy each time: train mutates pad/flip/splits)."""
    orig = D.load

    @functools.lru_cache(maxsize=4)
    def cached(name, data_dir, device, val_fraction, limit_train):
        return orig(name, data_dir, device=device, val_fraction=val_fraction,
                    limit_train=limit_train)

    def load(name, data_dir=None, device="cpu", val_fraction=0.1, limit_train=None):
        return copy.copy(cached(name, data_dir, str(device), val_fraction, limit_train))
    return load


def run_one(label, margs, adv, seed, cfg, device, work, log):
    out = os.path.join(work, f"{margs[1]}_{margs[3]}_{'adv' if adv else 'std'}_s{seed}")
    argv = margs + ["--data", "fashion-mnist", "--width", str(cfg["width"]), "--epochs",
                    str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]), "--lr",
                    str(cfg["lr"]), "--seed", str(seed), "--limit-eval", str(cfg["limit_eval"]),
                    "--out", out, "--overwrite", "--quiet", "--device", device]
    argv += cfg["train_extra"]
    if cfg["limit_train"]:
        argv += ["--limit-train", str(cfg["limit_train"])]
    if adv:
        argv += ["--adv-train", "pgd", "--eps", str(cfg["eps"]), "--adv-steps",
                 str(cfg["adv_steps"])]
    t0 = time.time()
    rc = T.main(argv)
    if rc != 0:
        raise RuntimeError(f"training failed ({rc}): {' '.join(argv)}")
    summ = json.load(open(os.path.join(out, "summary.json")))
    t_train = time.time() - t0
    model, data, tcfg = A.load_model(os.path.join(out, "best.pt"), torch.device(device))
    noisy = tcfg["noise"] != "none"
    K = cfg["K"] if noisy else None
    M = cfg["M"] if noisy else 1
    net = A.wrap(model, data, K, "prob")
    batches = A.pixel_batches(data, data.test, 250, cfg["n_test"])
    common = dict(eps=cfg["eps"], norm="linf", seed=1000 + seed)
    t1 = time.time()
    res = {
        "natural": R.evaluate_attack(net, batches, "none", **dict(common, eps=0.0),
                                     random_baseline=False, grad_check=False),
        "fgsm": R.evaluate_attack(net, batches, "fgsm", eot=M, **common),
        "pgd_eot": R.evaluate_attack(net, batches, "pgd", steps=cfg["steps"], eot=M, **common),
        "pgd_frozen": R.evaluate_attack(net, batches, "pgd", steps=cfg["steps"], frozen=True,
                                        **common),
    }
    t_att = time.time() - t1
    rec = {"label": label, "adv": adv, "seed": seed, "K": K, "M": M,
           "train_time_s": summ["time_s"], "train_wall_s": t_train, "attack_time_s": t_att,
           "best_val_acc": summ["best_val_acc"], "best_epoch": summ["best_epoch"],
           "test_acc_noise_off": summ["test_acc_at_best_val"],
           **{k: {kk: v[kk] for kk in ("natural_acc", "robust_acc", "robust_ci95", "n",
                                       "gradient_masking_suspected", "random_noise_acc",
                                       "grad_l1_mean") if kk in v} for k, v in res.items()}}
    log(f"{label} {'adv' if adv else 'std'} seed {seed}: nat {res['natural']['natural_acc']:.3f}"
        f" fgsm {res['fgsm']['robust_acc']:.3f} pgd {res['pgd_eot']['robust_acc']:.3f} frozen "
        f"{res['pgd_frozen']['robust_acc']:.3f} | train {t_train:.1f}s attack {t_att:.1f}s")
    return rec


def _ms(vals):
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, s


def table(records, cfg, mode) -> str:
    hdr = (f"| model | training | seeds | natural % (MC K) | FGSM % | PGD-{cfg['steps']} + EOT % "
           f"| PGD-{cfg['steps']} frozen noise % | train time s | masking flags |\n"
           "|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for label, _ in MODELS:
        for adv in (False, True):
            rs = [r for r in records if r["label"] == label and r["adv"] == adv]
            if not rs:
                continue
            cells = []
            for key, field in (("natural", "natural_acc"), ("fgsm", "robust_acc"),
                               ("pgd_eot", "robust_acc"), ("pgd_frozen", "robust_acc")):
                m, s = _ms([100 * r[key][field] for r in rs])
                cells.append(f"{m:.1f} ± {s:.1f}")
            cells[0] += f" (K={rs[0]['K'] or 1})"
            cells[2] += f" (M={rs[0]['M']})"
            tm, ts = _ms([r["train_time_s"] for r in rs])
            flags = sum(r[k]["gradient_masking_suspected"] for r in rs
                        for k in ("fgsm", "pgd_eot", "pgd_frozen"))
            adv_s = f"PGD-{cfg['adv_steps']} adv. (eps {cfg['eps']})" if adv else "standard"
            rows.append(f"| {label} | {adv_s} | {len(rs)} | " + " | ".join(cells)
                        + f" | {tm:.1f} ± {ts:.1f} | {flags}/{3 * len(rs)} |")
    return hdr + "\n".join(rows) + "\n"


def write_md(path, mode, text):
    begin, end = f"<!-- reproduce:{mode}:begin -->", f"<!-- reproduce:{mode}:end -->"
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    with open(path, "w") as fh:
        fh.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced CPU version (labelled REDUCED)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--no-adv", action="store_true", help="skip adversarial training rows")
    p.add_argument("--work", default=None, help="folder for the training runs (default: temp)")
    p.add_argument("--json", default=None, help="per-seed records (default "
                   "bench/results_{quick,full}.json)")
    p.add_argument("--md", default=os.path.join(ROOT, "docs", "results.md"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = dict(CONFIGS[mode])
    if args.no_adv:
        cfg["adv"] = False
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        cfg["train_extra"] = [a for a in cfg["train_extra"] if a != "--cuda-graph"]
        if "--amp" in cfg["train_extra"] and mode == "quick":
            cfg["train_extra"] = []
    if args.threads:
        torch.set_num_threads(args.threads)
    D.load = _cached_load()
    work = args.work or tempfile.mkdtemp(prefix=f"cdk_reproduce_{mode}_")
    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:7.1f}s] {m}", flush=True)  # noqa: E731
    tag = "REDUCED (quick, CPU)" if args.quick else "full"
    log(f"{tag}: config {cfg}; runs in {work}")
    records = []
    for label, margs in MODELS:
        adv_here = cfg["adv"] and (cfg["adv_ensembles"] or "--members" not in margs)
        for adv in ((False, True) if adv_here else (False,)):
            for seed in range(args.seeds):
                records.append(run_one(label, margs, adv, seed, cfg, device, work, log))
    total = time.time() - t0
    cmd = "python bench/reproduce.py" + (" " + " ".join(argv if argv is not None
                                                        else sys.argv[1:])).rstrip()
    dev_name = (torch.cuda.get_device_name() if device.startswith("cuda")
                else f"{platform.processor() or platform.machine()} CPU, "
                f"{torch.get_num_threads()} threads")
    meta = {"mode": mode, "reduced": args.quick, "config": cfg, "seeds": args.seeds,
            "device": dev_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": cmd, "total_time_s": total, "torch": torch.__version__}
    js = args.json or os.path.join(ROOT, "bench", f"results_{mode}.json")
    with open(js, "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=2)
    tbl = table(records, cfg, mode)
    head = (f"**{'REDUCED (quick) run — not the full experiment' if args.quick else 'Full run'}"
            f"**: `{cmd}` on {dev_name}, {meta['date']}, torch {torch.__version__}, "
            f"total {total / 60:.1f} min. Fashion-MNIST; width {cfg['width']}, "
            f"{cfg['limit_train'] or 54000} training images, {cfg['epochs']} epochs, "
            f"batch {cfg['batch_size']}, model selected on the first {cfg['limit_eval']} "
            f"validation images; attacks on the first {cfg['n_test']} test images, L-inf "
            f"eps = {cfg['eps']} (pixel units), {args.seeds} seeds (mean ± std).\n\n")
    write_md(args.md, mode, head + tbl)
    print(tbl)
    log(f"done in {total / 60:.1f} min; table in {args.md}, records in {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
