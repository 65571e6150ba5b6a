"""Autocast for the fused ops.

The kernels take every tensor of a call in one dtype. Under ``torch.autocast`` the model's
parameters stay fp32 while activations arrive in the autocast dtype (or fp32, after an autocast
LayerNorm), so each op casts its floating inputs to the autocast dtype itself, as autocast does for
``F.linear``/``F.conv2d``, and runs with autocast off so the torch backend does not re-cast inside
(its ``F.layer_norm`` would come back fp32). The casts are differentiable: fp32 parameters get fp32
gradients. Results are in the autocast dtype, so under autocast the trunk stays in bf16/fp16
between blocks (timm keeps it fp32 through the layer-scale multiply; the difference is within the
low-precision parity rule and halves the trunk's memory traffic).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing

# Autocast lowers only these; fp64 runs as it is, like PyTorch's own autocast.
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


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
    cast = {n: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE else t
            for n, t in args.items()}
    return cast, torch.autocast(device_type, enabled=False)
