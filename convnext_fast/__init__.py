"""convnext_fast: ConvNeXt (V1/V2) with its hot path on fused kernels.

    import convnext_fast
    model = convnext_fast.convnext_tiny(pretrained=True)   # timm's weights (or a local file)
    report = convnext_fast.patch_timm(timm_model)   # or: run a timm ConvNeXt on the fused ops
    with convnext_fast.disable_kernels():           # the torch reference (CONVNEXT_FAST_DISABLE=1)
        ...

See README.md; ``python -m convnext_fast info`` shows which backend runs each op and why.
"""
from . import backends, ops, reference, specs
from ._prepared import clear_all as clear_prepared
from .backends import BackendError, use_backend
from .backends.registry import disable_kernels, disabled_ops, enable_kernels
from .models import *  # noqa: F401,F403  (variant constructors, create_model, from_timm, ...)
from .models import __all__ as _model_names
from .patch import PatchReport, patch_timm, unpatch_timm

backends.load()  # each backend registers its implementations of the ops in specs

__version__ = "0.1.0"

__all__ = ["backends", "ops", "reference", "specs", "BackendError", "use_backend", "disable_kernels",
           "enable_kernels", "disabled_ops", "clear_prepared", "patch_timm", "unpatch_timm", "PatchReport", *_model_names]
