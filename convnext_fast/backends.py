"""Backend registry and selection for the fused ops.

Each op (``dwconv_ln``, ``mlp``, ``mlp_grn``) has implementations registered here by backend name
(``torch``, ``cpu``, ``cuda``, ``triton``). Selection, highest first:

1. an explicit ``backend=`` argument to the op,
2. the innermost :func:`use_backend` context (one backend for every op, or a mapping op -> backend),
3. the ``CONVNEXT_FAST_BACKEND`` environment variable,
4. automatic: the first backend in :func:`auto_order` for the op, device type and dtype that is
   available and supports the call (a table of measured winners, else a per-device default).

An explicit choice (1-3) that cannot run raises :class:`BackendError` listing every reason.
Automatic selection never raises while ``torch`` can run; the backend it picked and the ones it
skipped (with reasons) are recorded and shown by ``python -m convnext_fast info``.

Every decision reads only static facts (device, dtype, shape, requires_grad), so torch.compile
traces the choice away and sees no graph break.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "BACKENDS", "AUTO_ORDER", "MEASURED_ORDER", "auto_order", "BackendError", "register", "select", "use_backend",
    "requested_backend", "available", "describe", "last_selections",
]

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "CONVNEXT_FAST_BACKEND"

# Preference per device type when nothing is requested. `torch` last: it always runs. Triton
# is chosen automatically only where MEASURED_ORDER shows it winning.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "torch"),
}

_BF16, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32

# Measured winners override AUTO_ORDER per (op, device type, dtype, training). "training" means
# some input requires grad, so the backward runs too. Figures: ConvNeXt-T stage shapes at batch
# 128, summed over the 3/3/9/3 blocks of the four stages, H100 + torch 2.11 + triton 3.6
# (benchmarks/results/h100_ops.txt). Shape-wise winners differ (Triton mlp wins at C=96 only).
MEASURED_ORDER: Dict[Tuple[str, str, torch.dtype, bool], Tuple[str, ...]] = {
    # forward: triton 4.3 ms, eager 5.2, CUDA 5.6
    ("dwconv_ln", "cuda", _BF16, False): ("triton", "torch", "cuda"),
    ("dwconv_ln", "cuda", _FP16, False): ("triton", "torch", "cuda"),
    # fwd+bwd: eager 13.4 ms, triton 27.7 (its backward is not tuned yet)
    ("dwconv_ln", "cuda", _BF16, True): ("torch", "triton"),
    ("dwconv_ln", "cuda", _FP16, True): ("torch", "triton"),
    # forward: CUDA 5.1 ms, triton 5.2, eager 8.6
    ("dwconv_ln", "cuda", _FP32, False): ("cuda", "triton", "torch"),
    # fwd+bwd: triton 42 ms, eager 95, CUDA fwd + composite bwd 101
    ("dwconv_ln", "cuda", _FP32, True): ("triton", "torch", "cuda"),
    # forward: eager 5.5 ms, triton 6.5
    ("mlp", "cuda", _BF16, False): ("torch", "triton"),
    ("mlp", "cuda", _FP32, False): ("torch", "triton"),
    # forward: triton 11.2 ms, eager 14.2
    ("mlp_grn", "cuda", _BF16, False): ("triton", "torch"),
    ("mlp_grn", "cuda", _FP32, False): ("torch", "triton"),
    # 2-core AVX2 CPU (no AMX), torch 2.14.1, benchmarks/results/cpu2core_ops.txt: C++ cpu vs
    # eager, summed over ConvNeXt-T's 18 blocks. fp32 at batch 8, bf16 at batch 1 (eager bf16 is
    # ~10x slower than fp32 on this CPU; the C++ kernels compute in fp32 here, and their mlp
    # forward's GEMMs in bf16 where oneDNN has it natively: untimed).
    # forward fp32: 34 ms vs 57 (eager wins at C=768 only); bf16: 5.8 ms vs 386
    ("dwconv_ln", "cpu", _FP32, False): ("cpu", "torch"),
    ("dwconv_ln", "cpu", _BF16, False): ("cpu", "torch"),
    # fwd+bwd fp32: 167 ms vs 251; bf16: 29 ms vs 1583
    ("dwconv_ln", "cpu", _FP32, True): ("cpu", "torch"),
    ("dwconv_ln", "cpu", _BF16, True): ("cpu", "torch"),
    # mlp forward fp32: 462 ms vs 581 (the win is at C=96; even elsewhere); bf16: 95 ms vs 476
    ("mlp", "cpu", _FP32, False): ("cpu", "torch"),
    ("mlp", "cpu", _BF16, False): ("cpu", "torch"),
    # mlp fwd+bwd fp32: eager 1509 ms, cpu 1634 (its backward recomputes the hidden: one GEMM
    # more than eager, which keeps it); bf16: 309 ms vs 6465
    ("mlp", "cpu", _FP32, True): ("torch", "cpu"),
    ("mlp", "cpu", _BF16, True): ("cpu", "torch"),
}


def auto_order(op: str, device_type: str, dtype: Optional[torch.dtype], training: bool = False
               ) -> Tuple[str, ...]:
    """Backends tried, in order, when nothing is requested."""
    return MEASURED_ORDER.get((op, device_type, dtype, training),
                              AUTO_ORDER.get(device_type, ("torch",)))

class BackendError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass(frozen=True)
class OpImpl:
    fn: Callable
    available: Callable[[], Reason]  # static: is the backend built/installed at all
    supports: Callable[..., Reason]  # per call: takes the op's arguments


_REGISTRY: Dict[str, Dict[str, OpImpl]] = {}
_CONTEXT: List[Union[str, Dict[str, str]]] = []
_LAST: Dict[str, Tuple[str, Tuple[Tuple[str, str], ...]]] = {}


def _always() -> Reason:
    return None


def _any_call(*args, **kwargs) -> Reason:
    return None


def register(op: str, backend: str, fn: Callable, available: Callable[[], Reason] = _always,
             supports: Callable[..., Reason] = _any_call) -> None:
    """Register ``fn`` as ``op`` on ``backend``; ``available``/``supports`` return None or a reason."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = OpImpl(fn, available, supports)


