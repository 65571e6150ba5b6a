"""Which ConvNeXt configurations the fused blocks compute exactly: the one judge.

Each function returns None when the fused ops compute exactly what is asked, else the reason, a
phrase that the caller puts into its own error or report:

- :func:`config_error` and :func:`config_reason` judge constructor arguments. ``ConvNeXt``,
  ``ConvNeXtBlock`` and the head's pooling raise ValueError for the first (no ConvNeXt has them)
  and NotImplementedError for the second (timm has them, the fused blocks do not).
- :func:`block_reason`, :func:`norm_reason` and :func:`tensors_reason` judge a live module,
  timm's or this package's: :func:`convnext_fast.patch_timm` skips and reports the timm modules
  with a reason, and the tests hold the package's own blocks to the same rules.
- :func:`timm_model_reason` judges a whole live timm ConvNeXt for :func:`convnext_fast.from_timm`.

Modules are recognised by class name and defining package, so timm is never imported here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SUPPORTED_POOLS", "is_timm", "config_error", "config_reason", "stage_kernel_sizes", "block_reason",
    "norm_reason", "tensors_reason", "timm_model_reason",
]

SUPPORTED_POOLS = ("", "avg", "max", "avgmax")


def is_timm(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s class is timm's class ``name``."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def _is_kind(module: nn.Module, name: str) -> bool:
    """timm's class ``name`` or this package's class of that name (which mirrors timm's)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith(("timm.", "convnext_fast."))


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --------------------------------------------------------------------------------------------
# Constructor arguments
# --------------------------------------------------------------------------------------------

def stage_kernel_sizes(kernel_sizes: Union[int, Sequence[int]], stages: int) -> Tuple[int, ...]:
    """One depthwise kernel size per stage from an int or a sequence (judged by :func:`config_error`)."""
    return (kernel_sizes,) * stages if isinstance(kernel_sizes, int) else tuple(kernel_sizes)


def config_error(depths: Optional[Sequence[int]] = None, dims: Optional[Sequence[int]] = None,
                 kernel_sizes: Union[int, Sequence[int]] = 7) -> Optional[str]:
    """Arguments no ConvNeXt can be built from: ``depths`` and ``dims`` need one entry per stage
    (4), ``kernel_sizes`` is an int or one per stage, each odd (the dwconv pads 'same'). A single
    block passes only its kernel size."""
    stages = 1
    if depths is not None or dims is not None:
        depths, dims = tuple(depths or ()), tuple(dims or ())
        if len(depths) != 4 or len(dims) != 4:
            return f"depths and dims must have 4 entries, got {depths} and {dims}"
        stages = 4
    ks = stage_kernel_sizes(kernel_sizes, stages)
    if len(ks) != stages:
        return f"kernel_sizes must be an int or {stages} ints, got {ks}"
    if any(k % 2 == 0 for k in ks):
        return f"kernel sizes must be odd, got {ks}"
    return None


def _is_exact_gelu(act_layer: Any) -> bool:
    """An ``act_layer`` argument naming the exact (erf) GELU: None, 'gelu', ``F.gelu`` or a GELU class."""
    if act_layer is None:
        return True
    if isinstance(act_layer, str):
        return act_layer.lower() == "gelu"
    if act_layer is nn.GELU or act_layer is F.gelu:
        return True
    return (isinstance(act_layer, type) and act_layer.__name__ == "GELU"
            and act_layer.__module__.startswith(("timm.", "torch.")))


def config_reason(output_stride: int = 32, stem_type: str = "patch", head_norm_first: bool = False,
                  norm_layer: Any = None, act_layer: Any = "gelu", use_grn: bool = False,
                  ls_init_value: Optional[float] = None, global_pool: str = "avg",
                  in_chs: Optional[int] = None, out_chs: Optional[int] = None) -> Optional[str]:
    """timm's ConvNeXt options the fused blocks do not implement (the defaults are supported)."""
    if output_stride != 32:
        return (f"output_stride={output_stride} (dilated stages) is not supported; only 32 (the fused "
                "dwconv_ln has no dilation). For a dilated ConvNeXt create the timm model "
                f"(timm.create_model(..., output_stride={output_stride})) and call "
                "convnext_fast.patch_timm(model): its undilated blocks then run on the fused ops and "
                "the report lists the dilated ones, which keep timm's forward")
    if stem_type != "patch":
        return f"stem_type={stem_type!r} is not supported; only 'patch'"
    if head_norm_first:
        return "head_norm_first=True is not supported"
    if norm_layer not in (None, "layernorm", "layernorm2d"):
        return f"norm_layer={norm_layer!r} is not supported; only LayerNorm"
    if not _is_exact_gelu(act_layer):
        return f"act_layer={act_layer!r} is not supported; only exact GELU"
    if use_grn and ls_init_value is not None:
        return (f"use_grn=True with layer scale (ls_init_value={ls_init_value}) is not supported; "
                "ConvNeXt V2 blocks have none (ls_init_value=None)")
    if (global_pool or "").lower() not in SUPPORTED_POOLS:
        return f"global_pool={global_pool!r} is not supported; use one of {SUPPORTED_POOLS}"
    if in_chs is not None and out_chs is not None and in_chs != out_chs:
        return f"in_chs != out_chs ({in_chs}, {out_chs}) is not supported"
    return None


# --------------------------------------------------------------------------------------------
# Live modules (timm's or ours)
# --------------------------------------------------------------------------------------------

def norm_reason(norm: nn.Module, channels: int, kind: str) -> Optional[str]:
    """A LayerNorm the fused ops (or the channels-last LayerNorm2d) reproduce: timm's class
    ``kind`` ('LayerNorm' over the last dim, 'LayerNorm2d' over dim 1), over ``channels``, affine."""
    if not _is_kind(norm, kind):
        return f"norm is {type(norm).__name__}, not timm's {kind}"
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


def _conv_dw_reason(conv: nn.Module) -> Optional[str]:
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
    return None


def block_reason(block: nn.Module) -> Optional[str]:
    """A ``ConvNeXtBlock`` (timm's or ours) whose configuration
    :meth:`convnext_fast.models.convnext.ConvNeXtBlock.forward` computes exactly: a stride-1
    undilated odd-kernel depthwise conv, LayerNorm, exact-GELU MLP without dropout, an identity
    shortcut, and either layer scale (V1) or GRN (V2)."""
    reason = _conv_dw_reason(block.conv_dw)
    if reason:
        return reason
    C = block.conv_dw.in_channels
    if not isinstance(block.shortcut, nn.Identity):
        return f"shortcut is {type(block.shortcut).__name__}, not the identity"
    conv_mlp = bool(block.use_conv_mlp)
    reason = norm_reason(block.norm, C, "LayerNorm2d" if conv_mlp else "LayerNorm")
    if reason:
        return reason
    mlp = block.mlp
    grn = _is_kind(mlp, "GlobalResponseNormMlp")
    if not grn and not _is_kind(mlp, "Mlp"):
        return f"mlp is {type(mlp).__name__}, not timm's Mlp or GlobalResponseNormMlp"
    D = mlp.fc1.weight.shape[0]
    for reason in (_linear_reason(mlp.fc1, "fc1", conv_mlp, C, D), _linear_reason(mlp.fc2, "fc2", conv_mlp, D, C),
                   _dropout_reason(mlp.drop1, "drop1"), _dropout_reason(mlp.drop2, "drop2")):
        if reason:
            return reason
    act = mlp.act
    if not (_is_kind(act, "GELU") or (type(act) is nn.GELU and act.approximate == "none")):
        return f"mlp.act is {act!r}, not the exact (erf) GELU"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return f"mlp.norm is {type(mlp.norm).__name__}, not the identity"
    if grn:
        g = mlp.grn
        if not _is_kind(g, "GlobalResponseNorm"):
            return f"mlp.grn is {type(g).__name__}, not timm's GlobalResponseNorm"
        if tuple(g.spatial_dim) != ((2, 3) if conv_mlp else (1, 2)):
            return f"mlp.grn reduces over dims {g.spatial_dim}, not this block's spatial dims"
        if block.gamma is not None:
            return "a GRN block with layer scale (gamma) is not a ConvNeXt V2 block"
    return None


def tensors_reason(module: nn.Module) -> Optional[str]:
    """Parameters the fused ops take as they are: one dtype and one device."""
    params = list(module.parameters())
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        return f"parameters mix dtypes {sorted(map(str, dtypes))} or devices {sorted(map(str, devices))}"
    return None


def timm_model_reason(model: nn.Module) -> Optional[str]:
    """A live timm ``ConvNeXt`` that :class:`~convnext_fast.models.convnext.ConvNeXt` can copy:
    patch stem, no head norm first, 4 stages with 2x2 stride-2 downsamples (output stride 32),
    LayerNorm norms, a supported pooling and every block passing :func:`block_reason`. The
    reason is a noun phrase (what is not supported)."""
    stem, stages, head = model.stem, model.stages, model.head
    if len(stem) != 2 or not isinstance(stem[0], nn.Conv2d) or stem[0].kernel_size != stem[0].stride:
        return "a stem other than 'patch' (conv k=s + norm)"
    if not isinstance(model.norm_pre, nn.Identity):
        return "head_norm_first=True"
    if len(stages) != 4:
        return f"{len(stages)} stages (pruned model)"
    if type(head).__name__ != "NormMlpClassifierHead":
        return f"head {type(head).__name__}"
    pool = head.global_pool.pool_type
    if pool not in SUPPORTED_POOLS:
        return f"global_pool={pool!r}"
    norms = [("stem.1", stem[1], stem[0].out_channels)]
    if not isinstance(head.norm, nn.Identity):
        norms.append(("head.norm", head.norm, head.in_features))
    n_blocks = 0
    for i, stage in enumerate(stages):
        ds = stage.downsample
        if i > 0 or not isinstance(ds, nn.Identity):
            if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[1], nn.Conv2d)
                    and ds[1].stride == (2, 2) and ds[1].kernel_size == (2, 2) and ds[1].dilation == (1, 1)):
                return f"stage {i} downsample (output_stride != 32 or dilation)"
            norms.append((f"stages.{i}.downsample.0", ds[0], ds[1].in_channels))
        for j, block in enumerate(stage.blocks):
            reason = block_reason(block)
            if reason:
                return f"block stages.{i}.blocks.{j} ({reason})"
            n_blocks += 1
    if not n_blocks:
        return "a model without blocks"
    for name, norm, channels in norms:
        reason = norm_reason(norm, channels, "LayerNorm2d")
        if reason:
            return f"{name} ({reason})"
    return None
