"""Spec of ``dwconv_ln``: depthwise kxk conv + bias fused with the channels-last LayerNorm, and of
its backward ``dwconv_ln_bwd`` (from x and the saved fp32 statistics; the conv is recomputed)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from .. import reference
from . import OpSpec
from ._random import nhwc, rand
from .checks import check_dwconv_ln


def make_inputs(device="cpu", dtype=torch.float32, *, N=2, C=8, H=5, W=6, k=3, bias=True,
                requires_grad=False) -> Dict[str, object]:
    """x [N, C, H, W] channels-last, conv_weight [C, 1, k, k], conv_bias [C] or None, ln_weight,
    ln_bias [C]; LayerNorm weights around 1 so no channel is switched off."""
    g = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    return dict(x=nhwc(N, C, H, W, **g), conv_weight=rand(C, 1, k, k, scale=1 / k, **g),
                conv_bias=rand(C, **g) if bias else None,
                ln_weight=(1 + rand(C, scale=0.5)).to(device, dtype).requires_grad_(requires_grad),
                ln_bias=rand(C, scale=0.5, **g), eps=1e-6)


# Channel counts off the vector widths, images smaller than the kernel, 1x1 images, every k.
_CASES = (dict(N=2, C=8, H=5, W=6, k=3), dict(N=1, C=3, H=1, W=1, k=7, bias=False),
          dict(N=2, C=20, H=9, W=7, k=5), dict(N=1, C=36, H=4, W=11, k=7))


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False) -> List[Dict[str, object]]:
    return [make_inputs(device, dtype, requires_grad=requires_grad, **c) for c in _CASES]


def _fake(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    N, _, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    stats = x.new_empty((N, H, W), dtype=torch.float32)
    return y, stats, torch.empty_like(stats)


def statistics(x, conv_weight, conv_bias, eps):
    """(mean, rstd) [N, H, W] fp32 of the LayerNorm in ``dwconv_ln`` (for the backward's inputs)."""
    C, k = x.shape[1], conv_weight.shape[-1]
    z = F.conv2d(x.float(), conv_weight.float(), None if conv_bias is None else conv_bias.float(),
                 padding=k // 2, groups=C)
    var, mean = torch.var_mean(z, dim=1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def make_bwd_inputs(device="cpu", dtype=torch.float32, **shape) -> Dict[str, object]:
    """The backward op's inputs: a forward case, a random grad_y and the forward's statistics."""
    a = make_inputs(device, dtype, **shape)
    mean, rstd = statistics(a["x"], a["conv_weight"], a["conv_bias"], a["eps"])
    return dict(grad_y=nhwc(*a["x"].shape, dtype=dtype, device=device), x=a["x"],
                conv_weight=a["conv_weight"], conv_bias=a["conv_bias"], ln_weight=a["ln_weight"],
                mean=mean, rstd=rstd)


def _bwd_fake(grad_y, x, conv_weight, conv_bias, ln_weight, mean, rstd):
    C = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last),
            torch.empty_like(conv_weight, memory_format=torch.contiguous_format),
            (conv_bias if conv_bias is not None else conv_weight).new_empty((C,)),
            ln_weight.new_empty((C,)), ln_weight.new_empty((C,)))


SPEC = OpSpec(
    name="dwconv_ln", reference=reference.dwconv_ln, outputs=("y", "mean", "rstd"), fake=_fake,
    make_inputs=make_inputs, sample_inputs=sample_inputs, check=check_dwconv_ln,
    channels_last=("x",), backward="dwconv_ln_bwd")

BWD_SPEC = OpSpec(
    name="dwconv_ln_bwd", reference=reference.dwconv_ln_bwd,
    outputs=("d_x", "d_conv_weight", "d_conv_bias", "d_ln_weight", "d_ln_bias"), fake=_bwd_fake,
    make_inputs=make_bwd_inputs,
    sample_inputs=lambda device="cpu", dtype=torch.float32: [
        make_bwd_inputs(device, dtype, **c) for c in _CASES],
    channels_last=("grad_y", "x"))
