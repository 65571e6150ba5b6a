"""Run an existing timm ConvNeXt (V1 or V2) on the fused ops, in place.

    report = convnext_fast.patch_timm(model)       # this model, now
    print(report)                                  # what was patched, what was not and why
    convnext_fast.unpatch_timm(model)              # the original forwards again

    convnext_fast.patch_timm()                     # every timm ConvNeXt created from now on
    convnext_fast.unpatch_timm()

Only ``forward`` is swapped, per module instance, to the library's own forward of the same module
bound with ``types.MethodType``: parameters, buffers, hooks and the module tree stay the same
objects, so optimizers, EMA copies, DDP/FSDP wrappers and state_dicts are untouched.
Each ``ConvNeXtBlock`` whose configuration the fused ops compute exactly runs
:meth:`convnext_fast.models.convnext.ConvNeXtBlock.forward` (:func:`~convnext_fast.ops.dwconv_ln`
then :func:`~convnext_fast.ops.mlp` (V1) or :func:`~convnext_fast.ops.mlp_grn` (V2)) on the
backend marked on the instance. Each ``LayerNorm2d`` outside the blocks (stem, downsamples, head)
runs :meth:`~convnext_fast.models.convnext.LayerNorm2d.forward`, which returns channels-last
memory, so the trunk is converted to NHWC once, at the stem, instead of by every block's op. The
stem and downsample convs run :func:`~convnext_fast.models.cpu_conv.fp32_compute_conv_forward`
(bf16/fp16 computed in fp32 on a CPU without native reduced-precision convs; elsewhere their
forward is unchanged), and each stage's downsample
:meth:`~convnext_fast.models.convnext.Downsample.forward` (its LayerNorm2d and conv as one op at
CPU inference, else the two patched modules). Modules the ops cannot compute exactly (dilation,
stride, a tanh GELU, dropout, another norm, ...) keep their forward, and the report says which and why
(:mod:`convnext_fast.models.support` judges). Eligibility is decided once, at patch time, from
the module's configuration, so the patched forward has no branches on it and ``torch.compile``
sees no graph breaks.
"""
from __future__ import annotations

import functools
import types
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch.nn as nn

from . import backends
from .models import support
from .models.convnext import ConvNeXtBlock, Downsample, LayerNorm2d
from .models.cpu_conv import fp32_compute_conv_forward

__all__ = ["patch_timm", "unpatch_timm", "PatchReport"]

_MARK = "_convnext_fast_patch"  # instance attribute; ConvNeXtBlock.forward reads its backend


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
# Installing the library's forwards (bound to the instance; the backend is read from its mark)
# --------------------------------------------------------------------------------------------

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


def _downsamples(model: nn.Module) -> set:
    """ids of the (LayerNorm2d, Conv2d) ``nn.Sequential`` downsamples of timm ConvNeXt stages."""
    return {id(m.downsample) for m in model.modules()
            if support.is_timm(m, "ConvNeXtStage") and isinstance(m.downsample, nn.Sequential)
            and len(m.downsample) == 2 and support.is_timm(m.downsample[0], "LayerNorm2d")
            and type(m.downsample[1]) is nn.Conv2d}


def _stem_and_downsample_convs(model: nn.Module) -> set:
    """ids of the plain Conv2d of timm ConvNeXt stems and stage downsamples (also under
    ``features_only``, whose FeatureListNet flattens the stem into ``stem_0``, ``stem_1``)."""
    found = []
    for module in model.modules():
        if support.is_timm(module, "ConvNeXt"):
            found += list(module.stem.children())
        elif support.is_timm(module, "ConvNeXtStage") and isinstance(module.downsample, nn.Sequential):
            found += list(module.downsample.children())
        elif support.is_timm(module, "FeatureListNet"):
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
                for name, block in model.named_modules() if support.is_timm(block, "ConvNeXtBlock")
                for sub, _ in block.named_modules()}
    stem_convs = _stem_and_downsample_convs(model)
    downsamples = _downsamples(model)
    plan = []  # (name, module, forward, what): decided in full before anything is installed
    for name, module in model.named_modules():
        if _MARK in module.__dict__:
            report.already.append(name)
        elif support.is_timm(module, "ConvNeXtBlock"):
            reason = support.block_reason(module) or support.tensors_reason(module)
            if reason:
                report.skipped.append((name, reason))
                continue
            fused = "mlp_grn" if hasattr(module.mlp, "grn") else "mlp"
            plan.append((name, module, ConvNeXtBlock.forward, f"dwconv_ln + {fused}"))
        elif support.is_timm(module, "LayerNorm2d") and name not in in_block:
            reason = support.norm_reason(module, module.normalized_shape[0], "LayerNorm2d")
            if reason:
                report.skipped.append((name, reason))
                continue
            plan.append((name, module, LayerNorm2d.forward, "channels-last LayerNorm2d"))
        elif id(module) in downsamples:
            plan.append((name, module, Downsample.forward,
                         "downsample: LayerNorm2d and conv as one op at CPU inference"))
        elif id(module) in stem_convs:
            plan.append((name, module, fp32_compute_conv_forward, "conv, fp32 compute for bf16/fp16 on CPU"))
        elif type(module).__name__ in ("ConvNeXtBlock", "LayerNorm2d") and not type(module).__module__.startswith("timm."):
            report.skipped.append((name, f"{type(module).__module__}.{type(module).__name__} is not timm's"))
    # An explicit backend that lacks an op the plan needs raises before any module is touched.
    for op in sorted({op for *_, what in plan if "+" in what for op in what.split(" + ")}):
        _check_backend(backend, op)
    for name, module, forward, what in plan:
        _install(module, forward, backend, what)
        report.patched.append((name, f"block: {what}" if forward is ConvNeXtBlock.forward else
                               "LayerNorm2d, channels-last out" if forward is LayerNorm2d.forward else what))
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
