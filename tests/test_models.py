"""cdkernels.models: registry, noise modes, backends, layouts, autocast, torch.compile."""
import math
import warnings

import pytest
import torch

import cdkernels
from cdkernels import models
from cdkernels.backends import _load
from cdkernels.models.resnet import StdNoiseStep
from cdkernels.nn import set_noise_in_eval

warnings.filterwarnings("ignore", message="cdkernels: using backend")


def small(noise="em", **kw):
    kw.setdefault("in_channels", 1)
    kw.setdefault("width", 4)
    return models.create("cd_preact_resnet", depth=8, noise=noise, **kw)


def test_registry():
    names = models.list()
    for d in (20, 32, 44, 56, 110):
        assert f"cd_preact_resnet{d}" in names and f"enresnet{d}" in names
    assert "cd_wrn16_4" in names and names == sorted(names)
    with pytest.raises(ValueError, match="valid models: .*cd_preact_resnet20"):
        models.create("resnet9000")
    with pytest.raises(TypeError, match="fixed by the model name"):
        models.create("cd_preact_resnet20", depth=32)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create("cd_preact_resnet", depth=21)
    with pytest.raises(ValueError, match="noise"):
        small(noise="gaussian")
    with pytest.raises(ValueError, match="learnable_sigma"):
        small(learnable_sigma="layer")


def test_depth_is_number_of_blocks():
    m = models.create("cd_preact_resnet56", width=4)
    assert len(m.blocks) == 27
    w = models.create("cd_wrn16_4", num_classes=7)
    assert len(w.blocks) == 6 and w.fc.out_features == 7 and w.fc.in_features == 256


@pytest.mark.parametrize("noise", ["em", "std", "none"])
@pytest.mark.parametrize("learnable", [False, "scalar", "channel"])
def test_noise_modes_train_and_eval(noise, learnable):
    torch.manual_seed(0)
    m = small(noise, learnable_sigma=learnable, sigma=0.3)
    x = torch.randn(6, 1, 8, 8)
    y1, y2 = m(x), m(x)
    assert y1.shape == (6, 10)
    assert torch.equal(y1, y2) == (noise == "none")  # noise on in train mode
    y1.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    sig = [p for n, p in m.named_parameters() if n.endswith(("step.sigma", "step.coef"))]
    if noise != "none" and learnable:
        assert len(sig) == 3 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in sig)
        if learnable == "channel":
            assert sig[0].shape == (4,)
    else:
        assert not sig
    m.eval()
    assert torch.equal(m(x), m(x))  # eval: no noise
    set_noise_in_eval(m, True)
    assert torch.equal(m(x), m(x)) == (noise == "none")
    set_noise_in_eval(m, False)
    assert torch.equal(m(x), m(x))


def test_em_noise_scale():
    """noise='em': the update's noise is sigma*sqrt(dt)*eps."""
    from cdkernels.models.resnet import make_step
    step = make_step("em", dt=0.25, sigma=0.8, learnable=None, channels=4).train()
    x, f = torch.randn(64, 4, 16, 16), torch.randn(64, 4, 16, 16)
    noise = step(x, f) - (x + 0.25 * f)
    assert abs(noise.std().item() - 0.8 * 0.5) < 0.01


def test_std_noise_scale_and_gradient():
    """noise='std': noise std = coef * std(x + dt*f), and the std is part of the graph."""
    step = StdNoiseStep(dt=0.25, coef=0.5).train()
    x = torch.randn(64, 4, 16, 16) * 3
    f = torch.randn(64, 4, 16, 16, requires_grad=True)
    z = x + 0.25 * f
    y = step(x, f)
    noise = (y - z).detach()
    assert abs(noise.std().item() / z.std().item() - 0.5) < 0.01
    # d/df of sum(y) = dt (from z) + d(sigma_eff)/df * sum(sqrt(dt)*eps): not just dt.
    y.sum().backward()
    assert not torch.allclose(f.grad, torch.full_like(f.grad, 0.25))
    with pytest.raises(ValueError, match="dt"):
        StdNoiseStep(dt=0.0, coef=0.1)


def _native_or_auto():
    inst, _ = _load("cpu")
    return "cpu" if inst is not None else "auto"


@pytest.mark.parametrize("noise", ["em", "std"])
def test_reference_and_native_backend_agree(noise):
    """The same model and generator seed give the same outputs and gradients on the reference
    backend and on the native CPU backend (or 'auto', which falls back when it is missing)."""
    torch.manual_seed(0)
    m = small(noise, learnable_sigma="scalar")
    x = torch.randn(4, 1, 8, 8)
    outs = []
    for b in ("reference", _native_or_auto()):
        m.zero_grad()
        torch.manual_seed(123)
        with cdkernels.use_backend(b):
            y = m(x)
            y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_channels_last():
    torch.manual_seed(0)
    m = small("em")
    x = torch.randn(5, 1, 8, 8)
    m.eval()
    ref = m(x)
    mc = m.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(mc(xc), ref, rtol=1e-5, atol=1e-5)
    mc.train()
    y = mc(xc)
    y.sum().backward()
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("noise", ["em", "std"])
def test_autocast_bf16(noise):
    torch.manual_seed(0)
    m = small(noise, learnable_sigma="scalar")
    x = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_enresnet_averages_members():
    torch.manual_seed(0)
    m = models.create("enresnet", depth=8, members=3, in_channels=1, width=4).eval()
    assert len(m.members) == 3
    w0, w1 = m.members[0].stem.weight, m.members[1].stem.weight
    assert not torch.equal(w0, w1)  # independent members
    x = torch.randn(4, 1, 8, 8)
    mean = torch.stack([mm(x) for mm in m.members]).mean(0)
    torch.testing.assert_close(m(x), mean, rtol=1e-5, atol=1e-6)
    m.train()
    m(x).sum().backward()
    assert all(mm.stem.weight.grad is not None for mm in m.members)  # trained jointly
    set_noise_in_eval(m, True)
    m.eval()
    assert not torch.equal(m(x), m(x))


def test_wide_resnet_runs():
    torch.manual_seed(0)
    m = models.create("cd_wide_resnet", depth=10, widen=1, in_channels=3, noise="std")
    y = m(torch.randn(2, 3, 16, 16))
    y.sum().backward()
    assert y.shape == (2, 10)


def test_torch_compile_small_model():
    """torch.compile on a depth-8 model: train step runs, eval matches eager."""
    torch.manual_seed(0)
    m = small("em", learnable_sigma="scalar")
    cm = torch.compile(m)
    x = torch.randn(4, 1, 8, 8)
    cm(x).sum().backward()
    assert m.blocks[0].step.sigma.grad is not None
    m.eval()
    torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_forward_fresh_noise():
    torch.manual_seed(0)
    m = small("em").cuda()
    x = torch.randn(8, 1, 8, 8, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            m(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = m(x)
    g.replay()
    a = y.clone()
    g.replay()
    assert not torch.equal(a, y)  # fresh seeds on every replay
    assert math.isfinite(y.sum().item())