def _normalize(name: Optional[str], source: str) -> Optional[str]:
    if name is None:
        return None
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise BackendError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def requested_backend(explicit: Optional[str] = None, op: Optional[str] = None) -> Tuple[Optional[str], str]:
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
                raise BackendError(f"use_backend(): unknown op {op!r}; expected one of {sorted(_REGISTRY)}")
            _normalize(backend, "use_backend()")
    _CONTEXT.append(name)
    try:
        yield
    finally:
        _CONTEXT.pop()


def _why_not(op: str, backend: str, args, kwargs) -> Reason:
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"no {backend} implementation of {op}"
    reason = impl.available()
    if reason is None:
        reason = impl.supports(*args, **kwargs)
    return reason


def select(op: str, device: torch.device, backend: Optional[str], args, kwargs) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for this call; see the module docstring for the order."""
    name, source = requested_backend(backend, op)
    if name is not None:
        reason = _why_not(op, name, args, kwargs)
        if reason is not None:
            raise BackendError(f"{op}: backend {name!r} (from {source}) cannot run this call: {reason}")
        return name, _REGISTRY[op][name].fn
    skipped = []
    # Runs on every op call (its cost shows at batch 1): no intermediate lists.
    dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
    training = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    for candidate in auto_order(op, device.type, dtype, training):
        reason = _why_not(op, candidate, args, kwargs)
        if reason is None:
            if not torch.compiler.is_compiling():
                _LAST[op] = (candidate, tuple(skipped))
            return candidate, _REGISTRY[op][candidate].fn
        skipped.append((candidate, reason))
    lines = "; ".join(f"{b}: {r}" for b, r in skipped)
    raise BackendError(f"{op}: no backend can run this call on {device.type} ({lines})")


def available(op: str, backend: str) -> Reason:
    """None if ``backend`` is built and usable for ``op`` in general, else why not."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"no {backend} implementation of {op}"
    return impl.available()


def describe() -> List[Tuple[str, str, Reason]]:
    """Rows (op, backend, None or reason) for every registered op and every backend."""
    return [(op, b, available(op, b)) for op in sorted(_REGISTRY) for b in BACKENDS]


def last_selections() -> Dict[str, Tuple[str, Tuple[Tuple[str, str], ...]]]:
    """op -> (backend picked automatically last time, ((skipped backend, reason), ...))."""
    return dict(_LAST)
