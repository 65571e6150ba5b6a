"""Bad input to the public ops and the models gets a clear exception naming the argument and the
expected value, never a crash or a wrong answer; edge shapes, layouts, views and non-finite
values give PyTorch's answer on every backend."""
import math
import os
import re
import sys

import pytest
import torch

from convnext_fast import backends, ops, reference
from convnext_fast.testing import assert_parity

sys.path.insert(0, os.path.dirname(__file__))  # tests/_cases.py (--import-mode=importlib adds none)
from _cases import (ARG_NAMES, INFERENCE_ONLY, OPS, call, check_grads, check_output, inputs, leaves,  # noqa: E402
                    op_backend_params, ref, skip_unless_runs)


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


# ------------------------------------------------------------------------------------------------
# Every public op x every backend (tests/_cases.py): argument errors name the argument and the
# expected value; edge shapes, layouts and non-finite inputs give PyTorch's answer.
# ------------------------------------------------------------------------------------------------
# What each op's check promises for each argument, as the message writes it.
EXPECTED_SHAPE = {
    "dwconv_ln": {"conv_weight": "[8, 1, *, *]", "conv_bias": "[8]", "ln_weight": "[8]", "ln_bias": "[8]"},
    "mlp": {"fc1_weight": "[*, 8]", "fc1_bias": "[32]", "fc2_weight": "[8, 32]", "fc2_bias": "[8]",
            "gamma": "[8]", "residual": "[2, 8, 3, 3]"},
    "mlp_grn": {"fc1_weight": "[*, 8]", "fc1_bias": "[32]", "grn_weight": "[32]", "grn_bias": "[32]",
                "fc2_weight": "[8, 32]", "fc2_bias": "[8]", "residual": "[2, 8, 3, 3]"},
}
ARG_CASES = [(op, i, name) for op in OPS for i, name in enumerate(ARG_NAMES[op]) if i > 0]
ANY_BACKEND = [None, *backends.BACKENDS]  # the checks run before a backend is chosen


def _ids(cases):
    return [f"{op}-{name}" for op, _, name in cases]


def _bad_shape(t):
    """``t`` with one size off by one: the channels of a conv weight, else the last dimension."""
    if t.dim() == 4 and t.shape[1] == 1:  # conv_weight [C, 1, k, k]
        return torch.randn(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)
    return torch.randn(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)


@pytest.mark.parametrize("op,i,name", ARG_CASES, ids=_ids(ARG_CASES))
def test_every_argument_on_another_device(op, i, name):
    args = inputs(op, C=8, H=3, W=3, k=3)
    args[i] = args[i].to("meta")
    for backend in ANY_BACKEND:
        with pytest.raises(ValueError, match=rf"{op}: {name} is on meta but the input is on cpu"):
            call(op, args, backend)


@pytest.mark.parametrize("op", OPS)
def test_input_on_another_device_than_the_weights(op):
    args = inputs(op, C=8, H=3, W=3, k=3)
    args[0] = args[0].to("meta")
    first = ARG_NAMES[op][1]
    with pytest.raises(ValueError, match=rf"{op}: {first} is on cpu but the input is on meta"):
        call(op, args)


@pytest.mark.parametrize("op,i,name", ARG_CASES, ids=_ids(ARG_CASES))
@pytest.mark.parametrize("bad", [torch.float64, torch.bfloat16])
def test_every_argument_in_another_dtype(op, i, name, bad):
    args = inputs(op, C=8, H=3, W=3, k=3)
    args[i] = args[i].to(bad)
    for backend in ANY_BACKEND:
        with pytest.raises(TypeError, match=rf"{op}: {name} has dtype {bad} but the input has "
                                            r"torch.float32"):
            call(op, args, backend)


