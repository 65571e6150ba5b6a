"""The ``triton`` backend of ``mlp`` and ``mlp_grn``: custom ops over the kernels in ``kernels/``.

Ops (each a ``torch.library.triton_op``, so torch.compile traces into the Triton launches):

* ``convnext_fast::mlp_triton(y, fc1_weight, fc1_bias?, fc2_weight, fc2_bias?, gamma?, residual?)``
  and ``convnext_fast::mlp_triton_bwd(grad_out, y, fc1_weight, fc1_bias?, fc2_weight, fc2_bias?,
  gamma?) -> (dy, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias, d_gamma)``;
* ``convnext_fast::mlp_grn_triton(y, fc1_weight, fc1_bias?, grn_weight, grn_bias, fc2_weight,
  fc2_bias?, residual?, eps)`` and ``convnext_fast::mlp_grn_triton_bwd(grad_out, y, fc1_weight,
  fc1_bias?, grn_weight, grn_bias, fc2_weight, fc2_bias?, eps) -> (dy, d_fc1_weight, d_fc1_bias,
  d_grn_weight, d_grn_bias, d_fc2_weight, d_fc2_bias)``.

A backward op returns a 0-element tensor for the gradient of an argument that was None. The
forward ops' autograd saves only ``y`` and the parameters (the hidden activation and the GRN
statistics are recomputed); the residual's gradient is ``grad_out`` itself, never an op output.

Importing this module never fails: without Triton (or without ``torch.library.triton_op``) the
backend registers as unavailable with the reason. The kernels are imported on first use.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

from .. import backends

__all__ = ["available", "supports_mlp", "supports_mlp_grn", "interpreter_problem"]

Tensor = torch.Tensor
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNELS = None
_TRITON_REASON: Optional[str] = "not checked yet"
_TRITON_CHECKED = False


def _kernels():
    """(kernels.mlp, kernels.mlp_grn), imported on first use."""
    global _KERNELS
    if _KERNELS is None:
        from ..kernels import mlp as k_mlp, mlp_grn as k_grn  # kernels/, installed as a subpackage
        _KERNELS = (k_mlp, k_grn)
    return _KERNELS


def available() -> Optional[str]:
    """None when Triton and ``torch.library.triton_op`` are usable, else why not."""
    global _TRITON_REASON, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        _TRITON_CHECKED = True
        if _OP_REASON is not None:
            _TRITON_REASON = _OP_REASON
        else:
            try:
                import triton  # noqa: F401
                _TRITON_REASON = None
            except Exception as e:  # ImportError, or a broken install
                _TRITON_REASON = f"triton is not importable ({type(e).__name__}: {e})"
    return _TRITON_REASON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def interpreter_problem() -> Optional[str]:
    """On the CPU: None when the Triton interpreter is really active, else why not.

    TRITON_INTERPRET=1 must be set before triton is first imported (timm and torch._dynamo
    import it), or triton's own library functions stay compiled-only and every launch fails.
    """
    if not _interpreting():
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton runs on CUDA)"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception as e:  # pragma: no cover - triton without an interpreter
        return f"the Triton interpreter is not importable ({type(e).__name__}: {e})"
    if not isinstance(tl.zeros, InterpretedFunction):
        return ("TRITON_INTERPRET=1 was set after triton had been imported; the interpreter only "
                "takes effect when it is set before the first import of triton")
    return None


def _supports(y) -> Optional[str]:
    if y.device.type == "cpu":
        reason = interpreter_problem()
        if reason is not None:
            return reason
    elif y.device.type != "cuda":
        return f"device {y.device.type} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
    if y.dtype not in _DTYPES:
        return f"dtype {y.dtype} is not supported (float32, float16, bfloat16)"
    N, _, H, W = y.shape
    if N * H * W >= 2 ** 31:  # row indices are int32 (element offsets are int64)
        return "the Triton kernels need N*H*W < 2**31"
    return None


def supports_mlp(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual) -> Optional[str]:
    return _supports(y)


def supports_mlp_grn(y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, residual,
                     eps) -> Optional[str]:
    return _supports(y)


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    """A bias / gamma / GRN vector with unit stride: the kernels index vectors as ``PTR + i``."""
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------------------------
# op definitions (decorating needs torch.library.triton_op, not triton itself)

_OP_REASON: Optional[str] = None
try:  # find_spec does not import triton (that stays lazy: TRITON_INTERPRET is read at import)
    if importlib.util.find_spec("triton") is None:
        _OP_REASON = "triton is not installed"
except (ImportError, ValueError) as e:
    _OP_REASON = f"triton is not importable ({type(e).__name__}: {e})"
if _OP_REASON is None:
    try:
        from torch.library import triton_op as _triton_op
    except ImportError as e:  # torch < 2.6
        _OP_REASON = f"torch {torch.__version__} has no torch.library.triton_op ({e})"

if _OP_REASON is None:

    @_triton_op("convnext_fast::mlp_triton", mutates_args=())
    def mlp_triton(y: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                   fc2_bias: Optional[Tensor], gamma: Optional[Tensor],
                   residual: Optional[Tensor]) -> Tensor:
        k_mlp, _ = _kernels()
        return k_mlp.mlp_fwd(y, fc1_weight, _c(fc1_bias), fc2_weight, _c(fc2_bias), _c(gamma),
                             residual)

    @_triton_op("convnext_fast::mlp_triton_bwd", mutates_args=())
    def mlp_triton_bwd(grad_out: Tensor, y: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                       fc2_weight: Tensor, fc2_bias: Optional[Tensor], gamma: Optional[Tensor]
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        k_mlp, _ = _kernels()
        dy, dw1, db1, dw2, db2, dgamma, _ = k_mlp.mlp_bwd(
            grad_out, y, fc1_weight, _c(fc1_bias), fc2_weight, _c(fc2_bias), _c(gamma), False)
        e = _empty(y)
        return (dy, dw1, e if db1 is None else db1, dw2, e.clone() if db2 is None else db2,
                e.clone() if dgamma is None else dgamma)

    def _mlp_setup(ctx, inputs, output):
        y, w1, b1, w2, b2, gamma, residual = inputs
        ctx.save_for_backward(y, w1, b1, w2, b2, gamma)
        ctx.has_residual = residual is not None

    def _mlp_backward(ctx, grad):
        y, w1, b1, w2, b2, gamma = ctx.saved_tensors
        dy, dw1, db1, dw2, db2, dgamma = torch.ops.convnext_fast.mlp_triton_bwd(
            grad, y, w1, b1, w2, b2, gamma)
        return (dy, dw1, None if b1 is None else db1, dw2, None if b2 is None else db2,
                None if gamma is None else dgamma, grad if ctx.has_residual else None)

    mlp_triton.register_autograd(_mlp_backward, setup_context=_mlp_setup)

    @_triton_op("convnext_fast::mlp_grn_triton", mutates_args=())
    def mlp_grn_triton(y: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], grn_weight: Tensor,
                       grn_bias: Tensor, fc2_weight: Tensor, fc2_bias: Optional[Tensor],
                       residual: Optional[Tensor], eps: float) -> Tensor:
        _, k_grn = _kernels()
        return k_grn.mlp_grn_fwd(y, fc1_weight, _c(fc1_bias), _c(grn_weight), _c(grn_bias),
                                 fc2_weight, _c(fc2_bias), residual, eps)

    @_triton_op("convnext_fast::mlp_grn_triton_bwd", mutates_args=())
    def mlp_grn_triton_bwd(grad_out: Tensor, y: Tensor, fc1_weight: Tensor,
                           fc1_bias: Optional[Tensor], grn_weight: Tensor, grn_bias: Tensor,
                           fc2_weight: Tensor, fc2_bias: Optional[Tensor], eps: float
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        _, k_grn = _kernels()
        dy, dw1, db1, dgw, dgb, dw2, db2, _ = k_grn.mlp_grn_bwd(
            grad_out, y, fc1_weight, _c(fc1_bias), _c(grn_weight), _c(grn_bias), fc2_weight,
            _c(fc2_bias), eps, False)
        e = _empty(y)
        return (dy, dw1, e if db1 is None else db1, dgw, dgb, dw2,
                e.clone() if db2 is None else db2)

    def _grn_setup(ctx, inputs, output):
        y, w1, b1, gw, gb, w2, b2, residual, eps = inputs
        ctx.save_for_backward(y, w1, b1, gw, gb, w2, b2)
        ctx.has_residual = residual is not None
        ctx.eps = eps

    def _grn_backward(ctx, grad):
        y, w1, b1, gw, gb, w2, b2 = ctx.saved_tensors
        dy, dw1, db1, dgw, dgb, dw2, db2 = torch.ops.convnext_fast.mlp_grn_triton_bwd(
            grad, y, w1, b1, gw, gb, w2, b2, ctx.eps)
        return (dy, dw1, None if b1 is None else db1, dgw, dgb, dw2, None if b2 is None else db2,
                grad if ctx.has_residual else None, None)

    mlp_grn_triton.register_autograd(_grn_backward, setup_context=_grn_setup)

    def _mlp_fn(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual):
        return torch.ops.convnext_fast.mlp_triton(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                  gamma, residual)

    def _mlp_grn_fn(y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, residual,
                    eps):
        return torch.ops.convnext_fast.mlp_grn_triton(y, fc1_weight, fc1_bias, grn_weight, grn_bias,
                                                      fc2_weight, fc2_bias, residual, float(eps))

else:

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"triton backend unavailable: {_OP_REASON}")

    _mlp_fn = _mlp_grn_fn = _unavailable


backends.register("mlp", "triton", _mlp_fn, available, supports_mlp)
backends.register("mlp_grn", "triton", _mlp_grn_fn, available, supports_mlp_grn)
