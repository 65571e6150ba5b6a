"""Triton kernels for ``mlp_grn`` (ConvNeXt V2): out = residual + fc2(GRN(gelu_erf(fc1(y)))).

GRN on the hidden h [M = N*H*W, D]: gx[n, j] = ||h[image n, :, j]||_2 over the image's pixels,
nx = gx / (mean_j gx + eps), h' = h + grn_b + grn_w * h * nx  =  h * S[n] + grn_b with
S = 1 + grn_w * nx. The global reduction over H*W sits between the two GEMMs, so the forward
runs in two passes:

1. :func:`_mlp_grn_fwd_fc1_kernel`: fc1 + b1 + GELU and, per (image, row tile, channel), the
   fp32 partial sum of h^2 into ``ssq [N * TPI, D]`` (no float atomics: a fixed-order sum over
   the tiles follows). Row tiles never straddle images: the grid is ``(N * TPI, D / BLOCK_D)``
   with ``TPI = ceil(HW / BLOCK_M)`` tiles per image, the last one masked; :func:`grn_block_m`
   picks ``BLOCK_M`` per ``HW`` (it sizes the partial buffer, so the launcher decides it). Then
   (tiny [N, D] torch ops, fixed order): gx = sqrt(sum_t ssq), S = 1 + grn_w * gx / (mean + eps).
2. Where the fused kernels fit (:func:`mlp.fused_path`, C <= 256), the first pass does not
   store h at all and the second is ``mlp``'s fused kernel with its GRN step: it recomputes h
   per hidden chunk, maps it to h * S[row // HW] + grn_b in registers and feeds fc2, so the
   hidden never touches HBM (one extra fc1 GEMM, +50% FLOPs, instead of writing and reading
   [M, 4C]: 16 C bytes per row against 2 C to read y again). For larger C the first pass
   writes h (input dtype) and the second is the fused-epilogue GEMM
   (``gemm._linear_fwd_kernel``) with the same mapping as its prologue: h crosses HBM once,
   as in any two-GEMM MLP. Row tiles of the second pass may straddle images (S is gathered
   per row).

Saved for backward: ``y`` only. The backward recomputes h from y anyway (for GELU'), and the
same pass re-derives gx from it for free, so not even the [N, D] statistics are kept.

Backward (:func:`mlp_grn_bwd`), g = grad_out, dh' = g @ W2 (gradient w.r.t. h'):
  A. :func:`_mlp_grn_bwd_recompute_kernel` (per-image row tiles as in pass 1, both GEMMs have
     K = C): pre = y W1^T + b1, h = gelu(pre), dh' = g W2; per-(image, tile) fp32 partials of
     sum h^2, Q = sum dh' * h, R = sum dh' and (once per row tile) sum g.
  B. tiny torch ops on [N, D]: gx, m = mean gx, nx, S; d grn_b = sum R; d grn_w = sum_n nx * Q;
     dnx = grn_w * Q; dgx_j = dnx_j / (m + eps) - sum_i dnx_i gx_i / (D (m + eps)^2);
     coef = dgx / gx (0 where gx = 0, where h is 0 too).
  C. Where the fused kernels fit: ``mlp``'s fused backward (:func:`mlp.bwd_fused`) with its GRN
     step recomputes pre, h and dh' once more per hidden chunk and uses dh = dh' * S + coef * h,
     dpre = dh * gelu'(pre), h' = h * S + grn_b on chip: dy, dW1, db1 and dW2 = g^T h' with no
     [M, D] tensor at all. Otherwise pass A also stores pre and dh' (input dtype),
     :func:`_mlp_grn_bwd_dpre_kernel` (elementwise, in place) turns them into h' and dpre (with
     fp32 per-row-tile partial sums of dpre for db1), and torch.mm forms dW2 = g^T h',
     dy = dpre W1, dW1 = dpre^T y (two transient [M, D] tensors).
No atomics anywhere, every reduction is a fixed-order sum, so reruns are bit-identical.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import runtime
from .gemm import empty, gelu, gelu_grad, linear_fwd, linear_tile, mlp_bwd_tiles, row_tile_configs
from .mlp import bwd_fused, fused_fwd, fused_path, fwd_rows, nhwc_view, rows2d
from .runtime import TunedKernel, dot_precision, dot_upcast, fit_block

__all__ = ["mlp_grn_fwd", "mlp_grn_bwd", "grn_block_m", "GRN_BLOCK_M_CANDIDATES",
           "GRN_BLOCK_M_CANDIDATES_INTERPRET", "GRN_MAX_PAD"]

_CL = torch.channels_last

# Row-tile candidates for the per-image kernels (largest first) and the padding (masked rows of
# the last tile of each image, as a fraction of the tiles' rows) accepted for a larger tile. On a
# GPU no tile under 64 rows (too few for a warpgroup MMA): 56x56 -> 128 (2% pad), 28x28 -> 128
# (12.5%), 14x14 -> 128 (23%, as 64), 7x7 -> 64 (23%). The interpreter pays for padded rows, so
# its candidates go down to 16. TODO(GPU): tune against measured time per stage shape.
GRN_BLOCK_M_CANDIDATES = (128, 64)
GRN_BLOCK_M_CANDIDATES_INTERPRET = (64, 32, 16)
GRN_MAX_PAD = 0.125

# Fixed tiles of the elementwise in-place backward kernel (in place => never autotuned, an
# autotuner would re-run it on already-updated data); 8 warps keep it spill-free.
_DPRE_BLOCK_M, _DPRE_BLOCK_D, _DPRE_WARPS = 64, 128, 8


def grn_block_m(hw: int, candidates=None) -> int:
    """Row tile for the per-image kernels: the largest candidate whose padding is <= GRN_MAX_PAD,
    else the candidate with the least padding (ties to the larger tile). ``candidates``: by
    default the interpreter's under TRITON_INTERPRET=1, else the GPU's."""
    if candidates is None:
        candidates = (GRN_BLOCK_M_CANDIDATES_INTERPRET if runtime.INTERPRET
                      else GRN_BLOCK_M_CANDIDATES)
    best, best_pad = None, 2.0
    for bm in candidates:
        slots = triton.cdiv(hw, bm) * bm
        pad = (slots - hw) / slots
        if pad <= GRN_MAX_PAD:
            return bm
        if pad < best_pad - 1e-12:
            best, best_pad = bm, pad
    return best


# ----------------------------------------------------------------------------------------------
# forward phase 1: fc1 + bias + GELU -> h, per-(image, tile) partial sums of h^2

@triton.jit
def _image_tile(TPI, HW, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows and hidden columns. Program (n * TPI + t, j) owns row tile t of image n
    and hidden chunk j: a row tile never straddles two images, so its partial sums are per image."""
    pid_t = tl.program_id(0)
    n = pid_t // TPI
    t = pid_t % TPI
    local = t * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = n.to(tl.int64) * HW + local
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid_t, rows64, local < HW, dd, dd < D


