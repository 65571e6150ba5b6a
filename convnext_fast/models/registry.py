"""Model variants (timm's settings for the same names), ``create_model`` and ``list_models``.

``pretrained`` is a local checkpoint path (timm, official facebookresearch or Hugging Face
format, see :mod:`convnext_fast.models.weights`), True for timm's pretrained weights of the name
(fetched and cached by timm / huggingface_hub), or None/False.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from .convnext import ConvNeXt, ConvNeXtFeatures
from .weights import load_pretrained, load_timm_pretrained, timm_pretrained_cfg

__all__ = [
    "create_model", "list_models", "VARIANTS",
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge", "convnext_xxlarge",
    "convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano", "convnextv2_tiny",
    "convnextv2_small", "convnextv2_base", "convnextv2_large", "convnextv2_huge",
]

PathLike = Union[str, "os.PathLike[str]"]

_V2 = dict(use_grn=True, ls_init_value=None)

#: name -> ConvNeXt kwargs, exactly timm's ``model_args`` for the registered model of that name.
VARIANTS: Dict[str, Dict[str, Any]] = {
    # ConvNeXt V1 (atto..nano are timm originals with 1x1-conv MLPs)
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "convnext_xlarge": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)),
    "convnext_xxlarge": dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), norm_eps=1e-5),
    # ConvNeXt V2 (GRN, no layer scale)
    "convnextv2_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True, **_V2),
    "convnextv2_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True, **_V2),
    "convnextv2_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True, **_V2),
    "convnextv2_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True, **_V2),
    "convnextv2_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **_V2),
    "convnextv2_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_V2),
    "convnextv2_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_V2),
    "convnextv2_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **_V2),
    "convnextv2_huge": dict(depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816), **_V2),
}


def _check_pretrained(pretrained) -> Union[None, bool, PathLike]:
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or isinstance(pretrained, (str, os.PathLike)):
        return pretrained
    raise ValueError(f"pretrained must be True (timm's weights for the model's name), a local checkpoint "
                     f"path (str or os.PathLike), or None/False; got {pretrained!r}")


def _build(name: str, pretrained=None, features_only: bool = False,
           out_indices: Sequence[int] = (0, 1, 2, 3), tag: Optional[str] = None, checkpoint_path=None,
           cache_dir=None, pretrained_cfg_overlay=None, **kwargs) -> Union[ConvNeXt, ConvNeXtFeatures]:
    # timm's checkpoint_path= (a local file) loads after pretrained=, as there.
    sources = [src for src in (_check_pretrained(pretrained), checkpoint_path) if src is not None]
    if kwargs.pop("pretrained_cfg", None) is not None:
        raise ValueError("pretrained_cfg= is not supported; use pretrained_cfg_overlay=dict(...) or "
                         "pretrained=<local path>")
    timm_name = f"{name}.{tag}" if tag else name
    # An unknown tag or a name without weights fails here, before a big model is built.
    cfg = timm_pretrained_cfg(timm_name, pretrained_cfg_overlay) if any(s is True for s in sources) else None
    if features_only:
        kwargs.setdefault("num_classes", 0)  # the head is dropped anyway
    model = ConvNeXt(**dict(VARIANTS[name], **kwargs))
    if cfg is not None:  # timm's loader fills the whole model, before a features wrapper drops its head
        load_timm_pretrained(model, timm_name, cache_dir=cache_dir, pretrained_cfg=cfg)
    if features_only:
        model = ConvNeXtFeatures(model, out_indices)
    for src in sources:  # local files load into the wrapper too (a features checkpoint has no head)
        if src is not True:
            load_pretrained(model, src)
    return model


def create_model(model_name: str, pretrained=None, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs) -> Union[ConvNeXt, ConvNeXtFeatures]:
    """Build a variant by name, like ``timm.create_model``.

    ``model_name``: one of :func:`list_models`, optionally with a timm pretrained tag such as
    ``'convnext_tiny.fb_in1k'`` (it picks the weights ``pretrained=True`` loads).
    ``pretrained``: True for timm's weights of that name (fetched and cached by timm /
    huggingface_hub; ``cache_dir=`` and ``pretrained_cfg_overlay=`` as in timm), a local checkpoint
    path (or ``checkpoint_path=``), or None. ``features_only=True`` returns a
    :class:`ConvNeXtFeatures` giving the stage outputs at ``out_indices`` (reductions 4/8/16/32).
    Other kwargs override the variant's :class:`ConvNeXt` arguments (num_classes, in_chans,
    drop_path_rate, ...).
    """
    base, _, tag = model_name.partition(".")
    if base not in VARIANTS:
        raise ValueError(f"unknown model {model_name!r}; known models: {', '.join(list_models())}")
    return _build(base, pretrained, features_only=features_only, out_indices=out_indices, tag=tag or None,
                  **kwargs)


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Names of the registered variants (optionally filtered by a shell-style ``pattern``)."""
    names = sorted(VARIANTS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def convnext_atto(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-Atto (timm original, 3.7M params): depths (2,2,6,2), dims (40..320), conv MLP."""
    return _build("convnext_atto", pretrained, **kwargs)


def convnext_femto(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-Femto (timm original): depths (2,2,6,2), dims (48..384), conv MLP."""
    return _build("convnext_femto", pretrained, **kwargs)


def convnext_pico(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-Pico (timm original): depths (2,2,6,2), dims (64..512), conv MLP."""
    return _build("convnext_pico", pretrained, **kwargs)


def convnext_nano(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-Nano (timm original): depths (2,2,8,2), dims (80..640), conv MLP."""
    return _build("convnext_nano", pretrained, **kwargs)


def convnext_tiny(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-T (28.6M params): depths (3,3,9,3), dims (96..768)."""
    return _build("convnext_tiny", pretrained, **kwargs)


def convnext_small(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-S: depths (3,3,27,3), dims (96..768)."""
    return _build("convnext_small", pretrained, **kwargs)


def convnext_base(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-B: depths (3,3,27,3), dims (128..1024)."""
    return _build("convnext_base", pretrained, **kwargs)


def convnext_large(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-L: depths (3,3,27,3), dims (192..1536)."""
    return _build("convnext_large", pretrained, **kwargs)


def convnext_xlarge(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-XL: depths (3,3,27,3), dims (256..2048)."""
    return _build("convnext_xlarge", pretrained, **kwargs)


def convnext_xxlarge(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-XXL: depths (3,4,30,3), dims (384..3072), norm_eps 1e-5."""
    return _build("convnext_xxlarge", pretrained, **kwargs)


def convnextv2_atto(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-Atto: depths (2,2,6,2), dims (40..320), conv MLP, GRN."""
    return _build("convnextv2_atto", pretrained, **kwargs)


def convnextv2_femto(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-Femto: depths (2,2,6,2), dims (48..384), conv MLP, GRN."""
    return _build("convnextv2_femto", pretrained, **kwargs)


def convnextv2_pico(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-Pico: depths (2,2,6,2), dims (64..512), conv MLP, GRN."""
    return _build("convnextv2_pico", pretrained, **kwargs)


def convnextv2_nano(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-Nano: depths (2,2,8,2), dims (80..640), conv MLP, GRN."""
    return _build("convnextv2_nano", pretrained, **kwargs)


def convnextv2_tiny(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-T: depths (3,3,9,3), dims (96..768), GRN."""
    return _build("convnextv2_tiny", pretrained, **kwargs)


def convnextv2_small(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-S (timm only, no official weights): depths (3,3,27,3), dims (96..768), GRN."""
    return _build("convnextv2_small", pretrained, **kwargs)


def convnextv2_base(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-B: depths (3,3,27,3), dims (128..1024), GRN."""
    return _build("convnextv2_base", pretrained, **kwargs)


def convnextv2_large(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-L: depths (3,3,27,3), dims (192..1536), GRN."""
    return _build("convnextv2_large", pretrained, **kwargs)


def convnextv2_huge(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-V2-H: depths (3,3,27,3), dims (352..2816), GRN."""
    return _build("convnextv2_huge", pretrained, **kwargs)
