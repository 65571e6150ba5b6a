"""A Conv2d for the stem and downsample convs on a CPU: fp32 compute for bf16/fp16 where the CPU
has no native reduced-precision convolutions, and prepacked weights for inference.

- PyTorch's own bf16 conv on a CPU without native bf16 is the im2col fallback
  (``aten::_slow_conv2d_forward``), 7-8x slower than oneDNN's fp32 conv on the 2-core dev CPU
  (ConvNeXt-T's stem and downsample convs: 22 vs 6 ms at batch 1, 176 vs 21 ms at batch 8), and
  the fp32 result, rounded once, is the more accurate one.
- Elsewhere on a CPU, an inference call (no gradient needed) runs oneDNN's conv on the weight
  reordered once into oneDNN's blocked layout (``mkldnn::_reorder_convolution_weight`` and
  ``_convolution_pointwise``, what torch.compile's CPU freezing pass emits), made again only when
  the weight changes (:class:`convnext_fast._prepared.Prepared`); ``nn.Conv2d`` reorders it on
  every call: at batch 1 on a 2-core Zen 4, ConvNeXt-T's last downsample takes 0.6 instead of
  3.6 ms in fp32. Under autocast the weight is cast once with it.
- Other devices, and calls that need gradients, run ``nn.Conv2d``'s forward.

Used by the model's stem and downsample convs (:class:`Fp32ComputeConv2d`) and bound by
:func:`convnext_fast.patch_timm` to timm's (:func:`fp32_compute_conv_forward`).

The model's downsamples (LayerNorm2d, then the 2x2/2 conv) go further on a CPU at inference
(:func:`fused_downsample`): one C++ op, ``convnext_fast::downsample``, normalises each input
pixel into the rows of a GEMM (the patches do not overlap) and runs it on the mlp's
packed-weight tiles (csrc/cpu/downsample_cpu.cpp). On 2 Zen 4 threads, per ConvNeXt-T
downsample at batch 1 with the caches evicted first, fp32 0.67-0.69 ms against 0.90-1.06 for the
LayerNorm and the packed oneDNN conv, bf16 0.34-0.49 against 0.55-0.78; batch 8 fp32 4.6-5.5 vs
4.9-6.3 ms, bf16 2.4-3.1 vs 3.1-4.0.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn as nn

from .._prepared import Prepared, caching_allowed
from ..ops._autocast import CASTABLE, autocast_args

__all__ = ["Fp32ComputeConv2d", "fp32_compute_conv_forward", "cpu_has_native_conv", "fused_downsample"]


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


_PACKABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_PACKED = {dtype: Prepared(f"oneDNN packed conv weights ({dtype})")
           for dtype, native in ((torch.float32, True), *_CPU_NATIVE_CONV.items()) if native}


def _packed_forward(self: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The conv on the weight reordered once (in ``dtype``); x: [N, C_in, H, W] on the CPU."""
    def pack():
        with torch.inference_mode(False), torch.no_grad():
            w = self.weight.detach().to(dtype)
            b = None if self.bias is None else self.bias.detach().to(dtype).contiguous()
            # the input's shape picks the blocked layout: without it oneDNN can pick one that is
            # 20-40x slower (bf16 192 -> 384 channels at 28x28: 12 ms instead of 0.3); the first
            # call's shape serves other batch sizes as well (checked at batch 1 and 8)
            return torch.ops.mkldnn._reorder_convolution_weight(
                w, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape)), b

    weight, bias = _PACKED[dtype].get((self.weight, self.bias), pack)
    with torch.autocast("cpu", enabled=False):
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight, bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "")


def _packs(self: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> bool:
    return (_PACKABLE and dtype in _PACKED and x.dim() == 4 and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple) and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))))


def cpu_has_native_conv(dtype: torch.dtype) -> bool:
    """Whether oneDNN convolves ``dtype`` natively on this CPU (always True for fp32/fp64)."""
    return _CPU_NATIVE_CONV.get(dtype, True)


def fp32_compute_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``nn.Conv2d.forward`` computing bf16/fp16 (stored, or under CPU autocast) in fp32 on a CPU
    without native convs for that dtype, rounded to it once. x: [N, C_in, H, W] ->
    [N, C_out, H', W'] in x's dtype (the autocast dtype under CPU autocast)."""
    if x.device.type == "cpu":
        autocast = torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, *_CPU_NATIVE_CONV)
        low = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        if low in _CPU_NATIVE_CONV and not _CPU_NATIVE_CONV[low]:
            if _packs(self, x, torch.float32):
                return _packed_forward(self, x, torch.float32).to(low)
            bias = None if self.bias is None else self.bias.float()
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight.float(), bias).to(low)
        if _packs(self, x, low) and (autocast or self.weight.dtype == low):
            return _packed_forward(self, x, low)
    return self._conv_forward(x, self.weight, self.bias)


class Fp32ComputeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and names) whose forward is :func:`fp32_compute_conv_forward`."""

    forward = fp32_compute_conv_forward


@functools.lru_cache(maxsize=None)
def _downsample_runs(dtype: torch.dtype) -> bool:
    from .. import _ext  # the extension loads on first use, not at import

    return bool(_ext.cpu_downsample().get(str(dtype).replace("torch.", ""), False))


def fused_downsample(norm: nn.LayerNorm, conv: nn.Conv2d, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``conv(norm(x))`` as one ``convnext_fast::downsample`` call (LayerNorm over C, then the
    s x s conv of stride s) where it runs, else None (the caller runs the two modules).

    x: [N, C, H, W] on the CPU -> [N, C_out, H / s, W / s] channels-last, in x's dtype (the autocast
    dtype under CPU autocast). Runs for eager calls that need no gradient, with the derived-weight
    cache allowed (the packed conv weight is made once per version), fp32 or bf16 where
    ``_ext.cpu_downsample()`` says so, a conv with kernel = stride, no padding, dilation or
    groups. ``CONVNEXT_FAST_CPU_DOWNSAMPLE=0`` turns it off, as does turning every kernel off
    (``CONVNEXT_FAST_DISABLE=1``, ``disable_kernels()``).
    """
    if x.device.type != "cpu" or x.dim() != 4 or torch.compiler.is_compiling():
        return None
    s = conv.kernel_size[0]
    if (conv.kernel_size != (s, s) or conv.stride != (s, s) or conv.padding != (0, 0)
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
            or norm.weight is None or norm.bias is None or x.shape[2] < s or x.shape[3] < s):
        return None
    params = (norm.weight, norm.bias, conv.weight, conv.bias)
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return None
    from ..backends import registry

    if (os.environ.get("CONVNEXT_FAST_CPU_DOWNSAMPLE") == "0" or not caching_allowed()
            or registry.is_off("downsample") is not None):
        return None
    autocast = torch.is_autocast_enabled("cpu") and x.dtype in CASTABLE
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if not _downsample_runs(dtype) or (dtype == torch.bfloat16 and s * s * x.shape[1] % 2):
        return None
    if not autocast and any(p is not None and p.dtype != dtype for p in params):
        return None  # mixed dtypes outside autocast: the modules raise, or promote, as they do
    from ..backends._cpp import call_with_cache

    args, ctx = autocast_args("cpu", {"x": x, "ln_weight": norm.weight, "ln_bias": norm.bias,
                                      "conv_weight": conv.weight, "conv_bias": conv.bias})
    args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
    with ctx:
        return call_with_cache(torch.ops.convnext_fast.downsample,
                               (args["x"], args["ln_weight"], args["ln_bias"], float(norm.eps),
                                args["conv_weight"], args["conv_bias"]))
