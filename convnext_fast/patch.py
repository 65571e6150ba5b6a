"""Run an existing timm ConvNeXt (V1 or V2) on the fused ops, in place.

    report = convnext_fast.patch_timm(model)       # this model, now
    print(report)                                  # what was patched, what was not and why
    convnext_fast.unpatch_timm(model)              # the original forwards again

    convnext_fast.patch_timm()                     # every timm ConvNeXt created from now on
    convnext_fast.unpatch_timm()

Only ``forward`` is swapped, per module instance: parameters, buffers, hooks and the module tree
stay the same objects, so optimizers, EMA copies, DDP/FSDP wrappers and state_dicts are untouched.
Each ``ConvNeXtBlock`` whose configuration the fused ops compute exactly runs
:func:`convnext_fast.ops.dwconv_ln` then :func:`~convnext_fast.ops.mlp` (V1) or
:func:`~convnext_fast.ops.mlp_grn` (V2). Each ``LayerNorm2d`` outside the blocks (stem,
downsamples, head) gets a forward that returns channels-last memory, so the trunk is converted to
NHWC once, at the stem, instead of by every block's op. The stem and downsample convs compute
bf16/fp16 in fp32 on a CPU without native reduced-precision convs (PyTorch's own is an im2col
fallback there, 7-8x slower; elsewhere their forward is unchanged). Modules the ops cannot
compute exactly (dilation, stride, a tanh GELU, dropout, another norm, ...) keep their forward,
and the report says which and why. Eligibility is decided once, at patch time, from the
module's configuration, so the patched forward has no branches on it and ``torch.compile`` sees
no graph breaks.
"""
from __future__ import annotations

import functools
import types
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, ops
from .models.convnext import patch_conv_forward

__all__ = ["patch_timm", "unpatch_timm", "PatchReport"]

_MARK = "_convnext_fast_patch"  # instance attribute: the backend a patched module runs on


@dataclass
class PatchReport:
    """What :func:`patch_timm` did: module names patched, already patched, and skipped with why."""

    backend: str = "auto"
    patched: List[Tuple[str, str]] = field(default_factory=list)  # (module name, what runs now)
    already: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (module name, reason)

    @property
    def blocks_patched(self) -> int:
        return sum(1 for _, what in self.patched if what.startswith("block"))

    def __bool__(self) -> bool:
        return bool(self.patched or self.already)

    def __str__(self) -> str:
        lines = [f"convnext_fast.patch_timm (backend={self.backend}): {len(self.patched)} modules patched "
                 f"({self.blocks_patched} blocks), {len(self.already)} already patched, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  patched  {name}: {what}" for name, what in self.patched]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Eligibility: None when the fused ops compute exactly what the module computes, else why not
# --------------------------------------------------------------------------------------------

