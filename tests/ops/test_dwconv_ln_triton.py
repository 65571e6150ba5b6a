"""dwconv_ln on the Triton kernels (convnext_fast/kernels/dwconv_ln.py) against the fp64 reference.

Without a CUDA device the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported) at small shapes; with one, the same tests run the
compiled kernels. Every buffer the launchers allocate is NaN-poisoned (and y also through
``out=``), so an element a kernel does not write fails parity. Plain parity and opcheck of the
backend's ops on small shapes are tests/ops/test_contract.py's.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # _kernel_tests.py (importlib import mode adds none)
from _kernel_tests import (DEVICE, check_common_refusals, dwconv_ln_inputs,  # noqa: E402
                          skip_module_unless_triton, supports)

skip_module_unless_triton("dwconv_ln")

from convnext_fast import ops, reference  # noqa: E402
from convnext_fast.kernels import dwconv_ln as K  # noqa: E402
from convnext_fast.testing import assert_parity  # noqa: E402

EPS = 1e-6
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# (N, C, H, W, k, bias, dtype): every value of C {40, 96, 136, 384, 1100, 1536, 3072},
# H x W {1x1, 3x3, 7x7, 9x11, 14x14, and 1x3, 1x7, 2x3}, k {3, 5, 7}, with and without bias,
# N {1, 2}, each dtype; not the cross product (the interpreter is slow). C <= 1024 is one register
# chunk, C > 1024 the two-pass chunked path (1100: ragged last chunk). C = 40 and 136 are not
# multiples of 16 (8-wide vectors on a GPU).
CASES = [
    (1, 40, 1, 1, 7, True, f32),
    (2, 40, 3, 3, 5, False, f32),
    (1, 40, 14, 14, 5, False, f32),
    (2, 40, 9, 11, 3, True, f16),
    (1, 96, 7, 7, 7, True, f32),
    (2, 96, 14, 14, 7, True, f32),
    (1, 96, 14, 14, 7, True, bf16),
    (1, 96, 1, 7, 7, False, f32),
    (1, 136, 9, 11, 3, False, f32),
    (2, 136, 9, 11, 7, True, f32),
    (1, 136, 7, 7, 5, False, bf16),
    (1, 384, 7, 7, 5, True, f32),
    (2, 384, 3, 3, 7, False, f32),
    (1, 384, 3, 3, 7, True, f16),
    (1, 1100, 2, 3, 3, True, f32),
    (1, 1536, 3, 3, 7, True, f32),
    (2, 1536, 1, 1, 7, True, bf16),
    (1, 3072, 1, 3, 3, False, f16),
]


def _id(case):
    N, C, H, W, k, bias, dtype = case
    return f"{N}x{C}x{H}x{W}-k{k}-{'b' if bias else 'nob'}-{str(dtype)[6:]}"


@pytest.fixture(autouse=True)
def _poison_and_no_autotune(monkeypatch):
    """NaN-poison every launcher allocation; use the heuristic config (one autotune test below),
    so a GPU run does not autotune every shape."""
    monkeypatch.setenv("CONVNEXT_FAST_POISON_OUTPUTS", "1")
    monkeypatch.setattr(K, "AUTOTUNE", False)


def case_inputs(case):
    *shape, bias, dtype = case
    return dwconv_ln_inputs(shape, dtype, bias, DEVICE)


def to64(t):
    return None if t is None else t.detach().double().cpu()


def dwconv_ln64(x, w, b, lw, lb):
    """fp64 forward as reference.dwconv_ln, with the depthwise conv as k*k shifted sums: exact in
    fp64 and differentiable, whereas PyTorch's fp64 depthwise conv on CPU takes seconds per call
    at large C and tiny H, W (slow fallback path). Returns (y, z) with z the conv output (NCHW).
    test_reference_anchor ties it to convnext_fast.reference."""
    N, C, H, W = x.shape
    k = w.shape[-1]
    xp = torch.nn.functional.pad(x, (k // 2,) * 4)
    z = sum(xp[:, :, i:i + H, j:j + W] * w[:, 0, i, j].view(1, C, 1, 1)
            for i in range(k) for j in range(k))
    if b is not None:
        z = z + b.view(1, C, 1, 1)
    y = torch.nn.functional.layer_norm(z.permute(0, 2, 3, 1), (C,), lw, lb, EPS)
    return y.permute(0, 3, 1, 2), z


def ref_stats(x, w, b):
    """fp64 per-pixel mean and rstd of the conv output, [N, H, W]."""
    C = x.shape[1]
    _, z = dwconv_ln64(to64(x), to64(w), to64(b), torch.ones(C).double(), torch.zeros(C).double())
    var, mean = torch.var_mean(z, dim=1, unbiased=False)
    return mean, (var + EPS).rsqrt()


def grads64(x, w, b, lw, lb, gy):
    """fp64 gradients (dx, dconv_w, dconv_b or None, dln_w, dln_b) by autograd."""
    leaves = [to64(t).requires_grad_() if t is not None else None for t in (x, w, b, lw, lb)]
    y, _ = dwconv_ln64(*leaves)
    used = [t for t in leaves if t is not None]
    g = iter(torch.autograd.grad(y, used, to64(gy)))
    return [next(g) if t is not None else None for t in leaves]


def scaled_tight(ref):
    s = max(1.0, ref.abs().max().item())
    return (2e-5 * s, 2e-5)


def test_reference_anchor():
    """The test-local fp64 reference equals convnext_fast.reference (forward and backward)."""
    x, w, b, lw, lb = (to64(t) for t in case_inputs((2, 24, 5, 6, 5, True, f32)))
    y, _ = dwconv_ln64(x, w, b, lw, lb)
    torch.testing.assert_close(y, reference.dwconv_ln(x, w, b, lw, lb, EPS), atol=1e-12, rtol=1e-12)
    gy = torch.randn_like(x)
    mu, rstd = ref_stats(x, w, b)
    ref = reference.dwconv_ln_bwd(gy, x, w, b, lw, mu, rstd)
    for name, g, r in zip(NAMES, grads64(x, w, b, lw, lb, gy), ref):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(case):
    N, C, H, W, k, bias, dtype = case
    x, w, b, lw, lb = case_inputs(case)
    out = torch.full_like(x, float("nan"), memory_format=torch.channels_last)
    y, mean, rstd = K.dwconv_ln_fwd(x, w, b, lw, lb, EPS, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (N, H, W)
    ref64, _ = dwconv_ln64(*(to64(t) for t in (x, w, b, lw, lb)))
    lowp = None if dtype == f32 else reference.dwconv_ln(x, w, b, lw, lb, EPS).cpu()
    assert_parity(y.cpu(), ref64, lowp, name=f"y{_id(case)}")
    mu64, rstd64 = ref_stats(x, w, b)
    assert_parity(mean.cpu(), mu64, name="mean", tight=(1e-5, 1e-5))
    assert_parity(rstd.cpu(), rstd64, name="rstd", tight=(1e-5, 1e-4))


def _lowp_grads(x, w, b, lw, gy, mean, rstd):
    """PyTorch's reference backward given the low-precision tensors: fp32 arithmetic, results
    rounded to the inputs' dtype (stricter than autograd in bf16/fp16, which also rounds the conv
    output; and it avoids oneDNN's bf16 depthwise backward, whose first call on CPU can take
    tens of seconds)."""
    return reference.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)


NAMES = ("dx", "dconv_w", "dconv_b", "dln_w", "dln_b")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backward(case):
    N, C, H, W, k, bias, dtype = case
    x, w, b, lw, lb = case_inputs(case)
    gy = torch.randn(N, C, H, W).to(device=DEVICE, dtype=dtype, memory_format=torch.channels_last)
    mu64, rstd64 = ref_stats(x, w, b)
    mean, rstd = mu64.float().to(DEVICE), rstd64.float().to(DEVICE)
    got = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)
    ref = grads64(x, w, b, lw, lb, gy)
    lowp = None if dtype == f32 else _lowp_grads(x, w, b, lw, gy, mean, rstd)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for i, (name, g, r) in enumerate(zip(NAMES, got, ref)):
        if r is None:
            assert g is None, f"{name} must be None without a conv bias"
            continue
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_parity(g.cpu(), r, None if lowp is None else lowp[i].cpu(),
                      name=f"{name}{_id(case)}", tight=scaled_tight(r))


@pytest.mark.parametrize("case", [(2, 96, 5, 4, 7, True, f32), (1, 136, 3, 9, 3, False, bf16)],
                         ids=_id)
def test_autograd_through_op(case):
    """The public op on the triton backend (triton_op + registered autograd), end to end, against
    fp64 autograd; x is NCHW-contiguous and grad_y arrives as an expanded, not channels_last,
    tensor."""
    N, C, H, W, k, bias, dtype = case
    args = case_inputs(case)
    leaves = [t.contiguous().requires_grad_() if t is not None else None for t in args]
    y = ops.dwconv_ln(*leaves, EPS, backend="triton")
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    lin = torch.linspace(-1, 1, W, device=DEVICE)
    g = iter(torch.autograd.grad((y.float() * lin).sum(), [t for t in leaves if t is not None]))
    got = [next(g) if t is not None else None for t in leaves]
    gy = lin.to(dtype).expand(N, C, H, W)  # the grad_y the op received
    y64, _ = dwconv_ln64(*(to64(t) for t in args))
    ref = grads64(*args, gy)
    mu64, rstd64 = ref_stats(*args[:3])
    lowp = ([None] * 5 if dtype == f32 else
            _lowp_grads(*args[:4], gy, mu64.float().to(DEVICE), rstd64.float().to(DEVICE)))
    ylowp = None if dtype == f32 else reference.dwconv_ln(*args, EPS).cpu()
    assert_parity(y.detach().cpu(), y64, ylowp, name="y")
    for name, g, r, lo in zip(NAMES, got, ref, lowp):
        if r is None:
            assert g is None
            continue
        assert_parity(g.cpu(), r, None if lo is None else lo.cpu(), name=name,
                      tight=scaled_tight(r))


def test_backward_is_deterministic():
    """Weight gradients come from per-program partials reduced by torch.sum: no atomics, so two
    runs are bit-identical (several pixel groups and, for C > 512, channel chunks)."""
    case = (2, 136, 14, 14, 3, True, f32)
    x, w, b, lw, lb = case_inputs(case)
    gy = torch.randn_like(x)
    mu64, rstd64 = ref_stats(x, w, b)
    mean, rstd = mu64.float().to(DEVICE), rstd64.float().to(DEVICE)
    a = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)
    c = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)
    for name, u, v in zip(NAMES, a, c):
        assert torch.equal(u, v), f"{name} differs between two identical backward runs"


# test_contract.py opchecks the backend's ops, but under the interpreter without test_faketensor:
# fake tensors reach the interpreted mlp kernels, which cannot run on them. dwconv_ln's launchers
# take them, so that check stays here. On a GPU test_contract.py runs every check.
_ON_CPU_ONLY = pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU test_contract.py runs it")


@_ON_CPU_ONLY
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(bias):
    args = dwconv_ln_inputs((1, 40, 5, 6, 3), f32, bias, DEVICE)
    torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln_triton.default, (*args, EPS),
                          test_utils=("test_faketensor",))


@_ON_CPU_ONLY
def test_opcheck_backward():
    x, w, b, lw, lb = dwconv_ln_inputs((1, 40, 5, 6, 3), f32, device=DEVICE)
    mu64, rstd64 = ref_stats(x, w, b)
    args = (torch.randn_like(x), x, w, b, lw, mu64.float().to(DEVICE), rstd64.float().to(DEVICE))
    torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln_triton_bwd.default, args,
                          test_utils=("test_faketensor",))


def test_backend_supports():
    args = [*dwconv_ln_inputs((1, 40, 3, 3, 3), f32, device=DEVICE), EPS]
    check_common_refusals("dwconv_ln", args)
    big = torch.zeros(40, 1, K.MAX_K + 2, K.MAX_K + 2, device=DEVICE)
    assert "odd kernel" in supports("dwconv_ln", args[0], big, *args[2:])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning runs on a GPU only")
def test_autotuned_configs(monkeypatch):
    monkeypatch.setattr(K, "AUTOTUNE", K._fwd_tuned is not None)
    case = (2, 384, 14, 14, 7, True, bf16)
    x, w, b, lw, lb = case_inputs(case)
    y, mean, rstd = K.dwconv_ln_fwd(x, w, b, lw, lb, EPS)
    ref64, _ = dwconv_ln64(*(to64(t) for t in (x, w, b, lw, lb)))
    assert_parity(y.cpu(), ref64, reference.dwconv_ln(x, w, b, lw, lb, EPS).cpu())
    gy = torch.randn_like(x)
    got = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)
    ref = grads64(x, w, b, lw, lb, gy)
    lowp = _lowp_grads(x, w, b, lw, gy, mean, rstd)
    for name, g, r, lo in zip(NAMES, got, ref, lowp):
        assert_parity(g.cpu(), r, lo.cpu(), name=name)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a CUDA device with >= 40 GB")
def test_int64_offsets():
    """N*H*W*C > 2**31: offsets past 2**31 elements (checked on the last image rows: a crop with
    a halo reproduces them exactly)."""
    N, C, H, W, k = 1, 128, 4100, 4100, 7
    x, w, b, lw, lb = case_inputs((N, C, H, W, k, True, bf16))
    assert x.numel() > 2 ** 31
    y, mean, rstd = K.dwconv_ln_fwd(x, w, b, lw, lb, EPS)
    gy = torch.randn_like(x)
    dx = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)[0]
    r0 = H - 13  # crop rows [r0, H): z exact from r0 + 3, dx exact from r0 + 6
    xc = x[:, :, r0:].detach().double().requires_grad_()
    w64, b64, lw64, lb64 = (t.detach().double() for t in (w, b, lw, lb))
    yc = reference.dwconv_ln(xc, w64, b64, lw64, lb64, EPS)
    (dxc,) = torch.autograd.grad(yc, xc, gy[:, :, r0:].double())
    yl = reference.dwconv_ln(x[:, :, r0:], w, b, lw, lb, EPS)
    assert_parity(y[:, :, r0 + 3:].cpu(), yc[:, :, 3:].detach().cpu(), yl[:, :, 3:].cpu(), name="y")
    assert torch.isfinite(dx[:, :, r0 + 6:]).all()
    err = (dx[:, :, r0 + 6:].double() - dxc[:, :, 6:]).abs().max().item()
    assert err <= 2e-2 * max(1.0, dxc[:, :, 6:].abs().max().item())
