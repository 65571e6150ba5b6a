"""Spec of ``mlp`` (Linear C->D + exact GELU + Linear D->C + layer scale + residual, per pixel)
and of its backward ``mlp_bwd`` (the hidden recomputed from y)."""
from __future__ import annotations

from typing import Dict, List

import torch

from .. import reference
from . import OpSpec
from ._random import nhwc, rand
from .checks import check_mlp


def make_inputs(device="cpu", dtype=torch.float32, *, N=2, C=8, H=3, W=3, D=None, bias=True,
                gamma=True, residual=True, requires_grad=False) -> Dict[str, object]:
    """y, residual [N, C, H, W] channels-last, fc1_weight [D, C], fc1_bias [D], fc2_weight [C, D],
    fc2_bias [C], gamma [C] (D = 4C by default); weights scaled by 1/sqrt(fan-in)."""
    D = D or 4 * C
    g = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    return dict(y=nhwc(N, C, H, W, **g), fc1_weight=rand(D, C, scale=C ** -0.5, **g),
                fc1_bias=rand(D, **g) if bias else None,
                fc2_weight=rand(C, D, scale=D ** -0.5, **g), fc2_bias=rand(C, **g) if bias else None,
                gamma=rand(C, **g) if gamma else None,
                residual=nhwc(N, C, H, W, **g) if residual else None)


# One pixel; rows off every tile; no bias / layer scale / residual; D != 4C.
_CASES = (dict(N=2, C=8, H=3, W=3), dict(N=1, C=5, H=1, W=1, bias=False, gamma=False, residual=False),
          dict(N=2, C=12, H=3, W=5, D=40), dict(N=1, C=20, H=7, W=3, gamma=False))


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False) -> List[Dict[str, object]]:
    return [make_inputs(device, dtype, requires_grad=requires_grad, **c) for c in _CASES]


def _fake(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
    return torch.empty_like(y, memory_format=torch.channels_last)


def make_bwd_inputs(device="cpu", dtype=torch.float32, **shape) -> Dict[str, object]:
    a = make_inputs(device, dtype, **shape)
    del a["residual"]
    return dict(grad_out=nhwc(*a["y"].shape, dtype=dtype, device=device), **a)


def _bwd_fake(grad_out, y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
    D, C = fc1_weight.shape
    return (torch.empty_like(y, memory_format=torch.channels_last),
            fc1_weight.new_empty((D, C)), fc1_weight.new_empty((D,)),
            fc1_weight.new_empty((C, D)), fc1_weight.new_empty((C,)), fc1_weight.new_empty((C,)))


SPEC = OpSpec(
    name="mlp", reference=reference.mlp, outputs=("out",), fake=_fake, make_inputs=make_inputs,
    sample_inputs=sample_inputs, check=check_mlp, channels_last=("y", "residual"),
    backward="mlp_bwd", passthrough=("residual",))

BWD_SPEC = OpSpec(
    name="mlp_bwd", reference=reference.mlp_bwd,
    outputs=("d_y", "d_fc1_weight", "d_fc1_bias", "d_fc2_weight", "d_fc2_bias", "d_gamma"),
    fake=_bwd_fake, make_inputs=make_bwd_inputs,
    sample_inputs=lambda device="cpu", dtype=torch.float32: [
        make_bwd_inputs(device, dtype, **c) for c in _CASES],
    channels_last=("grad_out", "y"))
