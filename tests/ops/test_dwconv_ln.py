"""dwconv_ln on the extension's kernels (C++ CPU, CUDA) against the fp64 reference.

The same tests run for the ``cpu`` backend everywhere and the ``cuda`` backend where a GPU is
visible and the extension was built with CUDA (skipped, with the reason, elsewhere). Gradients of
the public op on small shapes (autograd through the compiled backward) are test_contract.py's.
"""
import os
import sys

import pytest
import torch

from convnext_fast import _ext, backends, ops, reference
from convnext_fast.testing import assert_fp32, assert_parity

sys.path.insert(0, os.path.dirname(__file__))  # _kernel_tests.py (importlib import mode adds none)
from _kernel_tests import as64, dwconv_ln_inputs  # noqa: E402

needs_ext = pytest.mark.skipif(_ext.load() is None, reason=f"extension not built: {_ext.error()}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
EXT_BACKENDS = [pytest.param("cpu", marks=needs_ext), pytest.param("cuda", marks=[needs_ext, needs_gpu])]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def skip_unsupported(shape, backend):
    """The CUDA kernels take k in {3, 5, 7} (others fall back: tests/test_fallbacks.py)."""
    if backend == "cuda" and shape[4] not in (3, 5, 7):
        pytest.skip(f"CUDA kernel: k = {shape[4]} is outside 3/5/7")

# (N, C, H, W, k): ConvNeXt-T stage shapes at small batch, then odd ones: C not a multiple of the
# vector width, H != W, H or W smaller than the kernel, 1x1 images, 5x5 and 3x3 kernels, and 9x9
# and 1x1 (the CPU kernel's generic path; 3/5/7 are register-blocked). The CPU kernel cuts a row
# into near-equal tiles of at most 8 pixels, narrow ones with extra sets of sums over kernel rows:
# widths 17 (6+6+5), 12 (6+6), 4 and 2 cover the tile widths and sets the stage shapes do not.
SHAPES = [
    (1, 96, 56, 56, 7), (2, 192, 28, 28, 7), (2, 384, 14, 14, 7), (2, 768, 7, 7, 7),
    (2, 13, 9, 11, 7), (1, 40, 3, 5, 7), (3, 136, 1, 1, 7), (1, 7, 2, 9, 5), (2, 33, 4, 3, 3),
    (1, 1, 6, 6, 3), (1, 2048, 2, 3, 7), (2, 20, 10, 6, 9), (1, 24, 3, 5, 1),
    (1, 24, 7, 17, 7), (2, 16, 5, 12, 3), (1, 16, 6, 4, 7), (2, 24, 3, 2, 5),
]


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dtype, backend):
    skip_unsupported(shape, backend)
    args = dwconv_ln_inputs(shape, dtype, bias=shape[1] % 2 == 0, device=device_of(backend))
    y = ops.dwconv_ln(*args, 1e-6, backend=backend)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ref64 = reference.dwconv_ln(*as64(args), 1e-6)
    assert_parity(y, ref64, reference.dwconv_ln(*args, 1e-6), name=f"dwconv_ln{shape}")


