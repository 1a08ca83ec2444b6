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
                     "8.0;9.0+PTX" = sm_80, sm_90 and compute_90 PTX. Or one keyword:
                     "native" = the GPUs nvidia-smi lists here; "all" = every arch >= 7.0
                     this nvcc knows, plus PTX of the newest
  CUDA_HOME          the toolkit (default: derived from nvcc, else /usr/local/cuda)
  CXX                the host C++ compiler (default g++)
  MAX_JOBS           ninja parallelism (default: number of CPUs)

Objects live in build/ninja-PLATFORM-TAG/ of the source tree (incremental across editable and
wheel builds), or under setuptools' build_temp when the tree is read-only. The package's
metadata is in pyproject.toml; setup.py never imports torch, so isolated builds work.
"""
import atexit
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from glob import glob

from setuptools import Extension, setup
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
_DEFAULT_ARCHS = "8.0;9.0+PTX"
# Oldest architecture `CDK_CUDA_ARCHS=all` builds for. The kernels themselves need little (warp
# *_sync shuffles, float atomicAdd, bf16/fp16 conversions that cuda_bf16.h emulates before
# sm_80); 7.0 (Volta) is the oldest GPU current CUDA toolkits and torch's CUDA wheels still
# target, and every arch added to `all` costs a full device compile of every kernel.
_MIN_ALL_ARCH = (7, 0)


def _query(cmd):
    """stdout of a short query command; raises SystemExit with the command's words on failure.
    (A function of its own so tests can fake nvcc / nvidia-smi output.)"""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise SystemExit(f"cdkernels: `{' '.join(cmd)}` failed: {e}") from None
    if r.returncode != 0:
        raise SystemExit(f"cdkernels: `{' '.join(cmd)}` exited with {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()[:500]}")
    return r.stdout


def _sm_key(sm):
    """'90' -> (9, 0), '120' -> (12, 0), '90a' -> (9, 0): the last digit is the minor."""
    digits = re.match(r"\d+", sm).group(0)
    return int(digits[:-1]), int(digits[-1])


def _nvcc_archs(nvcc):
    """(real archs, virtual archs) this nvcc can target, plain ones only (no arch- or
    family-specific 'a'/'f' variants), e.g. (['75', '80', ...], ['75', '80', ...])."""
    def listed(flag, prefix):
        text = _query([nvcc, flag])
        found = re.findall(rf"\b{prefix}_(\d+)\b", text)
        if not found:
            raise SystemExit(f"cdkernels: `{nvcc} {flag}` listed no architectures:\n{text[:500]}")
        return sorted(set(found), key=lambda s: _sm_key(s))
    return listed("--list-gpu-code", "sm"), listed("--list-gpu-arch", "compute")


def _visible_gpu_archs():
    """Compute capabilities of this machine's GPUs as sm strings ('86', '90'), via nvidia-smi
    (the build must not need torch or a CUDA context)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise SystemExit("cdkernels: CDK_CUDA_ARCHS=native needs nvidia-smi to find this "
                         "machine's GPUs, and it is not on PATH; name the archs instead, e.g. "
                         "CDK_CUDA_ARCHS='8.6' (see `nvidia-smi --query-gpu=compute_cap`)")
    text = _query([exe, "--query-gpu=compute_cap", "--format=csv,noheader"])
    caps = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)", line)
        if not m:
            raise SystemExit(f"cdkernels: CDK_CUDA_ARCHS=native: cannot read the compute "
                             f"capability {line!r} from nvidia-smi (driver too old?)")
        sm = f"{m.group(1)}{m.group(2)}"
        if sm not in caps:
            caps.append(sm)
    if not caps:
        raise SystemExit("cdkernels: CDK_CUDA_ARCHS=native but nvidia-smi lists no GPU; name "
                         "the archs instead, e.g. CDK_CUDA_ARCHS='8.0;9.0+PTX'")
    return sorted(caps, key=_sm_key)