@pytest.mark.parametrize("op", OPS)
def test_input_dtype_and_rank(op):
    arg0 = ARG_NAMES[op][0]
    args = inputs(op, C=8, H=3, W=3, k=3)
    for bad in (args[0].to(torch.int64), args[0].to(torch.complex64), args[0].bool()):
        with pytest.raises(TypeError, match=rf"{op}: {arg0} must be float32, float16, bfloat16 or "
                                            rf"float64, got {bad.dtype}"):
            call(op, [bad, *args[1:]])
    for bad in (args[0][0], args[0][None], args[0].flatten()):
        shape = re.escape(str(list(bad.shape)))
        with pytest.raises(ValueError, match=rf"{op}: {arg0} must be 4-D \[N, C, H, W\], got shape {shape}"):
            call(op, [bad, *args[1:]])
    # weights in fp64 with an fp64 input: the error names the first argument that differs
    with pytest.raises(TypeError, match=rf"{op}: {ARG_NAMES[op][1]} has dtype torch.float32 but the "
                                        r"input has torch.float64"):
        call(op, [args[0].double(), *args[1:]])


@pytest.mark.parametrize("op,i,name", ARG_CASES, ids=_ids(ARG_CASES))
def test_every_argument_with_a_wrong_shape(op, i, name):
    want = re.escape(EXPECTED_SHAPE[op][name])
    args = inputs(op, C=8, H=3, W=3, k=3)
    good = args[i]
    for bad in (_bad_shape(good), good[None]):
        args[i] = bad
        got = re.escape(str(list(bad.shape)))
        with pytest.raises(ValueError, match=rf"{op}: {name} must have shape {want}, got {got}"):
            call(op, args)


@pytest.mark.parametrize("op", OPS)
def test_channel_mismatch_between_input_and_weights(op):
    """An input with C+1 channels: the first weight that depends on C names it."""
    args = inputs(op, C=8, H=3, W=3, k=3)
    args[0] = torch.randn(2, 9, 3, 3)
    first = ARG_NAMES[op][1]
    want = {"dwconv_ln": r"\[9, 1, \*, \*\]", "mlp": r"\[\*, 9\]", "mlp_grn": r"\[\*, 9\]"}[op]
    with pytest.raises(ValueError, match=rf"{op}: {first} must have shape {want}"):
        call(op, args)


@pytest.mark.parametrize("op", OPS)
def test_non_tensor_arguments(op):
    args = inputs(op, C=8, H=3, W=3, k=3)
    with pytest.raises(TypeError, match=rf"{op}: {ARG_NAMES[op][0]} must be a torch.Tensor, got ndarray"):
        call(op, [args[0].numpy(), *args[1:]])
    args[1] = None
    with pytest.raises(TypeError, match=rf"{op}: {ARG_NAMES[op][1]} must be a tensor, got None"):
        call(op, args)


# ------------------------------------------------------------------------------------------------
# Layouts, views, edge shapes: the right answer on every backend, forward and backward.
# ------------------------------------------------------------------------------------------------

def _small(op, backend, **kw):
    """Shapes the Triton interpreter runs in well under a second (its dwconv_ln backward costs
    ~0.3 s per call at k=3, ~2 s at k=7)."""
    kw.setdefault("k", 3 if backend == "triton" else 7)
    return inputs(op, **kw)


def _run_fwd_bwd(op, backend, device, args, which=None):
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
    skip_unless_runs(op, backend, args)
    if backend in INFERENCE_ONLY:
        with torch.no_grad():
            out = call(op, args, backend)
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        assert out.is_contiguous(memory_format=torch.channels_last)
        check_output(op, out, args)
        return out
    live = leaves(args, which)
    out = call(op, live, backend)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(out.shape, device=out.device)
    out.backward(g)
    check_output(op, out.detach(), args)
    check_grads(op, live, g)
    return out


@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_nchw_contiguous_input_is_converted(op, backend, device):
    args = _small(op, backend, N=2, C=8, H=5, W=4)
    args = [t.contiguous() if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in args]
    assert not args[0].is_contiguous(memory_format=torch.channels_last)
    _run_fwd_bwd(op, backend, device, args)