@pytest.mark.parametrize("backend", EXT_BACKENDS)
def test_statistics_are_fp32_and_exact(backend):
    x, w, b, lw, lb = dwconv_ln_inputs((2, 96, 5, 6, 7), torch.bfloat16, device=device_of(backend))
    x = x * 1e4  # large magnitude: E[x^2]-E[x]^2 in low precision would lose everything
    _, mean, rstd = torch.ops.convnext_fast.dwconv_ln(x, w, b, lw, lb, 1e-6)
    z = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=3, groups=96)
    var, mu = torch.var_mean(z, dim=1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(rstd.double(), (var + 1e-6).rsqrt(), rtol=1e-4, atol=0)


@needs_ext
def test_fp64_is_exact():
    args = dwconv_ln_inputs((2, 24, 7, 5, 7), torch.float64)
    assert_parity(ops.dwconv_ln(*args, backend="cpu"), reference.dwconv_ln(*args))


BWD_SHAPES = [(2, 96, 14, 14, 7), (1, 384, 7, 7, 7), (2, 13, 9, 11, 7), (1, 40, 3, 5, 7),
              (3, 136, 1, 1, 7), (1, 7, 2, 9, 5), (2, 33, 4, 3, 3), (1, 1, 6, 6, 3),
              (2, 20, 10, 6, 9), (1, 24, 7, 17, 7), (1, 16, 6, 4, 7), (2, 24, 3, 2, 5),
              # C = 1536 / 3072 / 4000: two / three / four channel vectors per CUDA thread
              (1, 1536, 3, 2, 7), (1, 3072, 2, 3, 7), (1, 4000, 1, 2, 3)]
BWD_NAMES = ("dx", "d_conv_weight", "d_conv_bias", "d_ln_weight", "d_ln_bias")


def skip_without_bwd_kernel(device):
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("convnext_fast::dwconv_ln_bwd", key):
        pytest.skip(f"this build has no {key} kernel for dwconv_ln_bwd (autograd uses the composite)")


def run_bwd(args, grad_y, eps=1e-6):
    """The compiled backward op on the forward op's own saved statistics."""
    x, w, b, lw, lb = args
    skip_without_bwd_kernel(x.device)
    _, mean, rstd = torch.ops.convnext_fast.dwconv_ln(x, w, b, lw, lb, eps)
    return torch.ops.convnext_fast.dwconv_ln_bwd(grad_y, x, w, b, lw, mean, rstd)


def assert_within_torch_error(out, ref64, torch_same, name, factor=2.0):
    """The low-precision parity rule applied to fp32 (for cases whose exact answer is 0)."""
    err = (out.double() - ref64).abs().max().item()
    base = (torch_same.double() - ref64).abs().max().item()
    assert err <= factor * base + 1e-6, f"{name}: error {err:.3g} vs PyTorch's fp32 {base:.3g}"


def autograd_grads(args, grad_y):
    """Gradients of the reference forward by autograd, in the inputs' dtype (what PyTorch makes)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in args]
    y = reference.dwconv_ln(*leaves, 1e-6)
    live = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(y, live, grad_y))
    return [next(got) if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_op_matches_reference(shape, dtype, backend):
    skip_unsupported(shape, backend)
    bias = shape[1] % 2 == 0
    args = dwconv_ln_inputs(shape, dtype, bias=bias, device=device_of(backend))
    gy = torch.randn(args[0].shape).to(args[0].device, dtype).contiguous(memory_format=torch.channels_last)
    got = run_bwd(args, gy)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    want = autograd_grads(as64(args), gy.double())
    lowp = autograd_grads(args, gy)
    for name, g, w, lp in zip(BWD_NAMES, got, want, lowp):
        assert g.dtype == dtype
        if w is None:  # no conv bias: the op still returns the sum of dz; the autograd drops it
            continue
        assert g.shape == w.shape, name
        if dtype == torch.float32 and shape[1] > 1:
            assert_fp32(g, w, name=f"{name}{shape}", rtol=2e-5)
        elif dtype == torch.float32:
            # C == 1: every true gradient but d_ln_bias is 0 and fp32 rounding of z - mean is
            # scaled by rstd = eps^-1/2, so fp32 is held to PyTorch's own fp32 error there.
            assert_within_torch_error(g, w, lp, name=f"{name}{shape}")
        else:
            assert_parity(g, w, lp, name=f"{name}{shape}")


@pytest.mark.parametrize("backend", EXT_BACKENDS)
def test_backward_is_deterministic(backend):
    args = dwconv_ln_inputs((2, 72, 11, 9, 7), torch.float32, device=device_of(backend))
    gy = torch.randn_like(args[0])
    first = run_bwd(args, gy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the CPU kernel's partial sums must not depend on the thread count
        second = run_bwd(args, gy)
    finally:
        torch.set_num_threads(threads)
    third = run_bwd(args, gy)
    for name, a, b, c in zip(BWD_NAMES, first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c), name


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_opcheck(dtype, backend):
    dev = device_of(backend)
    for shape, bias in (((2, 12, 5, 4, 3), True), ((1, 8, 3, 3, 7), False)):
        x, w, b, lw, lb = dwconv_ln_inputs(shape, dtype, bias=bias, device=dev)
        skip_without_bwd_kernel(x.device)
        _, mean, rstd = torch.ops.convnext_fast.dwconv_ln(x, w, b, lw, lb, 1e-6)
        gy = torch.randn_like(x)
        torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln_bwd.default,
                              (gy, x, w, b, lw, mean, rstd))


@pytest.mark.parametrize("backend", EXT_BACKENDS)
def test_autograd_runs_the_compiled_backward(backend):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    args = [t.requires_grad_() for t in dwconv_ln_inputs((1, 16, 4, 4, 3), torch.float32,
                                                    device=device_of(backend))]
    skip_without_bwd_kernel(args[0].device)
    y = ops.dwconv_ln(*args, backend=backend)
    with Record() as rec:
        y.backward(torch.randn_like(y))
    assert "convnext_fast.dwconv_ln_bwd" in rec.ops
    assert "aten.convolution_backward" not in rec.ops  # not the composite


@needs_ext
def test_backward_op_rejects_bad_input():
    x, w, b, lw, lb = dwconv_ln_inputs((1, 8, 4, 4, 3), torch.float32)
    _, mean, rstd = torch.ops.convnext_fast.dwconv_ln(x, w, b, lw, lb, 1e-6)
    gy = torch.randn_like(x)
    bwd = torch.ops.convnext_fast.dwconv_ln_bwd
    with pytest.raises(RuntimeError, match="grad_y must be channels_last-contiguous"):
        bwd(gy.contiguous(), x, w, b, lw, mean, rstd)
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        bwd(gy[:, :, :2].contiguous(memory_format=torch.channels_last), x, w, b, lw, mean, rstd)
    with pytest.raises(RuntimeError, match=r"mean must have shape \[N, H, W\]"):
        bwd(gy, x, w, b, lw, mean[:, :2], rstd)
    with pytest.raises(RuntimeError, match="rstd must be float32"):
        bwd(gy, x, w, b, lw, mean, rstd.double())
    with pytest.raises(RuntimeError, match="ln_weight has dtype"):
        bwd(gy, x, w, b, lw.double(), mean, rstd)


@needs_ext
def test_gradcheck_fp64():
    args = [t.requires_grad_() for t in dwconv_ln_inputs((1, 5, 4, 3, 3), torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: ops.dwconv_ln(*a, backend="cpu"), args)
    # no conv bias, H and W smaller than k
    x, w, _, lw, lb = [t.requires_grad_() if t is not None else None
                       for t in dwconv_ln_inputs((2, 3, 2, 3, 5), torch.float64, bias=False)]
    assert torch.autograd.gradcheck(lambda *a: ops.dwconv_ln(a[0], a[1], None, *a[2:], backend="cpu"),
                                    (x, w, lw, lb))


@pytest.mark.parametrize("backend", EXT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, backend):
    args = dwconv_ln_inputs((2, 12, 5, 4, 3), dtype, device=device_of(backend))
    torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln.default, (*args, 1e-6))
    args = dwconv_ln_inputs((1, 8, 3, 3, 3), dtype, bias=False, device=device_of(backend))
    torch.library.opcheck(torch.ops.convnext_fast.dwconv_ln.default, (*args, 1e-5))


@needs_ext
def test_automatic_selection_prefers_the_cpu_kernel():
    y = ops.dwconv_ln(*dwconv_ln_inputs((1, 8, 3, 3, 3), torch.float32))
    assert backends.last_selections()["dwconv_ln"][0] == "cpu"
    assert y.shape == (1, 8, 3, 3)


# The CPU forward splits the conv by rows or, for small images, by channel planes. Both, forced, at
# shapes where the two differ in what they load: images smaller than the kernel, one row, C not a
# multiple of the vector width (a partial last plane), several images, every blocked kernel size.
SPLIT_SHAPES = [
    (1, 768, 7, 7, 7), (2, 37, 5, 9, 7), (1, 20, 1, 1, 7), (3, 16, 2, 3, 5), (1, 33, 4, 17, 3),
    (2, 96, 13, 11, 7), (1, 8, 3, 30, 7), (4, 24, 1, 6, 5), (1, 200, 14, 14, 7),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_splits_match_the_reference_and_each_other(shape, dtype, monkeypatch):
    """Both splits within the parity rule and bitwise equal (the same sums in the same order), with
    the outputs poisoned first (tests/conftest.py) and the statistics checked too."""
    args = dwconv_ln_inputs(shape, dtype, bias=shape[1] % 2 == 1)
    outs = {}
    for split in ("rows", "planes"):
        monkeypatch.setenv("CONVNEXT_FAST_DWCONV_LN_CPU_SPLIT", split)
        outs[split] = torch.ops.convnext_fast.dwconv_ln(*args, 1e-6)
    ref64 = reference.dwconv_ln(*as64(args), 1e-6)
    assert_parity(outs["planes"][0], ref64, reference.dwconv_ln(*args, 1e-6), name=f"planes{shape}")
    for a, b in zip(outs["rows"], outs["planes"]):
        assert torch.equal(a, b)


@needs_ext
def test_cpu_split_setting_is_read_and_checked(monkeypatch):
    """An unknown split fails loudly (the setting is read where the forward picks its split)."""
    monkeypatch.setenv("CONVNEXT_FAST_DWCONV_LN_CPU_SPLIT", "diagonal")
    with pytest.raises(RuntimeError, match="must be 'auto', 'rows' or 'planes'"):
        torch.ops.convnext_fast.dwconv_ln(*dwconv_ln_inputs((1, 16, 4, 4, 7), torch.float32), 1e-6)


@pytest.mark.parametrize("backend", ["torch", *EXT_BACKENDS])
def test_layouts_and_edge_shapes(backend):
    dev = device_of(backend)
    x, w, b, lw, lb = dwconv_ln_inputs((2, 16, 9, 8, 7), torch.float32, device=dev)
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
    x, w, b, lw, lb = dwconv_ln_inputs((1, 8, 4, 4, 3), torch.float32)
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


@needs_ext
def test_cuda_backward_kernel_is_in_the_build_when_built_with_cuda():
    """A CUDA build registers CUDA kernels for the forward and the backward op (autograd uses the
    compiled backward only where one is registered); a CPU-only build registers neither."""
    with_cuda = _ext.build_info()["with_cuda"]
    for op in ("convnext_fast::dwconv_ln", "convnext_fast::dwconv_ln_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == with_cuda, op
