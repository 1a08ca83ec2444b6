"""Build and packaging for cdkernels.

One compiled module, ``cdkernels._C``, built by ninja from a ``build.ninja`` this script
writes (no torch.utils.cpp_extension):

* CPU part, always: ``csrc/bindings.cpp`` + ``csrc/cpu/*.cpp`` (g++, SIMD clones picked at
  run time, std::thread parallelism).
* CUDA part, whenever ``nvcc`` is found (PATH, ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``):
  ``csrc/cuda/*.cu`` (nvcc) + ``csrc/cuda/bind_cuda.cpp`` (g++, ``-DCDK_WITH_CUDA``), linked
  against the *static* CUDA runtime, so the module imports on machines without a GPU driver.

The module never includes torch headers and never links libtorch: it takes raw data pointers,
sizes and CUDA stream handles, so one build works with any torch version.

Environment:
  CDK_SKIP_CUDA=1    never build the CUDA part
  CDK_FORCE_CUDA=1   fail if the CUDA part cannot be built (nvcc or sources missing)
  CDK_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST
                     e.g. "8.0;9.0" or "8.0 9.0+PTX" (CDK_CUDA_ARCHS wins); default
                     "8.0;9.0+PTX" = sm_80, sm_90 and compute_90 PTX
  CUDA_HOME          the toolkit (default: derived from nvcc, else /usr/local/cuda)
  CXX                the host C++ compiler (default g++)
  MAX_JOBS           ninja parallelism (default: number of CPUs)
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from glob import glob

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _log(msg):
    print(f"cdkernels: {msg}", file=sys.stderr, flush=True)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# -- CUDA discovery -------------------------------------------------------------------------------
def _find_nvcc():
    cands = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_lib_dir(home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    return None


def _cuda_home(nvcc):
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc -> exec .../cuda-X/bin/nvcc):
    # ask nvcc where its toolkit is.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ _?TOP_?=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            cands.append(os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    cands.append("/usr/local/cuda")
    for h in cands:
        if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h")) and _cuda_lib_dir(h):
            return h
    return None


_ARCH_NAMES = {"maxwell": ["5.0", "5.2"], "pascal": ["6.0", "6.1"], "volta": ["7.0"],
               "turing": ["7.5"], "ampere": ["8.0", "8.6"], "ada": ["8.9"], "hopper": ["9.0"],
               "blackwell": ["10.0", "12.0"]}


def _cuda_archs():
    """[(sm, ptx)]: sm like '80' or '90a', ptx True when +PTX was asked for."""
    spec = os.environ.get("CDK_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    out = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        ptx = tok.upper().endswith("+PTX")
        base = tok[:-4] if ptx else tok
        names = _ARCH_NAMES.get(base.lower(), [base])
        for i, name in enumerate(names):
            name = name.lower().replace("sm_", "").replace("compute_", "")
            m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", name) or re.fullmatch(r"(\d+)(\d)([a-z]?)", name)
            if not m:
                raise SystemExit(f"cdkernels: cannot parse CUDA arch {tok!r} in {spec!r}")
            sm = f"{m.group(1)}{m.group(2)}{m.group(3)}"
            entry = (sm, ptx and i == len(names) - 1)
            if entry[0] not in [e[0] for e in out]:
                out.append(entry)
            elif entry[1]:
                out = [(s, p or s == sm) for s, p in out]
    if not out:
        raise SystemExit(f"cdkernels: no CUDA architectures in {spec!r}")
    return out


# -- build ------------------------------------------------------------------------------------------
def _q(path):
    """Quote a path for build.ninja (ninja escapes: $ space :) and the shell."""
    return shlex.quote(path).replace("$", "$$")


def _ninja_path(path):
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_cmd():
    exe = shutil.which("ninja")
    if exe:
        return [exe]
    try:
        import ninja  # the `ninja` PyPI package ships the binary
        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(exe):
            return [exe]
    except ImportError:
        pass
    raise SystemExit("cdkernels: ninja not found; `pip install ninja`")


class NinjaBuildExt(build_ext):
    """Builds the single extension `cdkernels._C` with a generated build.ninja."""

    def build_extension(self, ext):
        import pybind11

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        # A fixed build folder in the source tree (not self.build_temp, which pip's editable
        # installs put in a fresh temporary folder), so rebuilds are incremental. ninja reruns
        # every step whose command line changed, so switching configurations is safe.
        build_dir = os.path.join(ROOT, "build", f"ninja-{sysconfig.get_platform()}-"
                                 f"{sys.implementation.cache_tag}")
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)

        cxx = os.environ.get("CXX", "g++")
        py_inc = sysconfig.get_paths()["include"]
        cpu_srcs = [os.path.join(CSRC, "bindings.cpp")] + sorted(glob(os.path.join(CSRC, "cpu", "*.cpp")))

        # CUDA part?
        cu_srcs = sorted(glob(os.path.join(CSRC, "cuda", "*.cu")))
        bind_cuda = os.path.join(CSRC, "cuda", "bind_cuda.cpp")
        nvcc = home = libdir = None
        archs = []
        why_not = None
        if _env_flag("CDK_SKIP_CUDA"):
            why_not = "CDK_SKIP_CUDA=1"
        else:
            nvcc = _find_nvcc()
            if nvcc is None:
                why_not = "nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
            else:
                home = _cuda_home(nvcc)
                libdir = home and _cuda_lib_dir(home)
                if not home or not libdir:
                    why_not = f"nvcc at {nvcc} but no CUDA toolkit (cuda_runtime.h, libcudart_static.a)"
                elif not cu_srcs or not os.path.isfile(bind_cuda):
                    why_not = "no CUDA sources (csrc/cuda/*.cu and csrc/cuda/bind_cuda.cpp)"
                else:
                    archs = _cuda_archs()
        with_cuda = why_not is None
        if not with_cuda and _env_flag("CDK_FORCE_CUDA"):
            raise SystemExit(f"cdkernels: CDK_FORCE_CUDA=1 but the CUDA part cannot be built: {why_not}")

        arch_names = []
        gencode = []
        for sm, ptx in archs:
            code = f"sm_{sm}" + (f",compute_{sm}" if ptx else "")
            gencode.append(f"-gencode=arch=compute_{sm},code=[{code}]" if ptx
                           else f"-gencode=arch=compute_{sm},code=sm_{sm}")
            arch_names.append(f"sm_{sm}")
            if ptx:
                arch_names.append(f"compute_{sm}")

        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-math-errno",
                  "-fno-trapping-math", "-ffp-contract=off", "-Wall", "-Wno-unused-function",
                  "-I" + CSRC, "-I" + pybind11.get_include(), "-I" + py_inc]
        # only bindings.cpp and bind_cuda.cpp see the CUDA flags, so switching the CUDA part on
        # or off does not recompile the (slow) CPU kernels
        cuda_cflags = []
        if with_cuda:
            cuda_cflags = ["-DCDK_WITH_CUDA", "-I" + os.path.join(home, "include"),
                           "-DCDK_CUDA_ARCHS=\"" + ",".join(arch_names) + "\""]
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                      "-Xcompiler", "-fvisibility=hidden", "-I" + CSRC] + gencode
        if "CXX" in os.environ:
            nvcc_flags += ["-ccbin", cxx]
        ldflags = ["-shared", "-Wl,--exclude-libs,ALL", "-Wl,-z,noexecstack"]
        if with_cuda:
            ldflags += ["-L" + libdir, "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        else:
            ldflags += ["-lpthread"]

        def obj_of(src):
            rel = os.path.relpath(src, CSRC).replace(os.sep, "_")
            return os.path.join(build_dir, rel + ".o")

        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {shlex.quote(cxx)}",
            f"cflags = {' '.join(_q(f) for f in cflags)}",
            f"ldflags = {' '.join(_q(f) for f in ldflags)}",
            "",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags $extra -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
            "",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = LINK $out",
            "",
        ]
        if with_cuda:
            lines += [
                f"nvcc = {_q(nvcc)}",
                f"nvcc_flags = {' '.join(_q(f) for f in nvcc_flags)}",
                "",
                "rule nvcc",
                "  command = $nvcc --generate-dependencies-with-compile --dependency-output $out.d"
                " $nvcc_flags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $in",
                "",
            ]
        objs = []
        for src in cpu_srcs + ([bind_cuda] if with_cuda else []):
            o = obj_of(src)
            objs.append(o)
            lines.append(f"build {_ninja_path(o)}: cxx {_ninja_path(src)}")
            if src == cpu_srcs[0] or src == bind_cuda:
                lines.append(f"  extra = {' '.join(_q(f) for f in cuda_cflags)}")
        if with_cuda:
            for src in cu_srcs:
                o = obj_of(src)
                objs.append(o)
                lines.append(f"build {_ninja_path(o)}: nvcc {_ninja_path(src)}")
        lines.append(f"build {_ninja_path(out_path)}: link {' '.join(_ninja_path(o) for o in objs)}")
        lines.append(f"default {_ninja_path(out_path)}")
        ninja_file = os.path.join(build_dir, "build.ninja")
        text = "\n".join(lines) + "\n"
        # rewrite only on change, so an unchanged configuration is a no-op build
        if not os.path.isfile(ninja_file) or open(ninja_file).read() != text:
            with open(ninja_file, "w") as fh:
                fh.write(text)

        if with_cuda:
            _log(f"building with the CUDA part for {', '.join(arch_names)} (nvcc {nvcc}, CUDA {home})")
        else:
            _log(f"building the CPU part only; CUDA part not built: {why_not}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
        cmd = _ninja_cmd() + ["-C", build_dir, "-f", "build.ninja", "-j", jobs]
        if _env_flag("CDK_VERBOSE_BUILD"):
            cmd.append("-v")
        subprocess.run(cmd, check=True)
        _log(f"built {out_path} (CUDA: {'yes, ' + ', '.join(arch_names) if with_cuda else 'no'})")


setup(
    name="cdkernels",
    version="0.1.0",
    description="Fused convection-diffusion ops with in-kernel Philox Gaussian noise "
                "(CPU, CUDA and Triton backends)",
    packages=find_packages(include=["cdkernels", "cdkernels.*"]),
    python_requires=">=3.9",
    # torch is deliberately NOT listed: install the torch build you want (CPU or a CUDA
    # variant) yourself first. Listing it would let pip pull a multi-GB CUDA torch wheel, or
    # replace the one you have. The compiled module does not link libtorch, so any torch works.
    install_requires=["numpy", "tqdm"],
    ext_modules=[Extension("cdkernels._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
    entry_points={"console_scripts": ["cdk-train=cdkernels.train:main"]},
    zip_safe=False,
)
