"""Autocast for the fused ops.

The kernels take every tensor of a call in one dtype. Under ``torch.autocast`` the model's
parameters stay fp32 while activations arrive in the autocast dtype (or fp32, after an autocast
LayerNorm), so each op casts its floating inputs to the autocast dtype itself, as autocast does for
``F.linear``/``F.conv2d``, and runs with autocast off so the torch backend does not re-cast inside
(its ``F.layer_norm`` would come back fp32). The casts are differentiable: fp32 parameters get fp32
gradients. Results are in the autocast dtype, so under autocast the trunk stays in bf16/fp16
between blocks (timm keeps it fp32 through the layer-scale multiply; the difference is within the
low-precision parity rule and halves the trunk's memory traffic).

A parameter (or a view of one) is cast once per version, not on every call (:class:`convnext_fast._prepared.Prepared`:
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
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


_CASTS = {dtype: Prepared(f"autocast cast to {dtype}") for dtype in _CASTABLE}


def _cast(t: object, dtype: torch.dtype) -> object:
    if not isinstance(t, torch.Tensor) or t.dtype not in _CASTABLE or t.dtype == dtype:
        return t
    if isinstance(owner(t), torch.nn.Parameter) and not (t.requires_grad and torch.is_grad_enabled()) \
            and not torch.compiler.is_compiling():
        return _CASTS[dtype].get((t,), lambda: _plain_cast(t, dtype))
    return t.to(dtype)


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
    cast = {n: _cast(t, dtype) for n, t in args.items()}
    return cast, torch.autocast(device_type, enabled=False)
