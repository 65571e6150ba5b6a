"""The fused ops, one public function each, built from the op's spec (:mod:`convnext_fast.specs`)
by the one front (:mod:`._front`: autocast -> checks -> layout -> backend selection -> call).
The backend is picked by :mod:`convnext_fast.backends`."""
from ..specs import SPECS
from ._front import make_op

__all__ = ["dwconv_ln", "mlp", "mlp_grn"]

dwconv_ln = make_op(SPECS["dwconv_ln"], """y = LayerNorm_C(dwconv_kxk(x) + conv_bias), 'same' padding,
    stride 1.

    x: [N, C, H, W] (NCHW-contiguous input is converted to channels-last once, here);
    conv_weight: [C, 1, k, k], odd k; conv_bias: [C] or None; ln_weight, ln_bias: [C], all with
    x's dtype and device. Returns y: [N, C, H, W], channels-last, x's dtype. LayerNorm statistics
    are fp32 on every backend. Under ``torch.autocast`` every tensor is first cast to the autocast
    dtype and y comes back in it. ``backend``: see :mod:`convnext_fast.backends`.
    """)

mlp = make_op(SPECS["mlp"], """out = residual + gamma * fc2(gelu_erf(fc1(y))) per pixel.

    y: [N, C, H, W]; fc1_weight: [D, C]; fc1_bias: [D] or None; fc2_weight: [C, D];
    fc2_bias: [C] or None; gamma: [C] or None (no layer scale); residual: [N, C, H, W] or None
    (return the branch alone). Returns [N, C, H, W], channels-last, y's dtype (the autocast dtype
    under ``torch.autocast``, which casts every tensor first).
    """)

mlp_grn = make_op(SPECS["mlp_grn"], """out = residual + fc2(GRN(gelu_erf(fc1(y)))), GRN over H*W per
    image and channel.

    y: [N, C, H, W]; fc1_weight: [D, C]; fc1_bias: [D] or None; grn_weight, grn_bias: [D];
    fc2_weight: [C, D]; fc2_bias: [C] or None; residual: [N, C, H, W] or None. Returns
    [N, C, H, W], channels-last, y's dtype (the autocast dtype under ``torch.autocast``).
    """)
