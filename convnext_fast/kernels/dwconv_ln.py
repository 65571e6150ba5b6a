"""Triton kernels for ``dwconv_ln``: depthwise kxk conv (+ bias) fused with LayerNorm over C.

Layout: x, y, grad_y, dx are logically [N, C, H, W] and physically NHWC (``channels_last``), so
viewed as a row-major [P = N*H*W, C] matrix. A pixel p = (n*H + h)*W + w; its tap (dh, dw)
neighbour is pixel p + dh*W + dw when (h+dh, w+dw) lies inside the image (zero padding
otherwise), so the conv is k*k shifted, masked, C-contiguous (coalesced) tile loads.

Two sets of kernels implement the op; ``_band_chunk`` picks one per call (see there, VARIANT):

Band kernels (C = NCH * BC exactly, BC a power of two, NCH <= 8, C <= 1024, k <= 7: every
ConvNeXt width up to 1024 channels)
    A program owns a band of BH output rows x a run of BW columns of one image. Channels come
    in NCH chunks of exactly BC lanes (C = 96 = 3 x 32, 768 = 3 x 256, 40 = 5 x 8): no masked
    lanes. Each input row of the band's halo is loaded once per column shift and feeds every
    output row it touches, so a band of BH rows costs k * (BH + k - 1) tile loads instead of
    k * k * BH (BH = 4, k = 7: 17.5 loads per output instead of 49), and each weight is loaded
    once per band. The BH * NCH fp32 accumulator tiles are a tuple of registers.
    ``_dwconv_ln_fwd_band_kernel``: conv, then per row the LayerNorm over the NCH chunks
        (mean, then centred variance, on registers), y and mean/rstd stored. 1 conv.
    ``_dwconv_ln_bwd_dz_band_kernel`` (K1, the forward's tiling): recompute z (conv 1),
        dz = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)) with g = grad_y * ln_w, stored in
        the input dtype (half the bytes of an fp32 scratch; autograd rounds it the same way);
        per-program sums of grad_y * xhat, grad_y and dz (fp32) to a [programs, 3, C] buffer.
    ``_dwconv_ln_bwd_dxdw_band_kernel`` (K2; a program: a strip of bands x BW columns x one
        channel chunk, no reduction over C): dx = sum_taps w[tap] * dz[p - tap] (conv 2, the
        flipped taps, dz rows reused across the band like x in the forward) and
        d conv_w[tap] = sum_p dz[p] * x[p + tap] (conv 3: the band's dz rows stay in registers,
        each x row is loaded once per column shift and multiplied into the per-tap-row
        accumulators), summed into a [programs, k*k, C] buffer.
    Backward: 3 conv-equivalents of FMAs (the minimum when z is recomputed rather than stored).

Pixel kernels (every other C and k; still selectable everywhere)
    ``_dwconv_ln_fwd_kernel`` (grid: P / BLOCK_P programs, 1-D): a program owns BLOCK_P
    consecutive pixels (they may span image rows; each pixel masks its own taps) x all of C,
    padded to BLOCK_C = next_pow2(C); each of the k*k taps is its own masked tile load.
    * C <= 1024 (ONE_CHUNK): the whole fp32 conv row lives in registers. x is read once.
    * C > 1024: pass 1 convolves chunk by chunk and merges per-chunk (count, mean, M2) with
      Chan's parallel formula (no sum/sum-of-squares cancellation); pass 2 *recomputes* the conv
      and normalises: y has the input dtype (stashing z there would round it before
      normalising) and an fp32 scratch would add a [P, C] fp32 write + read to HBM, whereas the
      re-read x neighbourhood was touched moments ago by the same program (L1/L2 hits).
    ``_dwconv_ln_bwd_dz_kernel`` (the forward's tiling): recompute z, write dz as an fp32
    [P, C] scratch (for C > 1024 z is stashed there first and overwritten with dz).
    ``_dwconv_ln_bwd_dx_kernel`` (grid: pixel groups x C chunks): pass A: dx from dz with the
    flipped taps, and z recomputed for the LayerNorm weight sums; pass B: for each tap, the sum
    over its pixels of dz[p] * x[p + tap]. Both loop over taps at run time (re-reads are cache
    hits). About 5 conv-equivalents in all.
    Saves (for backward), both sets: only mean and rstd, [N, H, W] fp32; z is never stored.

Determinism: no float atomics. Every reduction has a fixed order for a given launch
configuration: per-program partial sums in fixed buffers, reduced by torch.sum; the autotuner
fixes the configuration once per key and process, so results are bit-identical run to run
(across processes only with CONVNEXT_FAST_TRITON_AUTOTUNE=0 or the same tuning outcome).

Registers (ptxas for sm_90, triton 3.8, bf16, k = 7): pixel kernels 60-160 per thread for every
config in _TILE_CONFIGS, up to C = 3072; band kernels 70-215 for the rule's tiles and the
forward's autotune candidates at every ConvNeXt width (no spills; the note of issue 18 lists
them). Neither set has been timed against the other on a GPU yet.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import next_pow2

__all__ = ["dwconv_ln_fwd", "dwconv_ln_bwd", "MAX_K", "AUTOTUNE"]

# Largest kernel size accepted. Any odd k works (the pixel forward unrolls its k*k taps, so
# compile time grows as k*k); ConvNeXt uses 7.
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
# band kernels: exact-C chunks, a band of output rows per program, each input row loaded once
# ----------------------------------------------------------------------------------------------
@triton.jit
def _band_coords(H, W, C: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """The band tile of a (image x band, column run) program: its first row h0 and column w0,
    the BW columns, the BC channel lanes, the int32 tile-local offsets (column * C + lane)
    shared by every load and store, and the int64 pixel index of the image's first pixel."""
    n_bands = tl.cdiv(H, BH)
    pid = tl.program_id(0)
    n = pid // n_bands
    h0 = (pid % n_bands) * BH
    w0 = tl.program_id(1) * BW
    cols = w0 + tl.arange(0, BW)
    cr = tl.arange(0, BC)
    offs = (tl.arange(0, BW) * C)[:, None] + cr[None, :]
    return h0, w0, cols, cr, offs, n.to(tl.int64) * H * W


