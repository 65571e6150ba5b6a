"""GEMM pieces the MLP kernels share: exact-erf GELU, the MMA step, a fused-epilogue linear kernel.

Conventions (DESIGN.md): row-major [M, K] activations (NHWC viewed as [N*H*W, C]), weights in
nn.Linear layout [out, in], fp32 accumulation and statistics for every input dtype, exact erf
GELU. Launchers go through ``torch.library.wrap_triton`` so that a ``triton_op`` calling them
can be traced by torch.compile; outside tracing it simply launches the kernel. How a kernel is
launched (interpreter, autotuning, tile fitting) is :mod:`.runtime`'s business.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .runtime import TunedKernel, dot_precision, dot_upcast, fit_block, next_pow2

__all__ = ["gelu", "gelu_grad", "mma", "linear_tile", "mlp_bwd_tiles", "linear_fwd", "gemm_configs",
           "row_tile_configs", "split_channels", "fused_configs", "fused_smem_bytes",
           "fused_regs", "empty", "SMEM_LIMIT", "REG_BUDGET", "FUSED_MAX_C", "FUSED_KINDS"]

# Shared memory one block may use (the opt-in maximum per block): sm_90 227 KiB, sm_80 163 KiB.
# Every config below is pruned against these with the arithmetic of its own kernel.
SMEM_LIMIT = {9: 227 * 1024, 8: 163 * 1024}
# 32-bit registers per thread that a fused program's register tiles (:func:`fused_regs`) may
# take out of 255, the rest going to addresses, masks and loop state. Calibrated against
# offline sm_90 / sm_80 compiles (ptxas register and spill counts) of the fused kernels at
# C = 96, 192 and 256: the configs kept compile without spilling (or a few bytes at most).
REG_BUDGET = 232
# Largest C (as the sum of its power-of-two chunks) whose whole output row a fused kernel keeps
# in one program's fp32 accumulators; above it, two GEMMs through an HBM hidden. At C = 256 the
# forward's only sm_90 tile that fits shared memory (64 rows, 4 warps) spills registers.
FUSED_MAX_C = 192


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here. With CONVNEXT_FAST_POISON_OUTPUTS=1
    (the test suite sets it) it is NaN-filled, so an element a kernel fails to write shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("CONVNEXT_FAST_POISON_OUTPUTS", "0") == "1":
        t.fill_(float("nan"))
    return t


def _arch_key(arch: int) -> int:
    return 9 if arch >= 9 else 8


def gemm_configs(arch: int, static: dict) -> List["triton.Config"]:
    """Tile candidates for the plain fused-epilogue GEMM (BLOCK_M x BLOCK_N x BLOCK_K)."""
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); first = default
    if arch >= 9:  # wgmma wants 128-row tiles and 8 warps for big N
        shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 128, 32, 8, 4), (64, 64, 64, 4, 3), (64, 256, 32, 8, 3)]
    else:  # mma.sync: deeper K-pipelines with BLOCK_K = 32
        shapes = [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4),
                  (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 256, 32, 8, 3)]
    itemsize, affine = static.get("ITEMSIZE", 2), static.get("AFFINE", False)
    out = []
    for bm, bn, bk, w, st in shapes:
        # pipelined A and W tiles (+ the fp32 GRN scale tile when the prologue is on) + the fp32
        # output tile's layout conversion in the epilogue (+ fp32's tf32x3 copy of the W tile)
        smem = (st * (itemsize * (bm * bk + bk * bn) + (4 * bm * bk if affine else 0))
                + 4 * bm * bn + (4 * bk * bn if itemsize == 4 else 0))
        if smem <= SMEM_LIMIT[_arch_key(arch)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=w, num_stages=st))
    return out


def row_tile_configs(arch: int, block_m: int, n_gemm: int, itemsize: int) -> List["triton.Config"]:
    """(BLOCK_D, BLOCK_K) candidates for the kernels whose row tile ``block_m`` the launcher fixes
    and which run ``n_gemm`` GEMMs (one fp32 accumulator each) over K = C into one
    [block_m, BLOCK_D] tile. Pruned so that the accumulators stay within ~96 registers per thread
    and the pipelined operand tiles plus the epilogue (and fp32's tf32x3 copy of the weight tiles)
    within shared memory. The first config is the default when autotuning is off."""
    if arch >= 9:
        cand = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (256, 64, 8, 3), (64, 64, 8, 3),
                (64, 32, 4, 4), (128, 64, 4, 3), (256, 32, 8, 4), (64, 32, 8, 4), (64, 32, 8, 2)]
    else:
        cand = [(128, 32, 4, 4), (64, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (256, 32, 8, 3),
                (64, 64, 8, 3), (64, 32, 8, 4), (64, 32, 8, 2)]
    out = []
    for bd, bk, w, st in cand:
        regs = n_gemm * block_m * bd / (32 * w)
        smem = (st * itemsize * n_gemm * (block_m * bk + bk * bd) + 4 * block_m * bd
                + (4 * n_gemm * bk * bd if itemsize == 4 else 0))  # tf32x3: a copy of W tiles
        if regs <= 96 and smem <= SMEM_LIMIT[_arch_key(arch)]:
            out.append(triton.Config({"BLOCK_D": bd, "BLOCK_K": bk}, num_warps=w, num_stages=st))
    return out


# ----------------------------------------------------------------------------------------------
# Tiles of the fused kernels (mlp.py): C in power-of-two chunks, the 4C hidden in BLOCK_H chunks

def split_channels(C: int) -> Tuple[int, int]:
    """(BLOCK_C0, BLOCK_C1): C as one or two power-of-two column chunks, each >= 16 (tl.dot's
    least extent), with the least padding (ties: one chunk). Exact for C = 2^k and 3 * 2^k
    (96 = 64 + 32, 192 = 128 + 64) and 5 * 2^k (80 = 64 + 16, 160 = 128 + 32); 40 -> 32 + 16."""
    one = max(16, next_pow2(C))
    c0 = max(16, one // 2)
    if c0 >= C:
        return one, 0
    c1 = max(16, next_pow2(C - c0))
    return (c0, c1) if c0 + c1 < one else (one, 0)


# Which fused kernel a config is for:
#   fwd:    [BLOCK_M rows] x (W1, W2 chunks of BLOCK_H hidden units, pipelined over the hidden)
#   bwd_dx: the same walk, computing dy (two GEMMs into [BLOCK_M, BLOCK_H] + one into dy)
#   bwd_dw: [BLOCK_H hidden units] x (y, g tiles of BLOCK_M rows, pipelined over the rows)
FUSED_KINDS = ("fwd", "bwd_dx", "bwd_dw")

# (BLOCK_M, BLOCK_H, warps, stages) per kind and architecture, best first (the first that fits
# is the default). bwd_dw's MMAs are BLOCK_H rows high, so on sm_90 BLOCK_H >= 64 (a warpgroup
# MMA's height; at 32 Triton falls back to mma.sync) and 64-row steps (at 128 the y and g tiles
# spill registers, 80 bytes at C = 96).
_ROW_MAJOR = {
    9: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 4),
        (128, 128, 8, 2), (64, 128, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (64, 32, 8, 3),
        (64, 32, 4, 2)],
    8: [(128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 4),
        (64, 32, 4, 3), (64, 32, 8, 3), (64, 32, 4, 2), (64, 32, 8, 2)],
}
_FUSED_CANDIDATES = {
    "fwd": _ROW_MAJOR,
    "bwd_dx": _ROW_MAJOR,
    "bwd_dw": {
        9: [(64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)],
        8: [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 3),
            (64, 32, 4, 2)],
    },
}


def fused_smem_bytes(kind: str, block_m: int, block_h: int, stages: int, c0: int, c1: int,
                     itemsize: int, grn: bool = False) -> int:
    """Shared memory of one fused-kernel program: the pipelined operand tiles x stages, the
    resident operand tiles, the epilogue's fp32 layout conversion (one C chunk at a time),
    for fp32 (tf32x3) one more fp32 copy of each shared-memory MMA operand tile (the compiler
    splits it into TF32 head and tail in registers and stores one of them back) and, with GRN,
    the pipelined fp32 [rows, BLOCK_H] gathers of the per-image scale (and, backward, coef)."""
    cp = c0 + c1
    tf32x3 = itemsize == 4
    if grn:
        gathers = 1 if kind == "fwd" else 2
        return (fused_smem_bytes(kind, block_m, block_h, stages, c0, c1, itemsize)
                + (stages - 1) * gathers * block_m * block_h * 4)
    if kind == "fwd":  # per stage W1 [BH, C] + W2 [C, BH]; resident y [BM, C], h [BM, BH]
        return (stages * 2 * block_h * cp * itemsize + block_m * cp * itemsize
                + block_m * block_h * itemsize + 4 * block_m * c0
                + tf32x3 * 2 * block_h * cp * 4)
    if kind == "bwd_dx":  # per stage W1, W2 chunks; resident y, g [BM, C], dpre [BM, BH]
        return (stages * 2 * block_h * cp * itemsize + 2 * block_m * cp * itemsize
                + block_m * block_h * itemsize + 4 * block_m * c0
                + tf32x3 * 3 * block_h * cp * 4)  # W1 (twice: as W1^T and W1), W2
    if kind == "bwd_dw":  # per stage y, g [BM, C]; resident W1, W2 chunks, h and dpre [BM, BH]
        return (stages * 2 * block_m * cp * itemsize + 2 * block_h * cp * itemsize
                + 2 * block_m * block_h * itemsize + 4 * block_h * c0
                + tf32x3 * 4 * block_m * cp * 4)  # y and g, each as y^T / g^T and as is
    raise ValueError(kind)


def fused_regs(kind: str, block_m: int, block_h: int, warps: int, c0: int, c1: int,
               itemsize: int, arch: int = 9, grn: bool = False) -> float:
    """Estimated 32-bit registers per thread for a fused program's register tiles: fp32
    accumulators and intermediates, plus the 16/32-bit MMA operand tiles held in registers
    (on sm_80 mma.sync takes the streamed weight chunks from registers too; fp32 operands count
    twice: tf32x3 splits each into a TF32 head and tail; GRN adds its gathered fp32 tiles)."""
    cp, threads = c0 + c1, 32 * warps
    words = itemsize / 4 * (2 if itemsize == 4 else 1)
    mh = block_m * block_h
    w_ops = 2 * block_h * cp * words if arch < 9 else 0
    # S (forward) or S and coef (backward), per row and hidden unit
    gathers = ((1 if kind == "fwd" else 2) * mh) if grn else 0
    if kind == "fwd":  # acc [BM, C]; pre and the GELU's temporary; h, y operands
        tiles = block_m * cp + 2 * mh + (mh + block_m * cp) * words + w_ops
    elif kind == "bwd_dx":  # dy [BM, C]; pre, dh; dpre, y, g operands
        tiles = block_m * cp + 2 * mh + (mh + 2 * block_m * cp) * words + w_ops
    elif kind == "bwd_dw":  # dW1, G^T [BH, C]; pre, dh, GELU temporary; h, dpre, y, g operands
        tiles = 2 * block_h * cp + 3 * mh + (2 * mh + 2 * block_m * cp) * words
    else:
        raise ValueError(kind)
    return (tiles + gathers) / threads


def fused_configs(arch: int, static: dict) -> List["triton.Config"]:
    """Candidates for the fused kernel ``static["KIND"]`` at ``BLOCK_C0``/``BLOCK_C1``,
    ``ITEMSIZE`` and ``GRN`` (mlp_grn's variant), pruned by :func:`fused_smem_bytes` and
    :func:`fused_regs`; may be empty (then the launchers take the two-GEMM path, never a toy
    tile)."""
    key = _arch_key(arch)
    kind, c0, c1, isz = static["KIND"], static["BLOCK_C0"], static["BLOCK_C1"], static["ITEMSIZE"]
    grn = static.get("GRN", False)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_H": bh}, num_warps=w, num_stages=st)
            for bm, bh, w, st in _FUSED_CANDIDATES[kind][key]
            if fused_smem_bytes(kind, bm, bh, st, c0, c1, isz, grn) <= SMEM_LIMIT[key]
            and fused_regs(kind, bm, bh, w, c0, c1, isz, key, grn) <= REG_BUDGET]


def _gemm_heuristic(s: dict) -> dict:
    return {"BLOCK_M": fit_block(s["M"], (64, 32, 16)), "BLOCK_N": fit_block(s["N"]),
            "BLOCK_K": fit_block(s["K"], (64, 32, 16)), "GROUP_M": 8}


# ----------------------------------------------------------------------------------------------
# Elementwise helpers (exact erf GELU and its derivative, fp32 in, fp32 out)

@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see :func:`dot_upcast` for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def linear_tile(A, W, rows64, rmask, cols, nmask, K, stride_am, SCALE, SHIFT, img,
                A_AFFINE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of prologue(A)[rows, :K] @ W[cols, :K]^T (W in nn.Linear
    layout). With A_AFFINE, a[m, k] <- a[m, k] * SCALE[img[m], k] + SHIFT[k] (GRN, per image),
    rounded back to A's dtype so that the MMA sees what an unfused fc2 would read; ``img`` (the
    rows' images, int64) is read only then."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(A + rows64[:, None] * stride_am + kk[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        if A_AFFINE:
            s = tl.load(SCALE + img[:, None] * K + kk[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            t = tl.load(SHIFT + kk, mask=kmask, other=0.0)
            a = (a.to(tl.float32) * s + t[None, :]).to(A.dtype.element_ty)
        w = tl.load(W + cols[None, :].to(tl.int64) * K + kk[:, None],
                    mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc = mma(a, w, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def mlp_bwd_tiles(Y, G, W1, W2, GAMMA, SG, rows64, rmask, dd, dmask, C, D, stride_ym, stride_gm,
                  store_sg, HAS_GAMMA: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """(pre, dh) = (y @ W1^T, (g * gamma) @ W2) for one [BLOCK_M, BLOCK_D] hidden tile, fp32.

    Both GEMMs have K = C, so one pass over the K chunks reads each y and g tile once; where
    ``store_sg`` (one program per row tile) it also writes the column sums of g to SG[:C], for
    the bias and gamma gradients, with a masked store rather than a branch so that the K loop
    stays pipelineable.
    """
    dd64 = dd.to(tl.int64)
    pre = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < C
        amask = rmask[:, None] & kmask[None, :]
        wmask = kmask[:, None] & dmask[None, :]
        y = tl.load(Y + rows64[:, None] * stride_ym + kk[None, :], mask=amask, other=0.0)
        g = tl.load(G + rows64[:, None] * stride_gm + kk[None, :], mask=amask, other=0.0)
        tl.store(SG + kk, tl.sum(g.to(tl.float32), axis=0), mask=kmask & store_sg)
        if HAS_GAMMA:
            gm = tl.load(GAMMA + kk, mask=kmask, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * gm[None, :]).to(Y.dtype.element_ty)
        w1t = tl.load(W1 + dd64[None, :] * C + kk[:, None], mask=wmask, other=0.0)  # [K, D]
        w2 = tl.load(W2 + kk[:, None].to(tl.int64) * D + dd[None, :], mask=wmask, other=0.0)
        pre = mma(y, w1t, pre, PRECISION, UPCAST)
        dh = mma(g, w2, dh, PRECISION, UPCAST)
    return pre, dh


# ----------------------------------------------------------------------------------------------
# OUT[M, N] = epilogue( prologue(A)[M, K] @ W[N, K]^T )
#   prologue (A_AFFINE): a[m, k] <- a[m, k] * SCALE[m // HW, k] + SHIFT[k]   (GRN, per image)
#   epilogue: + BIAS[n]; GELU; * GAMMA[n]; + RES[m, n]; cast to OUT's dtype.

@triton.jit
def _linear_fwd_kernel(
    A, W, BIAS, SCALE, SHIFT, GAMMA, RES, OUT,
    M, N, K, HW, stride_am, stride_rm, stride_om,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, A_AFFINE: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share each weight column tile while it is in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    nmask = cols < N
    rows64 = rows.to(tl.int64)
    img = (rows // HW).to(tl.int64)  # dead code without A_AFFINE
    acc = linear_tile(A, W, rows64, rmask, cols, nmask, K, stride_am, SCALE, SHIFT, img, A_AFFINE,
                      PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu(acc)
    if HAS_GAMMA:
        acc *= tl.load(GAMMA + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows64[:, None] * stride_rm + cols[None, :], mask=omask,
                       other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * stride_om + cols[None, :],
             acc.to(OUT.dtype.element_ty), mask=omask)


LINEAR_FWD = TunedKernel(_linear_fwd_kernel, gemm_configs, key=["N", "K"], heuristic=_gemm_heuristic)


def linear_fwd(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, *,
               gelu_act: bool = False, gamma: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None, hw: int = 1) -> torch.Tensor:
    """out[M, N] = epilogue(prologue(a)[M, K] @ w[N, K]^T), written into ``out`` (2-D views).

    ``scale`` [M // hw, K] fp32 and ``shift`` [K] fp32 (both or neither) apply the GRN prologue
    a * scale[image] + shift; ``gamma`` [N] and ``residual`` [M, N] the layer-scale/residual
    epilogue. ``a``, ``residual`` and ``out`` need unit column stride; ``w`` is contiguous.
    """
    M, K = a.shape
    N = w.shape[0]
    kernel, meta = LINEAR_FWD.get(a.device, {"ITEMSIZE": a.element_size(), "AFFINE": scale is not None},
                                  M=M, N=N, K=K)
    dummy = w  # stands in for absent optional inputs (never read); never an output buffer, so
    # that functionalization under torch.compile cannot confuse it with a mutated argument
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    torch.library.wrap_triton(kernel)[grid](
        a, w, dummy if bias is None else bias, dummy if scale is None else scale,
        dummy if shift is None else shift, dummy if gamma is None else gamma,
        dummy if residual is None else residual, out,
        M, N, K, hw, a.stride(0), out.stride(0) if residual is None else residual.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None, GELU=gelu_act, A_AFFINE=scale is not None,
        HAS_GAMMA=gamma is not None, HAS_RES=residual is not None,
        PRECISION=dot_precision(a.dtype, a.device), UPCAST=dot_upcast(a.dtype), **meta)
    return out