def _is_timm(module: nn.Module, name: str) -> bool:
    """Class ``name`` from timm (matched by name and module, so timm is never imported here)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _norm_reason(norm: nn.Module, channels: int, want: str) -> Optional[str]:
    if not _is_timm(norm, want):
        return f"norm is {type(norm).__name__}, not timm's {want}"
    if tuple(norm.normalized_shape) != (channels,):
        return f"norm normalizes over {tuple(norm.normalized_shape)}, not ({channels},)"
    if norm.weight is None or norm.bias is None:
        return "norm has no affine weight/bias"
    return None


def _linear_reason(layer: nn.Module, name: str, conv: bool, in_f: int, out_f: int) -> Optional[str]:
    if conv:
        if type(layer) is not nn.Conv2d or _pair(layer.kernel_size) != (1, 1) or _pair(layer.stride) != (1, 1) \
                or layer.groups != 1:
            return f"mlp.{name} is not a plain 1x1 Conv2d"
    elif type(layer) is not nn.Linear:
        return f"mlp.{name} is {type(layer).__name__}, not nn.Linear"
    if layer.weight.shape[:2] != (out_f, in_f):
        return f"mlp.{name} maps {tuple(layer.weight.shape[:2][::-1])}, expected ({in_f}, {out_f})"
    return None


def _dropout_reason(m: nn.Module, name: str) -> Optional[str]:
    if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0.0):
        return None
    return f"mlp.{name} is {m!r} (the fused ops have no dropout)"


def _block_reason(block: nn.Module) -> Optional[str]:
    conv = block.conv_dw
    if type(conv) is not nn.Conv2d:
        return f"conv_dw is {type(conv).__name__}, not nn.Conv2d"
    C = conv.in_channels
    k = _pair(conv.kernel_size)
    if conv.out_channels != C or conv.groups != C:
        return f"conv_dw is not depthwise (in {C}, out {conv.out_channels}, groups {conv.groups})"
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"conv_dw kernel {k} is not square and odd"
    if _pair(conv.stride) != (1, 1):
        return f"conv_dw stride {_pair(conv.stride)} (the fused op is stride 1)"
    if _pair(conv.dilation) != (1, 1):
        return f"conv_dw dilation {_pair(conv.dilation)} (the fused op has no dilation)"
    if conv.padding_mode != "zeros" or conv.padding not in ((k[0] // 2,) * 2, "same"):
        return f"conv_dw padding {conv.padding!r} ({conv.padding_mode}) is not 'same' zero padding"
    if not isinstance(block.shortcut, nn.Identity):
        return f"shortcut is {type(block.shortcut).__name__}, not the identity"
    conv_mlp = bool(block.use_conv_mlp)
    reason = _norm_reason(block.norm, C, "LayerNorm2d" if conv_mlp else "LayerNorm")
    if reason:
        return reason
    mlp = block.mlp
    grn = _is_timm(mlp, "GlobalResponseNormMlp")
    if not grn and not _is_timm(mlp, "Mlp"):
        return f"mlp is {type(mlp).__name__}, not timm's Mlp or GlobalResponseNormMlp"
    D = mlp.fc1.weight.shape[0]
    for reason in (_linear_reason(mlp.fc1, "fc1", conv_mlp, C, D), _linear_reason(mlp.fc2, "fc2", conv_mlp, D, C),
                   _dropout_reason(mlp.drop1, "drop1"), _dropout_reason(mlp.drop2, "drop2")):
        if reason:
            return reason
    act = mlp.act
    exact_gelu = _is_timm(act, "GELU") or (type(act) is nn.GELU and act.approximate == "none")
    if not exact_gelu:
        return f"mlp.act is {act!r}, not the exact (erf) GELU"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return f"mlp.norm is {type(mlp.norm).__name__}, not the identity"
    if grn:
        g = mlp.grn
        if not _is_timm(g, "GlobalResponseNorm"):
            return f"mlp.grn is {type(g).__name__}, not timm's GlobalResponseNorm"
        if tuple(g.spatial_dim) != ((2, 3) if conv_mlp else (1, 2)):
            return f"mlp.grn reduces over dims {g.spatial_dim}, not this block's spatial dims"
        if block.gamma is not None:
            return "a GRN block with layer scale (gamma) is not a ConvNeXt V2 block"
    params = [p for p in block.parameters()]
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        return f"parameters mix dtypes {sorted(map(str, dtypes))} or devices {sorted(map(str, devices))}"
    return None


# --------------------------------------------------------------------------------------------
# The patched forwards (bound to the instance; the backend is read from the instance mark)
# --------------------------------------------------------------------------------------------

def _as_2d(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 2 else w.reshape(w.shape[0], w.shape[1])


def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``ConvNeXtBlock.forward`` on the fused ops: x [N, C, H, W] -> [N, C, H, W] channels-last."""
    backend = getattr(self, _MARK).backend
    y = ops.dwconv_ln(x, self.conv_dw.weight, self.conv_dw.bias, self.norm.weight, self.norm.bias,
                      self.norm.eps, backend=backend)
    # Stochastic depth scales the branch alone, so the residual add happens outside the op then.
    dropping = self.training and getattr(self.drop_path, "drop_prob", 0.0) > 0.0
    residual = None if dropping else x
    mlp = self.mlp
    if self.gamma is None and hasattr(mlp, "grn"):
        out = ops.mlp_grn(y, _as_2d(mlp.fc1.weight), mlp.fc1.bias, mlp.grn.weight, mlp.grn.bias,
                          _as_2d(mlp.fc2.weight), mlp.fc2.bias, residual, eps=mlp.grn.eps, backend=backend)
    else:
        out = ops.mlp(y, _as_2d(mlp.fc1.weight), mlp.fc1.bias, _as_2d(mlp.fc2.weight), mlp.fc2.bias,
                      self.gamma, residual, backend=backend)
    if dropping:
        out = x + self.drop_path(out)
    return out