@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_strided_and_expanded_views(op, backend, device):
    """Every argument a non-contiguous view: slices, an expanded residual, transposed weights."""
    args = _small(op, backend, N=2, C=8, H=5, W=4)
    dev = dict(device=device)
    views = []
    for i, t in enumerate(args):
        if t is None:
            views.append(t)
        elif i == 0:  # every other column of a wider NCHW image
            views.append(torch.randn(*t.shape[:3], 2 * t.shape[3], **dev)[..., ::2])
        elif t.dim() == 4 and ARG_NAMES[op][i] == "residual":  # one image broadcast over the batch
            views.append(torch.randn(1, *t.shape[1:], **dev).expand_as(t))
        elif t.dim() == 4:  # conv weight: every other tap row of a taller kernel
            k = t.shape[3]
            views.append((torch.randn(t.shape[0], 1, 2 * k, k, **dev) / k)[:, :, ::2])
        elif t.dim() == 2:  # a transposed (column-major) weight
            views.append(t.to(device).t().contiguous().t())
        else:  # every other element
            views.append(torch.stack([t.to(device), torch.randn_like(t, **dev)], 1)[:, 0])
    for i, v in enumerate(views):
        if v is not None and v.numel() > 1:
            assert not v.is_contiguous(), ARG_NAMES[op][i]
    _run_fwd_bwd(op, backend, device, views)


@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_empty_batch_forward_and_backward(op, backend, device):
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in _small(op, backend, N=0, C=8, H=4, W=3)]
    skip_unless_runs(op, backend, args)
    if backend in INFERENCE_ONLY:
        with torch.no_grad():
            assert call(op, args, backend).shape == (0, 8, 4, 3)
        return
    live = leaves(args)
    out = call(op, live, backend)
    assert out.shape == (0, 8, 4, 3) and out.dtype == torch.float32
    out.sum().backward()
    for name, t in zip(ARG_NAMES[op], live):
        if t is None:
            continue
        assert t.grad is not None and t.grad.shape == t.shape, name
        # no pixels: every gradient is an exact zero (not NaN from a poisoned, unwritten buffer)
        assert torch.equal(t.grad, torch.zeros_like(t)), name


# (N, C, H, W): 1x1 images, H or W of 1, images smaller than the kernel, odd C, C = 1
EDGE_SHAPES = [(1, 7, 1, 1), (2, 5, 1, 4), (2, 3, 2, 1), (1, 1, 2, 2), (3, 9, 2, 5)]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_tiny_images_and_odd_channels(shape, op, backend, device):
    N, C, H, W = shape
    if op == "dwconv_ln" and backend == "triton" and shape not in EDGE_SHAPES[:2]:
        pytest.skip("interpreter time: the triton dwconv_ln backward runs the first two shapes")
    args = _small(op, backend, N=N, C=C, H=H, W=W, D=3 * C + 1)
    if op == "dwconv_ln" and C == 1:
        # LayerNorm over one channel: y = ln_bias and rstd = 1/sqrt(eps), which scales fp32
        # rounding in dx by 1e3 against an exact zero: forward only
        args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in args]
        skip_unless_runs(op, backend, args)
        out = call(op, args, backend)
        assert torch.equal(out, args[4].view(1, 1, 1, 1).expand_as(out))
        return
    _run_fwd_bwd(op, backend, device, args)


def _some_grads(op):
    """Index sets of the arguments that require grad: the input alone, parameters alone, one
    parameter (and the residual, for the MLPs)."""
    n = len(ARG_NAMES[op])
    cases = [{0}, set(range(1, n)) - ({n - 1} if op != "dwconv_ln" else set()), {1}]
    if op != "dwconv_ln":
        cases.append({n - 1, 3})
    return cases


