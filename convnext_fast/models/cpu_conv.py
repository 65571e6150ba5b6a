"""A Conv2d whose bf16/fp16 runs in fp32 on CPUs without native reduced-precision convolutions.

PyTorch's own bf16 conv there is the im2col fallback (``aten::_slow_conv2d_forward``), 7-8x slower
than oneDNN's fp32 conv on the 2-core dev CPU (ConvNeXt-T's stem and downsample convs: 22 vs 6 ms
at batch 1, 176 vs 21 ms at batch 8), and the fp32 result, rounded once, is the more accurate one.
Elsewhere (other CPUs, other devices, fp32) the forward is ``nn.Conv2d``'s.

Used by the model's stem and downsample convs (:class:`Fp32ComputeConv2d`) and bound by
:func:`convnext_fast.patch_timm` to timm's (:func:`fp32_compute_conv_forward`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Fp32ComputeConv2d", "fp32_compute_conv_forward", "cpu_has_native_conv"]


def _onednn_has(query: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, query)())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# Asked once: the answer is a property of the CPU (AVX512-BF16, AMX, AVX512-FP16) and the build.
_CPU_NATIVE_CONV = {
    torch.bfloat16: _onednn_has("_is_mkldnn_bf16_supported"),
    torch.float16: _onednn_has("_is_mkldnn_fp16_supported"),
}


def cpu_has_native_conv(dtype: torch.dtype) -> bool:
    """Whether oneDNN convolves ``dtype`` natively on this CPU (always True for fp32/fp64)."""
    return _CPU_NATIVE_CONV.get(dtype, True)


def fp32_compute_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``nn.Conv2d.forward`` computing bf16/fp16 (stored, or under CPU autocast) in fp32 on a CPU
    without native convs for that dtype, rounded to it once. x: [N, C_in, H, W] ->
    [N, C_out, H', W'] in x's dtype (the autocast dtype under CPU autocast)."""
    if x.device.type == "cpu":
        low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if low in _CPU_NATIVE_CONV and not _CPU_NATIVE_CONV[low]:
            bias = None if self.bias is None else self.bias.float()
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight.float(), bias).to(low)
    return self._conv_forward(x, self.weight, self.bias)


class Fp32ComputeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and names) whose forward is :func:`fp32_compute_conv_forward`."""

    forward = fp32_compute_conv_forward
