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

# (N, C, H, W, k, bias, dtype): C {40, 80, 96, 136, 160, 384, 1100, 1536, 3072}, H x W {1x1,
# 3x3, 7x7, 9x11, 14x14, and 1x3, 1x7, 2x3, 4x5, 5x6, 6x11}, k {3, 5, 7}, with and without bias,
# N {1, 2}, each dtype; not the cross product (the interpreter is slow). The variant "auto"
# picks (see K._band_chunk): the band kernels for C = 40, 80, 160 (8|16|32 x 5 chunks), 96, 384
# (3 chunks); the pixel kernels for C = 136 (no power-of-two chunking), 1100, 1536, 3072
# (C > 1024; 1100: ragged last chunk). H, W < k, H and W not multiples of the band tile, N = 1
# among them.
CASES = [
    (1, 40, 1, 1, 7, True, f32),
    (2, 40, 3, 3, 5, False, f32),
    (2, 40, 9, 11, 3, True, f16),
    (1, 80, 5, 6, 5, True, bf16),
    (1, 96, 7, 7, 7, True, f32),
    (2, 96, 14, 14, 3, True, f32),
    (1, 96, 6, 11, 7, True, bf16),
    (1, 96, 1, 7, 7, False, f32),
    (1, 136, 9, 11, 3, False, f32),
    (2, 136, 9, 11, 7, True, f32),
    (1, 136, 7, 7, 5, False, bf16),
    (1, 160, 4, 5, 5, True, f16),
    (1, 384, 7, 7, 5, True, f32),
    (2, 384, 3, 3, 7, False, f32),
    (1, 384, 3, 3, 7, True, f16),
    (1, 1100, 2, 3, 3, True, f32),
    (1, 1536, 3, 3, 7, True, f32),
    (2, 1536, 1, 1, 7, True, bf16),
    (1, 3072, 1, 3, 3, False, f16),
]
# The pixel kernels at widths where "auto" picks the band kernels: both stay selectable
# (VARIANT) until a GPU run has timed them against each other.
PIXEL_CASES = [
    (2, 40, 14, 14, 5, False, f32),
    (1, 96, 14, 14, 7, True, bf16),
    (1, 384, 3, 3, 7, True, f16),
]
VARIANT_CASES = [("auto", c) for c in CASES] + [("pixel", c) for c in PIXEL_CASES]


def _id(case):
    N, C, H, W, k, bias, dtype = case
    return f"{N}x{C}x{H}x{W}-k{k}-{'b' if bias else 'nob'}-{str(dtype)[6:]}"


def _vid(vc):
    variant, case = vc
    path = "pixel" if variant == "pixel" or K._band_chunk(case[1], case[4]) is None else "band"
    return f"{path}-{_id(case)}"


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


@pytest.mark.parametrize("vc", VARIANT_CASES, ids=_vid)
def test_forward(vc, monkeypatch):
    variant, case = vc
    monkeypatch.setattr(K, "VARIANT", variant)
    check_forward(case)


def check_forward(case):
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


def _stored(t, dtype):
    """fp32 ``t`` rounded to ``dtype`` as a kernel stores it: to nearest on a GPU; triton 3.8's
    interpreter truncates fp32 -> bf16 (it drops the low 16 bits)."""
    if dtype == bf16 and DEVICE == "cpu":
        return (t.float().view(torch.int32) & -65536).view(torch.float32)
    return t.to(dtype).float()


def _lowp_grads(x, w, b, lw, gy, mean, rstd):
    """PyTorch's backward in x's dtype, with its rounding points and fp32 arithmetic: dz, the
    LayerNorm's input gradient, is rounded to x's dtype before the conv backward (as autograd
    stores it between the two, and as the band kernels do, see _stored), the results rounded to
    their dtypes. Written out rather than run by autograd: oneDNN's bf16 depthwise backward can take
    tens of seconds on its first call on CPU, and autograd would also round the conv output
    (the kernels do not)."""
    C, k = x.shape[1], w.shape[-1]
    xf, wf = x.float(), w.float()
    z = torch.nn.functional.conv2d(xf, wf, None if b is None else b.float(), padding=k // 2,
                                   groups=C)
    xhat = (z - mean.unsqueeze(1)) * rstd.unsqueeze(1)
    g32 = gy.float()
    g = g32 * lw.float().view(1, C, 1, 1)
    dz = rstd.unsqueeze(1) * (g - g.mean(dim=1, keepdim=True)
                              - xhat * (g * xhat).mean(dim=1, keepdim=True))
    dz = _stored(dz, x.dtype)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz, xf, wf, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], C,
        [True, True, b is not None])
    return (dx.to(x.dtype), dw.to(w.dtype), None if b is None else db.to(b.dtype),
            (g32 * xhat).sum(dim=(0, 2, 3)).to(lw.dtype), g32.sum(dim=(0, 2, 3)).to(lw.dtype))


NAMES = ("dx", "dconv_w", "dconv_b", "dln_w", "dln_b")


@pytest.mark.parametrize("vc", VARIANT_CASES, ids=_vid)
def test_backward(vc, monkeypatch):
    variant, case = vc
    monkeypatch.setattr(K, "VARIANT", variant)
    check_backward(case)