@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_requires_grad_on_some_inputs_only(op, backend, device):
    if backend in INFERENCE_ONLY:
        pytest.skip(f"{backend} runs inference only")
    for which in _some_grads(op):
        if op == "dwconv_ln" and backend == "triton" and which != {1}:
            continue  # interpreter time: one backward is enough there
        _run_fwd_bwd(op, backend, device, _small(op, backend, N=2, C=8, H=3, W=4), which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_nan_and_inf_propagate_like_pytorch(dtype, op, backend, device):
    """NaN and +-Inf in the input and a parameter: the same elements are NaN / +-Inf as in
    PyTorch's own result, and the finite ones still match."""
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in _small(op, backend, N=2, C=8, H=4, W=5, dtype=dtype)]
    skip_unless_runs(op, backend, args)
    x = args[0].clone()
    x[1, 1, 0, 0] = math.nan  # image 1 only: GRN spreads a non-finite value over its image
    x[1, 2, 3, 4] = math.inf
    x[1, 0, 0, 1] = -math.inf
    args[0] = x
    # a NaN in one channel of a last bias: that channel only (in conv_bias, LayerNorm spreads it)
    bias = ARG_NAMES[op].index("fc2_bias" if op != "dwconv_ln" else "ln_bias")
    args[bias] = args[bias].clone()
    args[bias][5] = math.nan
    if op != "dwconv_ln":  # an Inf in the residual stays an Inf of the output
        args[-1] = args[-1].clone()
        args[-1][0, 3, 2, 2] = -math.inf
    out = call(op, args, backend).cpu()
    want = ref(op, [t.cpu() if isinstance(t, torch.Tensor) else t for t in args])
    assert want.isnan().any() and not want.isnan().all()
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(out), mask(want)), f"{mask.__name__} differs from PyTorch"
    ok = torch.isfinite(want)
    assert_parity(torch.where(ok, out, 0), torch.where(ok, ref(op, [
        t.cpu().double() if isinstance(t, torch.Tensor) else t for t in args]), 0),
        torch.where(ok, want, 0), name=op)


# ------------------------------------------------------------------------------------------------
# More than 2**31 elements
# ------------------------------------------------------------------------------------------------
# Offsets: the C++ CPU kernels index with int64 throughout; the CUDA kernel forms image/row/pixel
# offsets in int64 (only in-tile offsets are int32); the Triton dwconv_ln kernels add int64 tile
# bases to int32 in-tile and tap offsets, so they need N*H*W < 2**31 and |tap offset| =
# (k//2) * (W + 1) * C < 2**31, which their supports() checks; the Triton MLP kernels index rows
# in int32 (N*H*W < 2**31, checked) and form element offsets in int64.
LARGE = os.environ.get("CONVNEXT_FAST_LARGE_TESTS") == "1"


