"""Backend registry and selection for the fused ops.

Each op (``dwconv_ln``, ``mlp``, ``mlp_grn``) has implementations registered here by backend name
(``torch``, ``cpu``, ``cuda``, ``triton``). An implementation is three callables that take the op's
arguments by name, as its spec (:mod:`convnext_fast.specs`) names them: ``fn(**args)`` runs it,
``available()`` says whether the backend is built/installed at all, ``supports(**args)`` whether it
can run this call (device, dtype, shape); both return None or the reason why not.

Selection, highest first:

0. the off switch: ``CONVNEXT_FAST_DISABLE`` (``1`` for every op, or a comma list of ops) and
   :func:`disable_kernels` make the named ops run the ``torch`` reference, whatever else asks,
1. an explicit ``backend=`` argument to the op,
2. the innermost :func:`use_backend` context (one backend for every op, or a mapping op -> backend),
3. the ``CONVNEXT_FAST_BACKEND`` environment variable,
4. automatic: the first backend in :func:`auto_order` for the op, device (its kind: CUDA
   capability, CPU ISA), dtype and mode that is available and supports the call (the measured
   order of :mod:`convnext_fast.backends.order`).

An explicit choice (1-3) that cannot run raises :class:`BackendError` with the reason. Automatic
selection never raises while ``torch`` can run; the backend it picked and the ones it skipped (with
reasons) are recorded and shown by ``python -m convnext_fast info``.

Every decision reads only static facts (device, dtype, shape, requires_grad), so torch.compile
traces the choice away and sees no graph break.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import order

__all__ = [
    "BACKENDS", "ENV_VAR", "Reason", "Impl", "BackendError", "register", "registered", "why_not",
    "available", "select", "use_backend", "requested_backend", "auto_order", "describe",
    "last_selections", "clear_selections", "ops",
    "DISABLE_VAR", "disable_kernels", "enable_kernels", "disabled_ops",
]

BACKENDS = ("torch", "cpu", "cuda", "triton", "onednn")
ENV_VAR = "CONVNEXT_FAST_BACKEND"
DISABLE_VAR = "CONVNEXT_FAST_DISABLE"

Reason = Optional[str]
"""None when a backend can run, else a sentence saying why not."""


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _always() -> Reason:
    return None


def _any_call(**args) -> Reason:
    return None


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op; every callable takes the op's arguments by name.

    The arguments arrive in the order of the op's spec, so ``fn`` may pass ``args.values()`` on
    positionally (a dispatcher call with keywords costs ~2 us more at batch 1).
    """

    fn: Callable[..., torch.Tensor]
    available: Callable[[], Reason] = _always
    supports: Callable[..., Reason] = _any_call


_REGISTRY: Dict[str, Dict[str, Impl]] = {}
_CONTEXT: List[Union[str, Dict[str, str]]] = []
_LAST: Dict[str, Tuple[str, Tuple[Tuple[str, str], ...]]] = {}
_ALL = "*"
_OFF_API: Optional[frozenset] = None  # ops turned off by disable_kernels() (_ALL: every op)


def register(op: str, backend: str, impl: Impl) -> Optional[Impl]:
    """Register ``impl`` as ``op`` on ``backend``; returns the implementation it replaces, if any
    (so a test can put it back)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    previous = _REGISTRY.setdefault(op, {}).get(backend)
    _REGISTRY[op][backend] = impl
    return previous


def registered(op: str) -> Dict[str, Impl]:
    """backend -> implementation for ``op`` (a copy, in :data:`BACKENDS` order)."""
    impls = _REGISTRY.get(op, {})
    return {b: impls[b] for b in BACKENDS if b in impls}


def ops() -> Tuple[str, ...]:
    """The names of the ops with at least one backend."""
    return tuple(sorted(_REGISTRY))


def why_not(op: str, backend: str, args: Optional[Mapping[str, object]] = None) -> Reason:
    """None when ``backend`` can run ``op`` (on ``args``, the op's arguments by name, when given;
    else in general: built and installed), otherwise why not."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"no {backend} implementation of {op}"
    reason = impl.available()
    if reason is None and args is not None:
        reason = impl.supports(**args)
    return reason


def available(op: str, backend: str) -> Reason:
    """None if ``backend`` is built and usable for ``op`` in general, else why not."""
    return why_not(op, backend)


def _normalize(name: Optional[str], source: str) -> Optional[str]:
    if name is None:
        return None
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise BackendError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def requested_backend(explicit: Optional[str] = None, op: Optional[str] = None
                      ) -> Tuple[Optional[str], str]:
    """The backend asked for ``op`` (None = automatic) and where the request came from."""
    if explicit is not None:
        return _normalize(explicit, "backend argument"), "backend argument"
    for request in reversed(_CONTEXT):
        if isinstance(request, str):
            return _normalize(request, "use_backend()"), "use_backend()"
        if op in request:  # a per-op mapping names only some ops; the rest look further out
            return _normalize(request[op], "use_backend()"), "use_backend()"
    env = os.environ.get(ENV_VAR)
    if env:
        return _normalize(env, ENV_VAR), ENV_VAR
    return None, "automatic"


