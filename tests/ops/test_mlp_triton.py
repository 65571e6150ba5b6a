"""mlp, forward and backward, on the Triton kernels (convnext_fast/kernels/mlp.py) against fp64;
and what the kernels of mlp and mlp_grn have alike (backward launcher, layouts, support checks),
parametrized over both ops. What only GRN has is in test_mlp_grn_triton.py.

Runs on a GPU for real; without CUDA, under the Triton CPU interpreter at small shapes.
Cases cover every value of C (40, 96, 136, 384, 768), H x W (1, 3, 7, 9x11, 14), N (1, 2),
gamma / residual / biases present or None, both forward paths (fused, two_gemm), fp32 and
fp16/bf16 - not their cross product. Plain parity on small shapes is tests/ops/test_contract.py's.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # _kernel_tests.py (importlib import mode adds none)
from _kernel_tests import (CL, DEVICE, as64, check_common_refusals,  # noqa: E402
                          check_forward, check_gradients, check_low_gradients, grads,
                          inputs, launcher,
                          ref, skip_module_unless_triton, triton_op)

from convnext_fast.specs import SPECS  # noqa: E402
from convnext_fast.testing import assert_fp32  # noqa: E402

OPS = ("mlp", "mlp_grn")
skip_module_unless_triton(*OPS)

# ----------------------------------------------------------------------------------------------
# forward: the launcher writing into a NaN-poisoned out=

# (N, C, H, W, bias, gamma, residual, path): path None = automatic (kernels.mlp.fused_path: the
# fused kernels where their tiles fit both sm_90 and sm_80, C <= 192 at 16 bits, else two_gemm)
FWD_CASES = [
    (1, 40, 1, 1, True, True, True, None),
    (2, 40, 7, 7, False, False, False, None),
    (2, 96, 3, 3, True, True, False, "fused"),
    (1, 96, 14, 14, True, False, True, None),
    (2, 136, 9, 11, True, True, True, "fused"),
    (1, 136, 3, 3, False, True, False, None),
    (2, 384, 3, 3, True, True, True, None),
    (1, 384, 7, 7, False, False, True, None),
    (1, 768, 1, 3, True, True, True, None),
    (2, 96, 7, 7, True, True, True, "two_gemm"),
    (1, 384, 1, 1, True, False, False, "fused"),
]


def _id(case):
    N, C, H, W, b, g, r, path = case
    return f"{N}x{C}x{H}x{W}-b{int(b)}g{int(g)}r{int(r)}-{path or 'auto'}"


@pytest.mark.parametrize("case", FWD_CASES, ids=_id)
def test_forward_fp32(case):
    N, C, H, W, b, g, r, path = case
    args = inputs("mlp", N, C, H, W, torch.float32, DEVICE, bias=b, gamma=g, residual=r)
    check_forward("mlp", args, f"mlp{case}", path=path)


LOW_CASES = [
    (2, 96, 7, 7, torch.bfloat16, None),
    (2, 136, 9, 11, torch.float16, None),
    (1, 384, 3, 3, torch.bfloat16, None),
    (1, 40, 14, 14, torch.float16, "two_gemm"),
]


@pytest.mark.parametrize("case", LOW_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-{c[5]}")
def test_forward_low_precision(case):
    N, C, H, W, dtype, path = case
    args = inputs("mlp", N, C, H, W, dtype, DEVICE, bias=C != 136)
    check_forward("mlp", args, f"mlp{case}", path=path)


# ----------------------------------------------------------------------------------------------
# backward: autograd through convnext_fast::mlp_triton vs autograd of the fp64 reference

# (N, C, H, W, bias, gamma, residual)
BWD_CASES = [
    (2, 40, 3, 3, True, True, True),
    (1, 96, 7, 7, False, False, False),
    (2, 136, 9, 11, True, True, False),
    (1, 384, 3, 3, True, False, True),
    (1, 768, 1, 1, False, True, True),
    (1, 96, 14, 14, True, True, True),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + "-b%dg%dr%d" % c[4:])
def test_backward_fp32(case):
    N, C, H, W, b, g, r = case
    args = inputs("mlp", N, C, H, W, torch.float32, DEVICE, bias=b, gamma=g, residual=r)
    # an NCHW-contiguous upstream gradient: the backward must accept any layout
    check_gradients("mlp", args, torch.randn(N, C, H, W, device=DEVICE), name=str(case))


# ----------------------------------------------------------------------------------------------
# mlp and mlp_grn alike

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", OPS)
def test_backward_low_precision(op, dtype):
    args = inputs(op, 2, 96, 7, 7, dtype, DEVICE)
    go = torch.randn(2, 96, 7, 7, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    check_low_gradients(op, args, go, str(dtype))


@pytest.mark.parametrize("op", OPS)
def test_backward_launcher_and_determinism(op):
    """The backward launcher on its own (d_residual is grad_out itself) and through autograd: two
    runs bit-identical, as the weight gradients are reduced in a fixed order without atomics."""
    args = inputs(op, 2, 136, 7, 7, torch.float32, DEVICE)
    go = torch.randn(2, 136, 7, 7, device=DEVICE).contiguous(memory_format=CL)
    named = dict(zip(SPECS[op].names, args), grad_out=go)
    bwd_args = {n: named[n] for n in SPECS[SPECS[op].backward].names}
    first = launcher(op, "bwd")(**bwd_args, has_residual=True)
    second = launcher(op, "bwd")(**bwd_args, has_residual=True)
    assert first[-1] is go
    _, want = grads(ref(op), as64(args), go.double())
    # the launcher returns the gradients in the order of the forward's tensor arguments
    for name, a, b, w in zip(SPECS[op].names, first, second, want):
        assert torch.equal(a, b), f"d{name} differs between two identical backward runs"
        assert_fp32(a, w, f"d{name}")
    _, g1 = grads(triton_op(op), args, go)
    _, g2 = grads(triton_op(op), args, go)
    for name, a, b in zip(SPECS[op].names, g1, g2):
        assert (a is None and b is None) or torch.equal(a, b), f"d{name}"


@pytest.mark.parametrize("op, shape", [("mlp", (1, 96, 3, 3)), ("mlp_grn", (1, 40, 3, 5))], ids=OPS)
def test_nchw_inputs_and_expanded_grad(op, shape):
    # NCHW-contiguous y and residual with N == 1 ([M, C] is then a strided view, not row-major);
    # a stride-0 upstream gradient, as from out.sum()
    named = dict(zip(SPECS[op].names, inputs(op, *shape, torch.float32, DEVICE)))
    for name in ("y", "residual"):
        named[name] = named[name].contiguous()
    check_gradients(op, list(named.values()), torch.ones((), device=DEVICE).expand(shape))


@pytest.mark.parametrize("op", OPS)
def test_backend_supports(op):
    check_common_refusals(op, inputs(op, 1, 40, 3, 3, torch.float32, DEVICE))
