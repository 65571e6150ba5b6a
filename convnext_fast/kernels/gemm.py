"""GEMM pieces the MLP kernels share: exact-erf GELU, the MMA step, a fused-epilogue linear kernel.

Conventions (DESIGN.md): row-major [M, K] activations (NHWC viewed as [N*H*W, C]), weights in
nn.Linear layout [out, in], fp32 accumulation and statistics for every input dtype, exact erf
GELU. Launchers go through ``torch.library.wrap_triton`` so that a ``triton_op`` calling them
can be traced by torch.compile; outside tracing it simply launches the kernel. How a kernel is
launched (interpreter, autotuning, tile fitting) is :mod:`.runtime`'s business.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .runtime import TunedKernel, dot_precision, dot_upcast, fit_block

__all__ = ["gelu", "gelu_grad", "mma", "linear_tile", "mlp_bwd_tiles", "linear_fwd", "gemm_configs",
           "row_tile_configs"]


def gemm_configs(arch: int, static: dict) -> List["triton.Config"]:
    """Tile candidates for the plain fused-epilogue GEMM (BLOCK_M x BLOCK_N x BLOCK_K)."""
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); all compile spill-free at bf16 with the GELU and
    # the GRN/gamma/residual epilogues (checked offline with triton's ptxas); first = default.
    if arch >= 9:  # H100: 228 KB smem/SM, wgmma wants 128-row tiles and 8 warps for big N
        shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 128, 32, 8, 4), (64, 64, 64, 4, 3), (64, 256, 32, 8, 3)]
        smem_cap = 220 * 1024
    else:  # A100-class: 164 KB smem/SM, mma.sync, deeper K-pipelines with BLOCK_K = 32
        shapes = [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4),
                  (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 256, 32, 8, 3)]
        smem_cap = 160 * 1024
    itemsize, affine = static.get("ITEMSIZE", 2), static.get("AFFINE", False)
    out = []
    for bm, bn, bk, w, st in shapes:
        # pipelined A and W tiles (+ the fp32 GRN scale tile when the prologue is on)
        smem = st * (itemsize * (bm * bk + bk * bn) + (4 * bm * bk if affine else 0))
        if smem <= smem_cap:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=w, num_stages=st))
    return out or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                                 num_warps=4, num_stages=2)]


def row_tile_configs(arch: int, block_m: int, n_gemm: int, itemsize: int) -> List["triton.Config"]:
    """(BLOCK_D, BLOCK_K) candidates for the kernels whose row tile ``block_m`` the launcher fixes
    and which run ``n_gemm`` GEMMs (one fp32 accumulator each) over K = C into one
    [block_m, BLOCK_D] tile. Pruned so that the accumulators stay within ~96 registers per thread
    and the pipelined operand tiles within shared memory (both checked by compiling every config
    offline for sm_90 / sm_80 with triton's bundled ptxas: no spills in the kept ones at bf16).
    The first config is the default when autotuning is off."""
    if arch >= 9:
        cand = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (256, 64, 8, 3), (64, 64, 8, 3),
                (64, 32, 4, 4), (128, 64, 4, 3), (256, 32, 8, 4), (64, 32, 8, 4)]
        smem_cap = 220 * 1024
    else:
        cand = [(128, 32, 4, 4), (64, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (256, 32, 8, 3),
                (64, 64, 8, 3), (64, 32, 8, 4)]
        smem_cap = 160 * 1024
    out = []
    for bd, bk, w, st in cand:
        regs = n_gemm * block_m * bd / (32 * w)
        smem = st * itemsize * n_gemm * (block_m * bk + bk * bd)
        if regs <= 96 and smem <= smem_cap:
            out.append(triton.Config({"BLOCK_D": bd, "BLOCK_K": bk}, num_warps=w, num_stages=st))
    return out or [triton.Config({"BLOCK_D": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2)]


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
