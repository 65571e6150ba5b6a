"""Pure-PyTorch reference implementations of the fused ops.

These are the `torch` backend and the ground truth every kernel is tested against. They compute
exactly what timm's ConvNeXt blocks compute, in the input dtype, with PyTorch's own kernels
(whose LayerNorm accumulates in fp32 for half types). Tensors are logically NCHW; the trunk keeps
them in ``torch.channels_last`` memory, and every result here is returned channels-last.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["dwconv_ln", "dwconv_ln_bwd", "mlp", "mlp_bwd", "mlp_grn", "mlp_grn_bwd", "grn"]

_CL = torch.channels_last


def dwconv_ln(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Depthwise kxk conv ('same' padding, stride 1) + bias, then LayerNorm over channels.

    x: [N, C, H, W]; conv_weight: [C, 1, k, k]; conv_bias: [C] or None; ln_weight, ln_bias: [C].
    Returns y: [N, C, H, W], channels-last, dtype of x.
    """
    C, k = x.shape[1], conv_weight.shape[-1]
    y = F.conv2d(x, conv_weight, conv_bias, padding=k // 2, groups=C)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (C,), ln_weight, ln_bias, eps)
    return y.permute(0, 3, 1, 2).contiguous(memory_format=_CL)


def grn(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global Response Norm (ConvNeXt V2) on NHWC rows, as timm's ``GlobalResponseNorm``.

    h: [N, H, W, D]; weight, bias: [D]. Returns h + bias + weight * h * gx / (mean_D(gx) + eps)
    with gx = ||h||_2 over (H, W) per image and channel.
    """
    gx = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return h + torch.addcmul(bias, weight, h * nx)


def _mlp_branch_out(o: torch.Tensor, gamma: Optional[torch.Tensor], residual: Optional[torch.Tensor]):
    if gamma is not None:
        o = o * gamma
    o = o.permute(0, 3, 1, 2)
    if residual is not None:
        o = residual + o
    return o.contiguous(memory_format=_CL)


def mlp(
    y: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out = residual + gamma * fc2(gelu_erf(fc1(y))), per pixel over channels.

    y: [N, C, H, W]; fc1_weight: [D, C] (D = 4C in ConvNeXt); fc1_bias: [D]; fc2_weight: [C, D];
    fc2_bias: [C]; gamma: [C] or None (no layer scale); residual: [N, C, H, W] or None (no add).
    Returns out: [N, C, H, W], channels-last, dtype of y.
    """
    h = F.gelu(F.linear(y.permute(0, 2, 3, 1), fc1_weight, fc1_bias))
    return _mlp_branch_out(F.linear(h, fc2_weight, fc2_bias), gamma, residual)


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
) -> torch.Tensor:
    """ConvNeXt V2 MLP: out = residual + fc2(GRN(gelu_erf(fc1(y)))).

    y: [N, C, H, W]; fc1_weight: [D, C]; grn_weight, grn_bias: [D]; fc2_weight: [C, D].
    GRN reduces over H*W per image, so a call must hold whole images. Returns [N, C, H, W]
    channels-last.
    """
    h = F.gelu(F.linear(y.permute(0, 2, 3, 1), fc1_weight, fc1_bias))
    h = grn(h, grn_weight, grn_bias, eps)
    return _mlp_branch_out(F.linear(h, fc2_weight, fc2_bias), None, residual)


def dwconv_ln_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
):
    """Gradients of :func:`dwconv_ln` from saved LayerNorm statistics, in torch ops.

    grad_y, x: [N, C, H, W]; mean, rstd: [N, H, W] (per pixel, over C). The conv output is
    recomputed from x rather than stored; arithmetic is fp32 (fp64 for fp64 inputs). Returns (dx, d_conv_weight, d_conv_bias or None,
    d_ln_weight, d_ln_bias), each in the dtype of its input.
    """
    C, k = x.shape[1], conv_weight.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, wf = x.to(acc), conv_weight.to(acc)
    z = F.conv2d(xf, wf, None if conv_bias is None else conv_bias.to(acc), padding=k // 2, groups=C)
    mean, rstd = mean.to(acc).unsqueeze(1), rstd.to(acc).unsqueeze(1)
    xhat = (z - mean) * rstd
    gy = grad_y.to(acc)
    d_ln_w = (gy * xhat).sum(dim=(0, 2, 3))
    d_ln_b = gy.sum(dim=(0, 2, 3))
    g = gy * ln_weight.to(acc).view(1, C, 1, 1)
    dz = rstd * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz, xf, wf, [C] if conv_bias is not None else None, [1, 1], [k // 2, k // 2], [1, 1],
        False, [0, 0], C, [True, True, conv_bias is not None])
    return (dx.to(x.dtype).contiguous(memory_format=_CL), dw.to(conv_weight.dtype),
            None if conv_bias is None else db.to(conv_bias.dtype),
            d_ln_w.to(ln_weight.dtype), d_ln_b.to(ln_weight.dtype))


def _autograd_grads(fn, grad_out: torch.Tensor, args: dict) -> tuple:
    """Gradients of ``fn(**args)`` against ``grad_out`` w.r.t. every tensor argument, in argument
    order (None for arguments that are None), by autograd through the composite."""
    leaves = {n: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v
              for n, v in args.items()}
    with torch.enable_grad():
        out = fn(**leaves)
        live = [v for v in leaves.values() if isinstance(v, torch.Tensor)]
        grads = iter(torch.autograd.grad(out, live, grad_out))
    return tuple(next(grads) if isinstance(v, torch.Tensor) else None
                 for n, v in leaves.items() if isinstance(v, torch.Tensor) or v is None)


def mlp_bwd(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
):
    """Gradients of :func:`mlp` (without the residual, whose gradient is grad_out itself):
    (dy, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias, d_gamma), None for absent arguments."""
    return _autograd_grads(mlp, grad_out, dict(y=y, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                                               fc2_weight=fc2_weight, fc2_bias=fc2_bias, gamma=gamma))


def mlp_grn_bwd(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    grn_weight: torch.Tensor,
    grn_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    eps: float = 1e-6,
):
    """Gradients of :func:`mlp_grn` (without the residual): (dy, d_fc1_weight, d_fc1_bias,
    d_grn_weight, d_grn_bias, d_fc2_weight, d_fc2_bias), None for absent arguments."""
    args = dict(y=y, fc1_weight=fc1_weight, fc1_bias=fc1_bias, grn_weight=grn_weight,
                grn_bias=grn_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    return _autograd_grads(lambda **a: mlp_grn(**a, eps=eps), grad_out, args)
