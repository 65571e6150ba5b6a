"""Triton kernels for ``mlp``: out = residual + gamma * (fc2(gelu_erf(fc1(y) + b1)) + b2).

Activations are NHWC (``[N, C, H, W]`` logically, channels-last memory), so ``y`` viewed as
``[M = N*H*W, C]`` is a row-major matrix; weights are nn.Linear ``fc1 [D, C]``, ``fc2 [C, D]``.

Forward, two paths (chosen by the padded channel count ``BLOCK_C = next_pow2(C)``):

* ``fused`` (``BLOCK_C <= FUSED_MAX_BLOCK_C``): one kernel, :func:`_mlp_fwd_kernel`. A program
  owns ``BLOCK_M`` rows; it keeps the ``[BLOCK_M, BLOCK_C]`` input tile and an fp32
  ``[BLOCK_M, BLOCK_C]`` accumulator on chip and walks D in ``BLOCK_D`` chunks:
  ``h = gelu(y @ W1[chunk]^T + b1[chunk])`` (never leaves the SM), ``acc += h @ W2[:, chunk]^T``;
  epilogue ``+ b2, * gamma, + residual``. HBM traffic: read y (+ residual), write out, weights
  from L2. The whole output row must sit in one accumulator, so C is padded to a power of two
  (C=96 -> 128; the padded MMA work is the price of the fusion).
* ``two_gemm`` (larger C): the fp32 accumulator ``[BLOCK_M, C]`` no longer fits in registers
  (C=384 -> 512 columns = 256 KB per 128-row tile). Tiling the output C and recomputing fc1 per
  column tile would multiply the fc1 FLOPs by C / BLOCK_N (3-6x for ConvNeXt's later stages),
  whereas at these C the MLP is firmly compute-bound (arithmetic intensity ~C/2 FLOP/byte even
  when the hidden tensor round-trips HBM), so two GEMMs with fused epilogues win:
  fc1 + b1 + GELU -> hidden ``[M, D]`` (input dtype), then fc2 + b2 + gamma + residual.

``FUSED_MAX_BLOCK_C`` is the switch-over, to be tuned on the GPU (``FUSED_MAX_BLOCK_C_FMA`` for
fp32 without TF32, where ``tl.dot`` runs on FMA units).

Backward, :func:`mlp_bwd`. Saved for backward: ``y`` only (plus the parameters) - the 4C-wide
hidden pre-activation is recomputed, never stored by the forward, so the forward keeps
``M * C`` elements of activation memory per block instead of ``M * (C + 2D)``. The backward
itself holds two transient ``[M, D]`` tensors in the input dtype (``h`` and ``dpre``).

1. :func:`_mlp_bwd_recompute_kernel` (one Triton kernel, both GEMMs have K = C): for each
   ``[BLOCK_M, BLOCK_D]`` tile, ``pre = y @ W1^T + b1`` and ``dh = (g * gamma) @ W2``;
   epilogue ``h = gelu(pre)``, ``dpre = dh * gelu'(pre)``, stores ``h`` and ``dpre``, and
   per-row-tile fp32 partial column sums of ``dpre`` (-> db1) and of ``g`` (-> db2, dgamma).
2. ``torch.mm`` for the big reductions: ``dW2 = g^T h`` (scaled by gamma, see below),
   ``dy = dpre @ W1``, ``dW1 = dpre^T y``.
3. With gamma, ``G = g^T h`` is formed in fp32 (``mm`` with ``out_dtype`` on CUDA) and
   :func:`_mlp_bwd_wgrad_kernel` computes ``dW2 = gamma * G``,
   ``dgamma = sum_d W2 * G + b2 * sum_m g`` and ``db2 = gamma * sum_m g`` - dgamma without
   recomputing the fc2 output.
Every reduction is a fixed-order sum of per-tile partials (no atomics): bit-identical reruns.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import runtime
from .gemm import gelu, gelu_grad, linear_fwd, mlp_bwd_tiles, mma, row_tile_configs
from .runtime import TunedKernel, dot_precision, dot_upcast, fit_block, next_pow2

__all__ = ["mlp_fwd", "mlp_bwd", "FUSED_MAX_BLOCK_C", "FUSED_MAX_BLOCK_C_FMA", "BWD_BLOCK_M"]

# Largest padded channel count (power of two) for the single fused kernel; above it the forward
# runs two GEMMs. 256 keeps a 64x256 fp32 accumulator (64 KB, 64 regs/thread at 8 warps) plus the
# hidden chunk in registers. TODO(GPU): measure fused vs two_gemm at C=192/256/320 on H100/A100.
FUSED_MAX_BLOCK_C = 256
# The same for fp32 inputs with IEEE precision (no TF32): tl.dot then runs on FMA units with its
# operands in registers, and at BLOCK_C >= 128 every fused config spills heavily or overflows
# shared memory (checked offline for sm_90 / sm_80).
FUSED_MAX_BLOCK_C_FMA = 64

# Row tile of the backward recompute kernel. Fixed (not autotuned) because it sizes the partial
# bias-gradient buffers that the launcher allocates. TODO(GPU): try 128 on H100.
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
# fused forward

@triton.jit
def _mlp_fwd_kernel(
    Y, W1, B1, W2, B2, GAMMA, RES, OUT,
    M, C, D, stride_ym, stride_rm, stride_om,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    io_mask = rmask[:, None] & cmask[None, :]
    y = tl.load(Y + rows64[:, None] * stride_ym + cols[None, :], mask=io_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        wmask = cmask[:, None] & dmask[None, :]
        # W1[dd, :]^T as [BLOCK_C, BLOCK_D]; W2[:, dd]^T as [BLOCK_D, BLOCK_C]
        w1t = tl.load(W1 + dd[None, :].to(tl.int64) * C + cols[:, None], mask=wmask, other=0.0)
        pre = mma(y, w1t, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), PRECISION, UPCAST)
        if HAS_B1:
            pre += tl.load(B1 + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
        h = gelu(pre)  # padded D columns: pre = 0 -> h = 0, and their W2 rows load as 0
        w2t = tl.load(W2 + cols[None, :].to(tl.int64) * D + dd[:, None],
                      mask=dmask[:, None] & cmask[None, :], other=0.0)
        acc = mma(h.to(w2t.dtype), w2t, acc, PRECISION, UPCAST)

    if HAS_B2:
        acc += tl.load(B2 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        acc *= tl.load(GAMMA + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows64[:, None] * stride_rm + cols[None, :], mask=io_mask,
                       other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=io_mask)


def _fused_configs(arch: int, static: dict) -> List["triton.Config"]:
    block_c, itemsize = static["BLOCK_C"], static["ITEMSIZE"]
    if static["FMA"]:
        # fp32 with IEEE precision: tl.dot runs on FMA units with register-resident operands;
        # only the narrow hidden chunks compile without heavy spills (checked offline)
        return [triton.Config({"BLOCK_M": bm, "BLOCK_D": 32}, num_warps=w, num_stages=st)
                for bm, w, st in ((64, 4, 4), (128, 8, 3), (32, 4, 3))
                if 4 * (bm * block_c + st * 2 * 32 * block_c) <= 160 * 1024] or [
            triton.Config({"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2)]
    if arch >= 9:
        cand = [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                (64, 32, 4, 4), (128, 32, 8, 3), (64, 64, 8, 4)]
        smem_cap = 220 * 1024
    else:
        cand = [(64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 2), (64, 128, 8, 2),
                (128, 32, 8, 3), (32, 64, 4, 3)]
        smem_cap = 160 * 1024
    out = []
    for bm, bd, warps, stages in cand:
        # 32-bit registers per thread: fp32 accumulator + fp32 hidden chunk + the input tile
        regs = (bm * block_c + bm * bd + bm * block_c * itemsize / 4) / (32 * warps)
        smem = itemsize * (bm * block_c + stages * 2 * bd * block_c)
        if regs <= 128 and smem <= smem_cap:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=warps,
                                     num_stages=stages))
    if not out:  # always leave something runnable
        out.append(triton.Config({"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=8, num_stages=2))
    return out


_MLP_FWD = TunedKernel(_mlp_fwd_kernel, _fused_configs, key=["C", "D"],
                       heuristic=lambda s: {"BLOCK_M": fit_block(s["M"], (64, 32, 16)),
                                            "BLOCK_D": fit_block(s["D"])})


def mlp_fwd(y: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
            fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], out: Optional[torch.Tensor] = None, *,
            path: Optional[str] = None) -> torch.Tensor:
    """out = residual + gamma * (fc2(gelu(fc1(y) + b1)) + b2); same contract as reference.mlp.

    y, residual, out: [N, C, H, W] channels-last (``out`` is allocated when None, else written
    in place and returned; it must not alias an input, the GPU autotuner re-runs kernels);
    fc1_weight [D, C], fc2_weight [C, D]; biases, gamma, residual may be None. ``path``: None
    (automatic: ``FUSED_MAX_BLOCK_C``, or ``FUSED_MAX_BLOCK_C_FMA`` for fp32 without TF32),
    ``"fused"`` or ``"two_gemm"``.
    """
    N, C, H, W = y.shape
    D = fc1_weight.shape[0]
    M = N * H * W
    out, o2, y2, r2 = fwd_rows(y, residual, out)
    if M == 0:
        return out
    w1, w2 = fc1_weight.contiguous(), fc2_weight.contiguous()
    block_c = max(16, next_pow2(C))
    precision = dot_precision(y.dtype, y.device)
    fma = y.dtype == torch.float32 and precision == "ieee"
    if path is None:
        limit = FUSED_MAX_BLOCK_C_FMA if fma else FUSED_MAX_BLOCK_C
        path = "fused" if block_c <= limit else "two_gemm"
    if path == "two_gemm":
        hidden = torch.empty((M, D), device=y.device, dtype=y.dtype)
        linear_fwd(y2, w1, fc1_bias, hidden, gelu_act=True)
        linear_fwd(hidden, w2, fc2_bias, o2, gamma=gamma, residual=r2)
        return out
    if path != "fused":
        raise ValueError(f"path must be None, 'fused' or 'two_gemm', got {path!r}")
    kernel, meta = _MLP_FWD.get(
        y.device, {"BLOCK_C": block_c, "ITEMSIZE": y.element_size(), "FMA": fma}, M=M, D=D)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)  # noqa: E731
    torch.library.wrap_triton(kernel)[grid](
        # absent optional inputs: w1 stands in (never read; never an output, see linear_fwd)
        y2, w1, w1 if fc1_bias is None else fc1_bias, w2, w1 if fc2_bias is None else fc2_bias,
        w1 if gamma is None else gamma, w1 if r2 is None else r2, o2,
        M, C, D, y2.stride(0), o2.stride(0) if r2 is None else r2.stride(0), o2.stride(0),
        HAS_B1=fc1_bias is not None, HAS_B2=fc2_bias is not None, HAS_GAMMA=gamma is not None,
        HAS_RES=r2 is not None, PRECISION=precision, UPCAST=dot_upcast(y.dtype), BLOCK_C=block_c,
        **meta)
    return out


# ----------------------------------------------------------------------------------------------
# backward

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
            fc2_bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor], has_residual: bool):
    """Gradients of :func:`mlp_fwd` from ``y`` alone (the hidden activation is recomputed).

    Returns ``(dy, d_fc1_weight, d_fc1_bias | None, d_fc2_weight, d_fc2_bias | None,
    d_gamma | None, d_residual | None)``; ``dy`` is channels-last; ``d_residual`` is
    ``grad_out`` itself. Deterministic: no atomics, fixed reduction order.
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

    bm = _bwd_block_m(M)
    T = triton.cdiv(M, bm)
    h = torch.empty((M, D), device=dev, dtype=dt)
    dpre = torch.empty((M, D), device=dev, dtype=dt)
    db1p = torch.empty((T, D), device=dev, dtype=torch.float32)
    sgp = torch.empty((T, C), device=dev, dtype=torch.float32)
    if M > 0:
        kernel, meta = _MLP_BWD.get(dev, {"BLOCK_M": bm, "ITEMSIZE": y.element_size()}, C=C, D=D)
        grid = lambda META: (T, triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
        torch.library.wrap_triton(kernel)[grid](
            y2, g2, w1, w1 if fc1_bias is None else fc1_bias, w2, w1 if gamma is None else gamma,
            h, dpre, db1p, sgp, M, C, D, y2.stride(0), g2.stride(0),
            HAS_B1=fc1_bias is not None, HAS_GAMMA=gamma is not None,
            PRECISION=dot_precision(dt, dev), UPCAST=dot_upcast(dt), BLOCK_M=bm, **meta)
    sg = sgp.sum(0)
    db1 = None if fc1_bias is None else db1p.sum(0).to(dt)

    if gamma is None:
        dw2 = torch.mm(g2.t(), h)
        db2 = None if fc2_bias is None else sg.to(dt)
        dgamma = None
    else:
        gm = mm_f32(g2.t(), h)  # [C, D] fp32
        dw2 = torch.empty((C, D), device=dev, dtype=dt)
        dgamma = torch.empty((C,), device=dev, dtype=dt)
        db2 = torch.empty((C,), device=dev, dtype=dt)
        block_c = 64 if runtime.INTERPRET else 32
        torch.library.wrap_triton(_mlp_bwd_wgrad_kernel)[(triton.cdiv(C, block_c),)](
            gm, w2, gamma, gamma if fc2_bias is None else fc2_bias, sg, dw2, dgamma, db2, C, D,
            HAS_B2=fc2_bias is not None, BLOCK_C=block_c, BLOCK_D=128)
        if fc2_bias is None:
            db2 = None
    del h
    dy2 = torch.mm(dpre, w1)  # [M, C]
    dw1 = torch.mm(dpre.t(), y2)  # [D, C]
    return nhwc_view(dy2, N, H, W), dw1, db1, dw2, db2, dgamma, dres