def check_backward(case):
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


@pytest.mark.parametrize("case", [(2, 96, 5, 4, 5, True, f32), (1, 136, 3, 9, 3, False, bf16)],
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


@pytest.mark.parametrize("case", [(2, 136, 14, 14, 3, True, f32), (2, 96, 10, 7, 3, True, f32)],
                         ids=_id)
def test_backward_is_deterministic(case):
    """Weight gradients come from per-program partials reduced by torch.sum: no atomics, so two
    runs are bit-identical (C = 136: the pixel kernels' pixel groups; C = 96: the band kernels'
    band programs, strips and channel chunks)."""
    x, w, b, lw, lb = case_inputs(case)
    gy = torch.randn_like(x)
    mu64, rstd64 = ref_stats(x, w, b)
    mean, rstd = mu64.float().to(DEVICE), rstd64.float().to(DEVICE)
    a = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)
    c = K.dwconv_ln_bwd(gy, x, w, b, lw, mean, rstd)
    for name, u, v in zip(NAMES, a, c):
        assert torch.equal(u, v), f"{name} differs between two identical backward runs"


@pytest.mark.parametrize("case", [(1, 96, 5, 9, 3, True, f32), (1, 40, 5, 6, 3, False, bf16),
                                  (1, 80, 3, 6, 5, True, f16)], ids=_id)
def test_band_small_tiles(case, monkeypatch):
    """Band tiles far smaller than the image: several bands (the last ragged) and column runs
    per image, so every halo crosses a tile edge; backward K2 walks two strips of bands."""
    monkeypatch.setattr(K, "_INTERP_BH", 2)
    monkeypatch.setattr(K, "_INTERP_BW", 4)
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("case", [(1, 96, 6, 18, 5, True, bf16), (1, 160, 3, 9, 3, False, f32)],
                         ids=_id)
def test_band_gpu_tiles(case, monkeypatch):
    """The band tiles the GPU rule picks (e.g. at C = 96: BH = 4 forward, 3 for backward K1, 6 for
    K2; 16-column runs), run under the interpreter."""
    tiles = K._band_tiles
    monkeypatch.setattr(K, "_band_tiles", lambda *a: tiles(*a, interpret=False))
    check_forward(case)
    check_backward(case)


def test_band_chunk_rule(monkeypatch):
    """Which shapes the band kernels take (exact power-of-two chunks, at most 8 of them, C <=
    1024, k <= 7), every ConvNeXt width up to 1024 among them; VARIANT overrides the rule."""
    expect = {40: 8, 48: 16, 64: 64, 80: 16, 96: 32, 128: 128, 160: 32, 192: 64, 256: 256,
              320: 64, 384: 128, 512: 256, 640: 128, 768: 256, 1024: 256,
              24: 8, 136: None, 100: None, 1100: None, 1536: None, 2048: None}
    assert {C: K._band_chunk(C, 7) for C in expect} == expect
    assert K._band_chunk(96, 3) == 32 and K._band_chunk(96, 9) is None
    monkeypatch.setattr(K, "VARIANT", "pixel")
    assert K._band_chunk(96, 7) is None
    monkeypatch.setattr(K, "VARIANT", "band")
    assert K._band_chunk(96, 7) == 32
    with pytest.raises(ValueError, match="band kernels need"):
        K._band_chunk(136, 7)
    monkeypatch.setattr(K, "VARIANT", "fast")
    with pytest.raises(ValueError, match="auto, band or pixel"):
        K._band_chunk(96, 7)


def test_band_gpu_rule_budgets():
    """The GPU tile rule stays inside its register budgets for every band width, k = 3..7, and
    the forward's autotune candidates keep the per-thread tile of the rule's first config."""
    for C in (40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024):
        BC = K._band_chunk(C, 7)
        for k in (3, 5, 7):
            t = K._band_tiles("fwd", C, BC, k, interpret=False)
            e = t["BW"] * BC // (32 * t["num_warps"])
            assert e >= 1 and t["BH"] * (C // BC) * e <= K._FWD_TILE_BUDGET, (C, k, t)
            t = K._band_tiles("dz", C, BC, k, interpret=False)
            e = t["BW"] * BC // (32 * t["num_warps"])
            assert (t["BH"] + 1) * (C // BC) * e <= K._DZ_TILE_BUDGET, (C, k, t)
            bc2 = min(C & -C, 64)  # K._dxdw_chunk on a GPU
            t = K._band_tiles("dxdw", C, bc2, k, interpret=False)
            e = t["BW"] * bc2 // (32 * t["num_warps"])
            assert (2 * t["BH"] + k + 1) * e <= K._DXDW_TILE_BUDGET, (C, k, t)
            cfgs = K._fwd_band_configs(90, dict(C=C, BC=BC, K=k))
            first = cfgs[0]
            assert (first.kwargs["BH"], first.kwargs["BW"], first.num_warps) == tuple(
                K._band_tiles("fwd", C, BC, k, interpret=False).values())
            for cfg in cfgs:
                e = cfg.kwargs["BW"] * BC // (32 * cfg.num_warps)
                assert cfg.kwargs["BH"] * (C // BC) * e <= K._FWD_TILE_BUDGET, (C, k, cfg)


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