@triton.jit
def _halo_rows(img, h0, H, W, C: tl.constexpr, R: tl.constexpr, PAD: tl.constexpr):
    """For the R rows h0 - PAD + r of an image: the int64 element offset of each row's first
    pixel and whether the row lies inside the image (tuples, indexed by r)."""
    roff = ()
    rok = ()
    for r in tl.static_range(R):
        ih = h0 + (r - PAD)
        roff = roff + ((img + ih * W) * C,)
        rok = rok + ((ih >= 0) & (ih < H),)
    return roff, rok


@triton.jit
def _band_conv(X, WT, CB, img, h0, w0, cols, cr, offs, H, W,
               C: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, BH: tl.constexpr,
               BW: tl.constexpr, BC: tl.constexpr):
    """z = conv(x) + conv_b for BH output rows x BW columns x all C, as a tuple of BH * C // BC
    fp32 [BW, BC] tiles (element oh * NCH + j: output row h0 + oh, channels [j*BC, (j+1)*BC)).

    For each column shift kw and chunk j the K weights of that kernel column are loaded once;
    each input row of the band's halo (BH + K - 1 rows) is then loaded once and feeds every
    output row it touches (up to K): K * (BH + K - 1) loads per BH output rows instead of
    K * K * BH, and one weight load per BH FMA tiles. Rows and chunks are unrolled, so each
    tile is its own set of registers (Triton tuples are immutable: an update rebuilds the tuple
    around the new element, which costs nothing once compiled); kw is a runtime loop, which
    keeps the code K times shorter (Triton's coalescing pass takes minutes on the fully unrolled
    K * K version). Out-of-image taps are masked loads (the zero padding); pixels outside the
    image come out as the bias alone and are masked by the caller's stores.
    """
    NCH: tl.constexpr = C // BC
    PAD: tl.constexpr = K // 2
    acc = ()
    for oh in tl.static_range(BH):
        for j in tl.static_range(NCH):
            z0 = tl.zeros([BW, BC], dtype=tl.float32)
            if HAS_BIAS:
                z0 += tl.load(CB + j * BC + cr)[None, :]
            acc = acc + (z0,)
    roff, rok = _halo_rows(img, h0, H, W, C, BH + K - 1, PAD)
    for kw in range(0, K):
        iw = cols + (kw - PAD)
        col_ok = ((iw >= 0) & (iw < W))[:, None]
        xk = X + (w0 + (kw - PAD)) * C + offs
        for j in tl.static_range(NCH):
            wk = ()
            for kh in tl.static_range(K):
                wv = tl.load(WT + (kh * K + kw) * C + j * BC + cr)
                # broadcast once here rather than in each of the BH FMAs that use it
                wk = wk + (tl.broadcast_to(wv[None, :], [BW, BC]),)
            for r in tl.static_range(BH + K - 1):
                xv = tl.load(xk + (roff[r] + j * BC), mask=col_ok & rok[r], other=0.0)
                xv = xv.to(tl.float32)
                # input row r is tap row r - oh of output row oh
                for oh in tl.static_range(max(0, r - K + 1), min(BH, r + 1)):
                    acc = (acc[:oh * NCH + j] + (tl.fma(xv, wk[r - oh], acc[oh * NCH + j]),)
                           + acc[oh * NCH + j + 1:])
    return acc


