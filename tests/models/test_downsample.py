"""The CPU inference downsample (LayerNorm2d + the s x s / s conv as one op,
``convnext_fast::downsample``, models/cpu_conv.py) against the fp64 reference, and the model's
``Downsample`` taking it exactly where it should.

Outputs are poisoned before the kernel writes them (tests/conftest.py)."""
import pytest
import torch
import torch.nn.functional as F

import convnext_fast
from convnext_fast import _ext
from convnext_fast.backends import _cpp
from convnext_fast.models.convnext import Downsample, LayerNorm2d
from convnext_fast.models.cpu_conv import Fp32ComputeConv2d
from convnext_fast.testing import assert_fp32, assert_parity

CL = torch.channels_last
FUSED = _ext.cpu_downsample()
needs_fp32 = pytest.mark.skipif(not FUSED.get("float32"), reason=f"no fused downsample here: {FUSED or _ext.error()}")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not FUSED.get("bfloat16"), reason="bf16 downsample needs AVX512-BF16 without AMX"))]


def reference(x, lw, lb, eps, w, b):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), lw, lb, eps).permute(0, 3, 1, 2)
    return F.conv2d(y, w, b, stride=w.shape[-1])


def make_inputs(N, C, H, W, C_out, s, dtype, bias=True):
    x = (torch.randn(N, C, H, W) * 3 + 1).to(dtype).to(memory_format=CL)
    lw, lb = torch.randn(C).to(dtype), torch.randn(C).to(dtype)
    w = (torch.randn(C_out, C, s, s) / (s * C ** 0.5)).to(dtype)
    return x, lw, lb, 1e-6, w, torch.randn(C_out).to(dtype) if bias else None


def call(*args):
    """The op with the derived-weight cache on, as the model calls it."""
    return _cpp.call_with_cache(torch.ops.convnext_fast.downsample, args)


# (N, C, H, W, C_out, s): ConvNeXt-T's first downsample; odd C, H, W (the last row and column
# dropped, as the conv does); C_out not a multiple of the vector width; a 3x3 and a 4x4 patch; one
# output pixel; few output rows (panels shared between threads) and many (rows shared); a long K
# (4C = 1200: the fp32 sums run in blocks of 128, mlp_tiles.h).
SHAPES = [(1, 96, 56, 56, 192, 2), (2, 37, 9, 7, 19, 2), (3, 16, 9, 12, 40, 3), (1, 8, 2, 2, 4, 2),
          (2, 200, 4, 6, 70, 2), (1, 24, 41, 40, 30, 2), (2, 6, 8, 8, 130, 4), (1, 300, 4, 4, 40, 2)]


@needs_fp32
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_matches_reference(shape, dtype, bias):
    args = make_inputs(*shape, dtype, bias=bias)
    out = call(*args)
    again = call(*args)  # the packed weight from the cache
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    ref64 = reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    if dtype == torch.float32:
        assert_fp32(out, ref64, name=f"downsample{shape}", rtol=2e-6)
    else:
        assert_parity(out, ref64, reference(*args), name=f"downsample{shape}")
    assert torch.equal(again, out)


@needs_fp32
def test_op_sees_weight_updates():
    x, lw, lb, eps, w, b = make_inputs(1, 16, 6, 6, 24, 2, torch.float32)
    w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
    with torch.no_grad():
        call(x, lw, lb, eps, w, b)
        w.mul_(-2.0)
        b.add_(1.0)
        out = call(x, lw, lb, eps, w, b)
    assert_fp32(out, reference(x.double(), lw.double(), lb.double(), eps, w.double(), b.double()), rtol=2e-6)


@needs_fp32
def test_op_rejects_bad_input():
    x, lw, lb, eps, w, b = make_inputs(1, 16, 6, 6, 24, 2, torch.float32)
    with pytest.raises(RuntimeError, match="channels_last"):
        call(x.contiguous(), lw, lb, eps, w, b)
    with pytest.raises(RuntimeError, match=r"conv_weight must be \[C_out, 16, s, s\]"):
        call(x, lw, lb, eps, w[:, :8], b)
    with pytest.raises(RuntimeError, match="fewer than the 2 x 2 kernel"):
        call(x[:, :, :1], lw, lb, eps, w, b)
    with pytest.raises(RuntimeError, match="ln_weight and ln_bias must be"):
        call(x, lw[:4], lb, eps, w, b)
    with pytest.raises(RuntimeError, match="no CPU kernel for Half"):
        call(*[a.half() if isinstance(a, torch.Tensor) else a for a in (x, lw, lb, eps, w, b)])
    with pytest.raises(RuntimeError, match="conv_bias must have shape"):
        call(x, lw, lb, eps, w, b[:3])


def downsample(C=24, C_out=48):
    return Downsample(LayerNorm2d(C, eps=1e-6), Fp32ComputeConv2d(C, C_out, kernel_size=2, stride=2)).eval()


def count_fused_calls(monkeypatch):
    calls = []
    real = _cpp.call_with_cache

    def counting(op, args):
        if op is torch.ops.convnext_fast.downsample:
            calls.append(args[0].dtype)
        return real(op, args)

    monkeypatch.setattr(_cpp, "call_with_cache", counting)
    return calls


@needs_fp32
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_fuses_inference_only(dtype, monkeypatch):
    """Inference calls take the op and match the two modules; calls that need gradients, and the
    off switch, run the modules."""
    calls = count_fused_calls(monkeypatch)
    mod = downsample().to(dtype)
    x = torch.randn(2, 24, 10, 14).to(dtype).to(memory_format=CL)
    with torch.no_grad():
        fused = mod(x)
    assert calls == [dtype]
    with torch.no_grad():
        monkeypatch.setenv("CONVNEXT_FAST_CPU_DOWNSAMPLE", "0")
        plain = mod(x)
        monkeypatch.delenv("CONVNEXT_FAST_CPU_DOWNSAMPLE")
    trained = mod(x.requires_grad_())
    assert calls == [dtype]
    trained.float().sum().backward()
    assert x.grad is not None and mod[1].weight.grad is not None
    ref64 = mod.double()(x.detach().double())
    if dtype == torch.float32:
        for out in (fused, plain, trained):
            assert_fp32(out.detach(), ref64, rtol=2e-6)
    else:
        assert_parity(fused, ref64, plain)


@pytest.mark.skipif(not FUSED.get("bfloat16"), reason="bf16 downsample needs AVX512-BF16 without AMX")
def test_module_fuses_under_autocast(monkeypatch):
    """fp32 parameters under CPU autocast: cast once, bf16 out, as autocast's conv gives."""
    calls = count_fused_calls(monkeypatch)
    mod = downsample()
    x = torch.randn(1, 24, 8, 8).to(memory_format=CL)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = mod(x.bfloat16())
        monkeypatch.setenv("CONVNEXT_FAST_CPU_DOWNSAMPLE", "0")
        plain = mod(x.bfloat16())
    assert calls == [torch.bfloat16] and out.dtype == plain.dtype == torch.bfloat16
    assert_parity(out, mod.double()(x.bfloat16().double()), plain)


@needs_fp32
def test_model_runs_its_downsamples_fused(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    model = convnext_fast.convnext_atto().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        monkeypatch.setenv("CONVNEXT_FAST_CPU_DOWNSAMPLE", "0")
        plain = model(x)
    assert len(calls) == 3
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
    monkeypatch.delenv("CONVNEXT_FAST_CPU_DOWNSAMPLE")
    with torch.no_grad(), convnext_fast.disable_kernels():  # every kernel off: this one too
        model(x)
    assert len(calls) == 3
