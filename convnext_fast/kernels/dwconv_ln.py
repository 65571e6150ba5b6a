"""Triton kernels for ``dwconv_ln``: depthwise kxk conv (+ bias) fused with LayerNorm over C.

Layout: x, y, grad_y, dx are logically [N, C, H, W] and physically NHWC (``channels_last``), so
viewed as a row-major [P = N*H*W, C] matrix. A pixel p = (n*H + h)*W + w; its tap (dh, dw)
neighbour is pixel p + dh*W + dw when (h+dh, w+dw) lies inside the image (zero padding
otherwise), so the conv is k*k shifted, masked, C-contiguous (coalesced) tile loads.

Forward ``_dwconv_ln_fwd_kernel`` (grid: P / BLOCK_P programs, 1-D)
    A program owns BLOCK_P consecutive pixels (they may span image rows; each pixel masks its
    own taps) x all of C, walked in BLOCK_C chunks (BLOCK_P * BLOCK_C = TILE elements).
    * C <= 1024 (ONE_CHUNK): the whole fp32 conv row lives in registers: conv, mean, centred
      variance (two-pass in registers), normalise, store. x is read once.
    * C > 1024: pass 1 convolves chunk by chunk and merges per-chunk (count, mean, M2) with
      Chan's parallel formula (numerically like Welford, no sum/sum-of-squares cancellation);
      pass 2 *recomputes* the conv chunk by chunk and normalises. Why recompute instead of
      stashing z: y has the input dtype (stashing z there would round it to bf16/fp16 before
      normalising), an fp32 scratch would add a full [P, C] fp32 write + read to HBM, whereas the
      re-read x neighbourhood (k rows x (BLOCK_P + k - 1) pixels x C) was touched moments ago by
      the same program and is served from L1/L2; the extra k*k FMAs per element are cheap next
      to the memory traffic of this op.
    Saves (for backward) only mean and rstd, [N, H, W] fp32; the conv output is never stored.

Backward, two kernels, no float atomics (deterministic for a given launch configuration):
    ``_dwconv_ln_bwd_dz_kernel`` (same tiling as the forward): recomputes z = conv(x) + b,
        xhat = (z - mean) * rstd, g = grad_y * ln_w and writes
        dz = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)) as an fp32 [P, C] scratch.
        For C > 1024 pass 1 stashes z in the dz buffer (exact fp32, this program's own rows)
        and pass 2 reads it back and overwrites it with dz.
    ``_dwconv_ln_bwd_dx_kernel`` (grid: pixel groups x C chunks): a program owns
        PIX_PER_PROG consecutive pixels x BLOCK_C channels and walks them in BLOCK_P tiles.
        Pass A: dx = sum_taps w[tap] * dz[p - tap] (correlation with the flipped kernel), and
        recomputes z to accumulate grad_y * xhat, grad_y and dz over its pixels.
        Pass B: for each tap, sum over its pixels of dz[p] * x[p + tap] (d conv_w).
        Per-program sums go to a [groups, k*k + 3, C] fp32 buffer that torch.sum reduces.
        Both passes loop over taps at run time (unrolled, the live loads and weights of k*k
        taps spill registers); the program's footprint is small, so re-reads are cache hits.

Determinism: every reduction has a fixed order for a given launch configuration (BLOCK_*, TILE,
num_warps, PIX_PER_PROG); the autotuner fixes the configuration once per key and process, so
results are bit-identical run to run (across processes only with CONVNEXT_FAST_TRITON_AUTOTUNE=0
or the same tuning outcome).

Registers (ptxas for sm_90, triton 3.8, C % 16 == 0): 60-160 per thread for every config in
_TILE_CONFIGS at k = 7, no spills, up to C = 3072.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import next_pow2

__all__ = ["dwconv_ln_fwd", "dwconv_ln_bwd", "MAX_K", "AUTOTUNE"]

# Largest kernel size accepted. Any odd k works (the forward unrolls its k*k taps, so compile time
# grows as k*k); ConvNeXt uses 7.
MAX_K = 15
# C up to this many channels is handled in one register-resident chunk; above it, C is looped
# over in MULTI_BLOCK_C chunks with two passes.
MAX_ONE_CHUNK = 1024
MULTI_BLOCK_C = 512


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
# Addressing: a tile's pointers are a *scalar* base (int64 element offset of its first pixel,
# plus a tap's scalar offset (dh*W + dw)*C) plus one int32 tile-local offset tensor shared by all
# taps. Per-element 64-bit pointers per tap would cost registers (and spills) for nothing.
@triton.jit
def _dwconv_row(acc, XT, WB, offs, h, w, pmask, cmask, H, W, C, kh, K: tl.constexpr):
    """acc += the K taps of kernel row kh (columns unrolled)."""
    PAD: tl.constexpr = K // 2
    ih = h + (kh - PAD)
    hok = pmask & (ih >= 0) & (ih < H)
    cm = cmask[None, :]
    for kw in tl.static_range(K):
        iw = w + (kw - PAD)
        ok = hok & (iw >= 0) & (iw < W)
        xv = tl.load(XT + ((kh - PAD) * W + (kw - PAD)) * C + offs, mask=ok[:, None] & cm,
                     other=0.0)
        wv = tl.load(WB + (kh * K + kw) * C, mask=cmask, other=0.0)
        acc += xv.to(tl.float32) * wv[None, :]
    return acc


@triton.jit
def _dwconv_tile(XT, WB, offs, h, w, pmask, cmask, H, W, C,
                 K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                 UNROLL_ROWS: tl.constexpr):
    """fp32 [BLOCK_P, BLOCK_C] depthwise conv (no bias) of a tile; 0 where masked.

    XT: scalar pointer to the tile's first element; offs: [BLOCK_P, BLOCK_C] int32 tile-local
    element offsets (pixel * C + channel); WB: [BLOCK_C] pointers into the [K*K, C] fp32 taps
    (row t = kh*K + kw). Kernel columns are always unrolled; kernel rows too when UNROLL_ROWS
    (all k*k loads in flight), else a runtime loop (k times less code, for the C-chunked paths,
    which inline this twice).
    """
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if UNROLL_ROWS:
        for kh in tl.static_range(K):
            acc = _dwconv_row(acc, XT, WB, offs, h, w, pmask, cmask, H, W, C, kh, K)
    else:
        for kh in range(0, K):
            acc = _dwconv_row(acc, XT, WB, offs, h, w, pmask, cmask, H, W, C, kh, K)
    return acc


@triton.jit
def _pixel_coords(p, H, W):
    hw = p % (H * W)
    return hw // W, hw % W


@triton.jit
def _pixel_tile(P, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The forward and the dz kernel tile alike: BLOCK_P consecutive pixels x all of C per
    program. Returns the pixels, their mask and coordinates, the int64 element offset of the
    first one and the int32 tile-local offsets (see above)."""
    pid = tl.program_id(0)
    pl = tl.arange(0, BLOCK_P)
    p = pid * BLOCK_P + pl
    pmask = p < P
    h, w = _pixel_coords(p, H, W)
    tbase = pid.to(tl.int64) * BLOCK_P * C
    cr = tl.arange(0, BLOCK_C)
    offs = (pl * C)[:, None] + cr[None, :]
    return p, pmask, h, w, tbase, cr, offs


