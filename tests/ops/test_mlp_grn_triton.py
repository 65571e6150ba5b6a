"""mlp_grn on the Triton backend (convnext_fast/kernels/mlp_grn.py) against the fp64 reference:
what GRN adds to the mlp kernels (what both have alike is tested in test_mlp_triton.py).

Runs on a GPU for real; without CUDA, under the Triton CPU interpreter at small shapes. GRN
reduces over H*W per image, so the cases use N=2 with H*W not a multiple of the row tile
(7x7 -> tile 64, 9x11 -> tile 16, 14x14 -> tile 32) and 1x1 images; every value of C (40, 96,
136, 384, 768), biases and residual None or given, fp32 and fp16/bf16.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # _kernel_tests.py (importlib import mode adds none)
from _kernel_tests import (DEVICE, check_forward, check_gradients, inputs,  # noqa: E402
                          skip_module_unless_triton)

skip_module_unless_triton("mlp_grn")

from convnext_fast.kernels import mlp_grn as K  # noqa: E402


def test_block_m_heuristic():
    # ConvNeXt stage shapes on a GPU: never under 64 rows (a warpgroup MMA's height)
    gpu = K.GRN_BLOCK_M_CANDIDATES
    assert [K.grn_block_m(s * s, gpu) for s in (56, 28, 14, 7)] == [128, 128, 128, 64]
    assert K.grn_block_m(1, gpu) == 64
    # the interpreter's (the odd shapes used below)
    cpu = K.GRN_BLOCK_M_CANDIDATES_INTERPRET
    assert [K.grn_block_m(hw, cpu) for hw in (7 * 7, 9 * 11, 14 * 14, 1)] == [64, 16, 32, 16]


# (N, C, H, W, bias, residual, backward): the forward runs on every case, the backward on those
# marked
CASES = [
    (2, 40, 7, 7, True, True, True),      (1, 40, 1, 1, False, False, False),
    (2, 96, 9, 11, True, False, False),   (2, 96, 9, 11, False, False, True),
    (1, 96, 3, 3, False, True, False),    (1, 136, 14, 14, True, True, True),
    (2, 136, 1, 1, True, True, False),    (2, 384, 3, 3, False, True, False),
    (2, 384, 3, 3, True, False, True),    (1, 384, 7, 7, True, False, False),
    (1, 768, 1, 3, True, True, False),    (1, 768, 1, 1, False, True, True),
]


def _id(case):
    return "x".join(map(str, case[:4])) + "-b%dr%d" % case[4:6]


def case_inputs(case, dtype=torch.float32):
    N, C, H, W, bias, residual, _ = case
    return inputs("mlp_grn", N, C, H, W, dtype, DEVICE, bias=bias, residual=residual)


# ----------------------------------------------------------------------------------------------
# forward: the launcher writing into a NaN-poisoned out=

@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_fp32(case):
    check_forward("mlp_grn", case_inputs(case), f"mlp_grn{case[:6]}")


@pytest.mark.parametrize("case", [(2, 96, 7, 7, torch.bfloat16), (2, 136, 9, 11, torch.float16),
                                  (1, 384, 3, 3, torch.bfloat16)],
                         ids=lambda c: "x".join(map(str, c[:4])) + f"-{c[4]}")
def test_forward_low_precision(case):
    N, C, H, W, dtype = case
    check_forward("mlp_grn", inputs("mlp_grn", N, C, H, W, dtype, DEVICE, bias=C != 136),
                  f"mlp_grn{case}")


# ----------------------------------------------------------------------------------------------
# backward: autograd through convnext_fast::mlp_grn_triton vs autograd of the fp64 reference

@pytest.mark.parametrize("case", [c for c in CASES if c[6]], ids=_id)
def test_backward_fp32(case):
    # an NCHW-contiguous upstream gradient: the backward must accept any layout
    go = torch.randn(*case[:4], device=DEVICE)
    check_gradients("mlp_grn", case_inputs(case), go, name=str(case[:6]))


def test_backward_zero_norm_channel():
    # channel 5 of the hidden layer is identically 0 (zero fc1 row, no fc1 bias): gx = 0 there
    y, w1, _, gw, gb, w2, b2, r, eps = inputs("mlp_grn", 2, 40, 3, 3, torch.float32, DEVICE)
    w1[5] = 0
    check_gradients("mlp_grn", [y, w1, None, gw, gb, w2, b2, r, eps],
                    torch.randn(2, 40, 3, 3, device=DEVICE))