def _cuda_archs(spec=None, nvcc=None):
    """[(sm, ptx)]: sm like '80' or '90a', ptx True when +PTX was asked for.

    ``spec`` (default: $CDK_CUDA_ARCHS, else $TORCH_CUDA_ARCH_LIST, else 8.0;9.0+PTX) is a list
    like "8.0;9.0+PTX", "sm_86 90", "ampere", or one of the keywords
      native  the GPUs of this machine (nvidia-smi), as real code only;
      all     every plain arch this nvcc can compile from 7.0 on, plus PTX of the newest so
              GPUs newer than the toolkit still run (JIT).
    """
    if spec is None:
        spec = (os.environ.get("CDK_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
                or _DEFAULT_ARCHS)
    keyword = spec.strip().lower()
    if keyword in ("native", "all"):
        if nvcc is None:
            raise SystemExit(f"cdkernels: CUDA arch list {spec!r} needs nvcc")
        real, virtual = _nvcc_archs(nvcc)
        if keyword == "native":
            out = []
            for sm in _visible_gpu_archs():
                if sm not in real and _sm_key(sm) < _sm_key(real[0]):
                    raise SystemExit(
                        f"cdkernels: CDK_CUDA_ARCHS=native: this machine has a GPU of compute "
                        f"capability {_sm_key(sm)[0]}.{_sm_key(sm)[1]}, older than anything "
                        f"{nvcc} compiles for (sm_{real[0]} and newer); build with an older "
                        f"CUDA toolkit")
                if sm not in real:
                    raise SystemExit(
                        f"cdkernels: CDK_CUDA_ARCHS=native: this machine has a GPU of compute "
                        f"capability {_sm_key(sm)[0]}.{_sm_key(sm)[1]}, which {nvcc} cannot "
                        f"compile for (it knows sm_{', sm_'.join(real)}); install a newer CUDA "
                        f"toolkit, or build PTX the driver can JIT, e.g. "
                        f"CDK_CUDA_ARCHS='{_sm_key(real[-1])[0]}.{_sm_key(real[-1])[1]}+PTX'")
                out.append((sm, False))
            return out
        chosen = [sm for sm in real if _sm_key(sm) >= _MIN_ALL_ARCH]
        if not chosen:
            raise SystemExit(f"cdkernels: CDK_CUDA_ARCHS=all: {nvcc} supports no arch >= "
                             f"{_MIN_ALL_ARCH[0]}.{_MIN_ALL_ARCH[1]} (it knows sm_"
                             f"{', sm_'.join(real)})")
        newest = chosen[-1]
        return [(sm, sm == newest and sm in virtual) for sm in chosen]
    out = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        if tok.lower() in ("native", "all"):
            raise SystemExit(f"cdkernels: {tok!r} must be the whole CUDA arch list, not part "
                             f"of {spec!r}")
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


def _writable(path):
    """Whether files can be created in ``path`` (os.access alone is wrong for root on a
    read-only mount, so try it)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".cdk-probe-")
        probe.close()
        return True
    except OSError:
        return False


class NinjaBuildExt(build_ext):
    """Builds the single extension `cdkernels._C` with a generated build.ninja."""

    def _ninja_dir(self):
        """Where ninja keeps objects: a fixed folder in the source tree when it is writable
        (not self.build_temp, which pip's editable installs put in a fresh temporary folder),
        so rebuilds, and a wheel build after an editable one, are incremental: ninja reruns only
        steps whose command line or inputs changed, so switching configurations is safe. A
        read-only source tree (a package manager's unpacked sources, a mounted checkout) builds
        under build_temp instead."""
        tag = f"ninja-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        in_tree = os.path.join(ROOT, "build", tag)
        if _writable(in_tree):
            return in_tree
        fallback = os.path.join(os.path.abspath(self.build_temp), tag)
        _log(f"{ROOT} is not writable; ninja builds in {fallback}")
        os.makedirs(fallback, exist_ok=True)
        return fallback

    def build_extension(self, ext):
        import pybind11

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = self._ninja_dir()
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
                    archs = _cuda_archs(nvcc=nvcc)
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
        # Link inside the build folder and copy out afterwards: build.ninja then does not depend
        # on where the module goes (in place for -e, build/lib... for a wheel), so a wheel build
        # after an editable one (or the reverse) finds every step up to date.
        linked = os.path.join(build_dir, os.path.basename(out_path))
        lines.append(f"build {_ninja_path(linked)}: link {' '.join(_ninja_path(o) for o in objs)}")
        lines.append(f"default {_ninja_path(linked)}")
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
        # write a new file and rename it over the old one: a process that has the old module
        # mapped (an editable install in use) keeps its copy instead of seeing it truncated
        tmp = out_path + ".tmp"
        shutil.copy2(linked, tmp)
        os.replace(tmp, out_path)
        _log(f"built {out_path} (CUDA: {'yes, ' + ', '.join(arch_names) if with_cuda else 'no'})")


def _out_of_tree_options():
    """setuptools writes build/ and cdkernels.egg-info/ into the source tree; when the tree is
    read-only, point both at a temporary folder (removed when this build step exits)."""
    if _writable(os.path.join(ROOT, "build")):
        return {}
    base = tempfile.mkdtemp(prefix="cdkernels-build-")
    atexit.register(shutil.rmtree, base, True)
    _log(f"source tree {ROOT} is not writable; building under {base}")
    return {"build": {"build_base": os.path.join(base, "build")},
            "egg_info": {"egg_base": base}}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the helpers
    # The metadata (name, version, dependencies, entry points, packages) is in pyproject.toml;
    # this file only adds the compiled module and the ninja step that builds it.
    setup(ext_modules=[Extension("cdkernels._C", sources=[])],
          cmdclass={"build_ext": NinjaBuildExt},
          options=_out_of_tree_options())
