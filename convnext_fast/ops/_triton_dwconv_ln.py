"""``dwconv_ln`` on the ``triton`` backend (kernels in ``kernels/dwconv_ln.py``).

Registers two ``torch.library.triton_op`` operators, so torch.compile traces into the kernels:

* ``convnext_fast::dwconv_ln_triton(x, conv_weight, conv_bias?, ln_weight, ln_bias, eps)
  -> (y, mean, rstd)``, with autograd through
* ``convnext_fast::dwconv_ln_triton_bwd(grad_y, x, conv_weight, conv_bias?, ln_weight, mean, rstd)
  -> (dx, d_conv_weight, d_conv_bias, d_ln_weight, d_ln_bias)`` (d_conv_bias is always computed;
  the autograd formula drops it when there is no bias),

and the backend ``("dwconv_ln", "triton")``. Importing this module never fails: without triton
(or with a torch lacking ``triton_op``) nothing is registered as an op and ``available()`` says
why. The kernels module itself (which imports triton) is imported lazily, on first use.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Optional, Tuple

import torch

from .. import backends

__all__ = ["FWD_OP", "BWD_OP", "available", "supports", "dwconv_ln_triton"]

FWD_OP = "convnext_fast::dwconv_ln_triton"
BWD_OP = "convnext_fast::dwconv_ln_triton_bwd"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_DEVICE = "Triton needs a CUDA device (or TRITON_INTERPRET=1)"

_kernels_mod: Optional[ModuleType] = None
_kernels_err: Optional[str] = None
_register_err: Optional[str] = None


def _kernels() -> ModuleType:
    """The launchers module ``convnext_fast.kernels.dwconv_ln`` (kernels/, installed as a
    subpackage by setup.py)."""
    global _kernels_mod
    if _kernels_mod is None:
        from ..kernels import dwconv_ln as mod

        _kernels_mod = mod
    return _kernels_mod


def _kernels_error() -> Optional[str]:
    global _kernels_err
    if _kernels_mod is None and _kernels_err is None:
        try:
            _kernels()
        except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
            _kernels_err = f"the Triton kernels could not be imported ({type(e).__name__}: {e})"
    return _kernels_err


def _register_ops() -> None:
    from torch.library import register_autograd, triton_op

    @triton_op(FWD_OP, mutates_args=())
    def dwconv_ln_triton(x: torch.Tensor, conv_weight: torch.Tensor,
                         conv_bias: Optional[torch.Tensor], ln_weight: torch.Tensor,
                         ln_bias: torch.Tensor, eps: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _kernels().dwconv_ln_fwd(x, conv_weight, conv_bias, ln_weight, ln_bias, eps)

    @triton_op(BWD_OP, mutates_args=())
    def dwconv_ln_triton_bwd(grad_y: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor,
                             conv_bias: Optional[torch.Tensor], ln_weight: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
        return _kernels()._dwconv_ln_bwd_all(grad_y, x, conv_weight, conv_bias, ln_weight, mean,
                                             rstd)

    def setup_context(ctx, inputs, output):
        x, conv_weight, conv_bias, ln_weight, _ln_bias, _eps = inputs
        _y, mean, rstd = output
        ctx.has_bias = conv_bias is not None
        ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, conv_weight, conv_bias, ln_weight, mean, rstd = ctx.saved_tensors
        dx, dw, db, dlw, dlb = torch.ops.convnext_fast.dwconv_ln_triton_bwd(
            grad_y, x, conv_weight, conv_bias, ln_weight, mean, rstd)
        return dx, dw, (db if ctx.has_bias else None), dlw, dlb, None

    register_autograd(FWD_OP, backward, setup_context=setup_context)


def _triton_missing() -> Optional[str]:
    """Why triton cannot be imported (without importing it), or None."""
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    except (ImportError, ValueError) as e:
        return f"triton cannot be imported ({e})"
    return None


def available() -> Optional[str]:
    """None when the Triton backend can run at all. The first call imports the kernels (and
    triton); later calls only read cached results (cheap, and traceable by torch.compile)."""
    if _register_err is not None:  # includes "triton is not installed"
        return _register_err
    return _kernels_error()


def supports(x, conv_weight, conv_bias, ln_weight, ln_bias, eps) -> Optional[str]:
    dev = x.device.type
    if dev != "cuda":
        # on CPU only under the interpreter, i.e. TRITON_INTERPRET=1 when triton was imported
        if dev != "cpu" or _kernels_error() is not None or not _kernels().INTERPRET:
            return _NO_DEVICE
        if _kernels().INTERPRETER_PROBLEM is not None:
            return _kernels().INTERPRETER_PROBLEM
    if x.dtype not in _DTYPES:
        return (f"dtype {x.dtype} is not supported by the Triton kernels "
                "(float32, float16, bfloat16)")
    k = conv_weight.shape[-1]
    max_k = _kernels().MAX_K if _kernels_error() is None else 0
    if k % 2 == 0 or k > max_k or conv_weight.shape[-2] != k:
        return f"the Triton kernels need a square odd kernel of size <= {max_k}, got {k}"
    N, C, H, W = x.shape
    if N * H * W >= 2 ** 31:
        return "the Triton kernels need N*H*W < 2**31"
    if (k // 2) * (W + 1) * C >= 2 ** 31:  # the farthest tap, as an int32 element offset
        return "the Triton kernels need (k//2) * (W+1) * C < 2**31 (int32 tap offsets)"
    return None


def dwconv_ln_triton(x, conv_weight, conv_bias, ln_weight, ln_bias, eps):
    """The backend function: y only (mean/rstd are kept for backward by the op's autograd)."""
    return torch.ops.convnext_fast.dwconv_ln_triton(x, conv_weight, conv_bias, ln_weight, ln_bias,
                                                    eps)[0]


_register_err = _triton_missing()
if _register_err is None and not hasattr(torch.library, "triton_op"):
    _register_err = f"torch {torch.__version__} has no torch.library.triton_op"
if _register_err is None:
    try:
        _register_ops()
    except Exception as e:  # noqa: BLE001 - a broken triton install must not break the import
        _register_err = f"registering the Triton ops failed ({type(e).__name__}: {e})"

backends.register("dwconv_ln", "triton", dwconv_ln_triton, available, supports)
