"""mlp on the Triton backend (kernels/mlp.py) against the fp64 reference, forward and backward.

Runs on a GPU for real; without CUDA, under the Triton CPU interpreter at small shapes.
Cases cover every value of C (40, 96, 136, 384, 768), H x W (1, 3, 7, 9x11, 14), N (1, 2),
gamma / residual / biases present or None, both forward paths (fused, two_gemm), fp32 and
fp16/bf16 - not their cross product.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402

pytest.importorskip("triton")

import convnext_fast.ops._triton_mlp as tm  # noqa: E402
from convnext_fast import backends, ops, reference  # noqa: E402
from convnext_fast.testing import assert_fp32, assert_parity  # noqa: E402

from convnext_fast.kernels import mlp as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if tm.available() is not None:
    pytest.skip(f"triton backend unavailable: {tm.available()}", allow_module_level=True)
if DEVICE == "cpu" and tm.interpreter_problem() is not None:
    # e.g. a test module collected earlier imported timm, which imports triton
    pytest.skip(f"{tm.interpreter_problem()}; run this file in its own process",
                allow_module_level=True)
CL = torch.channels_last


def make_inputs(N, C, H, W, dtype, bias=True, gamma=True, residual=True):
    D = 4 * C
    dev = DEVICE

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape)).to(device=dev, dtype=dtype)

    y = t(N, C, H, W).contiguous(memory_format=CL)
    w1 = t(D, C, scale=C ** -0.5)
    b1 = t(D, scale=0.5) if bias else None
    w2 = t(C, D, scale=D ** -0.5)
    b2 = t(C, scale=0.5) if bias else None
    g = t(C) if gamma else None
    r = t(N, C, H, W).contiguous(memory_format=CL) if residual else None
    return y, w1, b1, w2, b2, g, r


def to64(x):
    return None if x is None else x.detach().double()


def check_low(got, ref64, torch_same_dtype, name):
    # The Triton interpreter converts fp32 -> bf16 by truncation (round toward zero), which doubles
    # the final rounding error; on a GPU the conversion rounds to nearest even and the rule is 2x.
    factor = 3.0 if INTERPRET and got.dtype == torch.bfloat16 else 2.0
    assert_parity(got, ref64, torch_same_dtype, name=name, factor=factor)


# ----------------------------------------------------------------------------------------------
# forward: the launcher writing into a NaN-poisoned out=

# (N, C, H, W, bias, gamma, residual, path): path None = automatic (padded C <= 256 fused, else
# two_gemm; fp32 without TF32: padded C <= 64 fused)
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


def _run_fwd(args, path):
    out = torch.full_like(args[0], float("nan"), memory_format=CL)
    got = K.mlp_fwd(*args, out=out, path=path)
    assert got is out
    return out


@pytest.mark.parametrize("case", FWD_CASES, ids=_id)
def test_forward_fp32(case):
    N, C, H, W, b, g, r, path = case
    args = make_inputs(N, C, H, W, torch.float32, b, g, r)
    out = _run_fwd(args, path)
    assert_fp32(out, reference.mlp(*map(to64, args)), f"mlp{case}")


LOW_CASES = [
    (2, 96, 7, 7, torch.bfloat16, None),
    (2, 136, 9, 11, torch.float16, None),
    (1, 384, 3, 3, torch.bfloat16, None),
    (1, 40, 14, 14, torch.float16, "two_gemm"),
]


@pytest.mark.parametrize("case", LOW_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-{c[5]}")
def test_forward_low_precision(case):
    N, C, H, W, dtype, path = case
    args = make_inputs(N, C, H, W, dtype, bias=C != 136)
    out = _run_fwd(args, path)
    check_low(out, reference.mlp(*map(to64, args)), reference.mlp(*args), f"mlp{case}")


# ----------------------------------------------------------------------------------------------
# backward: autograd through convnext_fast::mlp_triton vs autograd of the fp64 reference

def _grads(fn, args, go):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    out.backward(go)
    return out, [None if a is None else a.grad for a in leaves]


def _op(*args):
    return torch.ops.convnext_fast.mlp_triton(*args)


NAMES = ["dy", "d_fc1_weight", "d_fc1_bias", "d_fc2_weight", "d_fc2_bias", "d_gamma", "d_residual"]

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
    args = make_inputs(N, C, H, W, torch.float32, b, g, r)
    # an NCHW-contiguous upstream gradient: the backward must accept any layout
    go = torch.randn(N, C, H, W, device=DEVICE)
    out, grads = _grads(_op, args, go)
    _, ref = _grads(reference.mlp, [to64(a) for a in args], go.double())
    assert_fp32(out.detach(), reference.mlp(*map(to64, args)), "out")
    assert out.is_contiguous(memory_format=CL)
    for name, gr, rf, a in zip(NAMES, grads, ref, args):
        assert (gr is None) == (a is None), name
        if gr is not None:
            assert gr.shape == a.shape and gr.dtype == a.dtype, name
            assert_fp32(gr, rf, f"{name}{case}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_low_precision(dtype):
    args = make_inputs(2, 96, 7, 7, dtype)
    go = torch.randn(2, 96, 7, 7, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    _, grads = _grads(_op, args, go)
    _, same = _grads(reference.mlp, args, go)
    _, ref = _grads(reference.mlp, [to64(a) for a in args], go.double())
    for name, gr, sm, rf in zip(NAMES, grads, same, ref):
        check_low(gr, rf, sm, f"{name}-{dtype}")


def test_backward_launcher_and_determinism():
    args = make_inputs(2, 136, 7, 7, torch.float32)
    go = torch.randn(2, 136, 7, 7, device=DEVICE).contiguous(memory_format=CL)
    y, w1, b1, w2, b2, g, _ = args
    first = K.mlp_bwd(go, y, w1, b1, w2, b2, g, True)
    second = K.mlp_bwd(go, y, w1, b1, w2, b2, g, True)
    assert first[-1] is go
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"
    _, ref = _grads(reference.mlp, [to64(a) for a in args], go.double())
    for name, gr, rf in zip(NAMES, first, ref):
        assert_fp32(gr, rf, name)
    # through autograd too: two runs bit-identical
    _, g1 = _grads(_op, args, go)
    _, g2 = _grads(_op, args, go)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.equal(a, b), name


def test_nchw_inputs_and_any_grad_layout():
    # NCHW-contiguous y/residual with N == 1: [M, C] is then a strided view, not row-major
    y, w1, b1, w2, b2, g, r = make_inputs(1, 96, 3, 3, torch.float32)
    args = (y.contiguous(), w1, b1, w2, b2, g, r.contiguous())
    out, grads = _grads(_op, args, torch.randn(1, 96, 3, 3, device=DEVICE))
    assert out.is_contiguous(memory_format=CL)
    assert_fp32(out.detach(), reference.mlp(*map(to64, args)), "out")
    _, ref = _grads(reference.mlp, [to64(a) for a in args], torch.ones(1, 96, 3, 3).double())
    # expanded (stride-0) upstream gradient, as from out.sum()
    leaves = [a.detach().clone().requires_grad_() for a in args]
    _op(*leaves).sum().backward()
    for name, a, rf in zip(NAMES, leaves, ref):
        assert_fp32(a.grad, rf, name)


# ----------------------------------------------------------------------------------------------
# registration

def test_public_op_and_backend_registration():
    assert backends.available("mlp", "triton") is None
    args = make_inputs(1, 40, 3, 3, torch.float32)
    out = ops.mlp(*args, backend="triton")
    assert_fp32(out, reference.mlp(*map(to64, args)), "ops.mlp")
    assert tm.supports_mlp(*args) is None
    f64 = [to64(a) for a in args]
    assert "dtype" in tm.supports_mlp(*f64)
    if DEVICE == "cpu":
        old = os.environ.pop("TRITON_INTERPRET")
        try:
            assert "TRITON_INTERPRET" in tm.supports_mlp(*args)
        finally:
            os.environ["TRITON_INTERPRET"] = old


def test_opcheck():
    args = make_inputs(2, 40, 3, 3, torch.float32)
    args = tuple(None if a is None else a.requires_grad_() for a in args)
    if INTERPRET:
        # Under TRITON_INTERPRET=1 torch.library.wrap_triton hands back the interpreted kernel
        # itself, so fake/functional tensors reach the interpreter ("Cannot access data pointer",
        # meta storage errors): test_faketensor and test_aot_dispatch_dynamic are environmental
        # failures on CPU. They run on a GPU.
        utils = ("test_schema", "test_autograd_registration")
    else:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.convnext_fast.mlp_triton.default, args, test_utils=utils)
    nog = (args[0], args[1], None, args[3], None, None, None)
    torch.library.opcheck(torch.ops.convnext_fast.mlp_triton.default, nog, test_utils=utils)