def _fake(*shape, device="cpu", dtype=torch.bfloat16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(*shape, device=device, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_triton_supports_knows_its_int32_offsets(device):
    """The index limits of the Triton kernels, on fake tensors (no memory): exactly at the limit
    is accepted, one past it is refused with the reason."""
    from convnext_fast import backends
    from convnext_fast.specs import SPECS

    if backends.available("dwconv_ln", "triton") is not None:
        pytest.skip(f"triton: {backends.available('dwconv_ln', 'triton')}")
    C, k = 8, 7

    def supports(op, args):
        return backends.registered(op)["triton"].supports(**SPECS[op].bind(args))

    def dw(N, H, W, C=C, k=k):
        w = _fake(C, 1, k, k, device=device)
        return supports("dwconv_ln", (_fake(N, C, H, W, device=device), w, None, w, w, 1e-6))

    assert dw(1, 2 ** 15, 2 ** 16 - 1) is None
    assert "N*H*W < 2**31" in dw(1, 2 ** 15, 2 ** 16)
    # taps reach (k//2) rows (and columns) away: (k//2) * (W + 1) * C elements
    W = 2 ** 31 // (3 * C) - 1
    assert dw(1, 1, W) is None
    assert "int32" in dw(1, 1, W + 1)
    mlp_args = lambda M: (_fake(1, C, 1, M, device=device), *(None,) * 6)  # noqa: E731
    assert supports("mlp", mlp_args(2 ** 31 - 1)) is None
    assert "N*H*W < 2**31" in supports("mlp", mlp_args(2 ** 31))


@pytest.mark.skipif(not LARGE, reason="allocates ~10 GB, ~30 s: set CONVNEXT_FAST_LARGE_TESTS=1 to run it")
def test_cpu_dwconv_ln_beyond_2_pow_31_elements():
    """One bf16 call with N*H*W*C = 2**31 + 2**26 elements: the last image lies entirely past
    element 2**31. Its corners (and the first image's) match the reference run on crops."""
    skip_unless_runs("dwconv_ln", "cpu", inputs("dwconv_ln", k=7, dtype=torch.bfloat16))
    N, C, H, W, k = 33, 64, 1024, 1024, 7
    assert N * C * H * W > 2 ** 31 and (N - 1) * C * H * W >= 2 ** 31
    x = torch.zeros(N, H, W, C, dtype=torch.bfloat16).permute(0, 3, 1, 2)  # channels-last
    for n in (0, N // 2, N - 1):
        x[n].copy_(torch.randn(C, H, W))
    _, w, b, lw, lb = inputs("dwconv_ln", C=C, k=k, dtype=torch.bfloat16)
    y = ops.dwconv_ln(x, w, b, lw, lb, backend="cpu")
    p, crop = k // 2, 40
    for n, rows, cols in ((0, slice(0, crop), slice(0, crop)), (N // 2, slice(500, 540), slice(0, crop)),
                          (N - 1, slice(H - crop, H), slice(W - crop, W))):
        xs = x[n:n + 1, :, rows, cols]
        # compare only pixels whose whole k x k window lies inside the crop or the image
        inner = (slice(None), slice(None),
                 slice(0 if rows.start == 0 else p, crop if rows.stop == H else crop - p),
                 slice(0 if cols.start == 0 else p, crop if cols.stop == W else crop - p))
        got = y[n:n + 1, :, rows, cols][inner]
        want64 = reference.dwconv_ln(*(t.double() for t in (xs, w, b, lw, lb)))[inner]
        assert_parity(got, want64, reference.dwconv_ln(xs, w, b, lw, lb)[inner], name=f"image {n}")
    # the images between hold zeros: their output is LayerNorm of the bias alone
    zero = torch.zeros(1, C, 1, 1, dtype=torch.bfloat16)
    assert_parity(y[N - 2:N - 1, :, 500:501, 500:501],
                  reference.dwconv_ln(*(t.double() for t in (zero, w, b, lw, lb))),
                  reference.dwconv_ln(zero, w, b, lw, lb), name="a zero image")


# ------------------------------------------------------------------------------------------------
# Models: the input is checked once, at the entry, with errors that name x
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def atto():
    import convnext_fast

    torch.manual_seed(0)
    return convnext_fast.convnext_atto(num_classes=5).eval()


@pytest.mark.parametrize("features_only", [False, True])
def test_model_input_errors_name_x(atto, features_only):
    import convnext_fast

    model = (convnext_fast.create_model("convnext_atto", features_only=True).eval()
             if features_only else atto)
    cases = [
        (torch.randn(3, 32, 32), ValueError, r"x must have shape \[N, 3, H, W\] \(in_chans=3\), got \[3, 32, 32\]"),
        (torch.randn(1, 4, 32, 32), ValueError, r"x must have shape \[N, 3, H, W\] \(in_chans=3\), got \[1, 4, 32, 32\]"),
        (torch.randn(1, 3, 31, 64), ValueError, r"x must be at least 32x32 pixels .*got 31x64"),
        (torch.randn(1, 3, 32, 32, device="meta"), ValueError, "x is on meta but the model is on cpu"),
        (torch.randn(1, 3, 32, 32).double(), TypeError,
         "x has dtype torch.float64 but the model's parameters have torch.float32"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "x must be a floating-point tensor, got torch.uint8"),
        (torch.randn(1, 3, 32, 32).numpy(), TypeError, "x must be a torch.Tensor, got ndarray"),
    ]
    for x, exc, msg in cases:
        with pytest.raises(exc, match="ConvNeXt: " + msg):
            model(x)
    if not features_only:
        with pytest.raises(ValueError, match=r"ConvNeXt: x must have shape \[N, 3, H, W\]"):
            model.forward_intermediates(torch.randn(2, 32, 32))


def test_model_low_precision_input_under_autocast_is_fine(atto):
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = atto(x.bfloat16())
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_model_empty_batch_forward_and_backward():
    import convnext_fast

    model = convnext_fast.convnext_atto(num_classes=5).train()
    x = torch.randn(0, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_model_nchw_and_channels_last_input_agree(atto):
    """The layout is converted once at the entry, so both give the same bits."""
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        a = atto(x)
        b = atto(x.contiguous(memory_format=torch.channels_last))
        c = atto(torch.randn(2, 3, 40, 72)[..., ::2].copy_(x))  # a strided view
    assert torch.equal(a, b) and torch.equal(a, c)
