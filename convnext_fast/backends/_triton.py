"""The ``triton`` backend: the kernels of :mod:`convnext_fast.kernels` as custom ops.

Per op two ``torch.library.triton_op`` operators (so torch.compile traces into the Triton
launches), with the schemas of the op's spec: ``convnext_fast::<op>_triton`` (the same outputs as
the extension's op) and ``convnext_fast::<op>_triton_bwd`` (the backward op's outputs; a 0-element
tensor for the gradient of an argument that was None), and the autograd between them (only the
inputs are saved: the conv output, the hidden and the GRN statistics are recomputed).

Importing this module never imports triton (``TRITON_INTERPRET=1`` must be set before that, and
triton is slow to import): without triton, or without ``torch.library.triton_op``, no op is
defined and ``available()`` says why. The kernels are imported on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, Optional

import torch

from ..specs import SPECS, autograd_formula
from .registry import Impl, Reason, register

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# op -> (kernels module, forward launcher, backward launcher, backward's extra arguments)
_LAUNCHERS = {
    "dwconv_ln": ("dwconv_ln", "dwconv_ln_fwd", "_dwconv_ln_bwd_all", {}),
    "mlp": ("mlp", "mlp_fwd", "mlp_bwd", {"has_residual": False}),
    "mlp_grn": ("mlp_grn", "mlp_grn_fwd", "mlp_grn_bwd", {"has_residual": False}),
}
_MODULES: Dict[str, object] = {}
_IMPORT_ERROR: Optional[str] = None


def _kernels(name: str):
    """``convnext_fast.kernels.<name>`` (imports triton on first use)."""
    mod = _MODULES.get(name)
    if mod is None:
        mod = _MODULES[name] = importlib.import_module(f"convnext_fast.kernels.{name}")
    return mod


def _definition_error() -> Reason:
    """Why the ops cannot be defined at all (checked without importing triton), or None."""
    try:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    except (ImportError, ValueError) as e:
        return f"triton cannot be imported ({e})"
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op"
    return None


def available() -> Reason:
    """None when the Triton backend can run at all. The first call imports the kernels (and
    triton); later calls only read the cached result (cheap, and traceable by torch.compile)."""
    global _IMPORT_ERROR
    if _DEFINE_ERROR is not None:
        return _DEFINE_ERROR
    if _IMPORT_ERROR is None and not _MODULES:
        try:
            for name in ("runtime", *(m for m, *_ in _LAUNCHERS.values())):
                _kernels(name)
        except Exception as e:  # noqa: BLE001 - a broken triton install is a reason, not a crash
            _IMPORT_ERROR = f"the Triton kernels could not be imported ({type(e).__name__}: {e})"
    return _IMPORT_ERROR


def _common_reason(t: torch.Tensor) -> Reason:
    """Device and dtype rules shared by every Triton kernel; ``t`` is the op's first input."""
    if t.device.type == "cpu":
        reason = _kernels("runtime").interpreter_problem()
        if reason is not None:
            return reason
    elif t.device.type != "cuda":
        return f"device {t.device.type} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"
    if t.dtype not in _DTYPES:
        return (f"dtype {t.dtype} is not supported by the Triton kernels "
                "(float32, float16, bfloat16)")
    N, _, H, W = t.shape
    if N * H * W >= 2 ** 31:  # pixel (row) indices are int32
        return "the Triton kernels need N*H*W < 2**31"
    return None


def _dwconv_ln_supports(x, conv_weight, **_) -> Reason:
    reason = _common_reason(x)
    if reason is not None:
        return reason
    k, max_k = conv_weight.shape[-1], _kernels("dwconv_ln").MAX_K
    if k % 2 == 0 or k > max_k or conv_weight.shape[-2] != k:
        return f"the Triton kernels need a square odd kernel of size <= {max_k}, got {k}"
    if (k // 2) * (x.shape[3] + 1) * x.shape[1] >= 2 ** 31:  # the farthest tap, int32 offsets
        return "the Triton kernels need (k//2) * (W+1) * C < 2**31 (int32 tap offsets)"
    return None


def _mlp_supports(y, **_) -> Reason:
    return _common_reason(y)


def _unit_stride(args: dict) -> dict:
    """Bias, gamma and GRN vectors with unit stride: the kernels index vectors as ``PTR + i``."""
    return {n: v.contiguous() if isinstance(v, torch.Tensor) and v.dim() == 1 else v
            for n, v in args.items()}


def _define(op: str) -> None:
    fwd = SPECS[op]
    bwd = SPECS[fwd.backward]
    module, fwd_launcher, bwd_launcher, bwd_extra = _LAUNCHERS[op]

    def forward(*args, **kwargs):
        return getattr(_kernels(module), fwd_launcher)(**_unit_stride(fwd.bind(args, kwargs)))

    def backward(*args, **kwargs):
        a = _unit_stride(bwd.bind(args, kwargs))
        grads = getattr(_kernels(module), bwd_launcher)(**a, **bwd_extra)[:len(bwd.outputs)]
        ref = a[bwd.names[1]]
        return tuple(ref.new_empty((0,)) if g is None else g for g in grads)

    torch.library.triton_op(f"convnext_fast::{op}_triton", forward, mutates_args=(),
                            schema=fwd.schema)
    torch.library.triton_op(f"convnext_fast::{op}_triton_bwd", backward, mutates_args=(),
                            schema=bwd.schema)
    setup_context, formula = autograd_formula(
        fwd, bwd, lambda a: getattr(torch.ops.convnext_fast, f"{op}_triton_bwd")(**a))
    torch.library.register_autograd(f"convnext_fast::{op}_triton", formula,
                                    setup_context=setup_context)


def _dwconv_ln(**args):
    # y; mean and rstd are kept for the backward by the op's autograd
    return torch.ops.convnext_fast.dwconv_ln_triton(*args.values())[0]


def _mlp(**args):
    return torch.ops.convnext_fast.mlp_triton(*args.values())


def _mlp_grn(**args):
    return torch.ops.convnext_fast.mlp_grn_triton(*args.values())


_DEFINE_ERROR = _definition_error()
if _DEFINE_ERROR is None:
    try:
        for _op in _LAUNCHERS:
            _define(_op)
    except Exception as e:  # noqa: BLE001 - a broken triton install must not break the import
        _DEFINE_ERROR = f"defining the Triton ops failed ({type(e).__name__}: {e})"

register("dwconv_ln", "triton", Impl(_dwconv_ln, available, _dwconv_ln_supports))
register("mlp", "triton", Impl(_mlp, available, _mlp_supports))
register("mlp_grn", "triton", Impl(_mlp_grn, available, _mlp_supports))
