"""ConvNeXt V1/V2 with timm's module and parameter names, its blocks running on the fused ops.

The module tree mirrors ``timm.models.convnext.ConvNeXt`` (patch stem, LayerNorm norms, exact GELU,
``head_norm_first=False``, ``output_stride=32``), so a timm ``state_dict`` loads with
``strict=True`` and the other way round; parameter counts are equal. The modules only hold the
parameters: a block's forward never calls ``conv_dw``/``norm``/``mlp.*`` but passes their tensors
to :func:`convnext_fast.ops.dwconv_ln` and :func:`convnext_fast.ops.mlp` (V1) or
:func:`convnext_fast.ops.mlp_grn` (V2).

Layout: tensors are logically ``[N, C, H, W]``; :meth:`ConvNeXt.forward_features` converts the
input once to ``torch.channels_last`` and the whole trunk stays NHWC in memory (the LayerNorm2d of
the stem, the downsamples and the head works on a permuted view, no copies).

No timm import here: timm is only used by the tests and by :func:`convnext_fast.from_timm`
(duck-typed).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import ops
from . import support
from .cpu_conv import Fp32ComputeConv2d, fused_downsample

__all__ = [
    "ConvNeXt", "ConvNeXtFeatures", "ConvNeXtBlock", "ConvNeXtStage", "LayerNorm", "LayerNorm2d",
    "GlobalResponseNorm", "Mlp", "GlobalResponseNormMlp", "NormMlpClassifierHead", "DropPath",
    "drop_path", "FeatureInfo",
]

_CL = torch.channels_last


# --------------------------------------------------------------------------------------------
# Layers (parameter holders with timm's names)
# --------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim (timm's ``LayerNorm``; the block norm when ``conv_mlp=False``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` tensor (timm's ``LayerNorm2d``).

    On a channels-last tensor the permute is a free view of contiguous NHWC memory, and the result
    is channels-last again: no copies. :func:`convnext_fast.patch_timm` binds this forward to
    timm's LayerNorm2d outside the blocks, so a patched timm trunk is converted to NHWC once.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C, H, W] in channels-last memory."""
        x = x.contiguous(memory_format=_CL)  # a no-op in our trunk; converts timm's NCHW stem output
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """GRN parameters (timm's ``GlobalResponseNorm``: ``weight``/``bias`` [D], zeros at init)."""

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.eps = eps
        self.channels_last = channels_last
        self.spatial_dim = (1, 2) if channels_last else (2, 3)  # timm's name; judged by support
        self.weight = nn.Parameter(torch.zeros(dim, **dd))
        self.bias = nn.Parameter(torch.zeros(dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standalone GRN (not used by the blocks, which call the fused op): x [N, H, W, D]
        (channels_last) or [N, D, H, W] -> the same shape."""
        cdim, shape = (-1, (1, 1, 1, -1)) if self.channels_last else (1, (1, -1, 1, 1))
        gx = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        nx = gx / (gx.mean(dim=cdim, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * nx)


class GELU(nn.Module):
    """Exact (erf) GELU; a placeholder that mirrors timm's ``act`` module (holds no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


def _linear_layer(use_conv: bool, in_f: int, out_f: int, bias: bool, dd) -> nn.Module:
    if use_conv:
        return nn.Conv2d(in_f, out_f, kernel_size=1, bias=bias, **dd)
    return nn.Linear(in_f, out_f, bias=bias, **dd)


class Mlp(nn.Module):
    """timm's ``Mlp`` layout: ``fc1`` (Linear or 1x1 Conv2d), ``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, use_conv: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = _linear_layer(use_conv, in_features, hidden_features, bias, dd)
        self.act = GELU()
        self.drop1 = nn.Dropout(0.0)
        # Registered between drop1 and fc2, where timm has it: the state_dict order is timm's.
        self._add_middle(hidden_features, use_conv, dd)
        self.fc2 = _linear_layer(use_conv, hidden_features, in_features, bias, dd)
        self.drop2 = nn.Dropout(0.0)

    def _add_middle(self, hidden_features: int, use_conv: bool, dd) -> None:
        self.norm = nn.Identity()


class GlobalResponseNormMlp(Mlp):
    """timm's ``GlobalResponseNormMlp`` layout: ``fc1``, ``act``, ``drop1``, ``grn``, ``fc2``, ``drop2``."""

    def _add_middle(self, hidden_features: int, use_conv: bool, dd) -> None:
        self.grn = GlobalResponseNorm(hidden_features, channels_last=not use_conv, **dd)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth per sample, exactly as timm (same RNG draws: one bernoulli_ per call)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """Drop paths (stochastic depth) per sample."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    """A Linear weight as is, a 1x1 Conv2d weight [D, C, 1, 1] viewed as [D, C]."""
    return w if w.dim() == 2 else w.reshape(w.shape[0], w.shape[1])


# --------------------------------------------------------------------------------------------
# Block, stage, head
# --------------------------------------------------------------------------------------------

class ConvNeXtBlock(nn.Module):
    """One ConvNeXt block (V1 with layer scale, or V2 with GRN) running on the fused ops.

    ``x + gamma * fc2(gelu(fc1(LN(dwconv(x)))))`` (V1) or ``x + fc2(GRN(gelu(fc1(LN(dwconv(x))))))``
    (V2). Only stride 1, no dilation and ``in_chs == out_chs`` (what ConvNeXt at output stride 32
    uses), so ``shortcut`` is always the identity; :func:`convnext_fast.models.support.block_reason`
    holds every block, ours or timm's, to these rules.
    """

    # patch_timm binds this class's forward to timm's blocks and marks each instance with the
    # backend it was asked for; our own blocks select the backend per call.
    _convnext_fast_patch = None

    def __init__(
            self,
            in_chs: int,
            out_chs: Optional[int] = None,
            kernel_size: int = 7,
            mlp_ratio: float = 4,
            conv_mlp: bool = False,
            conv_bias: bool = True,
            use_grn: bool = False,
            ls_init_value: Optional[float] = 1e-6,
            norm_eps: Optional[float] = None,
            drop_path: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_chs = out_chs or in_chs
        reason = support.config_reason(use_grn=use_grn, ls_init_value=ls_init_value, in_chs=in_chs,
                                       out_chs=out_chs)
        if reason:
            raise NotImplementedError(f"ConvNeXtBlock: {reason}")
        error = support.config_error(kernel_sizes=kernel_size)
        if error:
            raise ValueError(f"ConvNeXtBlock: {error}")
        eps = 1e-6 if norm_eps is None else norm_eps
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(in_chs, out_chs, kernel_size, stride=1, padding=kernel_size // 2,
                                 groups=in_chs, bias=conv_bias, **dd)
        self.norm = (LayerNorm2d if conv_mlp else LayerNorm)(out_chs, eps=eps, **dd)
        mlp_layer = GlobalResponseNormMlp if use_grn else Mlp
        self.mlp = mlp_layer(out_chs, int(mlp_ratio * out_chs), bias=True, use_conv=conv_mlp, **dd)
        self.gamma = (nn.Parameter(ls_init_value * torch.ones(out_chs, **dd))
                      if ls_init_value is not None else None)
        self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C, H, W] channels-last.

        Also timm's ``ConvNeXtBlock.forward`` once :func:`convnext_fast.patch_timm` binds it to a
        timm block, so it reads only what both classes have (no ``use_grn``: GRN is the V2 MLP's
        ``grn``) and only static attributes, for a fullgraph ``torch.compile``.
        """
        mark = self._convnext_fast_patch
        backend = None if mark is None else mark.backend
        y = ops.dwconv_ln(x, self.conv_dw.weight, self.conv_dw.bias, self.norm.weight, self.norm.bias,
                          self.norm.eps, backend=backend)
        # Stochastic depth scales the branch alone, so the residual add happens outside the op then.
        dropping = self.training and getattr(self.drop_path, "drop_prob", 0.0) > 0.0
        residual = None if dropping else x
        mlp = self.mlp
        if hasattr(mlp, "grn"):
            out = ops.mlp_grn(y, _as_2d(mlp.fc1.weight), mlp.fc1.bias, mlp.grn.weight, mlp.grn.bias,
                              _as_2d(mlp.fc2.weight), mlp.fc2.bias, residual, mlp.grn.eps, backend=backend)
        else:
            out = ops.mlp(y, _as_2d(mlp.fc1.weight), mlp.fc1.bias, _as_2d(mlp.fc2.weight), mlp.fc2.bias,
                          self.gamma, residual, backend=backend)
        if dropping:
            out = x + self.drop_path(out)
        return out


class Downsample(nn.Sequential):
    """A stage's downsample: ``LayerNorm2d`` then the s x s conv of stride s (timm's
    ``nn.Sequential`` and names). On a CPU at inference the two run as one op
    (:func:`convnext_fast.models.cpu_conv.fused_downsample`); elsewhere, one after the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C_out, H / s, W / s] channels-last. Also the forward of timm's
        downsample ``nn.Sequential`` once :func:`convnext_fast.patch_timm` binds it there."""
        out = fused_downsample(self[0], self[1], x)
        return nn.Sequential.forward(self, x) if out is None else out


class ConvNeXtStage(nn.Module):
    """An optional downsample (LayerNorm2d + 2x2/s2 conv) followed by ``depth`` blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 7,
            stride: int = 2,
            depth: int = 2,
            drop_path_rates: Optional[Sequence[float]] = None,
            ls_init_value: Optional[float] = 1.0,
            conv_mlp: bool = False,
            conv_bias: bool = True,
            use_grn: bool = False,
            norm_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        if in_chs != out_chs or stride > 1:
            eps = 1e-6 if norm_eps is None else norm_eps
            self.downsample = Downsample(
                LayerNorm2d(in_chs, eps=eps, **dd),
                Fp32ComputeConv2d(in_chs, out_chs, kernel_size=stride, stride=stride, bias=conv_bias, **dd),
            )
        else:
            self.downsample = nn.Identity()
        drop_path_rates = list(drop_path_rates or [0.0] * depth)
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(out_chs, out_chs, kernel_size=kernel_size, conv_mlp=conv_mlp, conv_bias=conv_bias,
                          use_grn=use_grn, ls_init_value=ls_init_value, norm_eps=norm_eps,
                          drop_path=drop_path_rates[i], **dd)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return x


class GlobalPool2d(nn.Module):
    """Global pooling to ``[N, C, 1, 1]``: 'avg', 'max', 'avgmax' or '' (no pooling)."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        reason = support.config_reason(global_pool=pool_type)
        if reason:
            raise NotImplementedError(reason)
        pool_type = (pool_type or "").lower()
        self.pool_type = pool_type

    def is_identity(self) -> bool:
        return not self.pool_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            return F.adaptive_avg_pool2d(x, 1)
        if self.pool_type == "max":
            return F.adaptive_max_pool2d(x, 1)
        if self.pool_type == "avgmax":
            return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))
        return x

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type}"


