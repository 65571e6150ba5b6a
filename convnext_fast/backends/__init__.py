"""Backends of the fused ops: the registry and selection (:mod:`.registry`), the measured order
(:mod:`.order`, data in ``backend_order.json``) and one module per backend family, each
registering its implementations of every op it has: ``_torch`` (the reference composites),
``_cpp`` (the compiled extension: ``cpu`` and ``cuda``, with its fakes and autograd) and
``_triton`` (``triton``: the kernels of :mod:`convnext_fast.kernels` as ``triton_op``s) and
``_onednn`` (``onednn``: the CPU inference MLP on oneDNN's prepacked GEMMs).

:func:`load` imports the four; ``import convnext_fast`` calls it once the specs are loaded.
"""
from .registry import (BACKENDS, ENV_VAR, BackendError, Impl, Reason, auto_order, available,
                       clear_selections, describe, last_selections, ops, register, registered,
                       requested_backend, select, use_backend, why_not)

__all__ = [
    "BACKENDS", "ENV_VAR", "BackendError", "Impl", "Reason", "auto_order", "available",
    "clear_selections", "describe", "last_selections", "ops", "register", "registered",
    "requested_backend", "select", "use_backend", "why_not", "load",
]


def load() -> None:
    """Register every backend's implementations (idempotent: modules import once)."""
    from . import _cpp, _onednn, _torch, _triton  # noqa: F401
