"""Autocast for the fused ops.

The kernels take every tensor of a call in one dtype. Under ``torch.autocast`` the model's
parameters stay fp32 while activations arrive in the autocast dtype (or fp32, after an autocast
LayerNorm), so each op casts its floating inputs to the autocast dtype itself, as autocast does for
``F.linear``/``F.conv2d``, and runs with autocast off so the torch backend does not re-cast inside
(its ``F.layer_norm`` would come back fp32). The casts are differentiable: fp32 parameters get fp32
gradients. Results are in the autocast dtype, so under autocast the trunk stays in bf16/fp16
between blocks (timm keeps it fp32 through the layer-scale multiply; the difference is within the
low-precision parity rule and halves the trunk's memory traffic).

An op's parameters (or views of them) are cast together, once per version of each, not on every call (:class:`convnext_fast._prepared.Prepared`:
the cast is made again after an in-place update such as an optimizer step), unless the cast must
carry gradients (grad mode on and the parameter requires grad: then it is cast per call, as autocast
does) or torch.compile is tracing (the compiled graph does its own casts).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

from .._prepared import Prepared, owner

_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing

# Autocast lowers only these; fp64 runs as it is, like PyTorch's own autocast.
CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


_CASTS = {dtype: Prepared(f"autocast cast to {dtype}") for dtype in CASTABLE}


class _AutocastOff:
    """``torch.autocast(device_type, enabled=False)`` for an eager call at a fifth of its cost (1
    vs 6 us, paid by every op call under autocast): only the enabled flag is switched, so the outer
    autocast region keeps its nesting count and its cast cache. Traced code gets torch.autocast,
    which torch.compile understands."""

    __slots__ = ("device_type", "was")

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self) -> None:
        self.was = torch.is_autocast_enabled(self.device_type)
        torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc) -> None:
        torch.set_autocast_enabled(self.device_type, self.was)


def _needs_cast(t: object, dtype: torch.dtype) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in CASTABLE and t.dtype != dtype


def _cached_param(t: torch.Tensor, grad: bool) -> bool:
    """Whether ``t``'s cast can be cached: a parameter (or a view of one) whose cast carries no
    gradient."""
    return isinstance(owner(t), torch.nn.Parameter) and not (grad and t.requires_grad)


def _plain_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # an ordinary tensor even under inference_mode, so a later no-grad or frozen-weight training
    # call can use the cached cast too
    with torch.inference_mode(False):
        return t.detach().to(dtype)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_args(device_type: str, args: Dict[str, object]
                  ) -> Tuple[Dict[str, object], contextlib.AbstractContextManager]:
    """``args`` (an op's arguments by name) with every floating tensor cast to the active
    autocast dtype, and the context to run the op in. With autocast off: ``args`` itself and a
    no-op context."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return args, _NO_CONTEXT
    cast = dict(args)
    grad, compiling = torch.is_grad_enabled(), torch.compiler.is_compiling()
    params = []
    for n, t in args.items():
        if _needs_cast(t, dtype):
            if not compiling and _cached_param(t, grad):
                params.append(n)
            else:
                cast[n] = t.to(dtype)
    if params:  # the op's parameters cast together: one cache lookup per call, not one each
        sources = tuple(args[n] for n in params)
        cast.update(zip(params, _CASTS[dtype].get(
            sources, lambda: tuple(_plain_cast(t, dtype) for t in sources))))
    return cast, torch.autocast(device_type, enabled=False) if compiling else _AutocastOff(device_type)