class NormMlpClassifierHead(nn.Module):
    """Pool -> LayerNorm2d -> flatten -> (pre-logits fc + GELU) -> dropout -> fc, as timm's head."""

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            hidden_size: Optional[int] = None,
            pool_type: str = "avg",
            drop_rate: float = 0.0,
            norm_eps: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.num_features = in_features
        self.use_conv = not pool_type
        self.global_pool = GlobalPool2d(pool_type)
        self.norm = LayerNorm2d(in_features, eps=1e-6 if norm_eps is None else norm_eps, **dd)
        self.flatten = nn.Flatten(1) if pool_type else nn.Identity()
        if hidden_size:
            self.pre_logits = nn.Sequential(OrderedDict([
                ("fc", _linear_layer(self.use_conv, in_features, hidden_size, True, dd)),
                ("act", GELU()),
            ]))
            self.num_features = hidden_size
        else:
            self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = (_linear_layer(self.use_conv, self.num_features, num_classes, True, dd)
                   if num_classes > 0 else nn.Identity())

    def reset(self, num_classes: int, pool_type: Optional[str] = None, reset_other: bool = False,
              in_features: Optional[int] = None) -> None:
        p = next(self.parameters(), None)
        dd = {"device": p.device if p is not None else None, "dtype": p.dtype if p is not None else None}
        if in_features is not None and in_features != self.in_features:
            if not (reset_other or isinstance(self.norm, nn.Identity)):
                raise ValueError("Input features can only change with the norm removed (reset_other=True)")
        if pool_type is not None:
            self.global_pool = GlobalPool2d(pool_type).train(self.training)
            self.flatten = (nn.Flatten(1) if pool_type else nn.Identity()).train(self.training)
        if reset_other:
            self.norm = nn.Identity().train(self.training)
            self.pre_logits = nn.Identity().train(self.training)
            self.hidden_size = None
            self.num_features = self.in_features
        if in_features is not None and in_features != self.in_features:
            self.in_features = in_features
            if not self.hidden_size:
                self.num_features = in_features
        self.use_conv = self.global_pool.is_identity()
        if self.hidden_size:
            old = self.pre_logits.fc
            if isinstance(old, nn.Conv2d) != self.use_conv:
                new_fc = _linear_layer(self.use_conv, self.in_features, self.hidden_size, True, dd)
                with torch.no_grad():
                    new_fc.weight.copy_(old.weight.reshape(new_fc.weight.shape))
                    new_fc.bias.copy_(old.bias)
                self.pre_logits.fc = new_fc.train(self.pre_logits.training)
        self.fc = (_linear_layer(self.use_conv, self.num_features, num_classes, True, dd)
                   if num_classes > 0 else nn.Identity()).train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.norm(x)
        x = self.flatten(x)
        x = self.pre_logits(x)
        x = self.drop(x)
        if pre_logits:
            return x
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def _feature_take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]] = None
                          ) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices``: None -> all, int n -> last n, sequence -> those (negatives ok)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_features - 1})")
            take.append(idx)
    if not take:
        raise ValueError("no feature indices selected")
    return take, max(take)


