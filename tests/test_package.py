"""Packaging contract: one version, declared metadata and entry points, the info CLI, the CUDA
capability check (with a faked GPU), the build's arch keywords (with faked nvcc / nvidia-smi)
and the timm-style model registry. The wheel itself is built and installed by
scripts/wheel_smoke.sh (run by .ci/run)."""
import ast
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import cdkernels
from cdkernels import backends as B
from cdkernels import models
from cdkernels.backends import cuda as cuda_mod
from cdkernels.backends.cuda import CudaBackend, kernel_image_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300, **kw)


# -- metadata ------------------------------------------------------------------------------------

def _pyproject():
    """pyproject.toml as setuptools reads it (schema-validated, dynamic fields expanded), in a
    process where torch cannot be imported: an isolated build has no torch, so the version must
    come from the source text, not from importing cdkernels."""
    r = _run(["-c", textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None
        from setuptools.config.pyprojecttoml import read_configuration
        cfg = read_configuration("pyproject.toml", expand=True)
        print(json.dumps(cfg["project"]))
    """)])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def project():
    return _pyproject()


def test_version_single_source(project):
    assert project["version"] == cdkernels.__version__
    assert project["name"] == "cdkernels"
    assert "version" in project["dynamic"]
    # the literal is defined once, in cdkernels/__init__.py
    hits = []
    for dirpath, _, files in os.walk(ROOT):
        if any(part in dirpath for part in ("/build", "/.git", "/runs", "egg-info")):
            continue
        for f in files:
            if f.endswith((".py", ".toml", ".cfg")):
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                if f'"{cdkernels.__version__}"' in text and "version" in text:
                    hits.append(os.path.relpath(os.path.join(dirpath, f), ROOT))
    assert hits == [os.path.join("cdkernels", "__init__.py")], hits


def test_dependencies_and_extras(project):
    deps = project["dependencies"]
    assert "torch>=2.4" in deps and "numpy" in deps and "tqdm" in deps
    extras = project["optional-dependencies"]
    assert {"train", "triton", "test", "attacks"} <= set(extras)
    assert {"scikit-learn", "matplotlib"} <= set(extras["train"])
    assert any(d.startswith("torchattacks") for d in extras["attacks"])
    # no extra may pull its own torch: the user's build (CPU or CUDA) is the one to keep
    for name, reqs in extras.items():
        assert not any(r.split(";")[0].strip().startswith("torch") and "torchattacks" not in r
                       for r in reqs), (name, reqs)


def test_license_and_readme(project):
    assert project["license"] == "BSD-3-Clause"
    assert open(os.path.join(ROOT, "LICENSE")).readline().strip() == "BSD 3-Clause License"
    assert project["readme"] == "README.md"
    assert project["requires-python"] == ">=3.9"


def test_entry_points_resolve(project):
    scripts = project["scripts"]
    assert scripts["cdk-train"] == "cdkernels.train:main"
    assert scripts["cdk-attack"] == "cdkernels.attack:main"
    for target in scripts.values():
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), target


def test_setup_py_is_build_only():
    """setup.py builds the extension; metadata lives in pyproject.toml only, and it never
    imports torch (isolated builds have none)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1
    kws = {k.arg for k in calls[0].keywords}
    assert not kws & {"name", "version", "install_requires", "entry_points", "packages",
                      "python_requires", "description"}, kws


# -- info CLI ------------------------------------------------------------------------------------

def test_info_cli_json_and_text():
    r = _run(["-m", "cdkernels.info", "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cdkernels"] == cdkernels.__version__
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert info["backends"]["reference"]["available"] is True
    for st in info["backends"].values():
        assert st["reason"], st
    build = info["build_info"]
    if "cpu" in os.environ.get("CDK_REQUIRE_BACKENDS", ""):
        assert "error" not in build, build
    if "error" not in build:
        assert info["simd_level"] in build["simd_levels"]
        assert info["cuda_archs"] == build["cuda_archs"]
    r = _run(["-m", "cdkernels.info"])
    assert r.returncode == 0, r.stderr
    for word in ("cdkernels " + cdkernels.__version__, "torch", "CUDA archs", "SIMD level",
                 "backends:", "reference", "cpu", "cuda", "triton"):
        assert word in r.stdout, (word, r.stdout)


def test_info_cli_version():
    r = _run(["-m", "cdkernels.info", "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"cdkernels {cdkernels.__version__} (torch {torch.__version__}")


# -- CUDA capability check -----------------------------------------------------------------------

@pytest.mark.parametrize("archs,cap,ok", [
    (["sm_80", "sm_90", "compute_90"], (8, 0), True),
    (["sm_80", "sm_90", "compute_90"], (8, 6), True),     # A10 / RTX 30: sm_80 SASS
    (["sm_80", "sm_90", "compute_90"], (8, 9), True),     # L4 / RTX 40
    (["sm_80", "sm_90", "compute_90"], (12, 0), True),    # RTX 50: compute_90 PTX JIT
    (["sm_80", "sm_90", "compute_90"], (7, 5), False),    # T4
    (["sm_80", "sm_90", "compute_90"], (7, 0), False),    # V100
    (["sm_80", "sm_90"], (10, 0), False),                 # no PTX: no newer major
    (["sm_86"], (8, 0), False),                           # SASS never runs on a lower minor
    (["compute_75"], (8, 6), True),
    (["compute_86"], (8, 0), False),
    (["sm_90a"], (9, 0), True),
    (["sm_90a", "compute_90a"], (10, 0), False),          # arch-specific: that GPU only
    (["sm_100f"], (10, 3), True),                         # family-specific
    (["sm_100f"], (12, 0), False),
    ([], (8, 0), False),
])
def test_kernel_image_for(archs, cap, ok):
    assert kernel_image_for(archs, cap) is ok


class _FakeC:
    """cdkernels._C as a CUDA build would look on a machine with a GPU."""
    with_cuda = True

    def __init__(self, archs=("sm_80", "sm_90", "compute_90"), devices=1, error=(0, ""),
                 runtime=13000, driver=13000):
        self.archs, self.devices, self.error = list(archs), devices, error
        self.runtime, self.driver = runtime, driver

    def build_info(self):
        return {"with_cuda": True, "cuda_archs": self.archs}

    def cuda_device_count(self):
        return self.devices

    def cuda_device_error(self):
        return self.error

    def cuda_runtime_version(self):
        return self.runtime

    def cuda_driver_version(self):
        return self.driver


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report one CUDA GPU of a chosen capability, with a fresh backend registry."""
    state = {"cap": (8, 0), "name": "Fake GPU", "fake_c": _FakeC()}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: state["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: state["name"])
    monkeypatch.setattr(cuda_mod, "_load_ext", lambda: (state["fake_c"], ""))
    monkeypatch.setattr(B, "_instances", {})
    monkeypatch.setattr(B, "_warned", set())
    monkeypatch.setattr(B, "_cache", {})  # get_backend's per-(device, dtype) lookup cache
    return state


def test_unsupported_gpu_is_unavailable_with_reason(fake_gpu):
    fake_gpu.update(cap=(7, 5), name="Tesla T4")
    ok, why = CudaBackend().availability()
    assert not ok
    assert "no kernel image" in why and "Tesla T4" in why and "7.5" in why
    assert "sm_80" in why and "CDK_CUDA_ARCHS" in why


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (9, 0), (12, 0)])
def test_supported_gpu_is_available(fake_gpu, cap):
    fake_gpu["cap"] = cap
    ok, why = CudaBackend().availability()
    assert ok, why
    assert B.get_backend(torch.device("cuda"), torch.float32).name == "cuda"


def test_unsupported_gpu_auto_falls_back_and_explicit_raises(fake_gpu):
    fake_gpu.update(cap=(7, 0), name="Tesla V100")
    with pytest.warns(RuntimeWarning, match="'cuda' unavailable .*no kernel image.*7\\.0"):
        inst = B.get_backend(torch.device("cuda"), torch.float32)
    assert inst.name in ("triton", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once
        assert B.get_backend(torch.device("cuda"), torch.float32).name == inst.name
    with pytest.raises(RuntimeError, match="'cuda' was requested but is unavailable: no "
                                           "kernel image for cuda:0 Tesla V100"):
        B.get_backend(torch.device("cuda"), torch.float32, backend="cuda")
    assert not cdkernels.backends()["cuda"]["available"]


def test_old_driver_gets_a_readable_reason(fake_gpu):
    fake_gpu["fake_c"] = _FakeC(devices=0, driver=12040, error=(
        35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA "
            "runtime version"))
    ok, why = CudaBackend().availability()
    assert not ok
    assert "driver is too old" in why and "13.0" in why and "12.4" in why
    assert "cudaErrorInsufficientDriver" in why


def test_missing_driver_is_not_called_old(fake_gpu):
    # the CUDA runtime answers cudaErrorInsufficientDriver also when libcuda.so is absent
    fake_gpu["fake_c"] = _FakeC(devices=0, driver=0, error=(
        35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient"))
    ok, why = CudaBackend().availability()
    assert not ok and "no NVIDIA driver" in why and "too old" not in why


def test_no_device_reason_names_the_runtime_error(fake_gpu):
    fake_gpu["fake_c"] = _FakeC(devices=0, error=(100, "cudaErrorNoDevice: no CUDA-capable "
                                                       "device is detected"))
    ok, why = CudaBackend().availability()
    assert not ok and "cudaErrorNoDevice" in why and "driver is too old" not in why


def test_real_module_reports_its_device_error():
    """The compiled module's own query: on a machine without a usable GPU it names the
    cudaError; with one it returns (0, '')."""
    ext, why = cuda_mod._load_ext()
    if ext is None:
        pytest.skip(f"no CUDA part in this build: {why}")
    code, what = ext.cuda_device_error()
    assert (code == 0) == (ext.cuda_device_count() > 0)
    assert (what == "") == (code == 0)
    if code:
        assert what.startswith("cudaError"), what
        ok, reason = CudaBackend().availability()
        assert not ok


# -- build: CDK_CUDA_ARCHS=native / all ----------------------------------------------------------

@pytest.fixture
def setup_mod(monkeypatch):
    spec = importlib.util.spec_from_file_location("cdk_setup_under_test",
                                                  os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": defines the helpers, builds nothing
    outputs = {}

    def query(cmd):
        key = os.path.basename(cmd[0]) + " " + cmd[1]
        if key not in outputs:
            raise AssertionError(f"unexpected query {cmd}")
        out = outputs[key]
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(mod, "_query", query)
    monkeypatch.setattr(mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    mod.outputs = outputs
    return mod


NVCC_13 = ("sm_75\nsm_80\nsm_86\nsm_87\nsm_88\nsm_89\nsm_90\nsm_100\nsm_110\nsm_103\nsm_120\n"
           "sm_121\n", "compute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_88\ncompute_89\n"
           "compute_90\ncompute_100\ncompute_110\ncompute_103\ncompute_120\ncompute_121\n")
NVCC_12 = ("sm_50\nsm_52\nsm_53\nsm_60\nsm_61\nsm_62\nsm_70\nsm_72\nsm_75\nsm_80\nsm_86\nsm_87\n"
           "sm_89\nsm_90\n", "compute_50\ncompute_52\ncompute_53\ncompute_60\ncompute_61\n"
           "compute_62\ncompute_70\ncompute_72\ncompute_75\ncompute_80\ncompute_86\ncompute_87\n"
           "compute_89\ncompute_90\n")


def _nvcc(mod, lists):
    mod.outputs["nvcc --list-gpu-code"], mod.outputs["nvcc --list-gpu-arch"] = lists


def test_arch_all(setup_mod):
    _nvcc(setup_mod, NVCC_12)
    archs = setup_mod._cuda_archs("all", nvcc="/cuda/bin/nvcc")
    assert [sm for sm, _ in archs] == ["70", "72", "75", "80", "86", "87", "89", "90"]
    assert [sm for sm, ptx in archs if ptx] == ["90"]  # PTX of the newest only
    _nvcc(setup_mod, NVCC_13)
    archs = setup_mod._cuda_archs("ALL", nvcc="/cuda/bin/nvcc")
    assert archs[0] == ("75", False) and archs[-1] == ("121", True)
    assert [sm for sm, _ in archs].index("103") < [sm for sm, _ in archs].index("110")


def test_arch_native(setup_mod):
    _nvcc(setup_mod, NVCC_13)
    setup_mod.outputs["nvidia-smi --query-gpu=compute_cap"] = "9.0\n8.6\n9.0\n"
    assert setup_mod._cuda_archs("native", nvcc="nvcc") == [("86", False), ("90", False)]


def test_arch_native_errors(setup_mod, monkeypatch):
    _nvcc(setup_mod, NVCC_12)
    setup_mod.outputs["nvidia-smi --query-gpu=compute_cap"] = "12.0\n"
    with pytest.raises(SystemExit, match="capability 12.0, which .*cannot compile for"):
        setup_mod._cuda_archs("native", nvcc="nvcc")
    _nvcc(setup_mod, NVCC_13)
    setup_mod.outputs["nvidia-smi --query-gpu=compute_cap"] = "6.1\n"
    with pytest.raises(SystemExit, match="capability 6.1, older than .*older CUDA toolkit"):
        setup_mod._cuda_archs("native", nvcc="nvcc")
    setup_mod.outputs["nvidia-smi --query-gpu=compute_cap"] = "\n"
    with pytest.raises(SystemExit, match="nvidia-smi lists no GPU"):
        setup_mod._cuda_archs("native", nvcc="nvcc")
    setup_mod.outputs["nvidia-smi --query-gpu=compute_cap"] = "[N/A]\n"
    with pytest.raises(SystemExit, match="cannot read the compute capability"):
        setup_mod._cuda_archs("native", nvcc="nvcc")
    setup_mod.outputs["nvidia-smi --query-gpu=compute_cap"] = SystemExit("nvidia-smi failed")
    with pytest.raises(SystemExit, match="nvidia-smi failed"):
        setup_mod._cuda_archs("native", nvcc="nvcc")
    monkeypatch.setattr(setup_mod.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="needs nvidia-smi"):
        setup_mod._cuda_archs("native", nvcc="nvcc")
    with pytest.raises(SystemExit, match="must be the whole CUDA arch list"):
        setup_mod._cuda_archs("native;8.0", nvcc="nvcc")


def test_arch_lists(setup_mod):
    assert setup_mod._cuda_archs("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert setup_mod._cuda_archs("sm_86 ampere") == [("86", False), ("80", False)]
    with pytest.raises(SystemExit, match="cannot parse"):
        setup_mod._cuda_archs("turbo")


def test_real_nvcc_arch_query():
    """The real nvcc, where there is one, answers the queries `all` relies on."""
    import shutil
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    spec = importlib.util.spec_from_file_location("cdk_setup_real", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real, virtual = mod._nvcc_archs(nvcc)
    assert real and virtual and all(s.isdigit() for s in real)
    archs = mod._cuda_archs("all", nvcc=nvcc)
    assert archs[-1][1] and all(mod._sm_key(sm) >= (7, 0) for sm, _ in archs)


def test_read_only_tree_builds_out_of_tree(setup_mod, tmp_path, monkeypatch):
    """A source tree that cannot be written: ninja objects go under build_temp, setuptools'
    build/ and egg-info under a temporary folder (the wheel smoke test builds one for real)."""
    assert setup_mod._writable(str(tmp_path / "a" / "b"))
    monkeypatch.setattr(setup_mod, "_writable", lambda path: False)
    from setuptools.dist import Distribution
    cmd = setup_mod.NinjaBuildExt(Distribution())
    cmd.build_temp = str(tmp_path / "temp")
    d = cmd._ninja_dir()
    assert d.startswith(str(tmp_path / "temp")) and os.path.isdir(d)
    assert not d.startswith(ROOT)
    opts = setup_mod._out_of_tree_options()
    base = opts["egg_info"]["egg_base"]
    assert not base.startswith(ROOT) and opts["build"]["build_base"].startswith(base)
    monkeypatch.undo()
    assert setup_mod._out_of_tree_options() == {}  # this checkout is writable


# -- model registry ------------------------------------------------------------------------------

def test_list_models():
    names = models.list_models()
    assert names == sorted(names) and "cd_preact_resnet20" in names and "cd_wrn16_4" in names
    assert models.list_models("enresnet*") == [n for n in names if n.startswith("enresnet")]
    assert models.list_models("CD_WRN16_*") == ["cd_wrn16_4", "cd_wrn16_8"]
    assert models.list_models(["cd_preact_resnet20", "enresnet20"]) == [
        "cd_preact_resnet20", "enresnet20"]
    assert models.list_models("nothing*") == []
    with pytest.raises(TypeError, match="pattern"):
        models.list_models(3)


def test_create_model_in_chans():
    m = models.create_model("cd_preact_resnet", depth=8, width=4, in_chans=1, num_classes=7)
    assert m.stem.in_channels == 1 and m.fc.out_features == 7
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    m = models.create_model("cd_preact_resnet", depth=8, width=4, in_channels=2)
    assert m.stem.in_channels == 2
    assert models.create_model("enresnet20", width=4, in_chans=1, members=2).members[0] \
        .stem.in_channels == 1
    with pytest.raises(TypeError, match="disagree"):
        models.create_model("cd_preact_resnet20", in_chans=1, in_channels=3)
    with pytest.raises(ValueError, match="valid models: .*cd_preact_resnet20"):
        models.create_model("resnet50")
    with pytest.raises(ValueError, match="no pretrained weights"):
        models.create_model("cd_preact_resnet20", pretrained=True)


def test_old_names_still_work():
    with pytest.warns(DeprecationWarning, match="list_models"):
        assert models.list() == models.list_models()
    assert isinstance(models.create("cd_preact_resnet", depth=8, width=4, in_chans=1),
                      torch.nn.Module)


# -- install scripts and CI ------------------------------------------------------------------------

def test_ci_builds_and_smoke_tests_the_wheel():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "bash scripts/install.sh" in ci and "bash scripts/wheel_smoke.sh" in ci
    assert ci.index("wheel_smoke.sh") > ci.index("install.sh")
    smoke = open(os.path.join(ROOT, "scripts", "wheel_smoke.sh")).read()
    for needle in ("-m venv", "pip wheel", "cdkernels.info", "cdk-train", "cdk-attack",
                   "metrics.jsonl", "curves.png", "mount -o remount,ro", "chmod -R a-w"):
        assert needle in smoke, needle
    # the venv gets the built wheel, never the source tree (no editable install there)
    installs = [line for line in smoke.split("# -- 3.")[1].splitlines() if "pip install" in line]
    assert installs and not any(" -e " in line or "--editable" in line for line in installs)


def test_install_script_takes_dependencies_from_the_metadata():
    sh = open(os.path.join(ROOT, "scripts", "install.sh")).read()
    assert '-e ".[train,test]"' in sh
    assert "torch==2.13.0" in sh  # this machine's CPU build; README says why
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "torch==2.13.0" in readme and "download.pytorch.org/whl/cpu" in readme
    assert "list_models" in readme and "create_model" in readme
    manifest = open(os.path.join(ROOT, "MANIFEST.in")).read()
    assert "LICENSE" in manifest


_HEAP_PROBE = """
import resource, sys, torch, cdkernels
print(cdkernels.steady_heap() if sys.argv[1] == "steady" else "defaults")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 10 << 20  # 40 MiB of float32: above glibc's largest dynamic mmap threshold (32 MiB)
for _ in range(20):  # (the steady heap grows for a few rounds before a freed block fits again)
    torch.empty(n).fill_(1.0)
f0 = faults()
for _ in range(5):
    torch.empty(n).fill_(1.0)
print((faults() - f0) / 5)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="steady_heap tunes glibc's malloc (elsewhere it returns False)")
def test_steady_heap_stops_the_page_faults_of_a_reused_allocation():
    """With glibc's defaults a freed 40 MiB tensor is unmapped and the next one faults in all of
    its 10K pages again; after cdkernels.steady_heap() the same pages are reused (a subprocess:
    the setting is process-wide)."""
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], float(out[1])
    took, steady = probe("steady")
    assert took == "True"
    _, default = probe("defaults")
    assert default > 5000, default  # every 40 MiB allocation faulted in afresh
    assert steady < 100, steady


def test_steady_heap_rejects_bad_sizes():
    for bad in (0, -1, 2 ** 31, 1.5, True, "1"):
        with pytest.raises(ValueError, match="must be an int"):
            cdkernels.steady_heap(trim_bytes=bad)
        with pytest.raises(ValueError, match="must be an int"):
            cdkernels.steady_heap(mmap_bytes=bad)
