"""``dwconv_ln``: depthwise kxk conv + bias fused with the channels-last LayerNorm.

Backends: ``torch`` (reference composite), and ``cpu`` / ``cuda``: the extension's op
``convnext_fast::dwconv_ln`` (``csrc/cpu/dwconv_ln_cpu.cpp``, ``csrc/cuda/dwconv_ln_cuda.cu``), whose
backward is the op ``convnext_fast::dwconv_ln_bwd`` (``csrc/cpu/dwconv_ln_bwd_cpu.cpp``, and the CUDA
kernel where the build has one) from x and the saved fp32 statistics; on a device without a compiled
backward it is the fp32 composite :func:`convnext_fast.reference.dwconv_ln_bwd`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, backends, reference
from ._autocast import autocast_inputs
from ._checks import channels_last, check_dwconv_ln, device_type as _device_type

__all__ = ["dwconv_ln"]

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CUDA_MAX_C = 4096  # 8 pixels x C fp32 conv outputs must fit in one block's shared memory
_CUDA_KERNEL_SIZES = (3, 5, 7)
_INT32_MAX = 2 ** 31 - 1


def _cuda_shared_bytes(C: int) -> int:
    """Shared memory per block of the CUDA kernels at C channels (csrc/include/dwconv_cuda.cuh):
    a tile of 8 pixels x C fp32, plus the backward's 3 x 8 fp32 per-pixel statistics."""
    return 8 * C * 4 + 3 * 8 * 4


def dwconv_ln(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = LayerNorm_C(dwconv_kxk(x) + conv_bias), 'same' padding, stride 1.

    x: [N, C, H, W] (NCHW-contiguous input is converted to channels-last once, here);
    conv_weight: [C, 1, k, k], odd k; conv_bias: [C] or None; ln_weight, ln_bias: [C], all with
    x's dtype and device. Returns y: [N, C, H, W], channels-last, x's dtype. LayerNorm statistics
    are fp32 on every backend. Under ``torch.autocast`` every tensor is first cast to the autocast
    dtype and y comes back in it.
    """
    tensors, ctx = autocast_inputs(_device_type(x), x, conv_weight, conv_bias, ln_weight, ln_bias)
    x, conv_weight, conv_bias, ln_weight, ln_bias = tensors
    check_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias)
    x = channels_last(x)
    args = (x, conv_weight, conv_bias, ln_weight, ln_bias, float(eps))
    _, fn = backends.select("dwconv_ln", x.device, backend, args, {})
    with ctx:
        return fn(*args)


def _cpu_available() -> Optional[str]:
    return _ext.error()


def _cpu_supports(x, conv_weight, conv_bias, ln_weight, ln_bias, eps) -> Optional[str]:
    if x.device.type != "cpu":
        return f"the C++ CPU kernel needs CPU tensors, got {x.device.type}"
    if x.dtype not in _CPU_DTYPES:
        return f"dtype {x.dtype} is not supported by the C++ CPU kernel"
    return None


def _cuda_available() -> Optional[str]:
    if _ext.error():
        return _ext.error()
    if not _ext.has_cuda_kernels():
        return "convnext_fast._C was built without CUDA kernels"
    return None


def _cuda_supports(x, conv_weight, conv_bias, ln_weight, ln_bias, eps) -> Optional[str]:
    N, C, H, _ = x.shape
    if x.device.type != "cuda":
        return f"the CUDA kernel needs CUDA tensors, got {x.device.type}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not supported by the CUDA kernel"
    if C > _CUDA_MAX_C or N > 65535 or H > 65535:
        return f"shape {list(x.shape)} is outside the CUDA kernel's limits (C <= {_CUDA_MAX_C}, N, H <= 65535)"
    if conv_weight.shape[-1] not in _CUDA_KERNEL_SIZES:
        return f"the CUDA kernel supports k in {_CUDA_KERNEL_SIZES}, got {conv_weight.shape[-1]}"
    W = x.shape[3]
    if W * C > _INT32_MAX or H * W > _INT32_MAX or W > _INT32_MAX - 8:
        return f"shape {list(x.shape)}: one image row or plane is too large for the CUDA kernel"
    if not torch.cuda.is_available():  # fake/meta CUDA tensors (tracing without a GPU): no device to ask
        return None
    reason = _ext.cuda_arch_unsupported(torch.cuda.get_device_capability(x.device))
    if reason is None:
        # sm_86/89 give a block at most 99 KiB (sm_80 163, sm_90 227): C = 4096 needs 128 KiB.
        limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
        if _cuda_shared_bytes(C) > limit:
            reason = (f"C = {C} needs {_cuda_shared_bytes(C)} bytes of shared memory per block, "
                      f"more than this GPU's {limit}")
    return reason


def _ext_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    return torch.ops.convnext_fast.dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)[0]


def _has_bwd_kernel(device_type: str) -> bool:
    """Whether the extension has a compiled ``dwconv_ln_bwd`` for this device (CPU always; CUDA
    when built with its kernel); elsewhere the backward is the composite
    :func:`convnext_fast.reference.dwconv_ln_bwd`."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "convnext_fast::dwconv_ln_bwd", key)


def _register_cpp_op() -> None:
    """Fake (meta) and autograd formulas for the C++ op; the schema lives in csrc/ops.cpp."""

    @torch.library.register_fake("convnext_fast::dwconv_ln")
    def _(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
        N, _, H, W = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        stats = x.new_empty((N, H, W), dtype=torch.float32)
        return y, stats, torch.empty_like(stats)

    def setup_context(ctx, inputs, output):
        x, conv_weight, conv_bias, ln_weight, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, mean, rstd)

    @torch.library.register_fake("convnext_fast::dwconv_ln_bwd")
    def _(grad_y, x, conv_weight, conv_bias, ln_weight, mean, rstd):
        C = x.shape[1]
        return (torch.empty_like(x, memory_format=torch.channels_last),
                torch.empty_like(conv_weight, memory_format=torch.contiguous_format),
                (conv_bias if conv_bias is not None else conv_weight).new_empty((C,)),
                ln_weight.new_empty((C,)), ln_weight.new_empty((C,)))

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, conv_weight, conv_bias, ln_weight, mean, rstd = ctx.saved_tensors
        if _has_bwd_kernel(x.device.type):
            dx, dw, db, dlw, dlb = torch.ops.convnext_fast.dwconv_ln_bwd(
                grad_y.contiguous(memory_format=torch.channels_last), x, conv_weight, conv_bias,
                ln_weight, mean, rstd)
        else:
            dx, dw, db, dlw, dlb = reference.dwconv_ln_bwd(grad_y, x, conv_weight, conv_bias,
                                                           ln_weight, mean, rstd)
        return dx, dw, db if conv_bias is not None else None, dlw, dlb, None

    torch.library.register_autograd("convnext_fast::dwconv_ln", backward, setup_context=setup_context)


backends.register("dwconv_ln", "torch", reference.dwconv_ln)
backends.register("dwconv_ln", "cpu", _ext_dwconv_ln, _cpu_available, _cpu_supports)
backends.register("dwconv_ln", "cuda", _ext_dwconv_ln, _cuda_available, _cuda_supports)
if _ext.load() is not None:
    _register_cpp_op()

from . import _triton_dwconv_ln  # noqa: E402,F401  (registers the triton backend)
