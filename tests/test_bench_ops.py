"""bench/bench_ops.py runs (tiny shapes) and its targets table reads the rows it measured."""
import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("bench_ops", os.path.join(ROOT, "bench",
                                                                            "bench_ops.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_bench_ops_smoke(capsys):
    b = _load()
    assert b.main(["--step-shape", "2x4x8x8", "--smooth-shape", "2x4x8x8", "--ensemble",
                   "2x4x10", "--repeats", "2", "--budget", "0.001", "--no-compile",
                   "--no-host", "--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cdkernels[cpu]" in out and "# targets" in out
    for op in ("cd_step fwd ", "cd_step fwd+bwd", "cd_smooth K=8", "ensemble_mean prob K=2",
               "ensemble_mean logprob K=2", "ensemble_mean logit K=2"):
        assert op in out, op


def test_target_keys_match_row_names():
    b = _load()
    rows = [dict(op="cd_step fwd", shape="4x16x64x64", dtype="float32",
                 impl="cdkernels[cpu]", vs_eager=3.5),
            dict(op="ensemble_mean prob K=8", shape="512x100", dtype="float32",
                 impl="cdkernels[cpu]", vs_eager=1.2)]
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        b.target_table(rows, [])
    text = buf.getvalue()
    assert "cd_step fwd 4x16x64x64" in text and "3.50" in text and " met" in text
    assert "ensemble_mean prob K=8 512x100" in text and "NOT met" in text


def test_forward_backward_rows_do_not_accumulate_grads():
    """measure_group calls an impl many times; the fwd+bwd impls clear .grad each call."""
    b = _load()
    x = torch.randn(8, requires_grad=True)
    seen = []

    def fb():
        x.grad = None
        (x * 2).sum().backward()
        seen.append(float(x.grad[0]))
    b.measure_group({"eager": fb}, torch.device("cpu"), 2, 0.001, 32)
    assert set(seen) == {2.0}


def test_bench_train_noise_cost_and_epochs_smoke(capsys, tmp_path):
    """bench/bench_train.py: the noise-cost table (one tiny size) and the end-to-end epochs mode
    with noise variants and bf16 autocast, on the embedded digits data."""
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "bench",
                                                                              "bench_train.py"))
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    assert bt.main(["--noise-cost", "--noise-sizes", "8", "--noise-variants", "off,em,std",
                    "--repeats", "1", "--iters", "1", "--warmup", "1", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    for v in ("off", "em", "std"):
        assert f" {v} " in out, v
    assert "cost" in out
    res = tmp_path / "epochs.json"
    assert bt.main(["--variants", "none", "--epochs", "1", "--data", "digits", "--batch", "64",
                    "--dtype", "bf16", "--epoch-variants", "off,em", "--out", str(res)]) == 0
    out = capsys.readouterr().out
    assert "noise cost" in out and "val acc" in out
    import json
    rows = json.loads(res.read_text())
    assert [r["variant"] for r in rows] == ["off", "em"]
    assert all(r["images_per_s"] > 0 and 0.0 <= r["val_acc"] <= 1.0 for r in rows)


def test_bench_train_noise_floor_smoke(tmp_path):
    """bench/bench_train.py --noise-floor: one row per noise variant and size, every block's
    update timed (the hook saw the network's nine blocks), numbers finite and the off step
    positive."""
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "bench",
                                                                              "bench_train.py"))
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    res = tmp_path / "floor.json"
    assert bt.main(["--noise-floor", "--noise-sizes", "8", "--noise-variants",
                    "off,em,em-learn-channel", "--repeats", "1", "--iters", "1", "--warmup", "1",
                    "--batch", "4", "--out", str(res)]) == 0
    import json
    import math
    rows = json.loads(res.read_text())
    assert [r["variant"] for r in rows] == ["em", "em-learn-channel"]
    assert all(r["blocks"] == 9 for r in rows)  # CD-PreActResNet-20: 3 stages x 3 blocks
    assert all(r["off_step_ms"] > 0 and math.isfinite(r["floor_pct"]) for r in rows)
