"""Spec of ``mlp_grn`` (ConvNeXt V2: Linear + exact GELU + GRN + Linear + residual; GRN reduces
over H*W per image and channel, so a call holds whole images) and of its backward ``mlp_grn_bwd``."""
from __future__ import annotations

from typing import Dict, List

import torch

from .. import reference
from . import OpSpec
from ._random import nhwc, rand
from .checks import check_mlp_grn
from .mlp import make_inputs as _mlp_inputs


def make_inputs(device="cpu", dtype=torch.float32, *, N=2, C=8, H=3, W=3, D=None, bias=True,
                residual=True, requires_grad=False) -> Dict[str, object]:
    """As ``mlp``'s inputs without gamma, with grn_weight, grn_bias [D]."""
    a = _mlp_inputs(device, dtype, N=N, C=C, H=H, W=W, D=D, bias=bias, gamma=False,
                    residual=residual, requires_grad=requires_grad)
    D = a["fc1_weight"].shape[0]
    g = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    return dict(y=a["y"], fc1_weight=a["fc1_weight"], fc1_bias=a["fc1_bias"],
                grn_weight=rand(D, **g), grn_bias=rand(D, **g), fc2_weight=a["fc2_weight"],
                fc2_bias=a["fc2_bias"], residual=a["residual"], eps=1e-6)


# One pixel per image (GRN over a single position), several images, no bias / residual, D != 4C.
_CASES = (dict(N=2, C=8, H=3, W=3), dict(N=3, C=5, H=1, W=1, bias=False, residual=False),
          dict(N=2, C=12, H=3, W=5, D=40), dict(N=1, C=20, H=7, W=3))


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False) -> List[Dict[str, object]]:
    return [make_inputs(device, dtype, requires_grad=requires_grad, **c) for c in _CASES]


def _fake(y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, residual, eps):
    return torch.empty_like(y, memory_format=torch.channels_last)


def make_bwd_inputs(device="cpu", dtype=torch.float32, **shape) -> Dict[str, object]:
    a = make_inputs(device, dtype, **shape)
    del a["residual"]
    return dict(grad_out=nhwc(*a["y"].shape, dtype=dtype, device=device), **a)


def _bwd_fake(grad_out, y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, eps):
    D, C = fc1_weight.shape
    return (torch.empty_like(y, memory_format=torch.channels_last),
            fc1_weight.new_empty((D, C)), fc1_weight.new_empty((D,)), fc1_weight.new_empty((D,)),
            fc1_weight.new_empty((D,)), fc1_weight.new_empty((C, D)), fc1_weight.new_empty((C,)))


SPEC = OpSpec(
    name="mlp_grn", reference=reference.mlp_grn, outputs=("out",), fake=_fake,
    make_inputs=make_inputs, sample_inputs=sample_inputs, check=check_mlp_grn,
    channels_last=("y", "residual"), backward="mlp_grn_bwd", passthrough=("residual",))

BWD_SPEC = OpSpec(
    name="mlp_grn_bwd", reference=reference.mlp_grn_bwd,
    outputs=("d_y", "d_fc1_weight", "d_fc1_bias", "d_grn_weight", "d_grn_bias", "d_fc2_weight",
             "d_fc2_bias"),
    fake=_bwd_fake, make_inputs=make_bwd_inputs,
    sample_inputs=lambda device="cpu", dtype=torch.float32: [
        make_bwd_inputs(device, dtype, **c) for c in _CASES],
    channels_last=("grad_out", "y"))
