"""The fused ops, one Python entry point each; the backend is picked by :mod:`convnext_fast.backends`."""
from .dwconv_ln import dwconv_ln
from .mlp import mlp
from .mlp_grn import mlp_grn

__all__ = ["dwconv_ln", "mlp", "mlp_grn"]
