"""dwconv_ln on the extension's kernels (C++ CPU, CUDA) against the fp64 reference.

The same tests run for the ``cpu`` backend everywhere and the ``cuda`` backend where a GPU is
visible and the extension was built with CUDA (skipped, with the reason, elsewhere).
"""
import os

import pytest
import torch

from convnext_fast import _ext, backends, ops, reference
from convnext_fast.testing import assert_parity

needs_ext = pytest.mark.skipif(_ext.load() is None, reason=f"extension not built: {_ext.error()}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
EXT_BACKENDS = [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=[needs_ext, needs_gpu])]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"

# (N, C, H, W, k): ConvNeXt-T stage shapes at small batch, then odd ones: C not a multiple of the
# vector width, H != W, H or W smaller than the kernel, 1x1 images, 5x5 and 3x3 kernels.
SHAPES = [
    (1, 96, 56, 56, 7), (2, 192, 28, 28, 7), (2, 384, 14, 14, 7), (2, 768, 7, 7, 7),
    (2, 13, 9, 11, 7), (1, 40, 3, 5, 7), (3, 136, 1, 1, 7), (1, 7, 2, 9, 5), (2, 33, 4, 3, 3),
    (1, 1, 6, 6, 3), (1, 2048, 2, 3, 7),
]


def make_inputs(N, C, H, W, k, dtype, bias=True, device="cpu"):
    x = torch.randn(N, C, H, W).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    w = (torch.randn(C, 1, k, k) / k).to(device, dtype)
    b = torch.randn(C).to(device, dtype) if bias else None
    lw = (1 + 0.5 * torch.randn(C)).to(device, dtype)
    lb = (0.5 * torch.randn(C)).to(device, dtype)
    return x, w, b, lw, lb


def to64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dtype, backend):
    args = make_inputs(*shape, dtype, bias=shape[1] % 2 == 0, device=device_of(backend))
    y = ops.dwconv_ln(*args, 1e-6, backend=backend)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ref64 = reference.dwconv_ln(*map(to64, args), 1e-6)
    assert_parity(y, ref64, reference.dwconv_ln(*args, 1e-6), name=f"dwconv_ln{shape}")


@pytest.mark.parametrize("backend", EXT_BACKENDS)
def test_statistics_are_fp32_and_exact(backend):
    x, w, b, lw, lb = make_inputs(2, 96, 5, 6, 7, torch.bfloat16, device=device_of(backend))
    x = x * 1e4  # large magnitude: E[x^2]-E[x]^2 in low precision would lose everything
    _, mean, rstd = torch.ops.convnext_fast.dwconv_ln(x, w, b, lw, lb, 1e-6)
    z = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=3, groups=96)
    var, mu = torch.var_mean(z, dim=1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(rstd.double(), (var + 1e-6).rsqrt(), rtol=1e-4, atol=0)


@needs_ext
def test_fp64_is_exact():
    args = make_inputs(2, 24, 7, 5, 7, torch.float64)
    assert_parity(ops.dwconv_ln(*args, backend="cpu"), reference.dwconv_ln(*args))


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_reference(bias, backend):
    args = [t.requires_grad_() if t is not None else None
            for t in make_inputs(2, 20, 6, 7, 5, torch.float32, bias, device_of(backend))]
    y = ops.dwconv_ln(*args, backend=backend)
    g = torch.randn_like(y)
    live = [t for t in args if t is not None]
    got = torch.autograd.grad(y, live, g)
    ref_in = [to64(t).detach().requires_grad_() if t is not None else None for t in args]
    want = torch.autograd.grad(reference.dwconv_ln(*ref_in), [t for t in ref_in if t is not None],
                               g.double())
    for name, a, b in zip(("x", "conv_weight", "conv_bias", "ln_weight", "ln_bias"), got, want):
        assert_parity(a, b, name=f"d{name}", tight=(1e-4, 1e-4))


@needs_ext
def test_gradcheck_fp64():
    args = [t.requires_grad_() for t in make_inputs(1, 5, 4, 3, 3, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: ops.dwconv_ln(*a, backend="cpu"), args)


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, backend):
    args = make_inputs(2, 12, 5, 4, 3, dtype, device=device_of(backend))
    torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln.default, (*args, 1e-6))
    args = make_inputs(1, 8, 3, 3, 3, dtype, bias=False, device=device_of(backend))
    torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln.default, (*args, 1e-5))


@needs_ext
def test_automatic_selection_prefers_the_cpu_kernel():
    y = ops.dwconv_ln(*make_inputs(1, 8, 3, 3, 3, torch.float32))
    assert backends.last_selections()["dwconv_ln"][0] == "cpu"
    assert y.shape == (1, 8, 3, 3)


@pytest.mark.parametrize("backend", ["torch", *EXT_BACKENDS])
def test_layouts_and_edge_shapes(backend):
    dev = device_of(backend)
    x, w, b, lw, lb = make_inputs(2, 16, 9, 8, 7, torch.float32, device=dev)
    want = reference.dwconv_ln(x, w, b, lw, lb)
    # NCHW-contiguous input: converted to channels-last once, same values.
    assert_parity(ops.dwconv_ln(x.contiguous(), w, b, lw, lb, backend=backend), want.double())
    # A strided, non-contiguous view.
    big = torch.randn(2, 32, 9, 16, device=dev).to(memory_format=torch.channels_last)
    view = big[:, ::2, :, ::2]
    assert_parity(ops.dwconv_ln(view, w, b, lw, lb, backend=backend),
                  reference.dwconv_ln(view.contiguous(), w, b, lw, lb).double())
    # Empty batch.
    y0 = ops.dwconv_ln(x[:0], w, b, lw, lb, backend=backend)
    assert y0.shape == (0, 16, 9, 8)


@needs_ext
def test_cpp_op_rejects_bad_input_itself():
    """The compiled op checks its own inputs too (it can be called without the Python wrapper)."""
    x, w, b, lw, lb = make_inputs(1, 8, 4, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="x must be channels_last-contiguous"):
        torch.ops.convnext_fast.dwconv_ln(x.contiguous(), w, b, lw, lb, 1e-6)
    with pytest.raises(RuntimeError, match=r"conv_weight must have shape \[C, 1, k, k\]"):
        torch.ops.convnext_fast.dwconv_ln(x, w[:4], b, lw, lb, 1e-6)
    with pytest.raises(RuntimeError, match="ln_bias has dtype"):
        torch.ops.convnext_fast.dwconv_ln(x, w, b, lw, lb.double(), 1e-6)


@needs_ext
def test_cuda_kernels_are_in_the_build_when_built_with_cuda():
    info = _ext.build_info()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("convnext_fast::dwconv_ln", "CUDA")
    assert has_cuda_kernel == info["with_cuda"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("convnext_fast::dwconv_ln", "CPU")
    toolkit = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if (torch.version.cuda and os.path.exists(os.path.join(toolkit, "bin", "nvcc"))
            and os.environ.get("CONVNEXT_FAST_SKIP_CUDA_BUILD") != "1"):
        assert info["with_cuda"], "a CUDA toolkit and a CUDA torch are here, but no CUDA kernels were built"
