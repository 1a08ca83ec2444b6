"""cdkernels.cd_step: every backend against the reference, autograd, torch.library
integration, layouts, dtypes and bad input."""
import math

import pytest
import torch

import cdkernels
from cdkernels.backends import get_backend
from cdkernels.nn import CDStep, set_noise_in_eval
from conftest import TOL, poisoned_like

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    f = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    return x, f


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        wide = torch.cat([t, torch.full_like(t, 7.0)], dim=-1)
        return wide[..., : t.shape[-1]]
    return t


def test_matches_documented_formula():
    """Contiguous x with an explicit seed adds exactly sigma*sqrt(dt)*normal(x.shape, seed)."""
    x, f = _inputs((3, 4, 5, 6), torch.float64, "cpu")
    y = cdkernels.cd_step(x, f, 0.25, 0.7, seed=42)
    eps = cdkernels.normal(x.shape, 42, dtype=torch.float64)
    torch.testing.assert_close(y, x + 0.25 * f + 0.7 * 0.5 * eps, rtol=0, atol=1e-12)
    y = cdkernels.cd_step(x, f, 0.25, 0.7, seed=42, activation="relu")
    torch.testing.assert_close(y, torch.relu(x + 0.25 * f + 0.7 * 0.5 * eps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_backend_kernels_against_reference(native, dtype, activation, per_channel):
    """Backend-level call with poisoned (NaN) outputs: every element must be written."""
    name, dev = native
    be, ref = get_backend(torch.device(dev), dtype, name), get_backend(torch.device("cpu"), dtype,
                                                                       "reference")
    n, C, cs = 4 * 97 + 3, 5, 7  # n % 4 == 3; channel of p = (p // 7) % 5
    x, f = _inputs((n,), dtype, dev)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3], device=dev) if per_channel else None
    seed = torch.tensor([123456789012345], device=dev)
    act = activation or "none"
    y = poisoned_like(x)
    be.cd_step_fwd(x, f, y, 0.3, sigma, 0.8, C, cs, seed, 5, act)
    y_ref = poisoned_like(x.cpu())
    ref.cd_step_fwd(x.cpu(), f.cpu(), y_ref, 0.3, None if sigma is None else sigma.cpu(), 0.8, C,
                    cs, seed.cpu(), 5, act)
    torch.testing.assert_close(y.cpu(), y_ref, **TOL[dtype])

    g = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=dev)
    outs = [poisoned_like(x), poisoned_like(x), torch.zeros(C, device=dev)]
    be.cd_step_bwd(g, y if act == "relu" else None, *outs, 0.3, sigma, 0.8, C, cs, seed, 5, act)
    refs = [poisoned_like(x.cpu()), poisoned_like(x.cpu()), torch.zeros(C)]
    ref.cd_step_bwd(g.cpu(), y.cpu() if act == "relu" else None, *refs, 0.3,
                    None if sigma is None else sigma.cpu(), 0.8, C, cs, seed.cpu(), 5, act)
    torch.testing.assert_close(outs[0].cpu(), refs[0], **TOL[dtype])
    torch.testing.assert_close(outs[1].cpu(), refs[1], **TOL[dtype])
    torch.testing.assert_close(outs[2].cpu(), refs[2], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_op_against_reference(native, dtype, layout):
    """Forward and all three gradients through the public op, for each memory layout."""
    name, dev = native
    results = {}
    for be, d in ((name, dev), ("reference", "cpu")):
        x, f = _inputs((2, 3, 5, 6), dtype, d)
        x, f = _layout(x, layout).requires_grad_(), _layout(f, "contiguous").requires_grad_()
        sigma = torch.tensor([0.2, 0.4, 0.8], device=d, requires_grad=True)
        y = cdkernels.cd_step(x, f, 0.1, sigma, activation="relu", seed=77, backend=be)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype=dtype,
                                                                                  device=d)
        y.backward(g)
        if layout != "strided":
            assert y.stride() == x.stride(), "output must follow x's memory layout"
        results[be] = [t.detach().cpu() for t in (y, x.grad, f.grad, sigma.grad)]
    for got, want in zip(results[name], results["reference"]):
        torch.testing.assert_close(got.float(), want.float(),
                                   **(TOL[dtype] if got.dtype != torch.float32 or
                                      got.numel() > 3 else dict(rtol=2e-3, atol=2e-3)))


