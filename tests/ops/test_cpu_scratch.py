"""The C++ CPU kernels take their scratch (conv row windows, accumulator rows, mlp hidden tiles and
partial products) from a pool kept per thread across calls (csrc/include/cpu_vec.h,
ThreadScratch). A kernel that read scratch it had not written would see what the previous call
left there: these run the ops back to back over shapes and dtypes that grow, shrink and change
element size, on one and two threads, and check every result against the fp64 reference.
"""
import os
import sys

import pytest
import torch

from convnext_fast import _ext, ops, reference
from convnext_fast.testing import assert_fp32, assert_parity

sys.path.insert(0, os.path.dirname(__file__))  # _kernel_tests.py (importlib import mode adds none)
from _kernel_tests import as64, dwconv_ln_inputs, inputs, leaves  # noqa: E402

if _ext.load() is None:
    pytest.skip(f"extension not built: {_ext.error()}", allow_module_level=True)

CL = torch.channels_last


def _check_dwconv_ln(shape, dtype):
    args = dwconv_ln_inputs(shape, dtype)
    y = ops.dwconv_ln(*args, 1e-6, backend="cpu")
    ref64 = reference.dwconv_ln(*as64(args), 1e-6)
    assert_parity(y, ref64, reference.dwconv_ln(*args, 1e-6), name=f"dwconv_ln{shape}{dtype}")
    if dtype == torch.float32:  # the backward's windows and rows come from the pool too
        live = leaves(args)
        gy = torch.randn(y.shape).contiguous(memory_format=CL)
        got = torch.autograd.grad(ops.dwconv_ln(*live, 1e-6, backend="cpu"), live, gy)
        live64 = leaves(as64(args))
        want = torch.autograd.grad(reference.dwconv_ln(*live64, 1e-6), live64, gy.double())
        for i, (g, w) in enumerate(zip(got, want)):
            assert_fp32(g, w, name=f"dwconv_ln grad {i} {shape}", rtol=1e-5)


def _check_mlp(shape, dtype):
    args = inputs("mlp", *shape, dtype)
    out = ops.mlp(*args, backend="cpu")
    ref64 = reference.mlp(*as64(args))
    assert_parity(out, ref64, reference.mlp(*args), name=f"mlp{shape}{dtype}")


# Sizes go up and down so later calls find larger, used buffers in the pool; the mlp cases cover
# one tile with the hidden split over threads (M < 256), several tiles, and bf16 (2-byte) tiles.
SEQUENCE = [
    ("mlp", (2, 64, 16, 16), torch.float32),
    ("dwconv_ln", (1, 24, 5, 6, 7), torch.float32),
    ("mlp", (1, 96, 7, 7), torch.bfloat16),
    ("dwconv_ln", (2, 96, 14, 14, 7), torch.float32),
    ("mlp", (1, 40, 3, 5), torch.float32),
    ("dwconv_ln", (1, 13, 9, 11, 5), torch.bfloat16),
    ("mlp", (2, 33, 17, 16), torch.float32),
    ("dwconv_ln", (1, 40, 3, 5, 3), torch.float32),
]


@pytest.mark.parametrize("threads", [1, 2])
def test_ops_back_to_back_reuse_scratch_correctly(threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            for op, shape, dtype in SEQUENCE:
                (_check_dwconv_ln if op == "dwconv_ln" else _check_mlp)(shape, dtype)
    finally:
        torch.set_num_threads(saved)