@triton.jit
def _conv_chunk(XT, WT, CB, c0, cr, offs, h, w, pmask, H, W, C,
                K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_C: tl.constexpr, UNROLL_ROWS: tl.constexpr):
    """z = conv(x) + conv_b on channels [c0, c0 + BLOCK_C) of a pixel tile, with the channel and
    element masks. z is never stored by the forward, so every pass that needs it recomputes it
    here, the same way each time."""
    cmask = c0 + cr < C
    m2 = pmask[:, None] & cmask[None, :]
    z = _dwconv_tile(XT + c0, WT + c0 + cr, offs, h, w, pmask, cmask, H, W, C, K, BLOCK_P,
                     BLOCK_C, UNROLL_ROWS)
    if HAS_BIAS:
        z += tl.load(CB + c0 + cr, mask=cmask, other=0.0)[None, :]
    return z, cmask, m2


@triton.jit
def _ln_grad_terms(GYT, LNW, c0, cr, offs, cmask, m2, z, mean, rstd):
    """xhat and g = grad_y * ln_w on a channel chunk (fp32; xhat 0 where masked). The chunked
    path forms them twice per chunk, for the sums and then for dz: one definition keeps the two
    consistent."""
    xhat = tl.where(m2, (z - mean[:, None]) * rstd[:, None], 0.0)
    lw = tl.load(LNW + c0 + cr, mask=cmask, other=0.0).to(tl.float32)
    gy = tl.load(GYT + c0 + offs, mask=m2, other=0.0).to(tl.float32)
    return xhat, gy * lw[None, :]


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["P", "H", "W"])
def _dwconv_ln_fwd_kernel(
    X, WT, CB, LNW, LNB, Y, MEAN, RSTD,
    P, H, W, C_V, eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
    CV: tl.constexpr, TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    C = C_V * CV  # C = C_V * CV: the compiler then knows rows are CV-aligned (vector loads)
    p, pmask, h, w, tbase, cr, offs = _pixel_tile(P, H, W, C, BLOCK_P, BLOCK_C)
    XT = X + tbase
    YT = Y + tbase
    if ONE_CHUNK:
        z, cmask, m2 = _conv_chunk(XT, WT, CB, 0, cr, offs, h, w, pmask, H, W, C, K, HAS_BIAS,
                                   BLOCK_P, BLOCK_C, True)
        z = tl.where(m2, z, 0.0)
        mean = tl.sum(z, axis=1) / C
        d = tl.where(m2, z - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        rstd = tl.rsqrt(var + eps)
        lw = tl.load(LNW + cr, mask=cmask, other=0.0).to(tl.float32)
        lb = tl.load(LNB + cr, mask=cmask, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * lw[None, :] + lb[None, :]
        tl.store(YT + offs, y.to(Y.dtype.element_ty), mask=m2)
    else:
        # pass 1: per-pixel (mean, M2) merged over C chunks (Chan et al.)
        mean = tl.zeros([BLOCK_P], dtype=tl.float32)
        m2acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        n_a = tl.zeros([BLOCK_P], dtype=tl.float32)  # channels merged so far
        for c0 in range(0, C, BLOCK_C):
            z, cmask, m2 = _conv_chunk(XT, WT, CB, c0, cr, offs, h, w, pmask, H, W, C, K,
                                       HAS_BIAS, BLOCK_P, BLOCK_C, False)
            n_b = tl.sum(cmask.to(tl.float32), axis=0)  # channels in this chunk
            mean_b = tl.sum(tl.where(m2, z, 0.0), axis=1) / n_b
            d = tl.where(m2, z - mean_b[:, None], 0.0)
            m2_b = tl.sum(d * d, axis=1)
            n = n_a + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n)
            m2acc = m2acc + m2_b + delta * delta * (n_a * n_b / n)
            n_a = n
        rstd = tl.rsqrt(m2acc / C + eps)
        # pass 2: recompute the conv (see module docstring) and normalise
        for c0 in range(0, C, BLOCK_C):
            z, cmask, m2 = _conv_chunk(XT, WT, CB, c0, cr, offs, h, w, pmask, H, W, C, K,
                                       HAS_BIAS, BLOCK_P, BLOCK_C, False)
            lw = tl.load(LNW + c0 + cr, mask=cmask, other=0.0).to(tl.float32)
            lb = tl.load(LNB + c0 + cr, mask=cmask, other=0.0).to(tl.float32)
            y = (z - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
            tl.store(YT + c0 + offs, y.to(Y.dtype.element_ty), mask=m2)
    tl.store(MEAN + p, mean, mask=pmask)
    tl.store(RSTD + p, rstd, mask=pmask)


# ----------------------------------------------------------------------------------------------
# backward 1: dz (fp32 scratch)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["P", "H", "W"])
def _dwconv_ln_bwd_dz_kernel(
    X, GY, WT, CB, LNW, MEAN, RSTD, DZ,
    P, H, W, C_V,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
    CV: tl.constexpr, TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    C = C_V * CV
    p, pmask, h, w, tbase, cr, offs = _pixel_tile(P, H, W, C, BLOCK_P, BLOCK_C)
    XT = X + tbase
    GYT = GY + tbase
    DZT = DZ + tbase
    mean = tl.load(MEAN + p, mask=pmask, other=0.0)
    rstd = tl.load(RSTD + p, mask=pmask, other=0.0)
    if ONE_CHUNK:
        z, cmask, m2 = _conv_chunk(XT, WT, CB, 0, cr, offs, h, w, pmask, H, W, C, K, HAS_BIAS,
                                   BLOCK_P, BLOCK_C, True)
        xhat, g = _ln_grad_terms(GYT, LNW, 0, cr, offs, cmask, m2, z, mean, rstd)
        s1 = tl.sum(g, axis=1) / C
        s2 = tl.sum(g * xhat, axis=1) / C
        dz = rstd[:, None] * (g - s1[:, None] - xhat * s2[:, None])
        tl.store(DZT + offs, dz, mask=m2)
    else:
        # pass 1: z into the dz buffer (exact fp32), per-pixel sums of g and g * xhat
        s1 = tl.zeros([BLOCK_P], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            z, cmask, m2 = _conv_chunk(XT, WT, CB, c0, cr, offs, h, w, pmask, H, W, C, K,
                                       HAS_BIAS, BLOCK_P, BLOCK_C, False)
            tl.store(DZT + c0 + offs, z, mask=m2)
            xhat, g = _ln_grad_terms(GYT, LNW, c0, cr, offs, cmask, m2, z, mean, rstd)
            s1 += tl.sum(g, axis=1)
            s2 += tl.sum(g * xhat, axis=1)
        s1 = s1 / C
        s2 = s2 / C
        # the stashed z elements were written by other threads of this program
        tl.debug_barrier()
        # pass 2: read z back, overwrite with dz
        for c0 in range(0, C, BLOCK_C):
            cmask = c0 + cr < C
            m2 = pmask[:, None] & cmask[None, :]
            z = tl.load(DZT + c0 + offs, mask=m2, other=0.0)
            xhat, g = _ln_grad_terms(GYT, LNW, c0, cr, offs, cmask, m2, z, mean, rstd)
            dz = rstd[:, None] * (g - s1[:, None] - xhat * s2[:, None])
            tl.store(DZT + c0 + offs, dz, mask=m2)


# ----------------------------------------------------------------------------------------------
# backward 2: dx, and per-program partial sums for d conv_w, d ln_w, d ln_b, d conv_b
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["P", "H", "W", "PIX_PER_PROG"])
def _dwconv_ln_bwd_dx_kernel(
    X, GY, DZ, WT, CB, MEAN, RSTD, DX, PART,
    P, H, W, C_V, PIX_PER_PROG,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, CV: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    C = C_V * CV
    PAD: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    grp = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cm = cmask[None, :]
    pl = tl.arange(0, BLOCK_P)
    offs = (pl * C)[:, None] + c[None, :]  # tile-local; a tile's base is its first pixel
    start = grp * PIX_PER_PROG
    end = tl.minimum(start + PIX_PER_PROG, P)
    n_tiles = tl.cdiv(end - start, BLOCK_P)
    if HAS_BIAS:
        cb = tl.load(CB + c, mask=cmask, other=0.0)
    # per-channel sums, reduced over each tile's pixels as it goes ([BLOCK_C], few registers)
    acc_lnw = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_lnb = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    # pass A: dx for each tile; z recomputed for xhat
    for i in range(0, n_tiles):
        p0 = start + i * BLOCK_P
        p = p0 + pl
        pmask = p < end
        h, w = _pixel_coords(p, H, W)
        m2 = pmask[:, None] & cm
        tbase = p0.to(tl.int64) * C
        XT = X + tbase
        DZT = DZ + tbase
        z = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        dxa = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        # a runtime loop over the k*k taps (unrolling keeps 2 tile loads + a weight vector per
        # tap live at once: register spills; the tile's taps are L1/L2 hits anyway)
        for t in range(0, KK):
            dh = t // K - PAD
            dw = t % K - PAD
            tap = (dh * W + dw) * C  # element offset of tap (dh, dw)
            wv = tl.load(WT + t * C + c, mask=cmask, other=0.0)[None, :]
            ok = pmask & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            xv = tl.load(XT + tap + offs, mask=ok[:, None] & cm, other=0.0)
            z += xv.to(tl.float32) * wv
            ok_t = pmask & (h - dh >= 0) & (h - dh < H) & (w - dw >= 0) & (w - dw < W)
            dzv = tl.load(DZT - tap + offs, mask=ok_t[:, None] & cm, other=0.0)
            dxa += dzv * wv
        tl.store(DX + tbase + offs, dxa.to(DX.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            z += cb[None, :]
        mean = tl.load(MEAN + p, mask=pmask, other=0.0)
        rstd = tl.load(RSTD + p, mask=pmask, other=0.0)
        xhat = (z - mean[:, None]) * rstd[:, None]
        gy = tl.load(GY + tbase + offs, mask=m2, other=0.0).to(tl.float32)
        acc_lnw += tl.sum(tl.where(m2, gy * xhat, 0.0), axis=0)
        acc_lnb += tl.sum(gy, axis=0)
        acc_db += tl.sum(tl.load(DZT + offs, mask=m2, other=0.0), axis=0)
    prow = PART + grp.to(tl.int64) * ((KK + 3) * C) + c
    tl.store(prow + KK * C, acc_lnw, mask=cmask)
    tl.store(prow + (KK + 1) * C, acc_lnb, mask=cmask)
    tl.store(prow + (KK + 2) * C, acc_db, mask=cmask)
    # pass B: d conv_w[tap] = sum_p dz[p] * x[p + tap], one tap at a time over this program's
    # pixels (re-reads hit L1/L2: the program's footprint is PIX_PER_PROG x BLOCK_C)
    # (a runtime tap loop: unrolling k*k copies of the pixel loop only bloats the code)
    for t in range(0, KK):
        dh = t // K - PAD
        dw = t % K - PAD
        tap = (dh * W + dw) * C
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for i in range(0, n_tiles):
            p0 = start + i * BLOCK_P
            p = p0 + pl
            pmask = p < end
            h, w = _pixel_coords(p, H, W)
            ok = pmask & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            m2 = ok[:, None] & cm
            tbase = p0.to(tl.int64) * C
            dzc = tl.load(DZ + tbase + offs, mask=m2, other=0.0)
            xv = tl.load(X + tbase + tap + offs, mask=m2, other=0.0)
            acc += dzc * xv.to(tl.float32)
        tl.store(prow + t * C, tl.sum(acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
# Read once, so that the tuned kernels below exist exactly when the launchers use them (the tests
# switch it off per test).
AUTOTUNE = runtime.autotune_enabled()

# TILE = BLOCK_P * BLOCK_C elements per tile (BLOCK_C is fixed by C, see _ln_chunking), so a
# config sets the tile size and the warps; num_stages=1: no tl.dot here, nothing to pipeline.
# At most 16 fp32 elements of a tile per thread (more spills registers at k = 7).
_TILE_CONFIGS = [triton.Config({"TILE": t}, num_warps=nw, num_stages=1)
                 for t, nw in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]
# heuristic defaults (no autotuning): GPU / interpreter (large tiles = few interpreted programs)
_GPU_TILE, _GPU_WARPS = 2048, 4
_INTERP_TILE = 65536

if AUTOTUNE:
    _fwd_tuned = triton.autotune(configs=_TILE_CONFIGS, key=["C_V", "CV", "K", "BLOCK_C"])(
        _dwconv_ln_fwd_kernel)
    _bwd_dz_tuned = triton.autotune(configs=_TILE_CONFIGS, key=["C_V", "CV", "K", "BLOCK_C"])(
        _dwconv_ln_bwd_dz_kernel)
    _bwd_dx_tuned = triton.autotune(configs=_TILE_CONFIGS, key=["C_V", "CV", "K", "BLOCK_C"])(
        _dwconv_ln_bwd_dx_kernel)
else:
    _fwd_tuned = _bwd_dz_tuned = _bwd_dx_tuned = None


def _ln_chunking(C) -> Tuple[int, bool]:
    """(BLOCK_C, ONE_CHUNK) for the kernels that reduce over C."""
    c2 = next_pow2(C)
    if c2 <= MAX_ONE_CHUNK:
        return c2, True
    # interpreter: fewer, larger chunks (C = 1100, 1536 still get a ragged last one)
    return (2 * MULTI_BLOCK_C if runtime.INTERPRET else MULTI_BLOCK_C), False


def _dx_block_c(C) -> int:
    """BLOCK_C of the dx/dw kernel (no reduction over C there: small chunks, many programs)."""
    if runtime.INTERPRET:  # few, large interpreted programs; C > 1024 still gets several chunks
        return min(next_pow2(C), 1024)
    for b in (64, 32, 16, 8):
        if C % b == 0:
            return b
    return min(next_pow2(C), 64)


def _pix_per_prog(P, n_cblocks) -> int:
    """Pixels per program of the dx/dw kernel: long enough that the [groups, k*k+3, C] partial
    buffer stays small next to dz, short enough for >= ~512 programs (GPU heuristic)."""
    if runtime.INTERPRET:
        # two groups (the 2nd ragged when P is odd): the partial reduction is tested
        return max(1, triton.cdiv(P, 2))
    r = 1024
    while r > 256 and triton.cdiv(P, r) * n_cblocks < 512:
        r //= 2
    return r


def _tile_meta(block_c: int, pix_per_prog: Optional[int] = None):
    """Launch meta for the untuned path. Interpreted, the cost is per operation, not per element:
    large tiles, except that a dx/dw program (``pix_per_prog`` given) walks ~2 tiles so its tile
    loop is exercised."""
    if runtime.INTERPRET:
        if pix_per_prog is not None:
            return dict(TILE=block_c * next_pow2(triton.cdiv(pix_per_prog, 2)), num_warps=4)
        return dict(TILE=max(_INTERP_TILE, block_c), num_warps=4)
    return dict(TILE=max(_GPU_TILE, block_c), num_warps=_GPU_WARPS if block_c < 1024 else 8)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _empty(shape, dtype, device):
    """Every buffer the launchers allocate comes from here. With CONVNEXT_FAST_POISON_OUTPUTS=1
    (the test suite sets it) it is NaN-filled, so an element a kernel fails to write shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("CONVNEXT_FAST_POISON_OUTPUTS", "0") == "1":
        t.fill_(float("nan"))
    return t


def _nchw_view(t_nhwc: torch.Tensor) -> torch.Tensor:
    return t_nhwc.permute(0, 3, 1, 2)


def _skip_launch(*tensors) -> bool:
    """Under the interpreter, tensors without data (fake/meta: register_fake, opcheck) cannot be
    launched on; skip the launch as the fake kernel of ``wrap_triton`` does on a GPU. Other tensor
    subclasses (functionalisation under torch.compile) cannot be run by the interpreter at all."""
    if not runtime.INTERPRET:
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    for t in tensors:
        if t is None:
            continue
        if isinstance(t, FakeTensor) or t.device.type == "meta":
            return True
        if not (type(t) is torch.Tensor or type(t) is torch.nn.Parameter):
            raise RuntimeError(
                "dwconv_ln triton kernels under TRITON_INTERPRET=1 cannot run on "
                f"{type(t).__name__} (torch.compile of the triton backend needs a CUDA device)")
    return False


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu":
        problem = runtime.interpreter_problem()
        if problem is not None:
            raise RuntimeError(f"dwconv_ln triton kernels: {problem}")


def _prep(x, conv_weight, conv_bias):
    N, C, H, W = x.shape
    K = int(conv_weight.shape[-1])  # a constexpr: specialised even when shapes are symbolic
    if conv_weight.shape[-2] != K or K % 2 == 0 or K > MAX_K:
        raise ValueError("dwconv_ln triton: conv_weight must be [C, 1, k, k] with odd "
                         f"k <= {MAX_K}, got {list(conv_weight.shape)}")
    if N * H * W >= 2 ** 31:
        raise ValueError("dwconv_ln triton: N*H*W must be < 2**31")
    x = x.contiguous(memory_format=torch.channels_last)
    # [K*K, C] fp32 taps: per-tap weight loads are C-contiguous
    wt = conv_weight.reshape(C, K * K).t().contiguous().to(torch.float32)
    cb = None if conv_bias is None else conv_bias.contiguous().to(torch.float32)
    return x, wt, cb, N, C, H, W, K


def _c_vec(C) -> int:
    """Largest power of two <= 16 dividing C (the kernels take C as C_V * CV, see there)."""
    cv = 16
    while C % cv:
        cv //= 2
    return cv


def dwconv_ln_fwd(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                  ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6,
                  out: Optional[torch.Tensor] = None):
    """y = LayerNorm_C(dwconv(x) + conv_bias). Returns (y, mean, rstd).

    x: [N, C, H, W] (channels_last memory; converted if not); conv_weight [C, 1, k, k];
    conv_bias [C] or None; ln_weight, ln_bias [C]. y: [N, C, H, W] channels_last, x.dtype (written
    into ``out`` when given: same shape/dtype, channels_last); mean, rstd: [N, H, W] fp32.
    """
    _check_device(x)
    x, wt, cb, N, C, H, W, K = _prep(x, conv_weight, conv_bias)
    if out is None:
        y = _nchw_view(_empty((N, H, W, C), x.dtype, x.device))
    else:
        if (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device
                or not out.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError("dwconv_ln_fwd: out must match x's shape, dtype and device and be "
                             "channels_last")
        y = out
    mean = _empty((N, H, W), torch.float32, x.device)
    rstd = _empty((N, H, W), torch.float32, x.device)
    lnw, lnb = ln_weight.contiguous(), ln_bias.contiguous()
    P, CV = N * H * W, _c_vec(C)
    if P == 0 or _skip_launch(x, wt, lnw, lnb, y):
        return y, mean, rstd
    BLOCK_C, ONE_CHUNK = _ln_chunking(C)
    has_bias = cb is not None
    cbp = cb if has_bias else wt
    if AUTOTUNE:
        kernel = _fwd_tuned
        grid = lambda meta: (triton.cdiv(P, meta["TILE"] // meta["BLOCK_C"]),)  # noqa: E731
        meta = {}
    else:
        kernel = _dwconv_ln_fwd_kernel
        meta = _tile_meta(BLOCK_C)
        grid = (triton.cdiv(P, meta["TILE"] // BLOCK_C),)
    torch.library.wrap_triton(kernel)[grid](
        x, wt, cbp, lnw, lnb, y, mean, rstd, P, H, W, C // CV, float(eps),
        K=K, HAS_BIAS=has_bias, BLOCK_C=BLOCK_C, ONE_CHUNK=ONE_CHUNK, CV=CV, **meta)
    return y, mean, rstd


def _dwconv_ln_bwd_all(grad_y, x, conv_weight, conv_bias, ln_weight, mean, rstd):
    """Backward; always returns 5 tensors (d conv_b is computed even without a bias)."""
    _check_device(x)
    x, wt, cb, N, C, H, W, K = _prep(x, conv_weight, conv_bias)
    gy = grad_y.contiguous(memory_format=torch.channels_last)
    mean = mean.contiguous().to(torch.float32)
    rstd = rstd.contiguous().to(torch.float32)
    lnw = ln_weight.contiguous()
    P, KK, CV = N * H * W, K * K, _c_vec(C)
    dz = _empty((P, C), torch.float32, x.device)
    dx = _nchw_view(_empty((N, H, W, C), x.dtype, x.device))
    BLOCK_C_B = _dx_block_c(C)
    n_cb = triton.cdiv(C, BLOCK_C_B)
    ppp = _pix_per_prog(P, n_cb)
    groups = triton.cdiv(P, ppp)
    part = _empty((groups, KK + 3, C), torch.float32, x.device)
    if P > 0 and not _skip_launch(x, gy, wt, lnw, mean, rstd):
        has_bias = cb is not None
        cbp = cb if has_bias else wt
        BLOCK_C, ONE_CHUNK = _ln_chunking(C)
        if AUTOTUNE:
            k_dz, k_dx = _bwd_dz_tuned, _bwd_dx_tuned
            grid_dz = lambda meta: (triton.cdiv(P, meta["TILE"] // meta["BLOCK_C"]),)  # noqa: E731
            meta_dz, meta_dx = {}, {}
        else:
            k_dz, k_dx = _dwconv_ln_bwd_dz_kernel, _dwconv_ln_bwd_dx_kernel
            meta_dz, meta_dx = _tile_meta(BLOCK_C), _tile_meta(BLOCK_C_B, ppp)
            grid_dz = (triton.cdiv(P, meta_dz["TILE"] // BLOCK_C),)
        torch.library.wrap_triton(k_dz)[grid_dz](
            x, gy, wt, cbp, lnw, mean, rstd, dz, P, H, W, C // CV,
            K=K, HAS_BIAS=has_bias, BLOCK_C=BLOCK_C, ONE_CHUNK=ONE_CHUNK, CV=CV, **meta_dz)
        torch.library.wrap_triton(k_dx)[(groups, n_cb)](
            x, gy, dz, wt, cbp, mean, rstd, dx, part, P, H, W, C // CV, ppp,
            K=K, HAS_BIAS=has_bias, BLOCK_C=BLOCK_C_B, CV=CV, **meta_dx)
    sums = part.sum(dim=0)  # deterministic reduction of the per-program partials
    # copies: the results must not alias each other (custom-op outputs)
    dw = sums[:KK].t().reshape(C, 1, K, K).to(conv_weight.dtype, copy=True,
                                               memory_format=torch.contiguous_format)
    dlnw = sums[KK].to(ln_weight.dtype, copy=True)
    dlnb = sums[KK + 1].to(ln_weight.dtype, copy=True)
    db = sums[KK + 2].to(x.dtype if conv_bias is None else conv_bias.dtype, copy=True)
    return dx, dw, db, dlnw, dlnb


def dwconv_ln_bwd(grad_y: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor,
                  conv_bias: Optional[torch.Tensor], ln_weight: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor):
    """Gradients of :func:`dwconv_ln_fwd` from its saved (mean, rstd); the conv is recomputed.

    Same contract as ``convnext_fast.reference.dwconv_ln_bwd``: returns (dx [N,C,H,W]
    channels_last, d conv_w [C,1,k,k], d conv_b [C] or None when conv_bias is None, d ln_w [C],
    d ln_b [C]), each in the dtype of its input.
    """
    dx, dw, db, dlnw, dlnb = _dwconv_ln_bwd_all(grad_y, x, conv_weight, conv_bias, ln_weight,
                                                 mean, rstd)
    return dx, dw, (None if conv_bias is None else db), dlnw, dlnb
