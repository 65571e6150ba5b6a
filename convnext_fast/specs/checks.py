"""Argument checks of the ops (part of each op's spec): each error names the argument and what was
expected. They take the op's arguments by name."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _shape_matches(got: torch.Size, want: Sequence[Optional[int]]) -> bool:
    return len(got) == len(want) and all(s is None or s == d for s, d in zip(want, got))


def _fits(t, shape: tuple, dtype: torch.dtype, device: torch.device) -> bool:
    """The passing case of :func:`check_tensor` with a concrete shape, as one expression."""
    return isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype and t.device == device


def _is_input(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in _FLOAT_DTYPES


def check_tensor(op: str, name: str, t, shape: Sequence[Optional[int]], ref: torch.Tensor,
                 optional: bool = False) -> None:
    """``t`` must be a tensor of ``shape`` (None = any size) on ``ref``'s device with its dtype."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    # The ops run these checks on every call: the common case is one tuple comparison.
    if t.shape != shape and not _shape_matches(t.shape, shape):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {_shape(t)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {ref.device}; "
                         "move all tensors to one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but the input has {ref.dtype}; "
                        "all tensors of one call must share a dtype")


def check_input(op: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D [N, C, H, W], got shape {_shape(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def check_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias, eps) -> None:
    # The ops check on every call and, between cache-evicting kernels, Python costs about 3x its
    # cost in a tight loop: valid arguments take the one-expression path, anything else the
    # checks below that name what is wrong.
    if _is_input(x) and isinstance(conv_weight, torch.Tensor) and conv_weight.dim() == 4:
        dt, dev, C, k = x.dtype, x.device, x.shape[1], conv_weight.shape[-1]
        if (k % 2 == 1 and _fits(conv_weight, (C, 1, k, k), dt, dev)
                and (conv_bias is None or _fits(conv_bias, (C,), dt, dev))
                and _fits(ln_weight, (C,), dt, dev) and _fits(ln_bias, (C,), dt, dev)):
            return
    op = "dwconv_ln"
    check_input(op, "x", x)
    C = x.shape[1]
    check_tensor(op, "conv_weight", conv_weight, (C, 1, None, None), x)
    k = conv_weight.shape[-1]
    if conv_weight.shape[-2] != k or k % 2 == 0:
        raise ValueError(f"{op}: conv_weight must be [C, 1, k, k] with odd k ('same' padding), "
                         f"got {_shape(conv_weight)}")
    check_tensor(op, "conv_bias", conv_bias, (C,), x, optional=True)
    check_tensor(op, "ln_weight", ln_weight, (C,), x)
    check_tensor(op, "ln_bias", ln_bias, (C,), x)


def _check_mlp_common(op: str, y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual) -> None:
    """Checks of the arguments ``mlp`` and ``mlp_grn`` share."""
    if _is_input(y) and isinstance(fc1_weight, torch.Tensor) and fc1_weight.dim() == 2:
        dt, dev, C, D = y.dtype, y.device, y.shape[1], fc1_weight.shape[0]
        if (_fits(fc1_weight, (D, C), dt, dev) and _fits(fc2_weight, (C, D), dt, dev)
                and (fc1_bias is None or _fits(fc1_bias, (D,), dt, dev))
                and (fc2_bias is None or _fits(fc2_bias, (C,), dt, dev))
                and (residual is None or _fits(residual, y.shape, dt, dev))):
            return
    check_input(op, "y", y)
    C = y.shape[1]
    check_tensor(op, "fc1_weight", fc1_weight, (None, C), y)
    D = fc1_weight.shape[0]
    check_tensor(op, "fc1_bias", fc1_bias, (D,), y, optional=True)
    check_tensor(op, "fc2_weight", fc2_weight, (C, D), y)
    check_tensor(op, "fc2_bias", fc2_bias, (C,), y, optional=True)
    check_tensor(op, "residual", residual, tuple(y.shape), y, optional=True)


def check_mlp(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual) -> None:
    _check_mlp_common("mlp", y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    check_tensor("mlp", "gamma", gamma, (y.shape[1],), y, optional=True)


def check_mlp_grn(y, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, residual,
                  eps) -> None:
    _check_mlp_common("mlp_grn", y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    D = fc1_weight.shape[0]
    check_tensor("mlp_grn", "grn_weight", grn_weight, (D,), y)
    check_tensor("mlp_grn", "grn_bias", grn_bias, (D,), y)
