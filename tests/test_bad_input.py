"""Bad input to the public ops gets a clear exception naming the argument, never a crash."""
import pytest
import torch

from convnext_fast import ops


def dw_args(C=8, k=7, dtype=torch.float32):
    return [torch.randn(2, C, 5, 5, dtype=dtype), torch.randn(C, 1, k, k, dtype=dtype),
            torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)]


def mlp_args(C=8, D=32, dtype=torch.float32):
    return [torch.randn(2, C, 3, 3, dtype=dtype), torch.randn(D, C, dtype=dtype),
            torch.randn(D, dtype=dtype), torch.randn(C, D, dtype=dtype), torch.randn(C, dtype=dtype),
            torch.randn(C, dtype=dtype), torch.randn(2, C, 3, 3, dtype=dtype)]


def grn_args(C=8, D=32, dtype=torch.float32):
    y, w1, b1, w2, b2, _, res = mlp_args(C, D, dtype)
    return [y, w1, b1, torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype), w2, b2, res]


DW_CASES = [
    ("x", lambda a: a.__setitem__(0, a[0][0]), ValueError, "x must be 4-D"),
    ("x", lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "x must be float"),
    ("conv_weight", lambda a: a.__setitem__(1, torch.randn(4, 1, 7, 7)), ValueError, "conv_weight must have shape"),
    ("conv_weight", lambda a: a.__setitem__(1, torch.randn(8, 1, 6, 6)), ValueError, "odd k"),
    ("conv_weight", lambda a: a.__setitem__(1, torch.randn(8, 1, 7, 5)), ValueError, "odd k"),
    ("conv_bias", lambda a: a.__setitem__(2, torch.randn(9)), ValueError, "conv_bias must have shape [8]"),
    ("ln_weight", lambda a: a.__setitem__(3, torch.randn(8, dtype=torch.float64)), TypeError, "ln_weight has dtype torch.float64"),
    ("ln_bias", lambda a: a.__setitem__(4, torch.randn(8, device="meta")), ValueError, "ln_bias is on meta"),
    ("ln_bias", lambda a: a.__setitem__(4, [0.0] * 8), TypeError, "ln_bias must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", None])
@pytest.mark.parametrize("name,mutate,exc,msg", DW_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DW_CASES)])
def test_dwconv_ln_bad_input(name, mutate, exc, msg, backend):
    args = dw_args()
    mutate(args)
    with pytest.raises(exc, match=r"dwconv_ln: .*" + msg.replace("[", r"\[").replace("]", r"\]")):
        ops.dwconv_ln(*args, backend=backend)


# (slot in mlp's args, slot in mlp_grn's args, bad value, exception, message)
MLP_CASES = [
    (0, 0, torch.randn(2, 8, 9), ValueError, "y must be 4-D"),
    (1, 1, torch.randn(32, 7), ValueError, r"fc1_weight must have shape \[\*, 8\]"),
    (3, 5, torch.randn(8, 31), ValueError, r"fc2_weight must have shape \[8, 32\]"),
    (4, 6, torch.randn(8).bfloat16(), TypeError, "fc2_bias has dtype torch.bfloat16"),
    (6, 7, torch.randn(2, 8, 3, 4), ValueError, "residual must have shape"),
]


@pytest.mark.parametrize("i_mlp,i_grn,bad,exc,msg", MLP_CASES, ids=[c[4][:12] for c in MLP_CASES])
def test_mlp_bad_input(i_mlp, i_grn, bad, exc, msg):
    args, gargs = mlp_args(), grn_args()
    args[i_mlp], gargs[i_grn] = bad, bad
    with pytest.raises(exc, match="mlp: " + msg):
        ops.mlp(*args)
    with pytest.raises(exc, match="mlp_grn: " + msg):
        ops.mlp_grn(*gargs)


def test_mlp_gamma_shape():
    args = mlp_args()
    args[5] = torch.randn(9)
    with pytest.raises(ValueError, match=r"mlp: gamma must have shape \[8\]"):
        ops.mlp(*args)


def test_mlp_grn_weight_shape():
    args = grn_args()
    args[3] = torch.randn(31)
    with pytest.raises(ValueError, match=r"mlp_grn: grn_weight must have shape \[32\]"):
        ops.mlp_grn(*args)


def test_empty_batch_and_tiny_images():
    y, *rest = mlp_args()
    out = ops.mlp(y[:0], *rest[:-1], rest[-1][:0])
    assert out.shape == (0, 8, 3, 3)
    y1 = torch.randn(1, 8, 1, 1)
    g = grn_args()
    assert ops.mlp_grn(y1, *g[1:7], None).shape == (1, 8, 1, 1)
