"""The ``onednn`` backend (CPU inference): the block MLP as two oneDNN GEMMs on prepacked weights,
on the [M = N*H*W, C] matrix the channels-last trunk already is:

    h   = gelu_erf(y @ W1^T + b1)                          # bias + exact GELU as a post-op
    out = h @ (gamma * W2)^T + gamma * b2 + residual       # residual add as a post-op

(``mlp_grn``: GRN between the two, in fp32 torch ops over the hidden; no gamma.) The GEMMs are
``torch.ops.mkldnn._linear_pointwise`` (what torch.compile's CPU freezing pass emits), on weights
reordered once into oneDNN's blocked layout (``_reorder_linear_weight``) with the layer scale
folded into fc2 (in fp32, rounded once to the weight dtype); both are made once per weight
version (:class:`convnext_fast._prepared.Prepared`), so an optimizer step or a weight load is
seen at the next call. Post-ops run on the fp32 accumulator, so bf16 rounds the hidden and the
output once each (PyTorch's bf16 Linear + GELU + scale + add rounds five times).

Compared with the ``cpu`` backend this materialises the [M, 4C] hidden (in cache-sized row
chunks in fp32). It ran 12% (fp32) and 14% (bf16) faster than the ``cpu`` backend's ATen-GEMM
tiles summed over ConvNeXt-T's blocks at batch 1 and 8 on 2 threads of a Zen 4; the ``cpu``
backend's own microkernel tiles (csrc/include/mlp_tiles.h) now beat it there, 424 vs 591 ms in
fp32 and 238 vs 251 ms in bf16 (benchmarks/results/cpu_avx512_bf16_ops.json). Which one runs is
the measured order per CPU kind (``backend_order.json``); ``mlp_grn`` has no tiles. Inference only: a call that needs
gradients goes to a backend with a backward; fp32 and bf16 (bf16 where oneDNN computes it
natively).
"""
from __future__ import annotations

import os

import torch

from .._prepared import Prepared
from ..specs import SPECS
from .registry import Impl, Reason, register

_PACKED = Prepared("oneDNN packed MLP weights")
# fp32: the hidden of one chunk of rows, in bytes, small enough to stay in cache between the two
# GEMMs (unchunked, the [M, 4C] round trip to memory made C=96 at batch 8 take 37.5 ms instead
# of 26-27 at 1-2 MiB on a 2-core Zen 4), while a chunk keeps at least 2C rows, so re-reading the
# weights per chunk costs no more than the hidden it keeps out of memory (C >= 384: no chunks).
# bf16 measured no gain from chunks (14.5 ms unchunked, 15.7 at 2 MiB): it runs whole.
# CONVNEXT_FAST_ONEDNN_CHUNK_KB tunes it.
_CHUNK_BYTES = int(os.environ.get("CONVNEXT_FAST_ONEDNN_CHUNK_KB", "2048")) * 1024
_lp = torch.ops.mkldnn._linear_pointwise if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _availability() -> Reason:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return f"torch {torch.__version__} has no mkldnn::_linear_pointwise"
    return None


_REASON = _availability()
_DTYPES = (torch.float32, torch.bfloat16) if _REASON is None and _onednn_bf16() else (torch.float32,)


