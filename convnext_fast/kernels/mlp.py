"""Triton kernels for ``mlp``: out = residual + gamma * (fc2(gelu_erf(fc1(y) + b1)) + b2).

Activations are NHWC (``[N, C, H, W]`` logically, channels-last memory), so ``y`` viewed as
``[M = N*H*W, C]`` is a row-major matrix; weights are nn.Linear ``fc1 [D, C]``, ``fc2 [C, D]``.

C in power-of-two chunks: Triton's block extents are powers of two, so the fused kernels hold C
as ``BLOCK_C0 + BLOCK_C1`` columns (:func:`gemm.split_channels`: 96 = 64 + 32, 192 = 128 + 64,
160 = 128 + 32, 80 = 64 + 16), each chunk its own operand tiles and fp32 accumulator, instead
of padding C to the next power of two (96 -> 128 cost a third more MMA work).

Forward, two paths (:func:`fused_path`: whether the fused tiles fit the GPU, C <= 256):

* ``fused``: :func:`_mlp_fwd_kernel`. A program owns ``BLOCK_M`` rows; it keeps the y tile and
  the fp32 ``[BLOCK_M, C]`` accumulator on chip and streams W1 and W2 in ``BLOCK_H``-wide hidden
  chunks (pipelined by the compiler over ``num_stages``): ``h = gelu(y @ W1[chunk]^T + b1)``
  never leaves the SM, ``acc += h @ W2[:, chunk]^T``; epilogue ``+ b2, * gamma, + residual``.
  Streaming the weights (rather than holding both matrices whole, 2 * 4C^2 elements = 576 KB at
  C=192) is what lets 128-row tiles fit shared memory at C=192 on sm_90
  (:func:`gemm.fused_smem_bytes` has the arithmetic). HBM traffic: read y (+ residual), write
  out, weights from L2.
* ``two_gemm`` (larger C): the fp32 accumulator ``[BLOCK_M, C]`` no longer fits in registers,
  and tiling the output C would recompute fc1 C / BLOCK_N times, whereas at these C the MLP is
  compute-bound even when the hidden round-trips HBM (arithmetic intensity ~C/2 FLOP/byte): two
  GEMMs with fused epilogues, fc1 + b1 + GELU -> hidden ``[M, D]``, then fc2 + b2 + gamma +
  residual.

Backward, :func:`mlp_bwd`. Saved for backward: ``y`` only (plus the parameters).

* ``fused`` (the same C): the hidden is recomputed and never stored. :func:`_mlp_bwd_dx_kernel`
  walks the hidden chunks per row tile like the forward (pre = y W1^T + b1, dh = (g gamma) W2,
  dpre = dh gelu'(pre), dy += dpre W1). :func:`_mlp_bwd_dw_kernel` owns one hidden chunk and a
  split of the rows, recomputes pre, h and dpre per row tile and accumulates its fp32 partials
  of dW1 = dpre^T y, G = g^T h and db1 on chip; the launcher sums the partials over the splits
  in a fixed order. 14 M C D multiply-adds instead of 10, no [M, D] tensor at all.
* ``two_gemm``: :func:`_mlp_bwd_recompute_kernel` stores ``h`` and ``dpre`` (two transient
  ``[M, D]`` tensors) and ``torch.mm`` does ``dy = dpre W1``, ``dW1 = dpre^T y``, ``G = g^T h``.

With gamma, :func:`_mlp_bwd_wgrad_kernel` turns the fp32 ``G`` into ``dW2 = gamma * G``,
``dgamma = sum_d W2 * G + b2 * sum_m g`` and ``db2 = gamma * sum_m g`` - dgamma without
recomputing the fc2 output. Every reduction is a fixed-order sum of per-tile or per-split
partials (no atomics): bit-identical reruns.

fp32 inputs run ``tl.dot`` on tensor cores with ``input_precision="tf32x3"`` (three TF32 MMAs,
about fp32 accuracy), or plain TF32 where the user allowed it for matmuls
(:func:`runtime.dot_precision`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import runtime
from .gemm import (FUSED_MAX_C, empty, fused_configs, gelu, gelu_grad, linear_fwd, mlp_bwd_tiles,
                   mma, row_tile_configs, split_channels)
from .runtime import TunedKernel, dot_precision, dot_upcast, fit_block

__all__ = ["mlp_fwd", "mlp_bwd", "fused_fwd", "bwd_fused", "fused_fits", "fused_path",
           "BWD_BLOCK_M"]

# Row tile of the two-GEMM backward's recompute kernel. Fixed (not autotuned) because it sizes
# the partial bias-gradient buffers that the launcher allocates. TODO(GPU): try 128 on H100.
BWD_BLOCK_M = 64


def _bwd_block_m(M: int) -> int:
    # the interpreter pays for padded rows: small problems get small tiles there
    return fit_block(M, (64, 32, 16)) if runtime.INTERPRET else BWD_BLOCK_M


_CL = torch.channels_last


# ----------------------------------------------------------------------------------------------
# helpers shared with mlp_grn

def rows2d(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N*H*W, C] view (a copy only when ``t`` is not channels-last)."""
    N, C, H, W = t.shape
    v = t.permute(0, 2, 3, 1).reshape(N * H * W, C)
    # the kernels assume unit column stride; reshape can return a strided view instead
    # (e.g. an NCHW-contiguous tensor with N == 1)
    return v if v.stride(1) == 1 or C == 1 else v.contiguous()


