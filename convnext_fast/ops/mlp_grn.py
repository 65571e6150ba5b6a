"""``mlp_grn``: the ConvNeXt V2 MLP, Linear + exact GELU + GRN + Linear + residual add."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends, reference
from ._autocast import autocast_inputs
from ._checks import channels_last, check_mlp, check_tensor, device_type

__all__ = ["mlp_grn"]


def mlp_grn(
    y: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    grn_weight: torch.Tensor,
    grn_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """out = residual + fc2(GRN(gelu_erf(fc1(y)))) with GRN over H*W per image and channel.

    y: [N, C, H, W]; fc1_weight: [D, C]; grn_weight, grn_bias: [D]; fc2_weight: [C, D];
    residual: [N, C, H, W] or None. Returns [N, C, H, W], channels-last, y's dtype (the autocast
    dtype under ``torch.autocast``, which casts every tensor first).
    """
    tensors, ctx = autocast_inputs(device_type(y), y, fc1_weight, fc1_bias, grn_weight, grn_bias,
                                   fc2_weight, fc2_bias, residual)
    y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, residual = tensors
    check_mlp("mlp_grn", y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    D = fc1_weight.shape[0]
    check_tensor("mlp_grn", "grn_weight", grn_weight, (D,), y)
    check_tensor("mlp_grn", "grn_bias", grn_bias, (D,), y)
    y, residual = channels_last(y), channels_last(residual)
    args = (y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, residual, float(eps))
    _, fn = backends.select("mlp_grn", y.device, backend, args, {})
    with ctx:
        return fn(*args)


backends.register("mlp_grn", "torch", reference.mlp_grn)
