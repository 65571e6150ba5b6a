"""Loads the compiled extension ``convnext_fast._C`` and keeps the reason when it cannot."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> Optional[ModuleType]:
    """The extension module, or None (then :func:`error` says why). Imported once."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("convnext_fast._C")
        except ImportError as e:  # not built, or built against another torch
            _error = (f"convnext_fast._C could not be imported ({e}); build it with "
                      "`pip install -e . --no-build-isolation`")
    return _module


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


def has_cuda_kernels() -> bool:
    return bool(build_info().get("with_cuda", False))
