"""Parity checks shared by the test suites (ours and users' own), per DESIGN.md section 6.

The rule: compare against an fp64 reference. fp32/fp64 results must be tight; a low-precision
result passes when its max error is within 2x of the error plain PyTorch makes in that dtype
(``torch_lowp``, the reference run in the same dtype) plus a small absolute slack.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["assert_parity", "assert_fp32", "max_error"]

_TIGHT = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def assert_parity(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: Optional[torch.Tensor] = None,
                  *, name: str = "output", tight: Optional[tuple] = None, factor: float = 2.0) -> None:
    """Raise AssertionError unless ``out`` matches the fp64 reference under the parity rule.

    out: the kernel's result (any dtype); ref64: the fp64 reference; torch_lowp: PyTorch's result
    in out's dtype, required when out is fp16/bf16; tight: (atol, rtol) override for fp32/fp64;
    factor: how many times PyTorch's own low-precision error ``out`` may make (2 by the rule).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    finite_ref = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out), finite_ref), (
        f"{name}: {(~torch.isfinite(out) & finite_ref).sum().item()} non-finite elements "
        "where the reference is finite (unwritten output?)")
    o, r = out.double()[finite_ref], ref64.double()[finite_ref]
    if out.dtype in _TIGHT:
        atol, rtol = tight or _TIGHT[out.dtype]
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    assert torch_lowp is not None, f"{name}: {out.dtype} parity needs PyTorch's own {out.dtype} result"
    err = (o - r).abs().max().item()
    base = (torch_lowp.double()[finite_ref] - r).abs().max().item()
    slack = 0.25 * torch.finfo(out.dtype).eps * r.abs().max().item()
    assert err <= factor * base + slack, (
        f"{name}: max error {err:.3g} vs fp64 exceeds {factor:g}x PyTorch's own {out.dtype} error "
        f"({base:.3g}) + {slack:.3g}")


def assert_fp32(out: torch.Tensor, ref64: torch.Tensor, name: str = "output", rtol: float = 1e-5,
                atol: float = 1e-7) -> None:
    """fp32 result vs the fp64 reference, relative to the reference's scale: max |out - ref| <=
    rtol * max |ref| + atol. Suits reductions (weight gradients) whose small elements carry the
    absolute rounding error of the large ones."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: non-finite elements (unwritten output?)"
    scale = ref64.abs().max().item()
    err = max_error(out, ref64)
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3e} vs max |ref| {scale:.3e}"
