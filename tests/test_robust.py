"""cdkernels.robust / python -m cdkernels.attack / train --adv-train (CPU, about a minute)."""
import json
import os
import warnings

import pytest
import torch
from torch import nn

from cdkernels import attack as A
from cdkernels import data as D
from cdkernels import models
from cdkernels import robust as R
from cdkernels import train as T
from cdkernels.nn import MonteCarlo

warnings.filterwarnings("ignore", message="cdkernels: using backend")
TINY = ["--model", "cd_preact_resnet20", "--width", "4", "--data", "digits", "--limit-train",
        "256", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def tiny():
    """A small noisy ResNet-8 (width 8, EM noise sigma 0.2) trained a few seconds on digits; returns
    (pixel-space model in eval mode, test batches in pixel space)."""
    torch.manual_seed(0)
    data = D.load("digits")
    net = models.create("cd_preact_resnet", depth=8, width=8, num_classes=10, in_channels=1,
                        noise="em", sigma=0.2)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    net.train()
    for _ in range(4):
        for idx in D.batch_indices(len(data.train), 64, torch.Generator().manual_seed(1), "cpu"):
            x, y = data.batch(data.train, idx, False)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    batches = A.pixel_batches(data, data.test, 120, 240)
    return net, data, batches


def pix(net, data, k=None):
    return A.wrap(net, data, k)


def test_trained_fixture_is_accurate(tiny):
    net, data, batches = tiny
    r = R.evaluate_attack(pix(net, data), batches, "none", grad_check=False,
                          random_baseline=False)
    assert r["natural_acc"] > 0.85, r


@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("kind", ["fgsm", "pgd"])
def test_eps0_gives_natural_accuracy(tiny, k, kind):
    net, data, batches = tiny
    r = R.evaluate_attack(pix(net, data, k), batches, kind, eps=0.0, steps=3, eot=2)
    assert r["robust_acc"] == r["natural_acc"] and r["n"] == 240
    assert r["stochastic"] == (k is not None)
    assert not r["gradient_masking_suspected"], r


def test_robust_never_exceeds_natural_and_attack_hurts(tiny):
    net, data, batches = tiny
    model = pix(net, data, 4)
    for kind in ("fgsm", "pgd"):
        r = R.evaluate_attack(model, batches, kind, eps=0.15, steps=5, eot=2)
        assert r["robust_correct"] <= r["natural_correct"]
        assert r["robust_acc"] < r["natural_acc"] - 0.2, r
        assert r["robust_ci95"][0] <= r["robust_acc"] <= r["robust_ci95"][1]
        assert not r["gradient_masking_suspected"], r


def test_l2_and_linf_stay_in_ball_and_pixel_range(tiny):
    net, data, batches = tiny
    x, y = batches[0]
    m = pix(net, data)
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        xa = R.pgd(m, x, y, eps, steps=4, norm=norm, generator=torch.Generator().manual_seed(0))
        d = (xa - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert float(size.max()) <= eps * (1 + 1e-5)
        assert xa.min() >= 0 and xa.max() <= 1


def test_more_steps_and_more_eot_not_weaker(tiny):
    net, data, batches = tiny
    det = pix(net, data)          # noise off: deterministic
    r1 = R.evaluate_attack(det, batches, "pgd", eps=0.06, steps=1, random_baseline=False)
    r10 = R.evaluate_attack(det, batches, "pgd", eps=0.06, steps=10, random_baseline=False)
    assert r10["robust_acc"] <= r1["robust_acc"] + 0.02, (r1["robust_acc"], r10["robust_acc"])
    mc = pix(net, data, 2)
    e1 = R.evaluate_attack(mc, batches, "pgd", eps=0.06, steps=4, eot=1, random_baseline=False)
    e4 = R.evaluate_attack(mc, batches, "pgd", eps=0.06, steps=4, eot=4, random_baseline=False)
    assert e4["robust_acc"] <= e1["robust_acc"] + 0.04, (e1["robust_acc"], e4["robust_acc"])
    s = R.sanity_checks(mc, batches, e4, attack_kind="pgd", eps=0.06, steps=4, eot=4)
    assert s["passed"], s


def _reference_pgd(model, x, y, eps, steps, alpha, gen):
    """Textbook L-inf PGD, one noise draw per gradient (no replication)."""
    xa = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        out = model(xa)
        loss = -torch.log(out.float().clamp_min(1e-30)).gather(1, y[:, None]).sum()
        g, = torch.autograd.grad(loss, xa)
        xa = (x + (xa + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return xa.detach()


def test_eot1_equals_plain_pgd_with_same_seed(tiny):
    net, data, batches = tiny
    x, y = batches[0]
    m = pix(net, data, 2)  # noisy, prob space
    torch.manual_seed(123)
    a = R.pgd(m, x, y, 0.1, steps=3, step_size=0.04, eot=1,
              generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = _reference_pgd(m, x, y, 0.1, 3, 0.04, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(124)  # other noise -> other examples (the noise really is fresh)
    c = R.pgd(m, x, y, 0.1, steps=3, step_size=0.04, eot=1,
              generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a, c)


def test_eot_is_one_batched_forward(tiny):
    net, data, batches = tiny
    x, y = batches[0]
    calls = []
    m = pix(net, data, 2)
    h = m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        R.pgd(m, x, y, 0.1, steps=3, eot=5)
        assert calls == [5 * len(y)] * 3
        calls.clear()
        R.pgd(m, x, y, 0.1, steps=2, eot=5, eot_chunk=2)  # memory bound: 2 + 2 + 1 draws
        assert calls == [2 * len(y), 2 * len(y), len(y)] * 2
    finally:
        h.remove()
    # deterministic model: the M-draw gradient is the single gradient
    det = pix(net, data)
    _, g1 = R.loss_and_grad(det, x, y, eot=1)
    _, g4 = R.loss_and_grad(det, x, y, eot=4)
    torch.testing.assert_close(g1, g4, rtol=1e-4, atol=1e-7)


def test_frozen_noise_makes_model_deterministic(tiny):
    net, data, batches = tiny
    x, _ = batches[0]
    m = pix(net, data, 3)
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))
        with R.frozen_noise(m, 7):
            a, b = m(x), m(x)
            _, g1 = R.loss_and_grad(m, x, batches[0][1])
            _, g2 = R.loss_and_grad(m, x, batches[0][1])
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        with R.frozen_noise(m, 8):
            c = m(x)
        assert not torch.equal(a, c)
        assert not torch.equal(m(x), m(x))  # hooks are gone afterwards
    assert all(not hasattr(s, "frozen_seed") for s in R.noisy_modules(m))
    r = R.evaluate_attack(m, batches, "pgd", eps=0.1, steps=5, frozen=True, eot=4)
    assert r["frozen_noise"] and r["eot"] == 1 and r["robust_acc"] < r["natural_acc"]


class _Masked(nn.Module):
    """Gradient masking: inputs are quantised by round() (zero gradient everywhere)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 16) / 16)


def test_gradient_masking_flagged(tiny):
    net, data, batches = tiny
    ok = R.evaluate_attack(pix(net, data), batches, "pgd", eps=0.1, steps=5)
    assert not ok["gradient_masking_suspected"] and ok["grad_l1_mean"] > 0
    bad = R.evaluate_attack(_Masked(pix(net, data)), batches, "pgd", eps=0.1, steps=5)
    assert bad["gradient_masking_suspected"], bad
    assert bad["grad_l1_mean"] == 0 and bad["grad_zero_fraction"] == 1.0
    assert any("gradient" in w for w in bad["gradient_masking_reasons"])


@pytest.mark.parametrize("kw, msg", [
    (dict(eps=-0.1), "eps"), (dict(norm="l3"), "norm"), (dict(steps=0), "steps"),
    (dict(eot=0), "eot"), (dict(eps=float("nan")), "eps"), (dict(step_size=-1.0), "step_size"),
])
def test_bad_input_raises(tiny, kw, msg):
    net, data, batches = tiny
    x, y = batches[0]
    args = dict(eps=0.1, steps=2, norm="linf", eot=1)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        R.pgd(pix(net, data), x, y, **args)
    with pytest.raises(ValueError, match=msg):
        R.evaluate_attack(pix(net, data), batches[:1], "pgd", **args)


def test_bad_attack_name_and_eps_parsing():
    with pytest.raises(ValueError, match="unknown attack"):
        R.evaluate_attack(nn.Identity(), [], "cw")
    assert R.parse_eps("8/255") == pytest.approx(8 / 255)
    with pytest.raises(ValueError):
        R.parse_eps("eight")


def test_wilson():
    lo, hi = R.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert R.wilson(0, 10)[0] == 0 and R.wilson(10, 10)[1] == pytest.approx(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "r")
    assert T.main(TINY + ["--epochs", "1", "--out", out, "--lr", "0.05"]) == 0
    return os.path.join(out, "best.pt")


def test_cli_end_to_end(ckpt, tmp_path, capsys):
    js = str(tmp_path / "res.json")
    md = str(tmp_path / "res.md")
    rc = A.main(["--checkpoint", ckpt, "--data", "digits", "--attack", "pgd", "--eps", "8/255",
                 "--steps", "3", "--eot", "2", "--mc-samples", "2", "--limit", "100",
                 "--out", js, "--md", md, "--sanity"])
    assert rc == 0
    r = json.load(open(js))
    assert r["n"] == 100 and r["eot"] == 2 and r["mc_samples"] == 2 and r["steps"] == 3
    assert r["robust_acc"] <= r["natural_acc"]
    assert r["sanity"]["eps0_equals_natural"] and r["sanity"]["robust_le_natural"]
    assert "| pgd | linf |" in open(md).read() and "| pgd | linf |" in capsys.readouterr().out
    rc = A.main(["--checkpoint", ckpt, "--attack", "fgsm", "--eps", "0.1", "--frozen-noise",
                 "--limit", "50", "--out", js])
    assert rc == 0 and json.load(open(js))["frozen_noise"]


@pytest.mark.parametrize("argv, msg", [
    (["--eps", "-1"], "eps"), (["--norm", "l3"], "invalid choice: 'l3'"),
    (["--steps", "0"], "steps"), (["--eot", "0"], "eot"),
    (["--attack", "cw"], "invalid choice: 'cw'"), (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "cuda"], "no CUDA device"), (["--restarts", "0"], "--restarts"),
])
def test_cli_bad_input(ckpt, capsys, argv, msg):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert A.main(["--checkpoint", ckpt, "--limit", "10"] + argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and msg in err and "Traceback" not in err
    if "invalid choice" not in msg:  # our own errors are one line (argparse adds usage)
        assert len(err.strip().splitlines()) == 1, err


def test_adv_train_cli(tmp_path, capsys):
    out = str(tmp_path / "adv")
    args = TINY + ["--epochs", "2", "--adv-train", "pgd", "--eps", "0.1", "--adv-steps", "2",
                   "--adv-eot", "2", "--adv-val", "40", "--mc-samples", "2", "--limit-eval",
                   "60"]
    assert T.main(args + ["--out", out]) == 0
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["config"]["adv_train"] == "pgd" and ck["config"]["adv_eps"] == pytest.approx(0.1)
    assert ck["config"]["adv_mode"] == "eval" and ck["config"]["adv_eot"] == 2
    # selected on robust validation accuracy (PGD on the first 40 validation images)
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert all(l["val_robust_n"] == 40 and 0 <= l["val_robust_acc"] <= 1
               for l in lines)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["selection"].startswith("robust") and "best_val_robust_acc" in s
    best = max(lines, key=lambda l: (l["val_robust_acc"], l["val_acc"]))
    assert s["best_epoch"] == best["epoch"]
    # resume stays exact with adversarial training (the PGD generator state is checkpointed)
    b = str(tmp_path / "b")
    assert T.main(args + ["--out", b, "--stop-after", "1"]) == 0
    assert T.main(args + ["--out", b, "--resume"]) == 0
    cb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    for k, v in ck["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert T.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "c"), "--eps", "0.1"]) == 2
    assert "--adv-train" in capsys.readouterr().err


def test_cli_defaults_attack_the_noise_on_model(ckpt, tmp_path):
    """A noisy checkpoint is attacked as the method uses it: Monte-Carlo K=4, noise on, EOT 4;
    --noise-off attacks the deterministic network; --eot 1 on a stochastic model warns."""
    js = str(tmp_path / "r.json")
    base = ["--checkpoint", ckpt, "--steps", "2", "--limit-eval", "20", "--quiet", "--out", js]
    assert A.main(base) == 0
    r = json.load(open(js))
    assert r["mc_samples"] == 4 and r["eot"] == 4 and r["stochastic"] and not r["noise_off"]
    assert A.main(base + ["--noise-off"]) == 0
    r = json.load(open(js))
    assert r["mc_samples"] is None and r["eot"] == 1 and not r["stochastic"] and r["noise_off"]
    with pytest.warns(UserWarning, match="--eot 1 on a stochastic model"):
        assert A.main(base + ["--eot", "1"]) == 0
    assert A.main(base + ["--loss", "cw", "--restarts", "2"]) == 0
    r = json.load(open(js))
    assert r["loss"] == "cw" and r["restarts"] == 2


def test_cli_cross_check_without_torchattacks(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torchattacks", None)
    assert A.main(["--checkpoint", ckpt, "--attack", "apgd", "--limit-eval", "5"]) == 2
    err = capsys.readouterr().err
    assert "pip install cdkernels[attacks]" in err and len(err.strip().splitlines()) == 1


def test_external_attack_keeps_eval_mode_and_batchnorm_statistics():
    """torchattacks calls .train() after an attack on a module that was training before it;
    a fresh wrapper module is, so the cross-check used to leave the model in training mode:
    its adversarial predictions then used batch statistics and moved the BatchNorm running
    statistics. The model must come back in the mode it had, with its statistics untouched."""
    pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    net = R.PixelModel(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(4 * 6 * 6, 3))).eval()
    bn = net.model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    xa = R.external_attack("apgd", net, x, y, eps=0.05, steps=3)
    assert not net.training and not bn.training
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert (xa - x).abs().max() <= 0.05 + 1e-6
    res = R.evaluate_attack(net, [(x, y)], "apgd", eps=0.05, steps=3, random_baseline=False,
                            grad_check=False)
    assert not net.training
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    # the robust count uses the eval-mode network: recompute it from the returned accuracy
    assert res["robust_acc"] <= res["natural_acc"]
    net.train()  # and a training-mode caller gets training mode back
    R.external_attack("apgd", net, x, y, eps=0.05, steps=1)
    assert net.training
