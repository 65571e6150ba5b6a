"""``mlp``: Linear(C->D) + exact GELU + Linear(D->C) + layer scale + residual add."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends, reference
from ._autocast import autocast_inputs
from ._checks import channels_last, check_mlp, check_tensor, device_type

__all__ = ["mlp"]


def mlp(
    y: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """out = residual + gamma * fc2(gelu_erf(fc1(y))) per pixel.

    y: [N, C, H, W]; fc1_weight: [D, C]; fc1_bias: [D] or None; fc2_weight: [C, D];
    fc2_bias: [C] or None; gamma: [C] or None (no layer scale); residual: [N, C, H, W] or None
    (return the branch alone). Returns [N, C, H, W], channels-last, y's dtype (the autocast dtype
    under ``torch.autocast``, which casts every tensor first).
    """
    tensors, ctx = autocast_inputs(device_type(y), y, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                   gamma, residual)
    y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual = tensors
    check_mlp("mlp", y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    check_tensor("mlp", "gamma", gamma, (y.shape[1],), y, optional=True)
    y, residual = channels_last(y), channels_last(residual)
    args = (y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual)
    _, fn = backends.select("mlp", y.device, backend, args, {})
    with ctx:
        return fn(*args)


backends.register("mlp", "torch", reference.mlp)

from . import _triton_mlp  # noqa: E402,F401  (registers the triton backends of mlp and mlp_grn)