@triton.jit
def _mlp_grn_fwd_fc1_kernel(
    Y, W1, B1, H, SSQ,
    C, D, HW, TPI, stride_ym,
    HAS_B1: tl.constexpr, STORE_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t, rows64, rmask, dd, dmask = _image_tile(TPI, HW, D, BLOCK_M, BLOCK_D)
    acc = linear_tile(Y, W1, rows64, rmask, dd, dmask, C, stride_ym, Y, Y, rows64, False,
                      PRECISION, UPCAST, BLOCK_M, BLOCK_D, BLOCK_K)
    if HAS_B1:
        acc += tl.load(B1 + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    h = gelu(acc).to(Y.dtype.element_ty)
    if STORE_H:
        tl.store(H + rows64[:, None] * D + dd[None, :], h, mask=rmask[:, None] & dmask[None, :])
    hq = tl.where(rmask[:, None], h.to(tl.float32), 0.0)  # the values fc2 will read
    tl.store(SSQ + pid_t.to(tl.int64) * D + dd, tl.sum(hq * hq, axis=0), mask=dmask)


def _fc1_configs(arch: int, static: dict) -> List["triton.Config"]:
    return row_tile_configs(arch, static["BLOCK_M"], 1, static["ITEMSIZE"])


def _bwd_configs(arch: int, static: dict) -> List["triton.Config"]:
    return row_tile_configs(arch, static["BLOCK_M"], 2, static["ITEMSIZE"])


def _tile_heuristic(s: dict) -> dict:
    return {"BLOCK_D": fit_block(s["D"]), "BLOCK_K": fit_block(s["C"], (64, 32, 16))}


_FC1 = TunedKernel(_mlp_grn_fwd_fc1_kernel, _fc1_configs, key=["C", "D", "BLOCK_M"],
                   heuristic=_tile_heuristic)


def _grn_scale(ssq: torch.Tensor, grn_weight: torch.Tensor, N: int, D: int, eps: float):
    """From per-tile partials [N*TPI, D]: gx, nx, denom = mean(gx) + eps, S = 1 + grn_w * nx (fp32)."""
    gx = ssq.view(N, ssq.shape[0] // max(N, 1), D).sum(1).sqrt()  # not -1: N = 0 is ambiguous
    denom = gx.mean(-1, keepdim=True) + eps
    nx = gx / denom
    scale = torch.addcmul(torch.ones_like(nx), grn_weight.float()[None, :], nx)
    return gx, nx, denom, scale


def mlp_grn_fwd(y: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                grn_weight: torch.Tensor, grn_bias: torch.Tensor, fc2_weight: torch.Tensor,
                fc2_bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                eps: float = 1e-6, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = residual + fc2(GRN(gelu(fc1(y) + b1))) + b2; same contract as reference.mlp_grn.

    y, residual, out: [N, C, H, W] channels-last (``out`` allocated when None; it must not alias
    an input); the call holds whole images (GRN reduces over H*W per image).
    """
    N, C, H, W = y.shape
    D = fc1_weight.shape[0]
    HW, M = H * W, N * H * W
    out, o2, y2, r2 = fwd_rows(y, residual, out)
    if M == 0:
        return out
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()

    fused = fused_path(C, y.element_size(), y.device, grn=True)
    bm = grn_block_m(HW)
    tpi = triton.cdiv(HW, bm)
    # fused: the first pass only sums h^2 (the hidden is recomputed by the second); else it
    # writes h for the second GEMM
    h = empty((1,) if fused else (M, D), y.dtype, y.device)
    ssq = empty((N * tpi, D), torch.float32, y.device)
    kernel, meta = _FC1.get(y.device, {"BLOCK_M": bm, "ITEMSIZE": y.element_size()}, C=C, D=D)
    grid = lambda META: (N * tpi, triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
    torch.library.wrap_triton(kernel)[grid](
        y2, w1, w1 if fc1_bias is None else fc1_bias, h, ssq, C, D, HW, tpi, y2.stride(0),
        HAS_B1=fc1_bias is not None, STORE_H=not fused, PRECISION=dot_precision(y.dtype, y.device),
        UPCAST=dot_upcast(y.dtype), BLOCK_M=bm, **meta)
    _, _, _, scale = _grn_scale(ssq, grn_weight, N, D, eps)
    shift = grn_bias.float().contiguous()
    if fused:
        fused_fwd(y2, w1, fc1_bias, w2, fc2_bias, None, r2, o2, scale=scale, shift=shift, hw=HW)
    else:
        linear_fwd(h, w2, fc2_bias, o2, residual=r2, scale=scale, shift=shift, hw=HW)
    return out


# ----------------------------------------------------------------------------------------------
# backward

@triton.jit
def _mlp_grn_bwd_recompute_kernel(
    Y, G, W1, B1, W2, PRE, DHP, SSQ, QP, RP, SGP,
    C, D, HW, TPI, stride_ym, stride_gm,
    HAS_B1: tl.constexpr, STORE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t, rows64, rmask, dd, dmask = _image_tile(TPI, HW, D, BLOCK_M, BLOCK_D)
    # the column sums of g (-> db2): one partial per row tile, from the programs of hidden chunk 0
    pre, dhp = mlp_bwd_tiles(Y, G, W1, W2, W1, SGP + pid_t.to(tl.int64) * C, rows64, rmask, dd,
                             dmask, C, D, stride_ym, stride_gm, tl.program_id(1) == 0, False,
                             PRECISION, UPCAST, BLOCK_M, BLOCK_D, BLOCK_K)

    if HAS_B1:
        pre += tl.load(B1 + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    # h as the forward's fc2 saw it (rounded to the input dtype); padded rows contribute 0
    h = tl.where(rmask[:, None], gelu(pre).to(Y.dtype.element_ty).to(tl.float32), 0.0)
    if STORE:
        omask = rmask[:, None] & dmask[None, :]
        offs = rows64[:, None] * D + dd[None, :]
        tl.store(PRE + offs, pre.to(PRE.dtype.element_ty), mask=omask)
        tl.store(DHP + offs, dhp.to(DHP.dtype.element_ty), mask=omask)
    poffs = pid_t.to(tl.int64) * D + dd
    tl.store(SSQ + poffs, tl.sum(h * h, axis=0), mask=dmask)
    tl.store(QP + poffs, tl.sum(dhp * h, axis=0), mask=dmask)
    tl.store(RP + poffs, tl.sum(dhp, axis=0), mask=dmask)


_BWD = TunedKernel(_mlp_grn_bwd_recompute_kernel, _bwd_configs, key=["C", "D", "BLOCK_M"],
                   heuristic=_tile_heuristic)


@triton.jit
def _mlp_grn_bwd_dpre_kernel(
    PRE, DHP, SCALE, COEF, GB, DB1P, M, D, HW,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """In place: DHP <- dpre = (dh' * S + coef * h) * gelu'(pre); PRE <- h' = h * S + grn_b."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    img = (rows // HW).to(tl.int64)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    m = rmask[:, None] & dmask[None, :]
    offs = rows64[:, None] * D + dd[None, :]
    soffs = img[:, None] * D + dd[None, :]
    pre = tl.load(PRE + offs, mask=m, other=0.0).to(tl.float32)
    dhp = tl.load(DHP + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SCALE + soffs, mask=m, other=0.0)
    coef = tl.load(COEF + soffs, mask=m, other=0.0)
    gb = tl.load(GB + dd, mask=dmask, other=0.0)
    h = gelu(pre)
    dpre = (dhp * s + coef * h) * gelu_grad(pre)
    dpre = tl.where(m, dpre, 0.0)
    tl.store(DHP + offs, dpre.to(DHP.dtype.element_ty), mask=m)
    tl.store(PRE + offs, (h * s + gb[None, :]).to(PRE.dtype.element_ty), mask=m)
    tl.store(DB1P + pid_m * D + dd, tl.sum(dpre, axis=0), mask=dmask)


def mlp_grn_bwd(grad_out: torch.Tensor, y: torch.Tensor, fc1_weight: torch.Tensor,
                fc1_bias: Optional[torch.Tensor], grn_weight: torch.Tensor, grn_bias: torch.Tensor,
                fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], eps: float,
                has_residual: bool, *, path: Optional[str] = None):
    """Gradients of :func:`mlp_grn_fwd` from ``y`` alone (h and the GRN statistics are recomputed).

    Returns ``(dy, d_fc1_weight, d_fc1_bias | None, d_grn_weight, d_grn_bias, d_fc2_weight,
    d_fc2_bias | None, d_residual | None)``; ``dy`` channels-last, ``d_residual`` is
    ``grad_out``. ``fc2_bias`` is only tested for None. ``path``: None (automatic,
    :func:`mlp.fused_path`), ``"fused"`` or ``"two_gemm"``. Deterministic (no atomics).
    """
    N, C, H, W = y.shape
    D = fc1_weight.shape[0]
    HW, M = H * W, N * H * W
    dt, dev = y.dtype, y.device
    grad_out = grad_out.contiguous(memory_format=_CL)
    g2 = rows2d(grad_out)
    y2 = rows2d(y)
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()

    if path is None:
        path = ("fused" if fused_path(C, y.element_size(), dev, backward=True, grn=True)
                else "two_gemm")
    if path not in ("fused", "two_gemm"):
        raise ValueError(f"path must be None, 'fused' or 'two_gemm', got {path!r}")
    fused = M > 0 and path == "fused"
    bm = grn_block_m(max(HW, 1))
    tpi = triton.cdiv(HW, bm)
    # fused: pass A only takes the statistics; the fused kernels recompute h and dh' per chunk
    pre, dhp = (empty((1,) if fused else (M, D), dt, dev) for _ in range(2))
    # per-(image, tile) fp32 partials: sum h^2, Q = sum dh' h, R = sum dh' (separate buffers, not
    # views of one, so functionalization under torch.compile sees three plain mutated outputs)
    ssq, qp, rp = (empty((N * tpi, D), torch.float32, dev) for _ in range(3))
    sgp = empty((N * tpi, C), torch.float32, dev)
    if M > 0:
        kernel, meta = _BWD.get(dev, {"BLOCK_M": bm, "ITEMSIZE": y.element_size()}, C=C, D=D)
        grid = lambda META: (N * tpi, triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
        torch.library.wrap_triton(kernel)[grid](
            y2, g2, w1, w1 if fc1_bias is None else fc1_bias, w2, pre, dhp,
            ssq, qp, rp, sgp, C, D, HW, tpi, y2.stride(0), g2.stride(0),
            HAS_B1=fc1_bias is not None, STORE=not fused, PRECISION=dot_precision(dt, dev),
            UPCAST=dot_upcast(dt), BLOCK_M=bm, **meta)

    # GRN statistics and their gradients: [N, D] fp32, fixed-order torch reductions
    gx, nx, denom, scale = _grn_scale(ssq, grn_weight, N, D, eps)
    q = qp.view(N, tpi, D).sum(1)
    d_gb = rp.sum(0)
    d_gw = (q * nx).sum(0)
    dnx = grn_weight.float()[None, :] * q
    dgx = dnx / denom - (dnx * gx).sum(-1, keepdim=True) / (D * denom * denom)
    coef = torch.where(gx > 0, dgx / torch.where(gx > 0, gx, torch.ones_like(gx)),
                       torch.zeros_like(gx))

    db2 = None if fc2_bias is None else sgp.sum(0).to(dt)
    dres = grad_out if has_residual else None
    d_grn = d_gw.to(grn_weight.dtype), d_gb.to(grn_bias.dtype)
    if fused:
        dy2, dw1, db1f, dw2, _ = bwd_fused(
            g2, y2, w1, fc1_bias, w2, None, scale=scale.contiguous(), coef=coef.contiguous(),
            shift=grn_bias.float().contiguous(), hw=HW)
        db1 = None if fc1_bias is None else db1f.to(dt)
        return nhwc_view(dy2, N, H, W), dw1, db1, *d_grn, dw2.to(dt), db2, dres

    bm_e, bd = _DPRE_BLOCK_M, _DPRE_BLOCK_D
    if runtime.INTERPRET:  # padded elements cost real time there
        bm_e, bd = fit_block(M, (64, 32, 16)), fit_block(D)
    T = triton.cdiv(M, bm_e)
    db1p = empty((T, D), torch.float32, dev)
    if M > 0:
        torch.library.wrap_triton(_mlp_grn_bwd_dpre_kernel)[(T, triton.cdiv(D, bd))](
            pre, dhp, scale.contiguous(), coef.contiguous(), grn_bias.float().contiguous(), db1p,
            M, D, HW, BLOCK_M=bm_e, BLOCK_D=bd, num_warps=_DPRE_WARPS)
    hp, dpre = pre, dhp  # updated in place
    db1 = None if fc1_bias is None else db1p.sum(0).to(dt)
    dw2 = torch.mm(g2.t(), hp)
    del hp, pre
    dy2 = torch.mm(dpre, w1)
    dw1 = torch.mm(dpre.t(), y2)
    return nhwc_view(dy2, N, H, W), dw1, db1, *d_grn, dw2, db2, dres
