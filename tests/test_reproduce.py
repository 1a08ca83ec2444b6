"""bench/reproduce.py --quick: the robustness protocol end to end on digits, and its cache."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(work, md, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--quick", "--arms",
           "none,std0.1", "--eps", "0.05,0.1", "--work", work, "--md", md, "--threads", "1",
           *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep
                            + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_quick_protocol_and_cache(tmp_path):
    work, md = str(tmp_path / "work"), str(tmp_path / "results.md")
    out = _run(work, md)
    assert "[0/4 done" in out and "now: train none seed 0" in out  # progress lines
    text = open(md).read()
    assert "<!-- reproduce:quick:begin -->" in text and "<!-- reproduce:quick:end -->" in text
    for needle in ("Natural accuracy and dose", "PGD-3 robust accuracy", "FGSM robust",
                   "Paired difference to noise none", "Attack checks", "std coef 0.1",
                   "Changed from the `quick` protocol"):
        assert needle in text, needle
    res = json.load(open(os.path.join(work, "results.json")))
    ev = res["evals"]["std0.1_s0"]
    assert len(ev["natural"]["natural_ok"]) == 40 and set(ev["pgd"]) == {"0.05", "0.1"}
    assert "frozen" in ev and "conv" in ev and "cross" in ev
    assert res["summaries"]["std0.1_s0"]["noise_to_signal_mean"] > 0
    # a second run reuses every unit; a deleted evaluation is the only thing redone
    evfile = [f for f in os.listdir(os.path.join(work, "none_s0")) if f.startswith("eval_")]
    os.remove(os.path.join(work, "none_s0", evfile[0]))
    out = _run(work, md)
    assert out.count("cached:") == 3 and "now: eval none seed 0" in out
    assert "now: train" not in out
    # one arm without the noise-free one (how parallel processes split the arms) still makes
    # its table, without the paired columns
    out = _run(work, md, "--arms", "std0.1")
    assert "now: train" not in out and "now: eval" not in out
    assert "std coef 0.1" in open(md).read()


def test_records_carry_a_run_to_another_machine(tmp_path):
    """--records keeps finished units (no weights); a fresh work folder (another machine) reuses
    them, and different settings are not mistaken for them."""
    rec, md = str(tmp_path / "records"), str(tmp_path / "results.md")
    _run(str(tmp_path / "w1"), md, "--arms", "none", "--records", rec)
    files = sorted(os.listdir(os.path.join(rec, "none_s0")))
    assert files[0].startswith("eval_") and files[1:] == ["summary.json", "train_key.json"]
    assert not any(f.endswith(".pt") for f in files)
    before = open(md).read()
    out = _run(str(tmp_path / "w2"), md, "--arms", "none", "--records", rec)
    assert "now:" not in out and out.count("cached:") == 2
    assert not os.path.exists(os.path.join(tmp_path, "w2", "none_s0", "best.pt"))
    assert open(md).read().split("<!-- reproduce:quick:begin -->")[1].split("\n\n", 1)[1] \
        == before.split("<!-- reproduce:quick:begin -->")[1].split("\n\n", 1)[1]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--quick", "--arms",
           "none", "--work", str(tmp_path / "w3"), "--md", md, "--records", rec, "--lr", "0.04"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "trained with other settings" in r.stderr
    assert sorted(os.listdir(os.path.join(rec, "none_s0"))) == files  # untouched


def test_seed_list_outside_the_protocol_is_refused(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--quick",
           "--seed-list", "0,3", "--work", str(tmp_path / "w"), "--md", str(tmp_path / "r.md")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--seed-list [3] outside range(1)" in r.stderr
    assert not os.path.exists(tmp_path / "w" / "none_s0")