def _input_reduction(stem_conv: nn.Conv2d, stages) -> int:
    """How many times the stem and the stages' downsamples shrink the input (32 for ConvNeXt)."""
    r = stem_conv.stride[0]
    for stage in stages:
        if isinstance(stage.downsample, nn.Sequential):
            r *= stage.downsample[1].stride[0]
    return r


def _check_image(x, stem_conv: nn.Conv2d, stages) -> None:
    """``x`` must be a float ``[N, in_chans, H, W]`` batch, H and W at least the trunk's reduction,
    on the parameters' device and (outside autocast) in their dtype. Each error names ``x`` and
    what was expected, instead of an error from deep inside a convolution."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ConvNeXt: x must be a torch.Tensor, got {type(x).__name__}")
    c_in, param = stem_conv.in_channels, stem_conv.weight
    if x.dim() != 4 or x.shape[1] != c_in:
        raise ValueError(f"ConvNeXt: x must have shape [N, {c_in}, H, W] (in_chans={c_in}), "
                         f"got {list(x.shape)}")
    r = _input_reduction(stem_conv, stages)
    if x.shape[2] < r or x.shape[3] < r:
        raise ValueError(f"ConvNeXt: x must be at least {r}x{r} pixels (the trunk downsamples "
                         f"{r}x), got {x.shape[2]}x{x.shape[3]}")
    if x.device != param.device:
        raise ValueError(f"ConvNeXt: x is on {x.device} but the model is on {param.device}")
    if not x.is_floating_point():
        raise TypeError(f"ConvNeXt: x must be a floating-point tensor, got {x.dtype}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"ConvNeXt: x has dtype {x.dtype} but the model's parameters have "
                        f"{param.dtype}; cast one of them, or run under torch.autocast")


def _stagewise_drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
    """timm's ``calculate_drop_path_rates(rate, depths, stagewise=True)``: linspace split per stage."""
    return [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]


