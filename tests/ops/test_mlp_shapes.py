"""mlp and mlp_grn on the Triton kernels at awkward shapes, forward and backward, against fp64.

The C the fused kernels split into two power-of-two chunks (80 = 64 + 16, 96 = 64 + 32,
160 = 128 + 32, 192 = 128 + 64), C = 320 past them (two GEMMs), N*H*W = 1, row counts that
are no multiple of any tile, fp32 / bf16 / fp16; outputs and every launcher-allocated buffer
NaN-poisoned (tests/conftest.py), so an unwritten element fails. The fused backward is run
where the automatic choice takes it and, through its launcher, where it does not; its weight
gradients come from several row splits and must be bit-identical across runs.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # _kernel_tests.py (importlib import mode adds none)
from _kernel_tests import (CL, DEVICE, as64, check_forward, check_gradients, check_low_gradients,  # noqa: E402
                          check_low, grads, inputs, launcher, ref, skip_module_unless_triton)

from convnext_fast.specs import SPECS  # noqa: E402
from convnext_fast.testing import assert_fp32  # noqa: E402

skip_module_unless_triton("mlp", "mlp_grn")

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16

# (op, N, C, H, W, dtype): forward through the launcher, backward through autograd
CASES = [
    ("mlp", 2, 80, 3, 5, FP32),
    ("mlp", 1, 160, 5, 7, FP32),
    ("mlp", 1, 192, 1, 1, FP32),
    ("mlp", 2, 320, 1, 3, FP32),
    ("mlp", 1, 192, 3, 7, BF16),
    ("mlp", 3, 80, 1, 1, FP16),
    ("mlp_grn", 2, 80, 3, 5, FP32),
    ("mlp_grn", 1, 192, 1, 1, FP32),
    ("mlp_grn", 2, 160, 3, 3, BF16),
    ("mlp_grn", 1, 320, 1, 3, FP16),
]


def _id(c):
    return f"{c[0]}-{c[1]}x{c[2]}x{c[3]}x{c[4]}-{str(c[5])[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_backward(case):
    op, N, C, H, W, dtype = case
    args = inputs(op, N, C, H, W, dtype, DEVICE)
    check_forward(op, args, _id(case))
    go = torch.randn(N, C, H, W, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    if dtype == FP32:
        check_gradients(op, args, go, name=_id(case))
        return
    check_low_gradients(op, args, go, _id(case))


# (op, N, C, H, W, dtype, options): the backward launcher on both paths, fp32 included (where
# the automatic choice is two_gemm); with M > 64 rows the fused weight-gradient kernel sums
# several row splits (64 rows each under the interpreter), and mlp_grn's images straddle them
BWD_PATHS = [
    ("mlp", 2, 96, 7, 7, FP32, {"gamma": True}),
    ("mlp", 1, 192, 3, 7, FP32, {"gamma": False}),
    ("mlp", 1, 160, 5, 5, BF16, {"gamma": True}),
    ("mlp_grn", 2, 80, 5, 7, FP32, {}),
]


@pytest.mark.parametrize("case", BWD_PATHS, ids=lambda c: _id(c[:6]))
def test_backward_paths(case):
    op, N, C, H, W, dtype, options = case
    args = inputs(op, N, C, H, W, dtype, DEVICE, **options)
    go = torch.randn(N, C, H, W, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    named = dict(zip(SPECS[op].names, args), grad_out=go)
    bwd_args = {n: named[n] for n in SPECS[SPECS[op].backward].names}
    _, want = grads(ref(op), as64(args), go.double())
    _, same = grads(ref(op), args, go) if dtype != FP32 else (None, want)
    results = {}
    for path in ("fused", "two_gemm"):
        results[path] = launcher(op, "bwd")(**bwd_args, has_residual=True, path=path)
        for name, g, s, w in zip(SPECS[op].names, results[path], same, want):
            if w is None:
                assert g is None, name
            elif dtype == FP32:
                assert_fp32(g, w, f"d{name}-{path}")
            else:
                check_low(g, w, s, f"d{name}-{path}")
    again = launcher(op, "bwd")(**bwd_args, has_residual=True, path="fused")
    for name, a, b in zip(SPECS[op].names, results["fused"], again):
        assert (a is None and b is None) or torch.equal(a, b), f"d{name}: reruns differ"


@pytest.mark.parametrize("C", [96, 192])
def test_fused_forward_where_automatic_is_two_gemm(C):
    # fp32 at C = 192 exceeds sm_80's shared memory, so the automatic path is two GEMMs; the
    # fused kernel itself must still be exact there (sm_90 takes it)
    args = inputs("mlp", 1, C, 3, 5, FP32, DEVICE)
    check_forward("mlp", args, f"mlp-{C}-fused", path="fused")