@contextlib.contextmanager
def use_backend(name: Union[str, Mapping[str, str]]) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (or ``'auto'``).

    ``name`` may also map op names to backends, e.g. ``{"dwconv_ln": "cpu"}``: the ops it names run
    there, the others as they would outside this block.
    """
    if isinstance(name, str):
        _normalize(name, "use_backend()")
    else:
        name = dict(name)
        for op, backend in name.items():
            if op not in _REGISTRY:
                raise BackendError(f"use_backend(): unknown op {op!r}; expected one of {ops()}")
            _normalize(backend, "use_backend()")
    _CONTEXT.append(name)
    try:
        yield
    finally:
        _CONTEXT.pop()


def auto_order(op: str, device: Union[torch.device, str], dtype: Optional[torch.dtype],
               training: bool = False) -> Tuple[str, ...]:
    """Backends tried, in order, when nothing is requested: the measured order for the device's
    kind (CUDA capability, CPU ISA), else the device type's default (see :mod:`.order`)."""
    return order.auto_order(op, device, dtype, training)


def select(op: str, device: torch.device, backend: Optional[str], args: Mapping[str, object]
           ) -> Tuple[str, Callable[..., torch.Tensor]]:
    """Pick the implementation of ``op`` for this call (``args``: its arguments by name); see the
    module docstring for the order."""
    off = is_off(op)
    if off is not None:
        if not torch.compiler.is_compiling():
            _LAST[op] = ("torch", ())
        return "torch", _REGISTRY[op]["torch"].fn
    name, source = requested_backend(backend, op)
    if name is not None:
        reason = why_not(op, name, args)
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} (from {source}) cannot run this call: {reason}")
        return name, _REGISTRY[op][name].fn
    skipped = []
    # Runs on every op call (its cost shows at batch 1): no intermediate lists.
    dtype = next((a.dtype for a in args.values() if isinstance(a, torch.Tensor)), None)
    training = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args.values())
    for candidate in auto_order(op, device, dtype, training):
        reason = why_not(op, candidate, args)
        if reason is None:
            if not torch.compiler.is_compiling():
                _LAST[op] = (candidate, tuple(skipped))
            return candidate, _REGISTRY[op][candidate].fn
        skipped.append((candidate, reason))
    lines = "; ".join(f"{b}: {r}" for b, r in skipped)
    raise BackendError(f"{op}: no backend can run this call on {device.type} ({lines})")


def _off_names(ops_: Union[None, str, Sequence[str]], source: str) -> frozenset:
    if ops_ is None:
        return frozenset([_ALL])
    names = [n.strip() for n in (ops_.split(",") if isinstance(ops_, str) else ops_)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise BackendError(f"{source}: unknown op(s) {unknown}; expected some of {ops()}")
    return frozenset(names)


def _off_env() -> frozenset:
    value = os.environ.get(DISABLE_VAR, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return frozenset()
    if value in ("1", "true", "yes", "on", "all"):
        return frozenset([_ALL])
    return _off_names(value, DISABLE_VAR)


def disabled_ops() -> Dict[str, str]:
    """op -> what turned its kernels off (``CONVNEXT_FAST_DISABLE`` or ``disable_kernels()``), for
    the ops that run the torch reference whatever else asks."""
    out = {}
    for source, off in ((DISABLE_VAR, _off_env()), ("disable_kernels()", _OFF_API or frozenset())):
        for op in ops():
            if _ALL in off or op in off:
                out.setdefault(op, source)
    return out


class disable_kernels:
    """Turn the fused kernels off: the ops run the ``torch`` reference composites instead.

    ``ops``: None for every op, else op names (``"mlp"``, ``["mlp", "dwconv_ln"]``). It beats
    every other choice (``backend=`` arguments, :func:`use_backend`, ``CONVNEXT_FAST_BACKEND``,
    ``patch_timm(backend=...)``), as the environment variable ``CONVNEXT_FAST_DISABLE=1`` (or
    ``=mlp,dwconv_ln``) does. Called, it stays in force until :func:`enable_kernels`; as a
    ``with`` block, until the block ends::

        with convnext_fast.disable_kernels():         # every op on the reference
            ...
        convnext_fast.disable_kernels(["mlp"])        # from now on, mlp on the reference
    """

    def __init__(self, ops: Union[None, str, Sequence[str]] = None):
        global _OFF_API
        off = _off_names(ops, "disable_kernels()")
        self._previous = _OFF_API
        _OFF_API = off if _OFF_API is None else _OFF_API | off

    def __enter__(self) -> "disable_kernels":
        return self

    def __exit__(self, *exc) -> None:
        global _OFF_API
        _OFF_API = self._previous


def enable_kernels() -> None:
    """Undo every :func:`disable_kernels` call (``CONVNEXT_FAST_DISABLE`` still applies)."""
    global _OFF_API
    _OFF_API = None


def is_off(op: str) -> Optional[str]:
    """What turned ``op``'s kernels off, or None. Runs on every op call: cheap when nothing is.
    A kernel outside the registry (the CPU downsample) asks with its own name: only the switch that
    turns every op off names it."""
    if _OFF_API is not None and (_ALL in _OFF_API or op in _OFF_API):
        return "disable_kernels()"
    if DISABLE_VAR in os.environ:
        off = _off_env()
        if _ALL in off or op in off:
            return DISABLE_VAR
    return None


def describe() -> List[Tuple[str, str, Reason]]:
    """Rows (op, backend, None or reason) for every registered op and every backend."""
    return [(op, b, available(op, b)) for op in ops() for b in BACKENDS]


def last_selections() -> Dict[str, Tuple[str, Tuple[Tuple[str, str], ...]]]:
    """op -> (backend picked automatically last time, ((skipped backend, reason), ...))."""
    return dict(_LAST)


def clear_selections() -> None:
    """Forget the recorded automatic choices (what :func:`last_selections` returns)."""
    _LAST.clear()