@torch.no_grad()
def _trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                   b: float = 2.0) -> torch.Tensor:
    """Truncated normal by the inverse CDF, as timm's ``trunc_normal_`` (same RNG draws, so the same
    seed gives timm's initial weights; torch's own ``trunc_normal_`` now samples differently)."""
    if tensor.is_meta:
        return tensor
    lo = (1.0 + math.erf((a - mean) / std / math.sqrt(2.0))) / 2.0
    hi = (1.0 + math.erf((b - mean) / std / math.sqrt(2.0))) / 2.0
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    tensor.add_(mean)
    tensor.clamp_(min=a, max=b)
    return tensor


def _init_weights(module: nn.Module, name: str = "", head_init_scale: float = 1.0) -> None:
    """timm's ConvNeXt ``_init_weights``: trunc_normal(std .02) conv/linear weights, zero biases."""
    if isinstance(module, nn.Conv2d):
        _trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        _trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
        if name and "head." in name:
            module.weight.data.mul_(head_init_scale)
            module.bias.data.mul_(head_init_scale)


class ConvNeXt(nn.Module):
    """ConvNeXt (V1 / V2) with timm's structure; the blocks run on :mod:`convnext_fast.ops`.

    Arguments are timm's. Supported (judged by :mod:`convnext_fast.models.support`):
    ``stem_type='patch'``, ``output_stride=32``, ``head_norm_first=False``, LayerNorm norms
    (``norm_layer`` None/'layernorm'/'layernorm2d'), exact GELU (``act_layer`` 'gelu'), no layer
    scale with ``use_grn=True``, ``global_pool`` in ('avg', 'max', 'avgmax', ''); anything else
    raises ``NotImplementedError``. Odd ``kernel_sizes`` and 4 ``depths``/``dims``, else ``ValueError``.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            output_stride: int = 32,
            depths: Tuple[int, ...] = (3, 3, 9, 3),
            dims: Tuple[int, ...] = (96, 192, 384, 768),
            kernel_sizes: Union[int, Tuple[int, ...]] = 7,
            ls_init_value: Optional[float] = 1e-6,
            stem_type: str = "patch",
            patch_size: int = 4,
            head_init_scale: float = 1.0,
            head_norm_first: bool = False,
            head_hidden_size: Optional[int] = None,
            conv_mlp: bool = False,
            conv_bias: bool = True,
            use_grn: bool = False,
            act_layer: Any = "gelu",
            norm_layer: Any = None,
            norm_eps: Optional[float] = None,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        reason = support.config_reason(
            output_stride=output_stride, stem_type=stem_type, head_norm_first=head_norm_first,
            norm_layer=norm_layer, act_layer=act_layer, use_grn=use_grn, ls_init_value=ls_init_value,
            global_pool=global_pool)
        if reason:
            raise NotImplementedError(f"ConvNeXt: {reason}")
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        error = support.config_error(depths, dims, kernel_sizes)
        if error:
            raise ValueError(f"ConvNeXt: {error}")
        kernel_sizes = support.stage_kernel_sizes(kernel_sizes, len(depths))
        dd = {"device": device, "dtype": dtype}
        eps = 1e-6 if norm_eps is None else norm_eps

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info: List[Dict[str, Any]] = []

        self.stem = nn.Sequential(
            Fp32ComputeConv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size, bias=conv_bias,
                              **dd),
            LayerNorm2d(dims[0], eps=eps, **dd),
        )
        dp_rates = _stagewise_drop_path_rates(drop_path_rate, depths)
        stages = []
        prev_chs = dims[0]
        curr_stride = patch_size
        for i in range(4):
            stride = 2 if curr_stride == 2 or i > 0 else 1  # timm: a stride-2 stem gets a stage-0 downsample
            curr_stride *= stride
            stages.append(ConvNeXtStage(
                prev_chs, dims[i], kernel_size=kernel_sizes[i], stride=stride, depth=depths[i],
                drop_path_rates=dp_rates[i], ls_init_value=ls_init_value, conv_mlp=conv_mlp,
                conv_bias=conv_bias, use_grn=use_grn, norm_eps=norm_eps, **dd))
            prev_chs = dims[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=curr_stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = prev_chs
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(self.num_features, num_classes, hidden_size=head_hidden_size,
                                          pool_type=global_pool, drop_rate=drop_rate, norm_eps=norm_eps, **dd)
        self.head_hidden_size = self.head.num_features
        # Same order as timm's named_apply (only leaves are touched, so pre-order == post-order).
        for name, module in self.named_modules():
            _init_weights(module, name, head_init_scale=head_init_scale)

    # -- timm API -----------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (torch.utils.checkpoint, use_reentrant=False) when enabled."""
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None,
                         reset_other: bool = False) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (timm's semantics). ``indices``: None = all 4, int n = last n, or a list.

        Returns the list of intermediates if ``intermediates_only`` else ``(final, intermediates)``.
        The tensors are ``[N, C, H, W]`` in channels-last memory.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = _feature_take_indices(len(self.stages), indices)
        _check_image(x, self.stem[0], self.stages)
        x = x.contiguous(memory_format=_CL)
        x = self.stem(x)
        last_idx = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                if norm and feat_idx == last_idx:
                    intermediates.append(self.norm_pre(x))
                else:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm_pre(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = _feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm_pre = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.stem[0], self.stages)
        x = x.contiguous(memory_format=_CL)  # the one layout conversion of the trunk
        x = self.stem(x)
        x = self.stages(x)
        x = self.norm_pre(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# --------------------------------------------------------------------------------------------
# Feature extraction (timm's features_only=True)
# --------------------------------------------------------------------------------------------

class FeatureInfo(list):
    """List of ``dict(num_chs, reduction, module, index)`` with timm's FeatureInfo accessors."""

    def _get(self, key: str, idx=None):
        if idx is None:
            return [f[key] for f in self]
        if isinstance(idx, (tuple, list)):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)


class ConvNeXtFeatures(nn.Module):
    """Stage outputs of a :class:`ConvNeXt` as a list (timm's ``features_only=True``).

    Takes the stem and the stages up to the last requested index from ``model`` (the head is
    dropped) and names them as timm's ``FeatureListNet`` does (``stem_0``, ``stem_1``,
    ``stages_0`` ...), so timm's features-only state_dicts load strictly.
    """

    def __init__(self, model: ConvNeXt, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        n = len(model.stages)
        out_indices = tuple(n + i if i < 0 else i for i in out_indices)
        for i in out_indices:
            if not 0 <= i < n:
                raise ValueError(f"out_indices must be in [0, {n}), got {out_indices}")
        self.out_indices = out_indices
        self.stem_0 = model.stem[0]
        self.stem_1 = model.stem[1]
        self._num_stages = max(out_indices) + 1
        for i in range(self._num_stages):
            self.add_module(f"stages_{i}", model.stages[i])
        self.feature_info = FeatureInfo(dict(model.feature_info[i], index=i) for i in out_indices)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for i in range(self._num_stages):
            getattr(self, f"stages_{i}").grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        _check_image(x, self.stem_0, [getattr(self, f"stages_{i}") for i in range(self._num_stages)])
        x = x.contiguous(memory_format=_CL)
        x = self.stem_1(self.stem_0(x))
        out = []
        for i in range(self._num_stages):
            x = getattr(self, f"stages_{i}")(x)
            if i in self.out_indices:
                out.append(x)
        return out