def test_channels_last_uses_memory_order():
    """docs/noise.md section 4: a channels_last x takes the stream in its memory order."""
    x, f = _inputs((2, 3, 4, 5), torch.float64, "cpu")
    xc = x.contiguous(memory_format=torch.channels_last)
    y = cdkernels.cd_step(xc, f, 0.5, 1.0, seed=9)
    eps_mem = cdkernels.normal((2, 4, 5, 3), 9, dtype=torch.float64).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, x + 0.5 * f + math.sqrt(0.5) * eps_mem, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", ["fast", "op"])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_sigma_grad_follows_the_output_layout(native, backend, path):
    """channels_last y with act='none' (y not saved): eps runs in y's memory order, whatever
    layout grad_y arrives in (y.sum() sends an expanded one, a contiguous one, y's own). It used
    to be regenerated in grad_y's memory order, a wrong sigma gradient with no error."""
    name, dev = native
    be = name if backend == "native" else "reference"
    dev = dev if backend == "native" else "cpu"
    x, f = (torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(i)).to(dev)
            .contiguous(memory_format=torch.channels_last) for i in (1, 2))
    eps = torch.empty_like(x, dtype=torch.float64, device="cpu")
    eps.as_strided((x.numel(),), (1,)).copy_(cdkernels.normal((x.numel(),), 5,
                                                              dtype=torch.float64))
    seed = torch.tensor([5], device=dev)
    grads = {"expanded": None, "contiguous": torch.arange(120.0).reshape(2, 3, 4, 5) / 60}
    grads["channels_last"] = grads["contiguous"].contiguous(memory_format=torch.channels_last)
    for kind, g in grads.items():
        s = torch.tensor([0.1, 0.2, 0.3], device=dev, requires_grad=True)
        y = (cdkernels.cd_step(x, f, 1.0, s, seed=seed, backend=be) if path == "fast" else
             torch.ops.cdkernels.cd_step.default(x, f, 1.0, 0.0, s, seed, 0, "none", be))
        if g is None:
            y.sum().backward()
            g = torch.ones(2, 3, 4, 5)
        else:
            y.backward(g.to(dev))
        want = (g.double() * eps).sum(dim=(0, 2, 3))
        torch.testing.assert_close(s.grad.cpu().double(), want, rtol=1e-5, atol=1e-5,
                                   msg=f"grad_y {kind}")


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("sigma_kind", ["float", "scalar_tensor", "per_channel"])
def test_gradcheck_float64(act, sigma_kind):
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    sig = {"float": 0.6,
           "scalar_tensor": torch.tensor(0.6, dtype=torch.float64, requires_grad=True),
           "per_channel": torch.tensor([0.2, 0.6, 1.1], dtype=torch.float64,
                                       requires_grad=True)}[sigma_kind]
    inputs = (x, f) + ((sig,) if torch.is_tensor(sig) else ())

    def fn(x, f, *s):
        return cdkernels.cd_step(x, f, 0.2, s[0] if s else sig, activation=act, seed=31)

    assert torch.autograd.gradcheck(fn, inputs)


def test_opcheck():
    x, f = _inputs((2, 3, 4, 4), torch.float32, "cpu")
    seed = torch.tensor([5])
    sig = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    op = torch.ops.cdkernels.cd_step.default
    for args in [(x, f, 0.1, 0.5, None, seed, 0, "relu", ""),
                 (x.requires_grad_(), f, 0.1, 0.0, sig, seed, 0, "relu", ""),
                 (x, f.requires_grad_(), 0.1, 0.0, sig, seed, 0, "none", "")]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.step = CDStep(0.1, 0.5, learnable_sigma=True, per_channel=3, activation="relu")

        def forward(self, x, seed):
            return self.step(x, self.conv(x), seed=seed)

    m = Block()
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(m, fullgraph=True)
    y_c = compiled(x, 123)
    y_e = m(x, 123)
    torch.testing.assert_close(y_c, y_e)
    y_c.sum().backward()
    gc = m.step.sigma.grad.clone()
    m.zero_grad()
    y_e.sum().backward()
    torch.testing.assert_close(gc, m.step.sigma.grad)
    # seed=None inside the compiled graph: still fresh noise per call
    z1, z2 = compiled(x, None), compiled(x, None)
    assert not torch.equal(z1, z2)


def test_saves_no_noise():
    """Autograd keeps the seed, sigma and (with relu) y: never eps."""
    x, f = _inputs((4, 8, 16, 16), torch.float32, "cpu")
    x.requires_grad_()
    sig = torch.tensor(0.5, requires_grad=True)
    for act, max_big in ((None, 0), ("relu", 1)):
        big = []

        def pack(t):
            if t.numel() >= x.numel():
                big.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = cdkernels.cd_step(x, f, 0.1, sig, activation=act, seed=1)
        assert len(big) <= max_big, f"{act}: saved {len(big)} tensors of x's size"
        y.sum().backward()


def test_empty_tensor():
    x = torch.empty(0, 3, 4)
    y = cdkernels.cd_step(x, torch.empty(0, 3, 4), 0.1, 1.0)
    assert y.shape == (0, 3, 4)
    xr = torch.empty(0, 3, requires_grad=True)
    sig = torch.ones(3, requires_grad=True)
    cdkernels.cd_step(xr, torch.empty(0, 3), 0.1, sig).sum().backward()
    assert xr.grad.shape == (0, 3)


