"""Issue 10 pieces of cdkernels.robust / cdkernels.nn: chunk-safe frozen noise, a library that
leaves the global RNG alone, margin losses and restarts, paired statistics, the realised
noise-to-signal ratio, and the optional torchattacks cross-check (CPU, seconds)."""
import sys
import warnings

import pytest
import torch

from cdkernels import models
from cdkernels import robust as R
from cdkernels.nn import MonteCarlo

warnings.filterwarnings("ignore", message="cdkernels: using backend")


def _net(noise="em", sigma=0.3, seed=0):
    torch.manual_seed(seed)
    return models.create("cd_preact_resnet", depth=8, width=4, num_classes=10, in_channels=1,
                         noise=noise, sigma=sigma).eval()


@pytest.mark.parametrize("noise", ["em", "std"])
def test_frozen_noise_chunked_equals_unchunked(noise):
    """Under frozen noise the K samples of MonteCarlo are K distinct draws whatever the chunk:
    chunk=1, 2, 3 and K give the same prediction (before the fix every equal-sized chunk got
    the same noise, so chunk=1 collapsed K samples into one)."""
    net = _net(noise)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        outs = {}
        for c in (1, 2, 3, 6):
            mc = MonteCarlo(net, samples=6, chunk=c, space="logit")
            with R.frozen_noise(mc, 11):
                outs[c] = mc(x)
        for c in (1, 2, 3):
            torch.testing.assert_close(outs[c], outs[6], rtol=0, atol=0)
        # the 6 samples are distinct draws: their mean differs from any single one
        one = MonteCarlo(net, samples=1, space="logit")
        with R.frozen_noise(one, 11):
            single = one(x)
        assert not torch.allclose(single, outs[6], atol=1e-6)
        # and frozen means frozen: the same seed twice gives the same output, another differs
        mc = MonteCarlo(net, samples=6, chunk=2, space="logit")
        with R.frozen_noise(mc, 11):
            again = mc(x)
        with R.frozen_noise(mc, 12):
            other = mc(x)
        torch.testing.assert_close(again, outs[6], rtol=0, atol=0)
        assert not torch.equal(other, outs[6])
    assert all("frozen_sample" not in m.__dict__ for m in R.noisy_modules(net))


def test_evaluate_attack_leaves_global_rng_alone():
    net = R.PixelModel(MonteCarlo(_net(), samples=2), torch.tensor([0.5]), torch.tensor([0.25]))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1 = R.evaluate_attack(net, [(x, y)], "pgd", eps=0.1, steps=2, eot=2, seed=5,
                           per_example=True)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # the caller's state does not leak into the result either
    r2 = R.evaluate_attack(net, [(x, y)], "pgd", eps=0.1, steps=2, eot=2, seed=5,
                           per_example=True)
    assert r1["robust_ok"] == r2["robust_ok"] and r1["natural_ok"] == r2["natural_ok"]
    assert len(r1["robust_ok"]) == 16 and sum(r1["robust_ok"]) == r1["robust_correct"]


def test_margin_losses():
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]]), 1)
    y = torch.tensor([0, 0])
    ce = R.attack_loss(lp, y, "ce")
    torch.testing.assert_close(ce, -lp[:, 0])
    cw = R.attack_loss(lp, y, "cw")   # max other logit - true logit (shift invariant)
    torch.testing.assert_close(cw, torch.tensor([-1.0, 3.0]))
    dlr = R.attack_loss(lp, y, "dlr")  # margin / (z_(1) - z_(3))
    torch.testing.assert_close(dlr, torch.tensor([-1.0 / 2.0, 3.0 / 2.5]))
    with pytest.raises(ValueError, match="unknown loss"):
        R.attack_loss(lp, y, "hinge")


@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_restarts_keep_the_worst_case(loss):
    """R restarts never end with a lower per-example loss than the first start alone (the first
    restart draws the same random start from the same generator)."""
    net = R.PixelModel(_net("none"), torch.tensor([0.5]), torch.tensor([0.25]))
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    a1 = R.pgd(net, x, y, 0.1, steps=3, loss=loss, generator=torch.Generator().manual_seed(3))
    a3 = R.pgd(net, x, y, 0.1, steps=3, loss=loss, restarts=3,
               generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        l1 = R.attack_loss(R.log_probs(net(a1), "logit"), y, loss)
        l3 = R.attack_loss(R.log_probs(net(a3), "logit"), y, loss)
    assert (l3 >= l1 - 1e-5).all()
    assert float((a3 - x).abs().max()) <= 0.1 + 1e-6 and a3.min() >= 0 and a3.max() <= 1


def test_paired_bootstrap():
    a = [[1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 1, 1, 1]]
    d = R.paired_bootstrap(a, a)
    assert d["diff"] == 0 and d["lo"] == 0 and d["hi"] == 0 and d["seeds"] == 2
    b = [[0] * 8, [0] * 8]
    d = R.paired_bootstrap(a, b, iters=500)
    assert d["diff"] == pytest.approx(11 / 16) and 0 < d["lo"] <= d["diff"] <= d["hi"] <= 1
    with pytest.raises(ValueError, match="equal-shaped"):
        R.paired_bootstrap(a, [[1, 0]])


def test_wilson_per_cell_covers_the_rate():
    lo, hi = R.wilson(7, 20)
    assert lo < 0.35 < hi


def test_noise_to_signal():
    x = torch.randn(16, 1, 8, 8)
    std = R.noise_to_signal(_net("std", 0.3), x)
    assert len(std) == 3 and all(abs(r - 0.3) < 0.02 for r in std)  # coef by construction
    em = R.noise_to_signal(_net("em", 0.3), x)
    assert len(em) == 3 and all(r > 0 for r in em)
    assert R.noise_to_signal(_net("none"), x) == []
    torch.manual_seed(4)
    state = torch.get_rng_state()
    net = _net("em", 0.3)
    net.train()
    R.noise_to_signal(net, x)
    assert net.training and all(not m.noise_in_eval for m in R.noisy_modules(net))


def test_cross_check_attack_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    net = R.PixelModel(_net("none"))
    with pytest.raises(R.MissingExtra, match=r"pip install cdkernels\[attacks\]"):
        R.evaluate_attack(net, [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))],
                          "apgd", eps=0.1)


def test_cross_check_attack_runs():
    pytest.importorskip("torchattacks")
    net = R.PixelModel(MonteCarlo(_net(), samples=2), torch.tensor([0.5]), torch.tensor([0.25]))
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)  # correctly classified by construction (up to noise)
    before = torch.get_rng_state()
    r = R.evaluate_attack(net, [(x, y)], "apgd", eps=0.2, steps=3, eot=2, grad_check=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert r["attack"] == "apgd" and r["loss"] == "ce" and r["eot"] == 2
    assert r["robust_correct"] <= r["natural_correct"] and r["natural_correct"] >= 5
    assert r["robust_acc"] < r["natural_acc"]