def _norm2d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``LayerNorm2d.forward`` returning channels-last memory: [N, C, H, W] -> [N, C, H, W]."""
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
    return y.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _Mark:
    backend: Optional[str]
    what: str


def _extra_repr(self) -> str:
    original = type(self).extra_repr(self)
    mark = getattr(self, _MARK)
    tag = f"convnext_fast: {mark.what}, backend={mark.backend or 'auto'}"
    return f"{original}, {tag}" if original else tag


def _install(module: nn.Module, forward, backend: Optional[str], what: str) -> None:
    setattr(module, _MARK, _Mark(backend, what))
    module.forward = types.MethodType(forward, module)
    module.extra_repr = types.MethodType(_extra_repr, module)


def _uninstall(module: nn.Module) -> bool:
    if _MARK not in module.__dict__:
        return False
    for attr in (_MARK, "forward", "extra_repr"):
        module.__dict__.pop(attr, None)
    return True


def _stem_and_downsample_convs(model: nn.Module) -> set:
    """ids of the plain Conv2d of timm ConvNeXt stems and stage downsamples (also under
    ``features_only``, whose FeatureListNet flattens the stem into ``stem_0``, ``stem_1``)."""
    found = []
    for module in model.modules():
        if _is_timm(module, "ConvNeXt"):
            found += list(module.stem.children())
        elif _is_timm(module, "ConvNeXtStage") and isinstance(module.downsample, nn.Sequential):
            found += list(module.downsample.children())
        elif _is_timm(module, "FeatureListNet"):
            found += [child for name, child in module.named_children() if name.startswith("stem_")]
    return {id(m) for m in found if type(m) is nn.Conv2d}


def _check_backend(name: Optional[str], op: str) -> None:
    """Patch-time check of what is static (built, installed); shape support is checked per call."""
    if name is not None:
        why = backends.available(op, name)
        if why is not None:
            raise backends.BackendError(f"patch_timm: backend {name!r} cannot run {op}: {why}")


def _patch_model(model: nn.Module, backend: Optional[str]) -> PatchReport:
    report = PatchReport(backend=backend or "auto")
    in_block = {f"{name}.{sub}" if sub else name
                for name, block in model.named_modules() if _is_timm(block, "ConvNeXtBlock")
                for sub, _ in block.named_modules()}
    stem_convs = _stem_and_downsample_convs(model)
    plan = []  # (name, module, forward, what): decided in full before anything is installed
    for name, module in model.named_modules():
        if _MARK in module.__dict__:
            report.already.append(name)
        elif _is_timm(module, "ConvNeXtBlock"):
            reason = _block_reason(module)
            if reason:
                report.skipped.append((name, reason))
                continue
            fused = "mlp_grn" if module.gamma is None and hasattr(module.mlp, "grn") else "mlp"
            plan.append((name, module, _block_forward, f"dwconv_ln + {fused}"))
        elif _is_timm(module, "LayerNorm2d") and name not in in_block:
            reason = _norm_reason(module, module.normalized_shape[0], "LayerNorm2d")
            if reason:
                report.skipped.append((name, reason))
                continue
            plan.append((name, module, _norm2d_forward, "channels-last LayerNorm2d"))
        elif id(module) in stem_convs:
            plan.append((name, module, patch_conv_forward, "conv, fp32 compute for bf16/fp16 on CPU"))
        elif type(module).__name__ in ("ConvNeXtBlock", "LayerNorm2d") and not type(module).__module__.startswith("timm."):
            report.skipped.append((name, f"{type(module).__module__}.{type(module).__name__} is not timm's"))
    # An explicit backend that lacks an op the plan needs raises before any module is touched.
    for op in sorted({op for *_, what in plan if "+" in what for op in what.split(" + ")}):
        _check_backend(backend, op)
    for name, module, forward, what in plan:
        _install(module, forward, backend, what)
        report.patched.append((name, f"block: {what}" if forward is _block_forward else
                               "LayerNorm2d, channels-last out" if forward is _norm2d_forward else what))
    return report


# Modules patched at construction while the class-level patch is on, so unpatch_timm() undoes them.
_CREATED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_CLASS_PATCH: dict = {}


def _timm_convnext_classes():
    try:
        from timm.models import convnext as timm_convnext
    except ImportError as e:
        raise ImportError("patch_timm() without a model patches timm's ConvNeXt classes; "
                          f"timm is not importable: {e}") from e
    classes = [timm_convnext.ConvNeXt]
    try:
        from timm.models import convnext_v2  # older timm versions have no separate V2 module
        classes += [c for c in vars(convnext_v2).values() if isinstance(c, type) and c.__name__ == "ConvNeXt"]
    except ImportError:
        pass
    return list(dict.fromkeys(classes))


def _patching_init(original_init, backend: Optional[str]):
    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.convnext_fast_report = _patch_model(self, backend)
        # The modules, not the model: a features_only wrapper keeps the modules and drops the model.
        _CREATED.update(m for m in self.modules() if _MARK in m.__dict__)

    return __init__


def patch_timm(model: Optional[nn.Module] = None, backend: Optional[str] = None) -> PatchReport:
    """Swap the forward of each eligible timm ConvNeXt block and LayerNorm2d to the fused ops.

    model: a timm ConvNeXt / ConvNeXt V2 (any variant, ``features_only`` wrappers included) or any
    module containing them; None patches timm's ConvNeXt class so that every model created
    afterwards is patched at construction (until :func:`unpatch_timm`). backend: None for automatic
    selection per call, or ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``; a backend that is not
    built or installed raises :class:`~convnext_fast.BackendError` now, and a call it cannot run
    (device, dtype, shape) raises then. Patching a patched module again is a no-op (listed in
    ``report.already``); unpatch first to change its backend.

    Returns a :class:`PatchReport`; with ``model=None`` an empty report for the class-level patch.
    """
    name, _ = backends.requested_backend(backend) if backend is not None else (None, "")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"patch_timm: model must be a torch.nn.Module, got {type(model).__name__}")
        return _patch_model(model, name)
    for cls in _timm_convnext_classes():
        if cls in _CLASS_PATCH:
            continue
        _CLASS_PATCH[cls] = cls.__init__
        cls.__init__ = _patching_init(cls.__init__, name)
    return PatchReport(backend=name or "auto")


def unpatch_timm(model: Optional[nn.Module] = None) -> int:
    """Restore the original forwards of ``model`` (or, with None, undo the class-level patch and
    unpatch the models created under it). Returns the number of modules restored."""
    if model is not None:
        return sum(_uninstall(m) for m in model.modules())
    for cls, original_init in list(_CLASS_PATCH.items()):
        cls.__init__ = original_init
        del _CLASS_PATCH[cls]
    restored = sum(_uninstall(m) for m in list(_CREATED))
    _CREATED.clear()
    return restored