def test_successive_calls_differ_and_ranks_differ(monkeypatch):
    x = torch.zeros(1000)
    a = cdkernels.cd_step(x, x, 1.0, 1.0)
    b = cdkernels.cd_step(x, x, 1.0, 1.0)
    assert not torch.equal(a, b)
    import cdkernels._common as common
    torch.manual_seed(3)
    r0 = cdkernels.cd_step(x, x, 1.0, 1.0)
    monkeypatch.setattr(common, "_rank", lambda: 1)
    torch.manual_seed(3)
    r1 = cdkernels.cd_step(x, x, 1.0, 1.0)
    assert not torch.equal(r0, r1), "DDP ranks with the same torch seed must get different noise"
    r1_explicit = cdkernels.cd_step(x, x, 1.0, 1.0, seed=4)
    monkeypatch.setattr(common, "_rank", lambda: 0)
    assert torch.equal(r1_explicit, cdkernels.cd_step(x, x, 1.0, 1.0, seed=4))


def test_bad_input():
    x = torch.randn(2, 3, 4)
    f = torch.randn(2, 3, 4)
    cases = [
        (lambda: cdkernels.cd_step(x, torch.randn(2, 3), 0.1, 1.0), ValueError, "f must have"),
        (lambda: cdkernels.cd_step(x, f.double(), 0.1, 1.0), TypeError, "f has dtype"),
        (lambda: cdkernels.cd_step(x.long(), f.long(), 0.1, 1.0), TypeError, "x must be a float"),
        (lambda: cdkernels.cd_step(x, f.int(), 0.1, 1.0), TypeError, "f must be a float"),
        (lambda: cdkernels.cd_step(x, f, -0.1, 1.0), ValueError, "dt"),
        (lambda: cdkernels.cd_step(x, f, 0.1, -1.0), ValueError, "sigma"),
        (lambda: cdkernels.cd_step(x, f, float("nan"), 1.0), ValueError, "dt"),
        (lambda: cdkernels.cd_step(x, f, 0.1, torch.ones(4)), ValueError, "sigma"),
        (lambda: cdkernels.cd_step(x, f, 0.1, torch.ones(3, 1)), ValueError, "sigma"),
        (lambda: cdkernels.cd_step(x, f, 0.1, torch.ones(3).long()), TypeError, "sigma"),
        (lambda: cdkernels.cd_step(x, f, 0.1, 1.0, activation="swish"), ValueError, "activation"),
        (lambda: cdkernels.cd_step(x, f, 0.1, 1.0, backend="fast"), ValueError, "backend"),
        (lambda: cdkernels.cd_step(x, f, 0.1, 1.0, seed=-3), ValueError, "seed"),
        (lambda: cdkernels.cd_step(x, f, 0.1, 1.0, backend="cuda"), RuntimeError, "cuda"),
        (lambda: cdkernels.cd_step(x.double(), f.double(), 0.1, 1.0, backend="cpu"),
         (TypeError, RuntimeError), "cpu"),
    ]
    if torch.cuda.is_available():
        cases.append((lambda: cdkernels.cd_step(x, f.cuda(), 0.1, 1.0), ValueError, "f is on"))
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_env_and_context_backend_selection(monkeypatch):
    x, f = _inputs((8,), torch.float32, "cpu")
    monkeypatch.setenv("CDK_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CDK_BACKEND"):
        cdkernels.cd_step(x, f, 0.1, 1.0, seed=1)
    monkeypatch.setenv("CDK_BACKEND", "reference")
    assert cdkernels.get_backend(torch.device("cpu")).name == "reference"
    with cdkernels.use_backend("auto"):
        assert cdkernels.get_backend(torch.device("cpu")).name in ("cpu", "reference")
    monkeypatch.delenv("CDK_BACKEND")
    with cdkernels.use_backend("reference"):
        assert cdkernels.get_backend(torch.device("cpu")).name == "reference"
    info = cdkernels.backends()
    assert set(info) == {"reference", "cpu", "cuda", "triton"}
    assert all(isinstance(v["reason"], str) and v["reason"] for v in info.values())
    with pytest.raises(ValueError, match="backend"):
        with cdkernels.use_backend("gpu"):
            pass


def test_cdstep_module_noise_switch():
    m = CDStep(0.1, 0.5, activation="relu")
    x, f = _inputs((4, 6), torch.float32, "cpu")
    m.train()
    assert not torch.equal(m(x, f), m(x, f))
    m.eval()
    torch.testing.assert_close(m(x, f), torch.relu(x + 0.1 * f))
    set_noise_in_eval(m, True)
    assert not torch.equal(m(x, f), m(x, f))
    ml = CDStep(0.1, 0.5, learnable_sigma=True, per_channel=6)
    assert isinstance(ml.sigma, torch.nn.Parameter) and ml.sigma.shape == (6,)
    ml(x, f).sum().backward()
    assert ml.sigma.grad is not None and ml.sigma.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="per_channel"):
        CDStep(0.1, 0.5, per_channel=0)
