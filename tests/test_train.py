"""The training CLI (python -m cdkernels.train): accuracy, resume, atomic checkpoints, DDP, errors."""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from cdkernels import train as T

warnings.filterwarnings("ignore", message="cdkernels: using backend")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "cd_preact_resnet20", "--width", "4", "--data", "digits", "--limit-train",
        "256", "--batch-size", "64", "--quiet"]


def _ckpt(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def test_digits_reaches_90_percent(tmp_path):
    """ResNet-20 (width 16) on digits, 8 epochs: >= 90 % test accuracy of the model selected on
    validation (about 96-97 %). Takes about 15-30 s on 2 idle CPU cores (native CPU
    backend; several times longer with the reference backend or a loaded machine)."""
    out = str(tmp_path / "run")
    rc = T.main(["--model", "cd_preact_resnet20", "--data", "digits", "--epochs", "8",
                 "--batch-size", "64", "--lr", "0.05", "--seed", "0", "--out", out, "--quiet"])
    assert rc == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["test_acc_at_best_val"] >= 0.90, s
    assert 1 <= s["best_epoch"] <= 8
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == list(range(1, 9))
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert os.path.isfile(os.path.join(out, "best.pt"))


@pytest.mark.parametrize("extra", [
    ["--noise", "none"],
    ["--noise", "std", "--learnable-sigma", "channel", "--amp", "bf16", "--channels-last"],
    ["--model", "enresnet20", "--members", "2", "--mc-samples", "2", "--schedule", "step",
     "--warmup", "0.5", "--nesterov", "--label-smoothing", "0.1"],
])
def test_cli_variants_run(tmp_path, extra):
    out = str(tmp_path / "r")
    assert T.main(TINY + ["--epochs", "1", "--out", out] + extra) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["finished"] and 0 <= s["test_acc_at_best_val"] <= 1
    if "--mc-samples" in extra:
        assert 0 <= s["mc2_test_acc"] <= 1 and s["test_acc_at_best_val"] == s["mc2_test_acc"]
    if "none" in extra:
        assert s["mc_samples"] == 0 and s["selection"] == "val accuracy (deterministic)"
        assert s["test_acc_at_best_val"] == s["test_acc_noise_off_at_best_val"]


def test_resume_is_exact(tmp_path):
    """3 epochs in one go == 2 epochs, 'kill', --resume for the rest (same final weights)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = TINY + ["--epochs", "3", "--learnable-sigma", "scalar"]
    assert T.main(args + ["--out", a]) == 0
    assert T.main(args + ["--out", b, "--stop-after", "2"]) == 0
    assert _ckpt(b)["epoch"] == 2 and not os.path.exists(os.path.join(b, "summary.json"))
    assert T.main(args + ["--out", b, "--resume"]) == 0
    ca, cb = _ckpt(a), _ckpt(b)
    assert cb["epoch"] == 3
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert [h["train_loss"] for h in ca["history"]] == [h["train_loss"] for h in cb["history"]]
    ma = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))]
    mb = [json.loads(l) for l in open(os.path.join(b, "metrics.jsonl"))]
    assert [m["val_acc"] for m in ma] == [m["val_acc"] for m in mb]


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r")
    args = TINY + ["--epochs", "2", "--out", out]
    assert T.main(args + ["--stop-after", "1"]) == 0

    def dying_save(obj, path):  # writes a partial temp file, then the process "dies"
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "_torch_save", dying_save)
    assert T.main(args + ["--resume"]) == 130
    err = capsys.readouterr().err  # Ctrl-C: says where the checkpoint is and how to resume
    assert "interrupted" in err and "checkpoint.pt (after epoch 1) is intact" in err
    assert err.strip().splitlines()[-1].strip().startswith("python -m cdkernels.train")
    assert err.strip().endswith("--resume") and "Traceback" not in err
    ck = _ckpt(out)  # still the previous, complete checkpoint
    assert ck["epoch"] == 1
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    monkeypatch.undo()
    assert T.main(args + ["--resume"]) == 0
    assert _ckpt(out)["epoch"] == 2


@pytest.mark.parametrize("argv,msg", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'; valid models:"),
    (["--data", "fashion-mnist", "--data-dir", "/nonexistent/x"], "apt-get install"),
    (["--data", "cifar10"], "needs --data-dir"),
    (["--cuda-graph", "--compile"], "cannot be combined"),
    (["--cuda-graph", "--device", "cpu"], "needs a CUDA device"),
    (["--mc-samples", "-1"], "--mc-samples must be >= 1"),
    (["--members", "3"], "only applies to enresnet"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--data", "mnist"], "invalid choice"),
    (["--resume", "/nonexistent.pt"], "no checkpoint file"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "tpu:0"], "--device"),
    (["--adv-eot", "2"], "need --adv-train pgd"),
])
def test_bad_cli_input(tmp_path, capsys, argv, msg):
    rc = T.main(argv + ["--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and "error:" in err
    if "invalid choice" not in msg:  # our own errors: one line (argparse's add the usage)
        assert len(err.strip().splitlines()) == 1, err


def test_cuda_device_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert T.main(["--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    """Only user errors become 'error: ...' + exit 2; a bug (here a ValueError raised inside
    the run) propagates with its traceback."""
    def broken(args):
        raise ValueError("internal bug")
    monkeypatch.setattr(T, "run", broken)
    with pytest.raises(ValueError, match="internal bug"):
        T.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "o")])


def test_version_and_help(capsys):
    import cdkernels
    from cdkernels import attack as A
    for mod in (T, A):
        assert mod.main(["--version"]) == 0
        assert cdkernels.__version__ in capsys.readouterr().out
        p = mod.build_parser()
        assert p.formatter_class is __import__("argparse").ArgumentDefaultsHelpFormatter
        assert "(default: " in p.format_help()  # renders (a stray % in a help text would not)
        for act in p._actions:
            if act.option_strings and act.help != "==SUPPRESS==":
                assert act.help, act.option_strings  # every visible option is explained
    acts = {o: a for a in A.build_parser()._actions for o in a.option_strings}
    assert "pgd" in acts["--attack"].choices and acts["--norm"].choices == ("linf", "l2")
    tacts = {o for a in T.build_parser()._actions for o in a.option_strings}
    assert {"--quiet", "--limit-eval"} <= tacts and {"--quiet", "--limit-eval"} <= set(acts)


def test_missing_matplotlib_skips_the_plot_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(T, "_PLOT_WARNED", False)
    for name in ("a", "b"):
        out = str(tmp_path / name)
        assert T.main(TINY + ["--epochs", "1", "--out", out, "--noise", "none"]) == 0
        assert os.path.isfile(os.path.join(out, "summary.json"))
        assert not os.path.exists(os.path.join(out, "curves.png"))
    text = capsys.readouterr()
    both = text.out + text.err
    assert both.count("matplotlib is not installed") == 1
    assert "pip install cdkernels[train]" in both


def test_missing_sklearn_fails_at_start_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    out = tmp_path / "o"
    assert T.main(["--data", "digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install cdkernels[train]" in err and "scikit-learn" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # failed before creating anything


def test_missing_sklearn_in_a_fresh_process(tmp_path):
    """The same through `python -m`, with scikit-learn blocked by a meta-path finder."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'sklearn' or name.startswith('sklearn.'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import runpy; sys.argv = ['x', '--data', 'digits', '--epochs', '1']\n"
            "runpy.run_module('cdkernels.train', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep
                                          + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 2 and "pip install cdkernels[train]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _record_batches(monkeypatch):
    """Every augmented training batch the run draws, in order."""
    from cdkernels import data as D
    seen = []
    orig = D.ImageData.batch

    def batch(self, split, idx, train, memory_format=torch.contiguous_format, generator=None):
        x, y = orig(self, split, idx, train, memory_format, generator)
        if train:
            seen.append((x.clone(), y.clone()))
        return x, y
    monkeypatch.setattr(D.ImageData, "batch", batch)
    return seen


def test_paired_arms_share_batches(tmp_path, monkeypatch):
    """Two noise arms with one seed see the same data order AND augmentation (their own
    generators), although the noise draws from torch's global stream in one arm only."""
    runs = {}
    for noise in ("none", "std"):
        seen = _record_batches(monkeypatch)
        assert T.main(TINY + ["--epochs", "2", "--noise", noise, "--mc-samples",
                              "0" if noise == "none" else "2", "--limit-eval", "40",
                              "--out", str(tmp_path / noise)]) == 0
        runs[noise] = seen
        monkeypatch.undo()
    a, b = runs["none"], runs["std"]
    assert len(a) == len(b) == 8
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and the augmentation is real (not the identity)
    from cdkernels import data as D
    d = D.load("digits", limit_train=256)
    assert not torch.equal(a[0][0], d.normalize(d.train.images[:64]))


def test_selection_is_noise_on_monte_carlo(tmp_path):
    out = str(tmp_path / "r")
    assert T.main(TINY + ["--epochs", "2", "--noise", "em", "--sigma", "0.3", "--limit-eval",
                          "80", "--out", out]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["mc_samples"] == 4 and "Monte-Carlo K=4, noise on" in s["selection"]
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert all(l["val_metric"] == "mc4_noise_on" and "val_acc_noise_off" in l
               and len(l["noise_to_signal"]) == 9 for l in lines)
    best = max(lines, key=lambda l: l["val_acc"])  # first maximum, as the selection does
    assert s["best_epoch"] == best["epoch"] and s["best_val_acc"] == best["val_acc"]
    assert s["best_val_acc_noise_off"] == best["val_acc_noise_off"]
    assert s["test_acc_at_best_val"] == s["mc4_test_acc"]
    assert 0 <= s["test_acc_noise_off_at_best_val"] <= 1 and len(s["noise_to_signal"]) == 9


def test_adv_generation_leaves_bn_statistics_alone():
    import argparse
    from cdkernels import data as D, models as M
    d = D.load("digits", limit_train=64)
    for mode in ("eval", "train"):
        torch.manual_seed(0)
        net = M.create("cd_preact_resnet", depth=8, width=4, num_classes=10, in_channels=1,
                       noise="em", sigma=0.2).train()
        args = argparse.Namespace(seed=0, adv_eps=0.1, adv_steps=2, adv_step_size=None,
                                  adv_mode=mode, adv_eot=2, amp=None, noise="em")
        make = T._adv_maker(args, net, d, torch.device("cpu"))
        before = [b.clone() for b in net.buffers()]
        x, y = d.batch(d.train, torch.arange(32), True, generator=torch.Generator())
        xa = make(x, y)
        assert net.training and xa.shape == x.shape and not torch.equal(xa, x)
        for b0, b1 in zip(before, net.buffers()):
            assert torch.equal(b0, b1), mode
        net(x)  # a training forward does update them (so the check above can fail)
        assert any(not torch.equal(b0, b1) for b0, b1 in zip(before, net.buffers()))


def test_resume_extends_a_finished_run(tmp_path):
    out = str(tmp_path / "r")
    assert T.main(TINY + ["--epochs", "1", "--noise", "none", "--out", out]) == 0
    assert json.load(open(os.path.join(out, "summary.json")))["epochs_done"] == 1
    assert T.main(TINY + ["--epochs", "2", "--noise", "none", "--out", out, "--resume"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["epochs_done"] == 2 and s["finished"] and _ckpt(out)["epoch"] == 2
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == [1, 2]


def _fake_fashion(folder, n_train=200, n_test=40):
    import gzip
    import struct
    import numpy as np
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.integers(0, 60, (n, 28, 28)) + y[:, None, None] * 19).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim,
                                                                     *arr.shape)
            with gzip.open(os.path.join(folder, f"{split}-{kind}-ubyte.gz"), "wb") as fh:
                fh.write(head + arr.tobytes())


def test_checkpoint_round_trip_without_the_data(tmp_path):
    """best.pt rebuilds its model with cdkernels.models.from_checkpoint after the dataset
    folder is gone: name, kwargs, classes, channels, normalisation and version travel along."""
    import shutil
    import cdkernels
    from cdkernels import models as M
    from cdkernels import data as D
    folder = str(tmp_path / "fm")
    _fake_fashion(folder)
    out = str(tmp_path / "r")
    assert T.main(["--model", "cd_preact_resnet20", "--width", "4", "--data", "fashion-mnist",
                   "--data-dir", folder, "--batch-size", "50", "--epochs", "1", "--noise",
                   "std", "--sigma", "0.2", "--learnable-sigma", "channel", "--mc-samples",
                   "2", "--out", out, "--quiet"]) == 0
    d = D.load("fashion-mnist", folder)
    x, _ = d.batch(d.test, torch.arange(8), False)
    trained = T.load_checkpoint(os.path.join(out, "best.pt"))
    shutil.rmtree(folder)
    model = M.from_checkpoint(os.path.join(out, "best.pt"))
    assert not model.training
    info = model.checkpoint_info
    assert info["name"] == "cd_preact_resnet20" and info["num_classes"] == 10
    assert info["in_channels"] == 1 and info["data"] == "fashion-mnist"
    assert info["cdkernels_version"] == cdkernels.__version__
    assert info["kwargs"]["learnable_sigma"] == "channel" and info["kwargs"]["width"] == 4
    torch.testing.assert_close(torch.tensor(info["mean"]), d.mean)
    torch.testing.assert_close(torch.tensor(info["std"]), d.std)
    ref = M.create("cd_preact_resnet20", **info["kwargs"])
    ref.load_state_dict(trained["model"])
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # the attack CLI needs no model flags either (it still needs the images it attacks)
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(open(os.path.join(out, "best.pt"), "rb").read()[:300])
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        M.from_checkpoint(str(bad))


def test_checkpoint_errors_are_one_line(tmp_path, capsys):
    """A truncated file or a checkpoint of another model: one line, exit 2, both CLIs."""
    from cdkernels import attack as A
    out = str(tmp_path / "r")
    assert T.main(TINY + ["--epochs", "1", "--noise", "none", "--out", out]) == 0
    best = os.path.join(out, "best.pt")
    trunc = str(tmp_path / "trunc.pt")
    open(trunc, "wb").write(open(best, "rb").read()[:1000])
    ck = torch.load(best, weights_only=True)
    ck["arch"]["name"] = ck["config"]["model"] = "cd_preact_resnet32"  # another model's file
    other = str(tmp_path / "other.pt")
    torch.save(ck, other)
    cases = [(A.main, ["--checkpoint", trunc, "--limit-eval", "5"], "cannot load checkpoint"),
             (A.main, ["--checkpoint", other, "--limit-eval", "5"], "do not fit"),
             (A.main, ["--checkpoint", str(tmp_path / "nope.pt")], "no checkpoint file"),
             (T.main, TINY + ["--epochs", "2", "--noise", "none", "--out", out, "--resume",
                              trunc], "cannot load checkpoint"),
             (T.main, TINY + ["--epochs", "2", "--noise", "none", "--out", out, "--resume",
                              "--model", "cd_preact_resnet32"], "different settings: model=")]
    for fn, argv, msg in cases:
        assert fn(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_resume_with_other_settings_is_an_error(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert T.main(TINY + ["--epochs", "2", "--out", out, "--stop-after", "1"]) == 0
    rc = T.main(TINY + ["--epochs", "2", "--out", out, "--resume", "--lr", "0.3"])
    assert rc == 2 and "different settings: lr=0.1 there vs 0.3 now" in capsys.readouterr().err
    rc = T.main(TINY + ["--epochs", "2", "--out", out])  # would silently overwrite
    assert rc == 2 and "pass --resume" in capsys.readouterr().err


def test_module_entry_point_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cdkernels.train", "--mc-samples", "-1"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep
                            + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 2 and "error: --mc-samples" in r.stderr and "Traceback" not in r.stderr


# -- DDP on CPU (gloo) ----------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, q):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        args = T.build_parser().parse_args(TINY + ["--epochs", "1", "--out", out])
        T.validate(args)
        res = T.run(args)
        model = res["model"]
        # identical weights on every rank (DDP), but each rank draws its own noise
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.manual_seed(7)
        model.train()
        y = model(torch.ones(2, 1, 8, 8)).detach()
        gathered = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(gathered, y)
        params = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(params, flat)
        q.put((rank, torch.equal(params[0], params[1]), not torch.equal(gathered[0], gathered[1]),
               res["history"][-1]["train_images"]))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    """2 ranks x 32 images per batch: weights stay in sync, noise differs per rank, metrics
    count the images of both ranks, and only rank 0 writes files."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, q), nprocs=2, join=True)
    res = sorted(q.get(timeout=10) for _ in range(2))
    for rank, same_params, noise_differs, images in res:
        assert same_params and noise_differs
        assert images == 256  # 4 global batches of 64, summed over both ranks
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert len(lines) == 1 and lines[0]["train_images"] == 256
    assert lines[0]["val_acc"] >= 0 and sorted(os.listdir(out)) == [
        "best.pt", "checkpoint.pt", "curves.png", "metrics.jsonl", "summary.json"]


@pytest.mark.parametrize("env", [None, "0"])
def test_cpu_runs_ask_for_a_steady_heap(tmp_path, monkeypatch, env):
    """A CPU run calls cdkernels.steady_heap (each step then reuses mapped memory) unless
    CDK_STEADY_HEAP=0 says to leave malloc alone."""
    from cdkernels import _common as C
    calls = []
    monkeypatch.setattr(C, "steady_heap", lambda *a: calls.append(a) or True)
    if env is None:
        monkeypatch.delenv("CDK_STEADY_HEAP", raising=False)
    else:
        monkeypatch.setenv("CDK_STEADY_HEAP", env)
    assert T.main(TINY + ["--epochs", "1", "--limit-train", "64", "--device", "cpu",
                          "--out", str(tmp_path / "r")]) == 0
    assert len(calls) == (1 if env is None else 0)
