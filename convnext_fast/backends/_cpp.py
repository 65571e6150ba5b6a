"""The ``cpu`` and ``cuda`` backends: the compiled extension ``convnext_fast._C``.

The schemas live in csrc/ops.cpp and the kernels under ``TORCH_LIBRARY_IMPL(convnext_fast,
CPU|CUDA)``; here are each op's fake (from its spec), its autograd (through its backward op), the
support rules per device, and the registry entries. The CUDA kernels' limits come from the
extension itself (``_C.cuda_limits()``), never mirrored here.

``dwconv_ln``: CPU (any odd k, fp32/bf16/fp16/fp64) and CUDA (k and C within the kernels'
limits); its backward is ``convnext_fast::dwconv_ln_bwd`` where the build has a kernel for the
device, else the fp32 composite :func:`convnext_fast.reference.dwconv_ln_bwd`. ``mlp``: CPU only.
"""
from __future__ import annotations

from typing import Dict

import torch

from .. import _ext, reference
from .._prepared import caching_allowed
from ..specs import SPECS, autograd_formula
from .registry import Impl, Reason, register

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2 ** 31 - 1
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _has_kernel(op: str, device_type: str) -> bool:
    key = _KEYS.get(device_type)
    return key is not None and hasattr(torch.ops.convnext_fast, op) and \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"convnext_fast::{op}", key)


def _kernel_reasons() -> Dict[str, Reason]:
    """(op, device) -> None when the extension has that kernel, else why not. Asked once, at
    import: a dispatcher query inside a traced function would break torch.compile's graph."""
    if _ext.load() is None:
        return {k: _ext.error() for k in ("dwconv_ln:cpu", "dwconv_ln:cuda", "mlp:cpu")}
    reasons = {}
    for op, dev in (("dwconv_ln", "cpu"), ("dwconv_ln", "cuda"), ("mlp", "cpu")):
        if dev == "cuda" and not _ext.has_cuda_kernels():
            reasons[f"{op}:{dev}"] = "convnext_fast._C was built without CUDA kernels"
        elif dev == "cuda" and not _ext.cuda_limits():
            reasons[f"{op}:{dev}"] = ("convnext_fast._C does not report its CUDA limits "
                                      "(an old build: rebuild it)")
        elif not _has_kernel(op, dev):
            reasons[f"{op}:{dev}"] = (f"convnext_fast._C has no {_KEYS[dev]} kernel for {op} "
                                      "(an old build: rebuild the extension)")
        else:
            reasons[f"{op}:{dev}"] = None
    return reasons


_LIMITS = _ext.cuda_limits()
_REASONS = _kernel_reasons()
_HAS_BWD = {dev: _ext.load() is not None and _has_kernel("dwconv_ln_bwd", dev) for dev in _KEYS}


def _cpu_supports(op: str):
    def supports(**args) -> Reason:
        t = args[SPECS[op].names[0]]
        if t.device.type != "cpu":
            return f"the C++ CPU kernel needs CPU tensors, got {t.device.type}"
        if t.dtype not in _CPU_DTYPES:
            return f"dtype {t.dtype} is not supported by the C++ CPU kernel"
        return None

    return supports


def cuda_shared_bytes(C: int) -> int:
    """Shared memory per block the CUDA dwconv_ln kernels may ask for at C channels: their tilings
    stay within one budget at every C (``max_shared_bytes``, kSharedBudget in dwconv_limits.h);
    an older build's kernels held ``tile_w`` pixels x C fp32 plus the backward's statistics."""
    if "max_shared_bytes" in _LIMITS:
        return _LIMITS["max_shared_bytes"]
    return _LIMITS["tile_w"] * 4 * C + _LIMITS["bwd_static_shared_bytes"]


