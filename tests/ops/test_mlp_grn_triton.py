"""mlp_grn on the Triton backend (kernels/mlp_grn.py) against the fp64 reference.

Runs on a GPU for real; without CUDA, under the Triton CPU interpreter at small shapes. GRN
reduces over H*W per image, so the cases use N=2 with H*W not a multiple of the row tile
(7x7 -> tile 64, 9x11 -> tile 16, 14x14 -> tile 32) and 1x1 images; every value of C (40, 96,
136, 384, 768), biases and residual None or given, fp32 and fp16/bf16.
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

from convnext_fast.kernels import mlp_grn as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if tm.available() is not None:
    pytest.skip(f"triton backend unavailable: {tm.available()}", allow_module_level=True)
if DEVICE == "cpu" and tm.interpreter_problem() is not None:
    # e.g. a test module collected earlier imported timm, which imports triton
    pytest.skip(f"{tm.interpreter_problem()}; run this file in its own process",
                allow_module_level=True)
CL = torch.channels_last
EPS = 1e-6


def make_inputs(N, C, H, W, dtype, bias=True, residual=True):
    D = 4 * C

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape)).to(device=DEVICE, dtype=dtype)

    y = t(N, C, H, W).contiguous(memory_format=CL)
    w1 = t(D, C, scale=C ** -0.5)
    b1 = t(D, scale=0.5) if bias else None
    gw = t(D, scale=0.5)
    gb = t(D, scale=0.5)
    w2 = t(C, D, scale=D ** -0.5)
    b2 = t(C, scale=0.5) if bias else None
    r = t(N, C, H, W).contiguous(memory_format=CL) if residual else None
    return y, w1, b1, gw, gb, w2, b2, r


def to64(x):
    return None if x is None else x.detach().double()


def check_low(got, ref64, torch_same_dtype, name):
    # The Triton interpreter converts fp32 -> bf16 by truncation (round toward zero), which doubles
    # the final rounding error; on a GPU the conversion rounds to nearest even and the rule is 2x.
    factor = 3.0 if INTERPRET and got.dtype == torch.bfloat16 else 2.0
    assert_parity(got, ref64, torch_same_dtype, name=name, factor=factor)


def ref_fn(y, w1, b1, gw, gb, w2, b2, r):
    return reference.mlp_grn(y, w1, b1, gw, gb, w2, b2, r, EPS)


def op_fn(y, w1, b1, gw, gb, w2, b2, r):
    return torch.ops.convnext_fast.mlp_grn_triton(y, w1, b1, gw, gb, w2, b2, r, EPS)


def test_block_m_heuristic():
    # ConvNeXt stage shapes and the odd ones used below
    assert K.grn_block_m(56 * 56) == 128
    assert K.grn_block_m(28 * 28) == 128
    assert K.grn_block_m(14 * 14) == 32
    assert K.grn_block_m(7 * 7) == 64
    assert K.grn_block_m(9 * 11) == 16
    assert K.grn_block_m(1) == 16


# ----------------------------------------------------------------------------------------------
# forward: the launcher writing into a NaN-poisoned out=

# (N, C, H, W, bias, residual)
FWD_CASES = [
    (2, 40, 7, 7, True, True),
    (1, 40, 1, 1, False, False),
    (2, 96, 9, 11, True, False),
    (1, 96, 3, 3, False, True),
    (1, 136, 14, 14, True, True),
    (2, 136, 1, 1, True, True),
    (2, 384, 3, 3, False, True),
    (1, 384, 7, 7, True, False),
    (1, 768, 1, 3, True, True),
]


def _run_fwd(args):
    out = torch.full_like(args[0], float("nan"), memory_format=CL)
    got = K.mlp_grn_fwd(*args, EPS, out=out)
    assert got is out
    return out


@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + "-b%dr%d" % c[4:])
def test_forward_fp32(case):
    N, C, H, W, b, r = case
    args = make_inputs(N, C, H, W, torch.float32, b, r)
    out = _run_fwd(args)
    assert_fp32(out, ref_fn(*map(to64, args)), f"mlp_grn{case}")


@pytest.mark.parametrize("case", [(2, 96, 7, 7, torch.bfloat16), (2, 136, 9, 11, torch.float16),
                                  (1, 384, 3, 3, torch.bfloat16)],
                         ids=lambda c: "x".join(map(str, c[:4])) + f"-{c[4]}")
def test_forward_low_precision(case):
    N, C, H, W, dtype = case
    args = make_inputs(N, C, H, W, dtype, bias=C != 136)
    out = _run_fwd(args)
    check_low(out, ref_fn(*map(to64, args)), ref_fn(*args), f"mlp_grn{case}")


# ----------------------------------------------------------------------------------------------
# backward: autograd through convnext_fast::mlp_grn_triton vs autograd of the fp64 reference

NAMES = ["dy", "d_fc1_weight", "d_fc1_bias", "d_grn_weight", "d_grn_bias", "d_fc2_weight",
         "d_fc2_bias", "d_residual"]


def _grads(fn, args, go):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    out.backward(go)
    return out, [None if a is None else a.grad for a in leaves]


BWD_CASES = [
    (2, 40, 7, 7, True, True),
    (2, 96, 9, 11, False, False),
    (1, 136, 14, 14, True, True),
    (2, 384, 3, 3, True, False),
    (1, 768, 1, 1, False, True),
]


def _check_grads(args, go):
    out, grads = _grads(op_fn, args, go)
    _, ref = _grads(ref_fn, [to64(a) for a in args], go.double())
    assert_fp32(out.detach(), ref_fn(*map(to64, args)), "out")
    for name, gr, rf, a in zip(NAMES, grads, ref, args):
        assert (gr is None) == (a is None), name
        if gr is not None:
            assert gr.shape == a.shape and gr.dtype == a.dtype, name
            assert_fp32(gr, rf, name)


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + "-b%dr%d" % c[4:])
def test_backward_fp32(case):
    N, C, H, W, b, r = case
    args = make_inputs(N, C, H, W, torch.float32, b, r)
    # an NCHW-contiguous upstream gradient: the backward must accept any layout
    _check_grads(args, torch.randn(N, C, H, W, device=DEVICE))


def test_backward_zero_norm_channel():
    # channel 5 of the hidden layer is identically 0 (zero fc1 row, no fc1 bias): gx = 0 there
    y, w1, _, gw, gb, w2, b2, r = make_inputs(2, 40, 3, 3, torch.float32)
    w1[5] = 0
    _check_grads((y, w1, None, gw, gb, w2, b2, r), torch.randn(2, 40, 3, 3, device=DEVICE))


def test_nchw_inputs_and_expanded_grad():
    # NCHW-contiguous y/residual with N == 1 ([M, C] is a strided view) and a stride-0 gradient
    y, w1, b1, gw, gb, w2, b2, r = make_inputs(1, 40, 3, 5, torch.float32)
    args = (y.contiguous(), w1, b1, gw, gb, w2, b2, r.contiguous())
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = op_fn(*leaves)
    assert out.is_contiguous(memory_format=CL)
    assert_fp32(out.detach(), ref_fn(*map(to64, args)), "out")
    out.sum().backward()
    _, ref = _grads(ref_fn, [to64(a) for a in args], torch.ones(1, 40, 3, 5).double())
    for name, a, rf in zip(NAMES, leaves, ref):
        assert_fp32(a.grad, rf, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_low_precision(dtype):
    args = make_inputs(2, 96, 7, 7, dtype)
    go = torch.randn(2, 96, 7, 7, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    _, grads = _grads(op_fn, args, go)
    _, same = _grads(ref_fn, args, go)
    _, ref = _grads(ref_fn, [to64(a) for a in args], go.double())
    for name, gr, sm, rf in zip(NAMES, grads, same, ref):
        check_low(gr, rf, sm, f"{name}-{dtype}")


def test_backward_launcher_and_determinism():
    args = make_inputs(2, 136, 7, 7, torch.float32)
    go = torch.randn(2, 136, 7, 7, device=DEVICE).contiguous(memory_format=CL)
    y, w1, b1, gw, gb, w2, b2, _ = args
    first = K.mlp_grn_bwd(go, y, w1, b1, gw, gb, w2, b2, EPS, True)
    second = K.mlp_grn_bwd(go, y, w1, b1, gw, gb, w2, b2, EPS, True)
    assert first[-1] is go
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"
    _, ref = _grads(ref_fn, [to64(a) for a in args], go.double())
    for name, gr, rf in zip(NAMES, first, ref):
        assert_fp32(gr, rf, name)
    _, g1 = _grads(op_fn, args, go)
    _, g2 = _grads(op_fn, args, go)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# registration

def test_public_op_and_backend_registration():
    assert backends.available("mlp_grn", "triton") is None
    args = make_inputs(2, 40, 3, 3, torch.float32)
    out = ops.mlp_grn(*args, EPS, backend="triton")
    assert_fp32(out, ref_fn(*map(to64, args)), "ops.mlp_grn")
    assert tm.supports_mlp_grn(*args, EPS) is None
    assert "dtype" in tm.supports_mlp_grn(*[to64(a) for a in args], EPS)


def test_opcheck():
    args = make_inputs(2, 40, 3, 3, torch.float32)
    args = tuple(None if a is None else a.requires_grad_() for a in args) + (EPS,)
    if INTERPRET:
        # Under TRITON_INTERPRET=1 torch.library.wrap_triton hands back the interpreted kernel
        # itself, so fake/functional tensors reach the interpreter ("Cannot access data pointer",
        # meta storage errors): test_faketensor and test_aot_dispatch_dynamic are environmental
        # failures on CPU. They run on a GPU.
        utils = ("test_schema", "test_autograd_registration")
    else:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.convnext_fast.mlp_grn_triton.default, args, test_utils=utils)
    nob = (args[0], args[1], None, args[3], args[4], args[5], None, None, EPS)
    torch.library.opcheck(torch.ops.convnext_fast.mlp_grn_triton.default, nob, test_utils=utils)