def _pack(fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
    """(W1 packed, b1, gamma*W2 packed, gamma*b2): b1 fp32 (oneDNN adds it to the fp32
    accumulator), the rest in the weights' dtype (the residual-add post-op wants one dtype)."""
    with torch.inference_mode(False), torch.no_grad():
        w2, b2 = fc2_weight.float(), None if fc2_bias is None else fc2_bias.float()
        if gamma is not None:
            g = gamma.float()
            w2, b2 = w2 * g[:, None], None if b2 is None else b2 * g
        reorder = torch.ops.mkldnn._reorder_linear_weight
        dtype = fc2_weight.dtype
        # oneDNN reads a bias as dense: a strided view (every other element) must be copied
        return (reorder(fc1_weight.detach().contiguous()),
                None if fc1_bias is None else fc1_bias.float().contiguous(),
                reorder(w2.to(dtype).contiguous()), None if b2 is None else b2.to(dtype).contiguous())


def mlp_onednn(y: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias, fc2_weight: torch.Tensor,
               fc2_bias, gamma, residual) -> torch.Tensor:
    """The ``mlp`` contract (:func:`convnext_fast.reference.mlp`): y [N, C, H, W] channels-last,
    fc1_weight [D, C], fc2_weight [C, D], vectors [D] / [C] -> [N, C, H, W] channels-last."""
    N, C, H, W = y.shape
    w1, b1, w2, b2 = _PACKED.get((fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma),
                                 lambda: _pack(fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma))
    M, D = N * H * W, fc1_weight.shape[0]
    rows = y.permute(0, 2, 3, 1).reshape(M, C)  # a view: the trunk is NHWC
    res = None if residual is None else residual.permute(0, 2, 3, 1).reshape(M, C)
    step = _CHUNK_BYTES // (D * y.element_size())
    if y.dtype != torch.float32 or M <= step or step < 2 * C:
        out = _fc2(_fc1(rows, w1, b1), res, w2, b2)
    else:
        out = torch.empty(M, C, dtype=y.dtype)
        for a in range(0, M, step):
            b = min(a + step, M)
            out[a:b] = _fc2(_fc1(rows[a:b], w1, b1), None if res is None else res[a:b], w2, b2)
    return out.view(N, H, W, C).permute(0, 3, 1, 2)


def _fc1(rows, w1, b1):
    return _lp(rows, w1, b1, "gelu", [], "none")


def _fc2(h, res, w2, b2):
    if res is None:
        return _lp(h, w2, b2, "none", [], "")
    return _lp.binary(h, res, w2, b2, "add")


def mlp_grn_onednn(y: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias, grn_weight: torch.Tensor,
                   grn_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias, residual,
                   eps: float) -> torch.Tensor:
    """The ``mlp_grn`` contract (:func:`convnext_fast.reference.mlp_grn`): shapes as
    :func:`mlp_onednn`, grn_weight/grn_bias [D]. GRN's statistics over each image's H*W are fp32."""
    N, C, H, W = y.shape
    D = fc1_weight.shape[0]
    w1, b1, w2, b2 = _PACKED.get((fc1_weight, fc1_bias, fc2_weight, fc2_bias, None),
                                 lambda: _pack(fc1_weight, fc1_bias, fc2_weight, fc2_bias, None))
    rows = y.permute(0, 2, 3, 1).reshape(N * H * W, C)
    h = _fc1(rows, w1, b1)
    hf = h.view(N, H * W, D).float()
    gx = torch.linalg.vector_norm(hf, ord=2, dim=1, keepdim=True)  # [N, 1, D]
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    # h + bias + weight * h * nx, as one pass over the hidden
    h = torch.addcmul(grn_bias.float(), hf, 1 + grn_weight.float() * nx).to(h.dtype).view(N * H * W, D)
    res = None if residual is None else residual.permute(0, 2, 3, 1).reshape(N * H * W, C)
    return _fc2(h, res, w2, b2).view(N, H, W, C).permute(0, 3, 1, 2)


_FUNCTIONS = {"mlp": mlp_onednn, "mlp_grn": mlp_grn_onednn}


def _define(op: str) -> None:
    spec = SPECS[op]
    torch.library.custom_op(f"convnext_fast::{op}_onednn", _FUNCTIONS[op], mutates_args=(), schema=spec.schema)
    torch.library.register_fake(f"convnext_fast::{op}_onednn")(lambda *a: spec.fake(**spec.bind(a, {})))


def _supports(y, **args) -> Reason:
    if y.device.type != "cpu":
        return f"oneDNN runs on the CPU, got {y.device.type}"
    if y.dtype not in _DTYPES:
        return (f"dtype {y.dtype} is not supported by the oneDNN MLP here "
                f"({', '.join(str(d) for d in _DTYPES)})")
    if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (y, *args.values())):
        return "inference only (no backward): this call needs gradients"
    return None


def _impl(op: str):
    fn = _FUNCTIONS[op]

    def call(**args):
        if torch.compiler.is_compiling():  # opaque to the compiler: the weight cache stays outside
            return getattr(torch.ops.convnext_fast, f"{op}_onednn")(*args.values())
        return fn(*args.values())  # the dispatcher round trip costs ~25 us a call

    return call


for _op in _FUNCTIONS:
    if _REASON is None:
        _define(_op)
    register(_op, "onednn", Impl(_impl(_op), lambda: _REASON, _supports))
