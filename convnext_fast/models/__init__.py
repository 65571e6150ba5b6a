"""ConvNeXt V1/V2 models with timm's names, running on the fused ops, and their weight loaders."""
from .convnext import ConvNeXt, ConvNeXtFeatures
from .registry import (
    convnext_atto, convnext_base, convnext_femto, convnext_large, convnext_nano, convnext_pico,
    convnext_small, convnext_tiny, convnext_xlarge, convnext_xxlarge, convnextv2_atto, convnextv2_base,
    convnextv2_femto, convnextv2_huge, convnextv2_large, convnextv2_nano, convnextv2_pico,
    convnextv2_small, convnextv2_tiny, create_model, list_models,
)
from .weights import CheckpointError, convert_state_dict, from_timm, load_pretrained

__all__ = [
    "ConvNeXt", "ConvNeXtFeatures", "CheckpointError",
    "create_model", "list_models", "from_timm", "load_pretrained", "convert_state_dict",
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge", "convnext_xxlarge",
    "convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano", "convnextv2_tiny",
    "convnextv2_small", "convnextv2_base", "convnextv2_large", "convnextv2_huge",
]