def _dwconv_ln_cuda_supports(x, conv_weight, **_) -> Reason:
    N, C, H, W = x.shape
    if x.device.type != "cuda":
        return f"the CUDA kernel needs CUDA tensors, got {x.device.type}"
    if x.dtype not in _CUDA_DTYPES:
        return f"dtype {x.dtype} is not supported by the CUDA kernel"
    max_c, grid = _LIMITS["max_c"], _LIMITS["max_grid_yz"]
    if C > max_c or N > grid or H > grid:
        return (f"shape {list(x.shape)} is outside the CUDA kernel's limits "
                f"(C <= {max_c}, N, H <= {grid})")
    sizes = tuple(_LIMITS["kernel_sizes"])
    if conv_weight.shape[-1] not in sizes:
        return f"the CUDA kernel supports k in {sizes}, got {conv_weight.shape[-1]}"
    if W * C > _INT32_MAX or H * W > _INT32_MAX or W > _INT32_MAX - _LIMITS["tile_w"]:
        return f"shape {list(x.shape)}: one image row or plane is too large for the CUDA kernel"
    if not torch.cuda.is_available():  # fake/meta CUDA tensors (tracing without a GPU): no device to ask
        return None
    reason = _ext.cuda_arch_unsupported(torch.cuda.get_device_capability(x.device))
    if reason is None:
        # sm_86/89 give a block at most 99 KiB (sm_80 163, sm_90 227); the kernels ask for 96.
        limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
        if cuda_shared_bytes(C) > limit:
            reason = (f"C = {C} needs {cuda_shared_bytes(C)} bytes of shared memory per block, "
                      f"more than this GPU's {limit}")
    return reason


def _dwconv_ln_bwd(args):
    if _HAS_BWD.get(args["x"].device.type, False):
        return torch.ops.convnext_fast.dwconv_ln_bwd(*args.values())
    return reference.dwconv_ln_bwd(**args)


def _mlp_bwd(args):
    return torch.ops.convnext_fast.mlp_bwd(*args.values())


def _register_op(op: str, call_backward) -> None:
    """Fakes of ``op`` and its backward op, and the autograd of ``op`` (schemas: csrc/ops.cpp)."""
    fwd = SPECS[op]
    bwd = SPECS[fwd.backward]
    for s in (fwd, bwd):
        torch.library.register_fake(f"convnext_fast::{s.name}")(
            lambda *a, _s=s, **kw: _s.fake(**_s.bind(a, kw)))
    setup_context, backward = autograd_formula(fwd, bwd, call_backward)
    torch.library.register_autograd(f"convnext_fast::{op}", backward, setup_context=setup_context)


def _available(op: str, device: str):
    reason = _REASONS[f"{op}:{device}"]
    return lambda: reason


def call_with_cache(op, args):
    """``op(*args)`` with the C++ kernels' cache of derived weights (conv taps, converted
    weights; csrc/include/derived_cache.h) on for this call where it is safe: no gradient needed
    (training derives per call, as autocast does) and no torch.distributed (see _prepared).
    Compiled graphs call the op alone, as they would any op."""
    if torch.compiler.is_compiling():
        return op(*args)
    module = _ext.load()
    if module is None or not hasattr(module, "set_cache_enabled") or not caching_allowed() or (
            torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                            for t in args)):
        return op(*args)
    was = module.set_cache_enabled(True)
    try:
        return op(*args)
    finally:
        module.set_cache_enabled(was)


def _dwconv_ln(**args):
    # y; mean and rstd are kept for the backward by the op's autograd
    return call_with_cache(torch.ops.convnext_fast.dwconv_ln, tuple(args.values()))[0]


def _mlp(**args):
    return call_with_cache(torch.ops.convnext_fast.mlp, tuple(args.values()))


for _op, _bwd in (("dwconv_ln", _dwconv_ln_bwd), ("mlp", _mlp_bwd)):
    if _REASONS[f"{_op}:cpu"] is None:
        _register_op(_op, _bwd)
register("dwconv_ln", "cpu", Impl(_dwconv_ln, _available("dwconv_ln", "cpu"), _cpu_supports("dwconv_ln")))
register("dwconv_ln", "cuda", Impl(_dwconv_ln, _available("dwconv_ln", "cuda"), _dwconv_ln_cuda_supports))
register("mlp", "cpu", Impl(_mlp, _available("mlp", "cpu"), _cpu_supports("mlp")))
