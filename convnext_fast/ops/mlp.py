"""``mlp``: Linear(C->D) + exact GELU + Linear(D->C) + layer scale + residual add.

Backends: ``torch`` (reference composite), ``triton`` (kernels/mlp.py), and ``cpu``: the
extension's op ``convnext_fast::mlp`` with its backward op ``convnext_fast::mlp_bwd``
(csrc/cpu/mlp_cpu.cpp: row tiles, the hidden stays in cache; CPU only, CUDA is served by
triton/torch).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, backends, reference
from ._autocast import autocast_inputs
from ._checks import channels_last, check_mlp, check_tensor, device_type

__all__ = ["mlp"]


def mlp(
    y: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """out = residual + gamma * fc2(gelu_erf(fc1(y))) per pixel.

    y: [N, C, H, W]; fc1_weight: [D, C]; fc1_bias: [D] or None; fc2_weight: [C, D];
    fc2_bias: [C] or None; gamma: [C] or None (no layer scale); residual: [N, C, H, W] or None
    (return the branch alone). Returns [N, C, H, W], channels-last, y's dtype (the autocast dtype
    under ``torch.autocast``, which casts every tensor first).
    """
    tensors, ctx = autocast_inputs(device_type(y), y, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                   gamma, residual)
    y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual = tensors
    check_mlp("mlp", y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    check_tensor("mlp", "gamma", gamma, (y.shape[1],), y, optional=True)
    y, residual = channels_last(y), channels_last(residual)
    args = (y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual)
    _, fn = backends.select("mlp", y.device, backend, args, {})
    with ctx:
        return fn(*args)


_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cpu_kernel_reason() -> Optional[str]:
    if _ext.load() is None:
        return _ext.error()
    if not (hasattr(torch.ops.convnext_fast, "mlp")
            and torch._C._dispatch_has_kernel_for_dispatch_key("convnext_fast::mlp", "CPU")):
        return "convnext_fast._C has no CPU kernel for mlp (an old build: rebuild the extension)"
    return None


_CPU_REASON = _cpu_kernel_reason()  # once, at import: a dispatcher query inside a traced
                                    # function would break torch.compile's graph


def _cpu_available() -> Optional[str]:
    return _CPU_REASON


def _cpu_supports(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual) -> Optional[str]:
    if y.device.type != "cpu":
        return f"the C++ CPU kernel needs CPU tensors, got {y.device.type}"
    if y.dtype not in _CPU_DTYPES:
        return f"dtype {y.dtype} is not supported by the C++ CPU kernel"
    return None


def _cpu_mlp(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
    return torch.ops.convnext_fast.mlp(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual)


def _register_cpp_op() -> None:
    """Fake tensors and autograd for the C++ ops ``convnext_fast::mlp`` / ``mlp_bwd`` (schemas in
    csrc/ops.cpp, CPU kernels in csrc/cpu/mlp_cpu.cpp). The autograd saves y and the parameters
    only; the backward op recomputes the hidden tile by tile."""

    @torch.library.register_fake("convnext_fast::mlp")
    def _(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
        return torch.empty_like(y, memory_format=torch.channels_last)

    @torch.library.register_fake("convnext_fast::mlp_bwd")
    def _(grad_out, y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
        D, C = fc1_weight.shape
        return (torch.empty_like(y, memory_format=torch.channels_last),
                fc1_weight.new_empty((D, C)), fc1_weight.new_empty((D,)),
                fc1_weight.new_empty((C, D)), fc1_weight.new_empty((C,)),
                fc1_weight.new_empty((C,)))

    def setup_context(ctx, inputs, output):
        y, w1, b1, w2, b2, gamma, residual = inputs
        ctx.save_for_backward(y, w1, b1, w2, b2, gamma)
        ctx.has_residual = residual is not None

    def backward(ctx, grad):
        y, w1, b1, w2, b2, gamma = ctx.saved_tensors
        dy, dw1, db1, dw2, db2, dgamma = torch.ops.convnext_fast.mlp_bwd(
            grad.contiguous(memory_format=torch.channels_last), y, w1, b1, w2, b2, gamma)
        return (dy, dw1, None if b1 is None else db1, dw2, None if b2 is None else db2,
                None if gamma is None else dgamma, grad if ctx.has_residual else None)

    torch.library.register_autograd("convnext_fast::mlp", backward, setup_context=setup_context)


backends.register("mlp", "torch", reference.mlp)
backends.register("mlp", "cpu", _cpu_mlp, _cpu_available, _cpu_supports)
if _CPU_REASON is None:
    _register_cpp_op()

from . import _triton_mlp  # noqa: E402,F401  (registers the triton backends of mlp and mlp_grn)
