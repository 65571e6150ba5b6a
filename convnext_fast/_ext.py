"""Loads the compiled extension ``convnext_fast._C`` and keeps the reason when it cannot."""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> Optional[ModuleType]:
    """The extension module, or None (then :func:`error` says why). Imported once."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        # An extension built against another torch can crash the process on import (C++ ABI),
        # not just fail it: compare the version setup.py recorded first.
        _error = torch_mismatch() or isa_mismatch()
        if _error is not None:
            warnings.warn(_error, RuntimeWarning, stacklevel=2)
            return None
        try:
            _module = importlib.import_module("convnext_fast._C")
        except ImportError as e:  # not built, or built against another torch
            _error = (f"convnext_fast._C could not be imported ({e}); build it with "
                      "`pip install -e . --no-build-isolation`")
    return _module


def recorded_build() -> dict:
    """What setup.py recorded when it built ``_C`` (torch, cuda, arch list, CPU ISA; the generated,
    untracked ``convnext_fast/_build_info.py``); empty for a build without that record."""
    try:
        from . import _build_info
    except ImportError:
        return {}
    return dict(_build_info.BUILD)


def torch_mismatch() -> Optional[str]:
    """Why ``_C`` must not be loaded into this torch (None when the recorded torch is this one,
    or nothing was recorded)."""
    built = recorded_build().get("torch")
    if built is None or built == torch.__version__:
        return None
    return (f"convnext_fast._C was built against torch {built}, but torch {torch.__version__} is "
            "installed, so it is not loaded: the torch (reference) and triton backends still run. "
            f"Rebuild it for torch {torch.__version__}: `pip install -e . --no-build-isolation` in "
            "a checkout, or install a wheel built against this torch (`make wheel`)")


# What the CPU must have for each ISA setup.py builds for (/proc/cpuinfo flags; setup.py's _ISA).
_ISA_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
              "avx2": ("avx2", "fma", "f16c")}


def _cpu_flags() -> Optional[set]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def isa_mismatch(flags: Optional[set] = None) -> Optional[str]:
    """Why ``_C`` must not be loaded on this CPU: it was compiled for vector instructions the CPU
    lacks (a wheel or a shared install built on another machine), which would kill the process
    with SIGILL at the first kernel. None when it fits, or when the CPU's flags are unknown."""
    built = recorded_build().get("cpu_flags")
    flags = _cpu_flags() if flags is None else flags
    if built not in _ISA_NEEDS or flags is None:
        return None
    missing = [f for f in _ISA_NEEDS[built] if f not in flags]
    if not missing:
        return None
    return (f"convnext_fast._C was compiled for {built} CPUs, but this CPU lacks "
            f"{', '.join(missing)}, so it is not loaded: the torch (reference) and triton backends "
            "still run. Rebuild it here (`pip install -e . --no-build-isolation`), or build a "
            "portable one with CONVNEXT_FAST_CPU_ISA=avx2 (what `make wheel` does)")


def error() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    load()
    return _error


def build_info() -> dict:
    """Facts the extension recorded at build time (compiled with CUDA, arch list, ...)."""
    mod = load()
    if mod is None:
        return {}
    return dict(mod.build_info())


def cpu_gemm_dtypes() -> dict:
    """{"bfloat16": dtype name, "float16": dtype name}: what the CPU mlp forward's GEMMs compute in
    for inputs of that dtype (the input's own dtype where oneDNN has it natively, else float32);
    empty without the extension."""
    mod = load()
    if mod is None or not hasattr(mod, "cpu_gemm_dtypes"):
        return {}
    return dict(mod.cpu_gemm_dtypes())


def cpu_mlp_tiles() -> dict:
    """{"float32": bool, "bfloat16": bool}: whether the C++ CPU mlp's inference calls (eager, no
    gradient) of that dtype run on its packed-weight tiles in this build on this CPU (bf16 also
    needs C and the hidden width even); empty without the extension."""
    mod = load()
    if mod is None or not hasattr(mod, "cpu_mlp_tiles"):
        return {}
    return dict(mod.cpu_mlp_tiles())


def cpu_downsample() -> dict:
    """{"float32": bool, "bfloat16": bool}: whether ``convnext_fast::downsample`` (the fused
    LayerNorm + patch conv of the CPU inference path, models/cpu_conv.py) runs for that dtype in this
    build on this CPU; empty without the extension or in an older build."""
    mod = load()
    if mod is None or not hasattr(mod, "cpu_downsample"):
        return {}
    return dict(mod.cpu_downsample())


def cuda_limits() -> dict:
    """The CUDA dwconv_ln kernels' limits (max_c, tile_w, bwd_static_shared_bytes, max_grid_yz,
    kernel_sizes) as compiled into the extension; empty without it (or in an old build)."""
    mod = load()
    if mod is None or not hasattr(mod, "cuda_limits"):
        return {}
    return dict(mod.cuda_limits())


def has_cuda_kernels() -> bool:
    return bool(build_info().get("with_cuda", False))


def _arches(arch_list: str):
    """(major, minor, ptx) per entry of a TORCH_CUDA_ARCH_LIST like "8.0;9.0+PTX"."""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry or not entry[0].isdigit():
            continue
        ptx = entry.endswith("+PTX")
        major, _, minor = entry.removesuffix("+PTX").partition(".")
        yield int(major), int((minor or "0").rstrip("a")), ptx


@functools.lru_cache(maxsize=None)
def cuda_arch_unsupported(capability: Tuple[int, int]) -> Optional[str]:
    """Why the built CUDA kernels cannot run on a GPU of ``capability`` (None when they can).

    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); PTX (``+PTX``) is JIT-compiled for
    any later GPU. A build for "the visible GPU" (arch list not recorded) is trusted.
    """
    arch_list = build_info().get("cuda_arch_list", "")
    arches = list(_arches(arch_list))
    if not arches:
        return None
    major, minor = capability
    for a_major, a_minor, ptx in arches:
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return None
    return (f"convnext_fast._C has CUDA kernels for {arch_list}, none of which runs on this "
            f"sm_{major}{minor} GPU; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