@triton.jit(do_not_specialize=["H", "W"])
def _dwconv_ln_fwd_band_kernel(
    X, WT, CB, LNW, LNB, Y, MEAN, RSTD, H, W, eps,
    C: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
):
    """Grid (N * cdiv(H, BH), cdiv(W, BW)): conv over the band (see _band_conv), then per output
    row the LayerNorm over the NCH exact chunks (two-pass mean / centred variance on registers)."""
    NCH: tl.constexpr = C // BC
    h0, w0, cols, cr, offs, img = _band_coords(H, W, C, BH, BW, BC)
    z = _band_conv(X, WT, CB, img, h0, w0, cols, cr, offs, H, W, C, K, HAS_BIAS, BH, BW, BC)
    for oh in tl.static_range(BH):
        h = h0 + oh
        ok = (cols < W) & (h < H)
        s = tl.zeros([BW], dtype=tl.float32)
        for j in tl.static_range(NCH):
            s += tl.sum(z[oh * NCH + j], axis=1)
        mean = s / C
        s = tl.zeros([BW], dtype=tl.float32)
        for j in tl.static_range(NCH):
            d = z[oh * NCH + j] - mean[:, None]
            s += tl.sum(d * d, axis=1)
        rstd = tl.rsqrt(s / C + eps)
        pix = img + h * W + w0
        for j in tl.static_range(NCH):
            lw = tl.load(LNW + j * BC + cr).to(tl.float32)
            lb = tl.load(LNB + j * BC + cr).to(tl.float32)
            y = (z[oh * NCH + j] - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
            tl.store(Y + pix * C + j * BC + offs, y.to(Y.dtype.element_ty), mask=ok[:, None])
        tl.store(MEAN + pix + tl.arange(0, BW), mean, mask=ok)
        tl.store(RSTD + pix + tl.arange(0, BW), rstd, mask=ok)


@triton.jit(do_not_specialize=["H", "W"])
def _dwconv_ln_bwd_dz_band_kernel(
    X, GY, WT, CB, LNW, MEAN, RSTD, DZ, PART, H, W,
    C: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
):
    """Backward K1, the forward's tiling and grid: recompute z (conv 1 of 3), then per output row
    xhat = (z - mean) * rstd, g = grad_y * ln_w and
    dz = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)), stored in the input dtype.
    The program's sums over its pixels of grad_y * xhat, grad_y and dz (fp32, before dz is
    rounded) go to its own row of PART [programs, 3, C]: fixed order, no atomics."""
    NCH: tl.constexpr = C // BC
    h0, w0, cols, cr, offs, img = _band_coords(H, W, C, BH, BW, BC)
    z = _band_conv(X, WT, CB, img, h0, w0, cols, cr, offs, H, W, C, K, HAS_BIAS, BH, BW, BC)
    sums = ()
    for i in tl.static_range(3 * NCH):
        sums = sums + (tl.zeros([BC], dtype=tl.float32),)
    for oh in tl.static_range(BH):
        h = h0 + oh
        ok = (cols < W) & (h < H)
        m2 = ok[:, None]
        pix = img + h * W + w0
        # outside the image mean = rstd = grad_y = 0, so xhat, g and dz are 0 there
        mean = tl.load(MEAN + pix + tl.arange(0, BW), mask=ok, other=0.0)
        rstd = tl.load(RSTD + pix + tl.arange(0, BW), mask=ok, other=0.0)
        s1 = tl.zeros([BW], dtype=tl.float32)
        s2 = tl.zeros([BW], dtype=tl.float32)
        gys = ()
        for j in tl.static_range(NCH):
            gy = tl.load(GY + pix * C + j * BC + offs, mask=m2, other=0.0).to(tl.float32)
            gys = gys + (gy,)
            xhat = (z[oh * NCH + j] - mean[:, None]) * rstd[:, None]
            g = gy * tl.load(LNW + j * BC + cr).to(tl.float32)[None, :]
            s1 += tl.sum(g, axis=1)
            s2 += tl.sum(g * xhat, axis=1)
            sums = (sums[:j] + (sums[j] + tl.sum(gy * xhat, axis=0),) + sums[j + 1:NCH + j]
                    + (sums[NCH + j] + tl.sum(gy, axis=0),) + sums[NCH + j + 1:])
        s1 = s1 / C
        s2 = s2 / C
        for j in tl.static_range(NCH):
            xhat = (z[oh * NCH + j] - mean[:, None]) * rstd[:, None]
            g = gys[j] * tl.load(LNW + j * BC + cr).to(tl.float32)[None, :]
            dz = rstd[:, None] * (g - s1[:, None] - xhat * s2[:, None])
            tl.store(DZ + pix * C + j * BC + offs, dz.to(DZ.dtype.element_ty), mask=m2)
            sums = (sums[:2 * NCH + j] + (sums[2 * NCH + j] + tl.sum(dz, axis=0),)
                    + sums[2 * NCH + j + 1:])
    prow = PART + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * (3 * C)
    for q in tl.static_range(3):
        for j in tl.static_range(NCH):
            tl.store(prow + q * C + j * BC + cr, sums[q * NCH + j])


@triton.jit(do_not_specialize=["H", "W", "BANDS"])
def _dwconv_ln_bwd_dxdw_band_kernel(
    X, DZ, WT, DX, PART, H, W, BANDS,
    C: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    """Backward K2 (convs 2 and 3 of 3). Grid (N * strips, cdiv(W, BW), C // BC): a program owns
    a strip of BANDS * BH rows x BW columns x BC channels (no reduction over C here, so channel
    chunks are independent programs) and walks it in bands of BH rows.

    dx = sum_taps w[tap] * dz[p - tap] (the flipped taps): each dz row of a band's halo is
    loaded once per kw and feeds the output rows it touches, as in _band_conv.
    d conv_w[kh, kw] = sum_p dz[p] * x[p + tap]: for one kw at a time (a runtime loop), the
    band's BH dz rows stay in registers, each x row of the halo is loaded once and multiplied
    into the K per-kh accumulator tiles of the rows it pairs with; at the end of the strip each
    tile is summed over its columns into the program's row of PART [programs, K*K, C].
    """
    PAD: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    n_strips = tl.cdiv(tl.cdiv(H, BH), BANDS)
    pid = tl.program_id(0)
    n = pid // n_strips
    hs = (pid % n_strips) * (BANDS * BH)
    he = tl.minimum(hs + BANDS * BH, H)
    w0 = tl.program_id(1) * BW
    c0 = tl.program_id(2) * BC
    cols = w0 + tl.arange(0, BW)
    cr = c0 + tl.arange(0, BC)
    offs = (tl.arange(0, BW) * C)[:, None] + cr[None, :]
    img = n.to(tl.int64) * H * W
    for h0 in range(hs, he, BH):
        acc = ()
        for oh in tl.static_range(BH):
            acc = acc + (tl.zeros([BW, BC], dtype=tl.float32),)
        roff, rok = _halo_rows(img, h0, H, W, C, BH + K - 1, PAD)
        for kw in range(0, K):
            iw = cols - (kw - PAD)
            col_ok = ((iw >= 0) & (iw < W))[:, None]
            dzk = DZ + (w0 - (kw - PAD)) * C + offs
            wk = ()
            for kh in tl.static_range(K):
                wk = wk + (tl.broadcast_to(tl.load(WT + (kh * K + kw) * C + cr)[None, :],
                                           [BW, BC]),)
            for r in tl.static_range(BH + K - 1):
                dzv = tl.load(dzk + roff[r], mask=col_ok & rok[r], other=0.0).to(tl.float32)
                # dz row h0 + r - PAD is tap row kh = oh - r + 2 * PAD of output row oh
                for oh in tl.static_range(max(0, r - 2 * PAD), min(BH, r + 1)):
                    acc = (acc[:oh] + (tl.fma(dzv, wk[oh - r + 2 * PAD], acc[oh]),)
                           + acc[oh + 1:])
        for oh in tl.static_range(BH):
            ok = ((cols < W) & (h0 + oh < he))[:, None]
            tl.store(DX + roff[oh + PAD] + w0 * C + offs, acc[oh].to(DX.dtype.element_ty),
                     mask=ok)
    prow = PART + ((pid.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * KK) * C + cr
    for kw in range(0, K):
        acc = ()
        for kh in tl.static_range(K):
            acc = acc + (tl.zeros([BW, BC], dtype=tl.float32),)
        iw = cols + (kw - PAD)
        col_ok = ((iw >= 0) & (iw < W))[:, None]
        xk = X + (w0 + (kw - PAD)) * C + offs
        for h0 in range(hs, he, BH):
            roff, rok = _halo_rows(img, h0, H, W, C, BH + K - 1, PAD)
            dzs = ()
            for oh in tl.static_range(BH):
                ok = ((cols < W) & (h0 + oh < he))[:, None]
                dzs = dzs + (tl.load(DZ + roff[oh + PAD] + w0 * C + offs, mask=ok,
                                     other=0.0).to(tl.float32),)
            for r in tl.static_range(BH + K - 1):
                xv = tl.load(xk + roff[r], mask=col_ok & rok[r], other=0.0).to(tl.float32)
                # x row h0 + r - PAD is tap row r - oh of dz row oh
                for oh in tl.static_range(max(0, r - K + 1), min(BH, r + 1)):
                    acc = (acc[:r - oh] + (tl.fma(dzs[oh], xv, acc[r - oh]),)
                           + acc[r - oh + 1:])
        for kh in tl.static_range(K):
            tl.store(prow + (kh * K + kw) * C, tl.sum(acc[kh], axis=0))


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
# Read once, so that the tuned kernels below exist exactly when the launchers use them (the tests
# switch it off per test).
AUTOTUNE = runtime.autotune_enabled()

# Which kernels run: "auto" (the band kernels wherever _band_chunk allows them, else the pixel
# kernels), "band" or "pixel". The two have not been timed against each other on a GPU yet; set
# CONVNEXT_FAST_DWCONV_LN_TRITON (or this attribute) to measure both.
VARIANT = os.environ.get("CONVNEXT_FAST_DWCONV_LN_TRITON", "auto").strip().lower()
# Band kernels: C = NCH * BC exactly, BC a power of two in [8, BAND_MAX_BC], NCH <= BAND_MAX_NCH
# (each of the NCH chunks of every band row is its own unrolled register tile), C <= BAND_MAX_C;
# k <= BAND_MAX_K (a program keeps the k weights of a kernel column in registers).
BAND_MAX_C = 1024
BAND_MAX_BC = 256
BAND_MAX_NCH = 8
BAND_MAX_K = 7

# --- pixel kernels ---
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


# --- band kernels ---
def _band_chunk(C: int, K: int) -> Optional[int]:
    """BC, the channel chunk of the band kernels for C channels and a k x k kernel, or None for
    the pixel kernels: with VARIANT "pixel", or where no exact chunking exists (e.g.
    C = 136 = 8 x 17; C > 1024) or k > 7. The band kernels are taken wherever they run: exact
    lanes and k-fold fewer loads, on paper; a GPU run decides (VARIANT)."""
    if VARIANT not in ("auto", "band", "pixel"):
        raise ValueError(f"CONVNEXT_FAST_DWCONV_LN_TRITON={VARIANT!r}: auto, band or pixel")
    bc = min(C & -C, BAND_MAX_BC)  # the largest power of two dividing C, capped
    fits = C <= BAND_MAX_C and bc >= 8 and C // bc <= BAND_MAX_NCH and K <= BAND_MAX_K
    if VARIANT == "pixel":
        return None
    if VARIANT == "band" and not fits:
        raise ValueError(f"dwconv_ln triton: the band kernels need C = NCH x BC with BC a power "
                         f"of two in 8..{BAND_MAX_BC}, NCH <= {BAND_MAX_NCH}, C <= {BAND_MAX_C} "
                         f"and k <= {BAND_MAX_K}; got C={C}, k={K}")
    return bc if fits else None


# Register budget (fp32 values per thread) of the long-lived tiles of a band program: each
# [BW, BC] chunk tile holds E = BW * BC / (32 * num_warps) values per thread. E = 4 gives every
# thread 4 consecutive channels of a pixel (8-byte bf16 / 16-byte fp32 loads); the budgets leave
# room under 255 registers for the loaded tile, the weights, addresses and the LayerNorm
# temporaries (ptxas figures for sm_90 in the issue 18 note).
_BAND_E = 4
_FWD_TILE_BUDGET = 48   # forward: BH * NCH z tiles
_DZ_TILE_BUDGET = 48    # backward K1: BH * NCH z tiles + one row's NCH grad_y tiles
_DXDW_TILE_BUDGET = 80  # backward K2: BH dx tiles, or BH dz + K dW tiles (+ the loaded one)
# interpreter: its cost is per operation of a program, i.e. per output row x column run x
# chunk; 4-row bands (ragged at most test shapes) and one column run up to W = 16
_INTERP_BH, _INTERP_BW = 4, 16


def _band_tiles(kind: str, C: int, BC: int, K: int, interpret: Optional[bool] = None) -> dict:
    """Band height BH, column run BW and warps for ``kind`` "fwd", "dz" (backward K1) or "dxdw"
    (backward K2, whose BC is its own chunk width). The GPU rule fills the tile budget with
    rows: a taller band loads each input row for more outputs (K * (BH + K - 1) / BH loads per
    output against K * K)."""
    if runtime.INTERPRET if interpret is None else interpret:
        return dict(BH=_INTERP_BH, BW=_INTERP_BW, num_warps=4)
    nw = 4 if kind == "dxdw" or C <= 256 else 8
    bw = max(1, min(64, _BAND_E * 32 * nw // BC))
    e = max(1, bw * BC // (32 * nw))
    nch = C // BC
    if kind == "fwd":
        bh = _FWD_TILE_BUDGET // (nch * e)
    elif kind == "dz":
        bh = _DZ_TILE_BUDGET // (nch * e) - 1
    else:
        bh = (_DXDW_TILE_BUDGET // e - K - 1) // 2
    return dict(BH=max(1, min(8, bh)), BW=bw, num_warps=nw)


def _fwd_band_configs(arch: int, static: dict) -> List["triton.Config"]:
    """Autotune candidates of the band forward: the rule's tile first, then half the band height
    (fewer registers, more resident warps), and, from 4 warps, twice the warps with twice the
    columns (the same per-thread tiles). None widens a thread's tiles: at k = 7 its K broadcast
    weight tiles grow with them (C = 320 at 8 values a tile already needs stack)."""
    C, BC, K = static["C"], static["BC"], static["K"]
    t = _band_tiles("fwd", C, BC, K, interpret=False)
    bh, bw, nw = t["BH"], t["BW"], t["num_warps"]
    cands = [(bh, bw, nw), (max(1, bh // 2), bw, nw)]
    if nw == 4:
        cands.append((bh, 2 * bw, 8))
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(triton.Config({"BH": c[0], "BW": c[1]}, num_warps=c[2], num_stages=1))
    return out


_FWD_BAND = runtime.TunedKernel(
    _dwconv_ln_fwd_band_kernel, _fwd_band_configs, key=["C", "K", "HAS_BIAS"],
    heuristic=lambda s: _band_tiles("fwd", s["C"], s["BC"], s["K"]))


def _dxdw_chunk(C: int) -> int:
    """The channel chunk (one program's channels) of backward K2, which does not reduce over
    C: at most 64 on a GPU (more programs, small tiles); as wide as the band chunk under the
    interpreter (fewer programs)."""
    return min(C & -C, BAND_MAX_BC if runtime.INTERPRET else 64)


def _strip_bands(N: int, n_bands: int, colruns: int, chunks: int) -> int:
    """Bands per program of backward K2: as long a strip as still leaves >= ~512 programs (its
    [programs, K*K, C] partial buffer shrinks with the strip); the interpreter takes two strips
    (the second ragged when the band count is odd), so the partial reduction is tested."""
    if runtime.INTERPRET:
        return max(1, triton.cdiv(n_bands, 2))
    per_strip = N * colruns * chunks
    return max(1, n_bands // max(1, triton.cdiv(512, per_strip)))


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


def _bwd_pixel(x, gy, wt, cb, lnw, mean, rstd, N, C, H, W, K):
    """The pixel kernels' backward (dz kernel + dx kernel); returns dx and the [K*K + 3, C]
    sums (d conv_w by tap, d ln_w, d ln_b, d conv_b)."""
    P, KK, CV = N * H * W, K * K, _c_vec(C)
    dz = _empty((P, C), torch.float32, x.device)
    dx = _nchw_view(_empty((N, H, W, C), x.dtype, x.device))
    BLOCK_C_B = _dx_block_c(C)
    n_cb = triton.cdiv(C, BLOCK_C_B)
    ppp = _pix_per_prog(P, n_cb)
    groups = triton.cdiv(P, ppp)
    part = _empty((groups, KK + 3, C), torch.float32, x.device)
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
    return dx, part.sum(dim=0)  # deterministic reduction of the per-program partials


def _fwd_band(x, wt, cb, lnw, lnb, y, mean, rstd, N, C, H, W, K, BC, eps):
    """The band forward: autotuned on a GPU, else the rule's (or the interpreter's) tile."""
    static = dict(C=C, BC=BC, K=K)
    if AUTOTUNE:
        kernel, meta = _FWD_BAND.get(x.device, static)
    else:
        kernel, meta = _dwconv_ln_fwd_band_kernel, _band_tiles("fwd", C, BC, K)
    grid = lambda m: (N * triton.cdiv(H, m["BH"]), triton.cdiv(W, m["BW"]))  # noqa: E731
    has_bias = cb is not None
    torch.library.wrap_triton(kernel)[grid](
        x, wt, cb if has_bias else wt, lnw, lnb, y, mean, rstd, H, W, float(eps),
        C=C, K=K, HAS_BIAS=has_bias, BC=BC, **meta)


def _bwd_band(x, gy, wt, cb, lnw, mean, rstd, N, C, H, W, K, BC):
    """Backward K1 + K2; returns dx and the [K*K + 3, C] sums (d conv_w by tap, then d ln_w,
    d ln_b, d conv_b), laid out as the pixel kernels' partials."""
    has_bias = cb is not None
    t1 = _band_tiles("dz", C, BC, K)
    grid1 = (N * triton.cdiv(H, t1["BH"]), triton.cdiv(W, t1["BW"]))
    dz = _empty((N, H, W, C), x.dtype, x.device)
    part1 = _empty((grid1[0] * grid1[1], 3, C), torch.float32, x.device)
    bc2 = _dxdw_chunk(C)
    t2 = _band_tiles("dxdw", C, bc2, K)
    n_bands = triton.cdiv(H, t2["BH"])
    colruns = triton.cdiv(W, t2["BW"])
    bands = _strip_bands(N, n_bands, colruns, C // bc2)
    grid2 = (N * triton.cdiv(n_bands, bands), colruns, C // bc2)
    dx = _nchw_view(_empty((N, H, W, C), x.dtype, x.device))
    part2 = _empty((grid2[0] * grid2[1], K * K, C), torch.float32, x.device)
    torch.library.wrap_triton(_dwconv_ln_bwd_dz_band_kernel)[grid1](
        x, gy, wt, cb if has_bias else wt, lnw, mean, rstd, dz, part1, H, W,
        C=C, K=K, HAS_BIAS=has_bias, BC=BC, **t1)
    torch.library.wrap_triton(_dwconv_ln_bwd_dxdw_band_kernel)[grid2](
        x, dz, wt, dx, part2, H, W, bands, C=C, K=K, BC=bc2, **t2)
    # deterministic reductions of the per-program partials
    return dx, torch.cat([part2.sum(dim=0), part1.sum(dim=0)])


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
    BC = _band_chunk(C, K)
    if BC is not None:
        _fwd_band(x, wt, cb, lnw, lnb, y, mean, rstd, N, C, H, W, K, BC, eps)
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
    KK = K * K
    BC = _band_chunk(C, K)
    if N * H * W == 0 or _skip_launch(x, gy, wt, lnw, mean, rstd):
        dx = _nchw_view(_empty((N, H, W, C), x.dtype, x.device))
        sums = torch.zeros((KK + 3, C), dtype=torch.float32, device=x.device)
    elif BC is not None:
        dx, sums = _bwd_band(x, gy, wt, cb, lnw, mean, rstd, N, C, H, W, K, BC)
    else:
        dx, sums = _bwd_pixel(x, gy, wt, cb, lnw, mean, rstd, N, C, H, W, K)
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
