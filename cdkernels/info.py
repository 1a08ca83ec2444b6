"""What this cdkernels installation is and what can run here.

    python -m cdkernels.info            # or: cdk-info
    python -m cdkernels.info --json     # the same, machine-readable
    python -m cdkernels.info --version

Prints the versions (cdkernels, Python, torch and its CUDA, Triton, NumPy), what the compiled
module was built with (``cdkernels._C.build_info()``: CUDA part and its archs, SIMD levels,
compiler), the CUDA devices torch sees and whether the compiled archs cover them, and every
backend with the reason it is or is not available. Paste its output into bug reports.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any, Dict, List, Optional


def _dist_version(name: str) -> Optional[str]:
    # the installed distribution's version, without importing it (importing triton is slow
    # and can fail for reasons the triton backend's own line reports)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _build_info() -> Dict[str, Any]:
    try:
        from cdkernels import _C
    except Exception as e:  # missing or broken build: say why instead of failing
        return {"error": f"cdkernels._C failed to import ({type(e).__name__}: {e})"}
    info = dict(_C.build_info())
    info["path"] = _C.__file__
    if info.get("with_cuda"):
        for key in ("cuda_runtime_version", "cuda_driver_version"):
            fn = getattr(_C, key, None)
            if fn is not None:
                v = int(fn())
                info[key] = f"{v // 1000}.{v % 1000 // 10}" if v else None
    return info


def _devices(archs: List[str]) -> List[Dict[str, Any]]:
    import torch

    from .backends.cuda import kernel_image_for
    out = []
    try:
        if not torch.cuda.is_available():
            return out
        for i in range(torch.cuda.device_count()):
            cap = tuple(torch.cuda.get_device_capability(i))
            out.append({"index": i, "name": torch.cuda.get_device_name(i),
                        "capability": f"{cap[0]}.{cap[1]}",
                        "kernel_image": bool(archs) and kernel_image_for(archs, cap)})
    except Exception as e:  # a broken driver must not hide the rest of the report
        out.append({"error": f"{type(e).__name__}: {e}"})
    return out


def collect() -> Dict[str, Any]:
    """Everything the report shows, as a JSON-serialisable dict."""
    import torch

    import cdkernels
    build = _build_info()
    archs = [str(a) for a in build.get("cuda_archs", [])]
    return {
        "cdkernels": cdkernels.__version__,
        "location": os.path.dirname(os.path.abspath(cdkernels.__file__)),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "numpy": _dist_version("numpy"),
        "build_info": build,
        "cuda_archs": archs,
        "simd_level": build.get("simd_level"),
        "cuda_devices": _devices(archs),
        "backends": cdkernels.backends(),
        "env": {k: os.environ[k] for k in ("CDK_BACKEND", "CDK_CPU_SIMD", "TRITON_INTERPRET",
                                           "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }


def format_text(info: Dict[str, Any]) -> str:
    b = info["build_info"]
    lines = [
        f"cdkernels {info['cdkernels']}  ({info['location']})",
        f"python    {info['python']}",
        f"platform  {info['platform']}",
        f"torch     {info['torch']}" + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"]
                                        else " (no CUDA)"),
        f"triton    {info['triton'] or 'not installed'}",
        f"numpy     {info['numpy'] or 'not installed'}",
        "",
        "compiled module (cdkernels._C):",
    ]
    if "error" in b:
        lines.append(f"  not available: {b['error']}")
    else:
        lines += [
            f"  path        {b['path']}",
            f"  compiler    {b.get('compiler', '?')}",
            f"  CUDA part   " + ("yes" if b.get("with_cuda") else "no"),
            f"  CUDA archs  {', '.join(info['cuda_archs']) or '-'}",
        ]
        if b.get("with_cuda"):
            lines.append(f"  CUDA runtime {b.get('cuda_runtime_version')} (static), driver "
                         f"{b.get('cuda_driver_version') or 'none found'}")
        lines += [
            f"  SIMD level  {b.get('simd_level')} (compiled: {', '.join(b.get('simd_levels', []))};"
            f" this CPU: {', '.join(b.get('simd_levels_supported', []))})"
            + (f" {b['simd_note']}" if b.get("simd_note") else ""),
        ]
    lines += ["", "CUDA devices:"]
    if not info["cuda_devices"]:
        lines.append("  none visible to torch")
    for d in info["cuda_devices"]:
        if "error" in d:
            lines.append(f"  query failed: {d['error']}")
        else:
            lines.append(f"  cuda:{d['index']} {d['name']} (compute capability "
                         f"{d['capability']}): compiled kernels "
                         + ("run here" if d["kernel_image"] else "do NOT run here"))
    lines += ["", "backends:"]
    for name, st in info["backends"].items():
        lines.append(f"  {name:<9} {'yes' if st['available'] else 'no ':<3}  {st['reason']}")
    if info["env"]:
        lines += ["", "environment: " + " ".join(f"{k}={v}" for k, v in info["env"].items())]
    return "\n".join(lines)


def version_line() -> str:
    import torch

    import cdkernels
    return (f"cdkernels {cdkernels.__version__} (torch {torch.__version__}, "
            f"Python {platform.python_version()})")


def main(argv: Optional[List[str]] = None) -> int:
    prog = "cdk-info" if os.path.basename(sys.argv[0]) == "cdk-info" else "python -m cdkernels.info"
    p = argparse.ArgumentParser(prog=prog, description="Show the versions, the build of the "
                                "compiled module and which cdkernels backends run here.")
    p.add_argument("--version", action="version", version=version_line())
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