def out2d(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The [M, C] view of a caller-provided output, which must be channels-last contiguous."""
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(like.shape)} {like.dtype} on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous(memory_format=_CL):
        raise ValueError("out must be channels-last contiguous")
    return rows2d(out)  # a view: channels-last contiguous => unit column stride, no copy


def fwd_rows(y: torch.Tensor, residual: Optional[torch.Tensor], out: Optional[torch.Tensor]):
    """A forward launcher's tensors as the [M, C] matrices its kernels index: (out, out rows,
    y rows, residual rows or None), ``out`` allocated channels-last when None."""
    if out is None:
        out = torch.empty_like(y, memory_format=_CL)
    return out, out2d(out, y), rows2d(y), None if residual is None else rows2d(residual)


def nhwc_view(t2d: torch.Tensor, N: int, H: int, W: int) -> torch.Tensor:
    """[N*H*W, C] row-major -> [N, C, H, W] channels-last view of the same memory."""
    return t2d.view(N, H, W, t2d.shape[1]).permute(0, 3, 1, 2)


_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, never rounded to the half dtype in between: cuBLAS writes fp32 directly
    (``torch.mm(..., out_dtype=torch.float32)``, CUDA only); elsewhere (CPU interpreter tests, or
    a torch without it) the operands are upcast, which is exact but runs an fp32 GEMM."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


# ----------------------------------------------------------------------------------------------
# fused kernels: tile helpers

@triton.jit
def _rows_tile(P, rows64, rmask, stride, cols, C):
    """P[rows, cols] as a [len(rows), len(cols)] tile (0 outside M x C)."""
    return tl.load(P + rows64[:, None] * stride + cols[None, :],
                   mask=rmask[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def _w1_tile(W1, hh, hmask, cols, C):
    """W1[hh, cols] as [BLOCK_H, len(cols)] (W1 is [D, C])."""
    return tl.load(W1 + hh[:, None] * C + cols[None, :],
                   mask=hmask[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def _w2_tile(W2, hh, hmask, cols, C, D):
    """W2[cols, hh] as [len(cols), BLOCK_H] (W2 is [C, D])."""
    return tl.load(W2 + cols[:, None] * D + hh[None, :],
                   mask=(cols < C)[:, None] & hmask[None, :], other=0.0)


@triton.jit
def _vec(P, idx, n):
    return tl.load(P + idx, mask=idx < n, other=0.0).to(tl.float32)


@triton.jit
def _fwd_epilogue(acc, cols, C, rows64, rmask, B2, GAMMA, RES, OUT, stride_rm, stride_om,
                  HAS_B2: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_B2:
        acc += _vec(B2, cols, C)[None, :]
    if HAS_GAMMA:
        acc *= _vec(GAMMA, cols, C)[None, :]
    m = rmask[:, None] & (cols < C)[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows64[:, None] * stride_rm + cols[None, :], mask=m,
                       other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=m)


# ----------------------------------------------------------------------------------------------
# fused forward (mlp, and the second pass of mlp_grn)

@triton.jit
def _fc1_chunk(y_a, y_b, W1, hh, hmask, ca, cb, C, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_C1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """y @ W1[hh]^T as fp32 [BLOCK_M, BLOCK_H], over the one or two C chunks."""
    pre = mma(y_a, tl.trans(_w1_tile(W1, hh, hmask, ca, C)),
              tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32), PRECISION, UPCAST)
    if BLOCK_C1 > 0:
        pre = mma(y_b, tl.trans(_w1_tile(W1, hh, hmask, cb, C)), pre, PRECISION, UPCAST)
    return pre


@triton.jit
def _fc2_chunk(pre, acc_a, acc_b, W2, B1, SCALE, SHIFT, img, rmask, hh, hmask, ca, cb, C, D,
               dtype, HAS_B1: tl.constexpr, GRN: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_C1: tl.constexpr):
    """acc += gelu(pre + b1) (GRN-mapped for mlp_grn) @ W2[:, hh]^T, per C chunk."""
    if HAS_B1:
        pre += _vec(B1, hh, D)[None, :]
    h = gelu(pre)  # hidden columns past D: pre = 0 -> h = 0, and their W2 columns load as 0
    if GRN:
        # rounded to the input dtype first: what the unfused GRN (and its sums of squares,
        # taken by the first pass) sees
        s = tl.load(SCALE + img[:, None] * D + hh[None, :],
                    mask=rmask[:, None] & hmask[None, :], other=0.0)
        h = h.to(dtype).to(tl.float32) * s + _vec(SHIFT, hh, D)[None, :]
    h = h.to(W2.dtype.element_ty)
    acc_a = mma(h, tl.trans(_w2_tile(W2, hh, hmask, ca, C, D)), acc_a, PRECISION, UPCAST)
    if BLOCK_C1 > 0:
        acc_b = mma(h, tl.trans(_w2_tile(W2, hh, hmask, cb, C, D)), acc_b, PRECISION, UPCAST)
    return acc_a, acc_b


@triton.jit
def _mlp_fwd_kernel(
    Y, W1, B1, W2, B2, GAMMA, SCALE, SHIFT, RES, OUT,
    M, C, D, HW, stride_ym, stride_rm, stride_om,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_GAMMA: tl.constexpr, GRN: tl.constexpr,
    HAS_RES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[rows] for BLOCK_M rows; the hidden lives in registers one BLOCK_H chunk at a time.
    C is held as columns [0, BLOCK_C0) and [BLOCK_C0, BLOCK_C0 + BLOCK_C1) (BLOCK_C1 = 0: one
    chunk), each its own fp32 accumulator. GRN: h <- h * SCALE[image, :] + SHIFT (mlp_grn)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    img = (rows // HW).to(tl.int64)  # dead code without GRN
    ca = tl.arange(0, BLOCK_C0)
    y_a = _rows_tile(Y, rows64, rmask, stride_ym, ca, C)
    acc_a = tl.zeros([BLOCK_M, BLOCK_C0], dtype=tl.float32)
    # one C chunk: chunk b's names stand in for nothing (never read, removed by the compiler)
    cb, y_b, acc_b = ca, y_a, acc_a
    if BLOCK_C1 > 0:
        cb = BLOCK_C0 + tl.arange(0, BLOCK_C1)
        y_b = _rows_tile(Y, rows64, rmask, stride_ym, cb, C)
        acc_b = tl.zeros([BLOCK_M, BLOCK_C1], dtype=tl.float32)
    dt = OUT.dtype.element_ty

    for h0 in range(0, D, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < D
        pre = _fc1_chunk(y_a, y_b, W1, hh, hmask, ca, cb, C, PRECISION, UPCAST, BLOCK_C1,
                         BLOCK_M, BLOCK_H)
        acc_a, acc_b = _fc2_chunk(pre, acc_a, acc_b, W2, B1, SCALE, SHIFT, img, rmask, hh, hmask,
                                  ca, cb, C, D, dt, HAS_B1, GRN, PRECISION, UPCAST, BLOCK_C1)

    _fwd_epilogue(acc_a, ca, C, rows64, rmask, B2, GAMMA, RES, OUT, stride_rm, stride_om,
                  HAS_B2, HAS_GAMMA, HAS_RES)
    if BLOCK_C1 > 0:
        _fwd_epilogue(acc_b, cb, C, rows64, rmask, B2, GAMMA, RES, OUT, stride_rm, stride_om,
                      HAS_B2, HAS_GAMMA, HAS_RES)


def _fwd_heuristic(s: dict) -> dict:
    return {"BLOCK_M": fit_block(s["M"], (64, 32, 16)), "BLOCK_H": fit_block(s["D"])}


_MLP_FWD = TunedKernel(_mlp_fwd_kernel, fused_configs, key=["C", "D"], heuristic=_fwd_heuristic)


def fused_fits(C: int, itemsize: int, arch: int, backward: bool = False,
               grn: bool = False) -> bool:
    """Whether the fused forward (or both fused backward kernels; ``grn``: mlp_grn's) have a
    config for C at ``itemsize`` on a GPU of major capability ``arch``. The fused backward is
    for 16-bit inputs only: with fp32 operands the tf32x3 splits (a TF32 head and tail of every
    MMA operand) spill registers even at C = 40 (888 bytes per thread in an offline sm_90
    compile of the weight-gradient kernel), so fp32 backward takes the two-GEMM path."""
    if backward and itemsize != 2:
        return False
    c0, c1 = split_channels(C)
    kinds = ("bwd_dx", "bwd_dw") if backward else ("fwd",)
    return c0 + c1 <= FUSED_MAX_C and all(
        fused_configs(arch, {"KIND": k, "BLOCK_C0": c0, "BLOCK_C1": c1, "ITEMSIZE": itemsize,
                             "GRN": grn})
        for k in kinds)


def fused_path(C: int, itemsize: int, device: torch.device, backward: bool = False,
               grn: bool = False) -> bool:
    """:func:`fused_fits` on ``device``'s architecture; on the CPU interpreter on sm_90 and sm_80
    alike, so that the tests run the path both GPUs take."""
    arches = (torch.cuda.get_device_capability(device)[0],) if device.type == "cuda" else (9, 8)
    return all(fused_fits(C, itemsize, a, backward, grn) for a in arches)


def fused_fwd(y2: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], gamma: Optional[torch.Tensor], r2: Optional[torch.Tensor],
              o2: torch.Tensor, *, scale: Optional[torch.Tensor] = None,
              shift: Optional[torch.Tensor] = None, hw: int = 1) -> None:
    """Launch :func:`_mlp_fwd_kernel` on [M, C] row matrices (``o2`` written). ``scale`` [N, D]
    and ``shift`` [D] (fp32, both or neither) turn on the GRN mapping of the hidden, with
    ``hw`` rows per image."""
    M, C = y2.shape
    D = w1.shape[0]
    c0, c1 = split_channels(C)
    static = {"KIND": "fwd", "BLOCK_C0": c0, "BLOCK_C1": c1, "ITEMSIZE": y2.element_size(),
              "GRN": scale is not None}
    kernel, meta = _MLP_FWD.get(y2.device, static, M=M, D=D)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)  # noqa: E731
    dummy = w1  # stands in for absent optional inputs (never read, never an output)
    torch.library.wrap_triton(kernel)[grid](
        y2, w1, dummy if b1 is None else b1, w2, dummy if b2 is None else b2,
        dummy if gamma is None else gamma, dummy if scale is None else scale,
        dummy if shift is None else shift, dummy if r2 is None else r2, o2,
        M, C, D, hw, y2.stride(0), o2.stride(0) if r2 is None else r2.stride(0), o2.stride(0),
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_GAMMA=gamma is not None,
        GRN=scale is not None, HAS_RES=r2 is not None, PRECISION=dot_precision(y2.dtype, y2.device),
        UPCAST=dot_upcast(y2.dtype), BLOCK_C0=c0, BLOCK_C1=c1, **meta)


def mlp_fwd(y: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
            fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], out: Optional[torch.Tensor] = None, *,
            path: Optional[str] = None) -> torch.Tensor:
    """out = residual + gamma * (fc2(gelu(fc1(y) + b1)) + b2); same contract as reference.mlp.

    y, residual, out: [N, C, H, W] channels-last (``out`` is allocated when None, else written
    in place and returned; it must not alias an input, the GPU autotuner re-runs kernels);
    fc1_weight [D, C], fc2_weight [C, D]; biases, gamma, residual may be None. ``path``: None
    (automatic, :func:`fused_path`), ``"fused"`` or ``"two_gemm"``.
    """
    N, C, H, W = y.shape
    D = fc1_weight.shape[0]
    M = N * H * W
    out, o2, y2, r2 = fwd_rows(y, residual, out)
    if M == 0:
        return out
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()
    if path is None:
        path = "fused" if fused_path(C, y.element_size(), y.device) else "two_gemm"
    if path == "two_gemm":
        hidden = torch.empty((M, D), device=y.device, dtype=y.dtype)
        linear_fwd(y2, w1, fc1_bias, hidden, gelu_act=True)
        linear_fwd(hidden, w2, fc2_bias, o2, gamma=gamma, residual=r2)
    elif path == "fused":
        fused_fwd(y2, w1, fc1_bias, w2, fc2_bias, gamma, r2, o2)
    else:
        raise ValueError(f"path must be None, 'fused' or 'two_gemm', got {path!r}")
    return out


# ----------------------------------------------------------------------------------------------
# fused backward: the hidden recomputed, never stored

@triton.jit
def _grn_bwd_step(pre, dh, offs, m, shift, SCALE, COEF, dtype):
    """mlp_grn: from the fp32 pre-activation and dh' = g W2 (gradient w.r.t. h' = h S + grn_b),
    (dh = dh' S + coef h, h' in ``dtype``). S and coef are [N, D] per image, gathered at
    ``offs`` (image * D + hidden unit, any orientation); ``shift`` is grn_b broadcast alike."""
    s = tl.load(SCALE + offs, mask=m, other=0.0)
    coef = tl.load(COEF + offs, mask=m, other=0.0)
    h = gelu(pre).to(dtype).to(tl.float32)  # as the forward's GRN saw it
    return dh * s + coef * h, (h * s + shift).to(dtype)


@triton.jit
def _mlp_bwd_dx_kernel(
    Y, G, W1, B1, W2, GAMMA, SCALE, COEF, SHIFT, DY,
    M, C, D, HW, stride_ym, stride_gm,
    HAS_B1: tl.constexpr, HAS_GAMMA: tl.constexpr, GRN: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dy[rows] = sum over hidden chunks of dpre @ W1[chunk], dpre = ((g * gamma) @ W2[:, chunk])
    * gelu'(y @ W1[chunk]^T + b1) (GRN: the dh of :func:`_grn_bwd_step` in place of the first
    factor); DY is [M, C] contiguous."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    ca = tl.arange(0, BLOCK_C0)
    y_a = _rows_tile(Y, rows64, rmask, stride_ym, ca, C)
    g_a = _rows_tile(G, rows64, rmask, stride_gm, ca, C)
    if HAS_GAMMA:
        g_a = (g_a.to(tl.float32) * _vec(GAMMA, ca, C)[None, :]).to(Y.dtype.element_ty)
    dy_a = tl.zeros([BLOCK_M, BLOCK_C0], dtype=tl.float32)
    if BLOCK_C1 > 0:
        cb = BLOCK_C0 + tl.arange(0, BLOCK_C1)
        y_b = _rows_tile(Y, rows64, rmask, stride_ym, cb, C)
        g_b = _rows_tile(G, rows64, rmask, stride_gm, cb, C)
        if HAS_GAMMA:
            g_b = (g_b.to(tl.float32) * _vec(GAMMA, cb, C)[None, :]).to(Y.dtype.element_ty)
        dy_b = tl.zeros([BLOCK_M, BLOCK_C1], dtype=tl.float32)

    for h0 in range(0, D, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < D
        zero = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        w1_a = _w1_tile(W1, hh, hmask, ca, C)
        w2_a = _w2_tile(W2, hh, hmask, ca, C, D)
        pre = mma(y_a, tl.trans(w1_a), zero, PRECISION, UPCAST)
        dh = mma(g_a, w2_a, zero, PRECISION, UPCAST)
        if BLOCK_C1 > 0:
            w1_b = _w1_tile(W1, hh, hmask, cb, C)
            w2_b = _w2_tile(W2, hh, hmask, cb, C, D)
            pre = mma(y_b, tl.trans(w1_b), pre, PRECISION, UPCAST)
            dh = mma(g_b, w2_b, dh, PRECISION, UPCAST)
        if HAS_B1:
            pre += _vec(B1, hh, D)[None, :]
        if GRN:
            offs = (rows // HW).to(tl.int64)[:, None] * D + hh[None, :]
            dh, _ = _grn_bwd_step(pre, dh, offs, rmask[:, None] & hmask[None, :], 0.0, SCALE,
                                  COEF, Y.dtype.element_ty)
        # rounded to the input dtype as an unfused backward's dpre tensor would be
        dpre = (dh * gelu_grad(pre)).to(Y.dtype.element_ty)
        dy_a = mma(dpre, w1_a, dy_a, PRECISION, UPCAST)
        if BLOCK_C1 > 0:
            dy_b = mma(dpre, w1_b, dy_b, PRECISION, UPCAST)

    m_a = rmask[:, None] & (ca < C)[None, :]
    tl.store(DY + rows64[:, None] * C + ca[None, :], dy_a.to(DY.dtype.element_ty), mask=m_a)
    if BLOCK_C1 > 0:
        m_b = rmask[:, None] & (cb < C)[None, :]
        tl.store(DY + rows64[:, None] * C + cb[None, :], dy_b.to(DY.dtype.element_ty), mask=m_b)


@triton.jit
def _mlp_bwd_dw_kernel(
    Y, G, W1, B1, W2, GAMMA, SCALE, COEF, SHIFT, DW1P, GP, DB1P,
    M, C, D, HW, ROWS_PER_SPLIT, stride_ym, stride_gm,
    HAS_B1: tl.constexpr, HAS_GAMMA: tl.constexpr, GRN: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_C0: tl.constexpr, BLOCK_C1: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (j, s): hidden chunk j over the rows of split s, in BLOCK_M steps. Writes its
    fp32 partials DW1P[s, chunk, :] = dpre^T y, GP[s, :, chunk] = g^T h (G; dW2 = gamma * G;
    GRN: g^T h', dW2 itself) and DB1P[s, chunk] = sum dpre. The launcher sums the partials over
    s in a fixed order: no atomics, bit-identical reruns.

    Hidden-major: the program computes pre^T = W1[chunk] y^T and dh^T = (gamma W2[:, chunk])^T
    g^T as [BLOCK_H, BLOCK_M] from transposed loads of the y and g tiles, so that dW1 += dpre^T y
    and G^T += h^T g take the register tiles as they are, without transposing any of them."""
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < D
    ca = tl.arange(0, BLOCK_C0)
    # loop-invariant: this chunk's W1 rows and W2 columns as [BLOCK_H, C] tiles, gamma folded
    # into W2 (dh = g @ (gamma W2)) so that no scaled copy of each g tile is made
    w1_a = _w1_tile(W1, hh, hmask, ca, C)
    w2t_a = tl.trans(_w2_tile(W2, hh, hmask, ca, C, D))
    if HAS_GAMMA:
        w2t_a = (w2t_a.to(tl.float32) * _vec(GAMMA, ca, C)[None, :]).to(W2.dtype.element_ty)
    dw1_a = tl.zeros([BLOCK_H, BLOCK_C0], dtype=tl.float32)
    gt_a = tl.zeros([BLOCK_H, BLOCK_C0], dtype=tl.float32)
    if BLOCK_C1 > 0:
        cb = BLOCK_C0 + tl.arange(0, BLOCK_C1)
        w1_b = _w1_tile(W1, hh, hmask, cb, C)
        w2t_b = tl.trans(_w2_tile(W2, hh, hmask, cb, C, D))
        if HAS_GAMMA:
            w2t_b = (w2t_b.to(tl.float32) * _vec(GAMMA, cb, C)[None, :]).to(W2.dtype.element_ty)
        dw1_b = tl.zeros([BLOCK_H, BLOCK_C1], dtype=tl.float32)
        gt_b = tl.zeros([BLOCK_H, BLOCK_C1], dtype=tl.float32)
    if HAS_B1:
        b1 = _vec(B1, hh, D)
    if GRN:
        shift = _vec(SHIFT, hh, D)[:, None]
    db1 = tl.zeros([BLOCK_H], dtype=tl.float32)

    r_start = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, M)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < r_end
        rows64 = rows.to(tl.int64)
        zero = tl.zeros([BLOCK_H, BLOCK_M], dtype=tl.float32)
        # rows past r_end load as y = 0, g = 0: they add nothing to any sum below
        y_a = _rows_tile(Y, rows64, rmask, stride_ym, ca, C)
        g_a = _rows_tile(G, rows64, rmask, stride_gm, ca, C)
        pre = mma(w1_a, tl.trans(y_a), zero, PRECISION, UPCAST)
        dh = mma(w2t_a, tl.trans(g_a), zero, PRECISION, UPCAST)
        if BLOCK_C1 > 0:
            y_b = _rows_tile(Y, rows64, rmask, stride_ym, cb, C)
            g_b = _rows_tile(G, rows64, rmask, stride_gm, cb, C)
            pre = mma(w1_b, tl.trans(y_b), pre, PRECISION, UPCAST)
            dh = mma(w2t_b, tl.trans(g_b), dh, PRECISION, UPCAST)
        if HAS_B1:
            pre += b1[:, None]
        if GRN:
            offs = (rows // HW).to(tl.int64)[None, :] * D + hh[:, None]
            dh, h = _grn_bwd_step(pre, dh, offs, hmask[:, None] & rmask[None, :], shift, SCALE,
                                  COEF, Y.dtype.element_ty)
        else:
            h = gelu(pre).to(Y.dtype.element_ty)
        dpre = dh * gelu_grad(pre)
        db1 += tl.sum(dpre, axis=1)
        dpre = dpre.to(Y.dtype.element_ty)
        dw1_a = mma(dpre, y_a, dw1_a, PRECISION, UPCAST)
        gt_a = mma(h, g_a, gt_a, PRECISION, UPCAST)
        if BLOCK_C1 > 0:
            dw1_b = mma(dpre, y_b, dw1_b, PRECISION, UPCAST)
            gt_b = mma(h, g_b, gt_b, PRECISION, UPCAST)

    split64 = split.to(tl.int64)
    m_a = hmask[:, None] & (ca < C)[None, :]
    tl.store(DW1P + split64 * D * C + hh[:, None] * C + ca[None, :], dw1_a, mask=m_a)
    tl.store(GP + split64 * C * D + ca[None, :] * D + hh[:, None], gt_a, mask=m_a)
    if BLOCK_C1 > 0:
        m_b = hmask[:, None] & (cb < C)[None, :]
        tl.store(DW1P + split64 * D * C + hh[:, None] * C + cb[None, :], dw1_b, mask=m_b)
        tl.store(GP + split64 * C * D + cb[None, :] * D + hh[:, None], gt_b, mask=m_b)
    tl.store(DB1P + split64 * D + hh, db1, mask=hmask)


def _dx_heuristic(s: dict) -> dict:
    return {"BLOCK_M": fit_block(s["M"], (64, 32, 16)), "BLOCK_H": fit_block(s["D"])}


def _dw_heuristic(s: dict) -> dict:
    return {"BLOCK_M": fit_block(min(s["M"], _INTERP_ROWS_PER_SPLIT), (64, 32, 16)),
            "BLOCK_H": fit_block(s["D"])}


_MLP_BWD_DX = TunedKernel(_mlp_bwd_dx_kernel, fused_configs, key=["C", "D"],
                          heuristic=_dx_heuristic)
_MLP_BWD_DW = TunedKernel(_mlp_bwd_dw_kernel, fused_configs, key=["C", "D"],
                          heuristic=_dw_heuristic)

# Rows per split of the weight-gradient kernel: on a GPU sized for about two waves of programs at
# BLOCK_H = 64 (a multiple of every BLOCK_M); under the interpreter small, so that the tests sum
# several partials.
_INTERP_ROWS_PER_SPLIT = 64


def _row_splits(M: int, D: int, device: torch.device) -> int:
    """Rows per split of :func:`_mlp_bwd_dw_kernel`; the split count is ceil(M / that)."""
    if device.type != "cuda":
        return _INTERP_ROWS_PER_SPLIT
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = max(1, 2 * sms * 64 // D)
    return max(128, triton.cdiv(triton.cdiv(M, target), 128) * 128)


def bwd_fused(g2, y2, w1, b1, w2, gamma, *, scale=None, coef=None, shift=None, hw=1):
    """The fused backward on [M, C] row matrices: (dy [M, C], dW1, db1 fp32 [D], G fp32 [C, D],
    sum g fp32 [C]), G = g^T h (dW2 = gamma * G, or G itself without gamma). ``scale``, ``coef``
    [N, D] and ``shift`` [D] (fp32, all or none) make it mlp_grn's, ``hw`` rows per image: then
    G = g^T h' and the rows' dh = dh' S + coef h."""
    M, C = y2.shape
    D = w1.shape[0]
    dt, dev = y2.dtype, y2.device
    c0, c1 = split_channels(C)
    common = dict(HAS_B1=b1 is not None, HAS_GAMMA=gamma is not None, GRN=scale is not None,
                  PRECISION=dot_precision(dt, dev), UPCAST=dot_upcast(dt), BLOCK_C0=c0, BLOCK_C1=c1)
    static = {"BLOCK_C0": c0, "BLOCK_C1": c1, "ITEMSIZE": y2.element_size(),
              "GRN": scale is not None}
    dummy = w1  # stands in for absent optional inputs (never read, never an output)
    opt = [dummy if t is None else t for t in (b1, w2, gamma, scale, coef, shift)]

    dy2 = empty((M, C), dt, dev)
    kernel, meta = _MLP_BWD_DX.get(dev, {**static, "KIND": "bwd_dx"}, M=M, D=D)
    torch.library.wrap_triton(kernel)[lambda META: (triton.cdiv(M, META["BLOCK_M"]),)](
        y2, g2, w1, *opt, dy2, M, C, D, hw, y2.stride(0), g2.stride(0), **common, **meta)

    rps = _row_splits(M, D, dev)
    S = triton.cdiv(M, rps)
    dw1p = empty((S, D, C), torch.float32, dev)
    gp = empty((S, C, D), torch.float32, dev)
    db1p = empty((S, D), torch.float32, dev)
    kernel, meta = _MLP_BWD_DW.get(dev, {**static, "KIND": "bwd_dw"}, M=M, D=D)
    torch.library.wrap_triton(kernel)[lambda META: (triton.cdiv(D, META["BLOCK_H"]), S)](
        y2, g2, w1, *opt, dw1p, gp, db1p, M, C, D, hw, rps, y2.stride(0), g2.stride(0),
        **common, **meta)
    # sum g (db2, dgamma): one more read of g, a deterministic torch reduction
    return dy2, dw1p.sum(0).to(dt), db1p.sum(0), gp.sum(0), g2.sum(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# two-GEMM backward (C past the fused kernels): the hidden through HBM

@triton.jit
def _mlp_bwd_recompute_kernel(
    Y, G, W1, B1, W2, GAMMA, H, DPRE, DB1P, SGP,
    M, C, D, stride_ym, stride_gm,
    HAS_B1: tl.constexpr, HAS_GAMMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    # column sums of g for db2 / dgamma: one partial per row tile, from the programs of chunk 0
    pre, dh = mlp_bwd_tiles(Y, G, W1, W2, GAMMA, SGP + pid_m * C, rows64, rmask, dd, dmask, C, D,
                            stride_ym, stride_gm, pid_d == 0, HAS_GAMMA, PRECISION, UPCAST,
                            BLOCK_M, BLOCK_D, BLOCK_K)

    if HAS_B1:
        pre += tl.load(B1 + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    h = gelu(pre)
    dpre = tl.where(rmask[:, None], dh * gelu_grad(pre), 0.0)
    omask = rmask[:, None] & dmask[None, :]
    offs = rows64[:, None] * D + dd[None, :]
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=omask)
    tl.store(DPRE + offs, dpre.to(DPRE.dtype.element_ty), mask=omask)
    tl.store(DB1P + pid_m * D + dd, tl.sum(dpre, axis=0), mask=dmask)


def _bwd_configs(arch: int, static: dict) -> List["triton.Config"]:
    return row_tile_configs(arch, static["BLOCK_M"], 2, static["ITEMSIZE"])


_MLP_BWD = TunedKernel(_mlp_bwd_recompute_kernel, _bwd_configs, key=["C", "D", "BLOCK_M"],
                       heuristic=lambda s: {"BLOCK_D": fit_block(s["D"]),
                                            "BLOCK_K": fit_block(s["C"], (64, 32, 16))})


def _bwd_two_gemm(g2, y2, w1, b1, w2, gamma):
    """As :func:`bwd_fused`, with G as dW2 itself (input dtype) when there is no gamma."""
    M, C = y2.shape
    D = w1.shape[0]
    dt, dev = y2.dtype, y2.device
    bm = _bwd_block_m(M)
    T = triton.cdiv(M, bm)
    h = empty((M, D), dt, dev)
    dpre = empty((M, D), dt, dev)
    db1p = empty((T, D), torch.float32, dev)
    sgp = empty((T, C), torch.float32, dev)
    kernel, meta = _MLP_BWD.get(dev, {"BLOCK_M": bm, "ITEMSIZE": y2.element_size()}, C=C, D=D)
    grid = lambda META: (T, triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
    torch.library.wrap_triton(kernel)[grid](
        y2, g2, w1, w1 if b1 is None else b1, w2, w1 if gamma is None else gamma,
        h, dpre, db1p, sgp, M, C, D, y2.stride(0), g2.stride(0),
        HAS_B1=b1 is not None, HAS_GAMMA=gamma is not None,
        PRECISION=dot_precision(dt, dev), UPCAST=dot_upcast(dt), BLOCK_M=bm, **meta)
    gm = torch.mm(g2.t(), h) if gamma is None else mm_f32(g2.t(), h)
    del h
    return torch.mm(dpre, w1), torch.mm(dpre.t(), y2), db1p.sum(0), gm, sgp.sum(0)


@triton.jit
def _mlp_bwd_wgrad_kernel(
    GM, W2, GAMMA, B2, SG, DW2, DGAMMA, DB2, C, D,
    HAS_B2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dW2 = gamma * G; dgamma = sum_d W2 * G + b2 * sg; db2 = gamma * sg  (G = g^T h, fp32)."""
    pid = tl.program_id(0)
    cc = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    cc64 = cc.to(tl.int64)
    gamma = tl.load(GAMMA + cc, mask=cmask, other=0.0).to(tl.float32)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = cmask[:, None] & (dd < D)[None, :]
        offs = cc64[:, None] * D + dd[None, :]
        gm = tl.load(GM + offs, mask=m, other=0.0).to(tl.float32)
        w2 = tl.load(W2 + offs, mask=m, other=0.0).to(tl.float32)
        dg += tl.sum(w2 * gm, axis=1)
        tl.store(DW2 + offs, (gm * gamma[:, None]).to(DW2.dtype.element_ty), mask=m)
    sg = tl.load(SG + cc, mask=cmask, other=0.0)
    if HAS_B2:
        dg += tl.load(B2 + cc, mask=cmask, other=0.0).to(tl.float32) * sg
        tl.store(DB2 + cc, (gamma * sg).to(DB2.dtype.element_ty), mask=cmask)
    tl.store(DGAMMA + cc, dg.to(DGAMMA.dtype.element_ty), mask=cmask)


def mlp_bwd(grad_out: torch.Tensor, y: torch.Tensor, fc1_weight: torch.Tensor,
            fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
            fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor], has_residual: bool,
            *, path: Optional[str] = None):
    """Gradients of :func:`mlp_fwd` from ``y`` alone (the hidden activation is recomputed).

    Returns ``(dy, d_fc1_weight, d_fc1_bias | None, d_fc2_weight, d_fc2_bias | None,
    d_gamma | None, d_residual | None)``; ``dy`` is channels-last; ``d_residual`` is
    ``grad_out`` itself. ``path``: None (automatic, :func:`fused_path`), ``"fused"`` (the hidden
    never leaves the chip) or ``"two_gemm"``. Deterministic: no atomics, fixed reduction order.
    """
    N, C, H, W = y.shape
    D = fc1_weight.shape[0]
    M = N * H * W
    dt, dev = y.dtype, y.device
    grad_out = grad_out.contiguous(memory_format=_CL)
    g2 = rows2d(grad_out)
    y2 = rows2d(y)
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()
    dres = grad_out if has_residual else None
    if M == 0:
        zeros = lambda *s: torch.zeros(s, device=dev, dtype=dt)  # noqa: E731
        dy2, dw1, db1f = zeros(0, C), zeros(D, C), zeros(D).float()
        gm, sg = (zeros(C, D).float() if gamma is not None else zeros(C, D)), zeros(C).float()
    else:
        if path is None:
            path = "fused" if fused_path(C, y.element_size(), dev, backward=True) else "two_gemm"
        if path == "fused":
            dy2, dw1, db1f, gm, sg = bwd_fused(g2, y2, w1, fc1_bias, w2, gamma)
            gm = gm if gamma is not None else gm.to(dt)
        elif path == "two_gemm":
            dy2, dw1, db1f, gm, sg = _bwd_two_gemm(g2, y2, w1, fc1_bias, w2, gamma)
        else:
            raise ValueError(f"path must be None, 'fused' or 'two_gemm', got {path!r}")
    db1 = None if fc1_bias is None else db1f.to(dt)

    if gamma is None:
        dw2, dgamma = gm, None
        db2 = None if fc2_bias is None else sg.to(dt)
    else:
        dw2 = empty((C, D), dt, dev)
        dgamma = empty((C,), dt, dev)
        db2 = empty((C,), dt, dev)
        block_c = 64 if runtime.INTERPRET else 32
        torch.library.wrap_triton(_mlp_bwd_wgrad_kernel)[(triton.cdiv(C, block_c),)](
            gm, w2, gamma, gamma if fc2_bias is None else fc2_bias, sg, dw2, dgamma, db2, C, D,
            HAS_B2=fc2_bias is not None, BLOCK_C=block_c, BLOCK_D=128)
        if fc2_bias is None:
            db2 = None
    return nhwc_view(dy2, N, H, W), dw1, db1, dw2, db2, dgamma, dres
