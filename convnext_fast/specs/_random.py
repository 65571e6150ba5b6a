"""Random tensors for the input factories of the specs."""
from __future__ import annotations

import torch


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False) -> torch.Tensor:
    """``scale * randn(shape)`` drawn in fp32 on the CPU (the same numbers for every dtype and
    device at one seed), then cast and moved."""
    t = (scale * torch.randn(*shape)).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def nhwc(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    """A random [N, C, H, W] tensor in channels-last memory."""
    t = rand(*shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)
