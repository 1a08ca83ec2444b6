"""GPU-only checks (skipped cleanly without CUDA; run on a GPU by bench/gpu_check.sh):
CUDA-graph replay freshness, device-side seeds, and device peak memory of cd_smooth."""
import pytest
import torch

import cdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = ["cuda", "triton"]


def _usable(name):
    info = cdkernels.backends()[name]
    return info["available"]


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_graph_replay_gets_fresh_noise(name):
    if not _usable(name):
        pytest.fail(f"{name} unavailable on a GPU machine: {cdkernels.backends()[name]}")
    x = torch.randn(4, 8, 16, 16, device="cuda")
    f = torch.randn_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph (Triton compiles here)
        for _ in range(2):
            cdkernels.cd_step(x, f, 0.1, 1.0, backend=name)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cdkernels.cd_step(x, f, 0.1, 1.0, activation="relu", backend=name)
        y_fixed = cdkernels.cd_step(x, f, 0.1, 1.0, backend=name, seed=7)
    outs, fixed = [], []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        outs.append(y.clone())
        fixed.append(y_fixed.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert torch.equal(fixed[0], fixed[1]), "an explicit seed replays the same stream"
    torch.testing.assert_close(fixed[0], x + 0.1 * f + 0.1 ** 0.5 *
                               cdkernels.normal(x.shape, 7, device="cuda", backend="reference"),
                               rtol=2e-6, atol=2e-6)
    # the noise is standard normal on every replay
    z = (outs[2] - torch.relu(x + 0.1 * f)).abs()
    assert z.max() > 0


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cd_smooth_peak_memory_independent_of_k(name):
    x = torch.randn(16, 64, 32, 32, device="cuda", requires_grad=True)
    peaks = []
    for K in (1, 64):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cdkernels.cd_smooth(x, 0.5, samples=K, backend=name).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        x.grad = None
    assert peaks[1] <= peaks[0] + x.numel() * x.element_size() // 2, peaks
    # forward alone: at most one extra tensor of x's size
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        cdkernels.cd_smooth(x, 0.5, samples=8, backend=name)
    assert torch.cuda.max_memory_allocated() - base <= x.numel() * 4 + 2 ** 20


def test_auto_backend_on_cuda_is_native():
    name = cdkernels.get_backend(torch.device("cuda")).name
    assert name in ("cuda", "triton"), name


def test_cuda_graph_training_runs_with_fresh_noise(tmp_path, capsys):
    """The whole training step (forward, backward, optimizer) captured and replayed: the run
    says its noise is fresh per replay, and the training loss decreases."""
    import json

    from cdkernels import train
    out = tmp_path / "run"
    rc = train.main(["--model", "cd_preact_resnet20", "--data", "digits", "--epochs", "4",
                     "--batch-size", "128", "--cuda-graph", "--device", "cuda", "--noise", "em",
                     "--sigma", "0.1", "--out", str(out)])
    assert rc == 0
    log = capsys.readouterr()
    assert "fresh noise" in (log.out + log.err)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["train_loss"] for r in rows]
    assert losses[-1] < losses[0], losses
