"""Shared pieces of the MLP kernels (private): GELU, a fused-epilogue GEMM, autotune plumbing.

Conventions (DESIGN.md): row-major [M, K] activations (NHWC viewed as [N*H*W, C]), weights in
nn.Linear layout [out, in], fp32 accumulation and statistics for every input dtype, exact erf
GELU. Launchers go through ``torch.library.wrap_triton`` so that a ``triton_op`` calling them
can be traced by torch.compile; outside tracing it simply launches the kernel.

Autotuning: on a GPU every tunable kernel is wrapped in ``triton.autotune`` (keyed on the
channel counts) with a config list for the device's architecture (sm_90+ or sm_80-class);
``CONVNEXT_FAST_TRITON_AUTOTUNE=0`` uses the first config of the list instead. Under
``TRITON_INTERPRET=1`` nothing is autotuned: each kernel runs with one heuristic config whose
tiles are fitted to the problem (:func:`fit_block`), because the interpreter pays for padded
work and per program/loop step, not for real FLOPs.

Interpreter caveats (CPU tests only): its ``tl.dot`` multiplies bf16 tensors as raw uint16, so
bf16 operands are upcast to fp32 there (:func:`dot_upcast`, exact), and it converts fp32 -> bf16
by truncation instead of round-to-nearest-even (the compiled kernels round to nearest).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "interpreting", "autotune_enabled", "dot_precision", "dot_upcast", "next_pow2", "fit_block",
    "TunedKernel", "gemm_configs", "row_tile_configs", "linear_fwd", "gelu", "gelu_grad", "mma",
]


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def autotune_enabled() -> bool:
    """``CONVNEXT_FAST_TRITON_AUTOTUNE=0`` launches each kernel with the first config of its list
    instead of benchmarking them all on first use (faster start-up, e.g. for test runs)."""
    return os.environ.get("CONVNEXT_FAST_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no")


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` for ``tl.dot``: IEEE fp32 unless the user allowed TF32 for CUDA matmuls.

    Only fp32 operands are affected; for fp16/bf16 operands the value is ignored by Triton.
    """
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Feed bf16 MMA operands to ``tl.dot`` as fp32 (exact: products of bf16 values are exact in
    fp32, accumulation is fp32 either way). Only under the interpreter, whose dot multiplies
    bf16 tensors as their raw uint16 storage."""
    return dtype == torch.bfloat16 and interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def fit_block(n: int, candidates: Sequence[int] = (128, 64, 32, 16), slack: float = 1.25) -> int:
    """The largest candidate tile whose padded extent is within ``slack`` x the least padded one.

    Used for the interpreter's single config: there padded work costs as much as real work (its
    dot is a plain numpy loop), but every extra program / loop step costs fixed overhead too.
    """
    padded = {b: triton.cdiv(max(n, 1), b) * b for b in candidates}
    best = min(padded.values())
    return max(b for b in candidates if padded[b] <= slack * best)


def _arch(device: torch.device) -> int:
    """Major compute capability (0 under the interpreter / on CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_capability(device)[0]


class TunedKernel:
    """A ``@triton.jit`` kernel plus how to pick its tile sizes.

    ``configs(arch, static)`` returns the autotune candidates for a GPU of major capability
    ``arch`` (9 -> the sm_90 list, else the sm_80 list), given the launch's static constexprs
    (e.g. the padded channel count, used to drop configs whose accumulator cannot fit).
    ``heuristic(static)`` returns the single config dict used under the interpreter.
    ``get(device, static)`` returns ``(kernel, meta)``: ``meta`` holds the tile constexprs the
    launcher must pass itself (empty when the autotuner picks them).
    """

    def __init__(self, fn, configs: Callable[[int, dict], List["triton.Config"]], key: Sequence[str],
                 heuristic: Callable[[dict], dict]):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.heuristic = heuristic
        self._tuned: Dict[Tuple, object] = {}

    def get(self, device: torch.device, static: Optional[dict] = None, **hints):
        """``hints`` (problem sizes) feed only the interpreter heuristic, never the GPU cache key."""
        static = dict(static or {})
        if interpreting() or device.type != "cuda":
            return self.fn, self.heuristic({**static, **hints})
        arch = _arch(device)
        if not autotune_enabled():  # first (default) config of the architecture's list
            cfg = self.configs(arch, static)[0]
            return self.fn, {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        cache_key = (arch, tuple(sorted(static.items())))
        kernel = self._tuned.get(cache_key)
        if kernel is None:
            kernel = triton.autotune(configs=self.configs(arch, static), key=self.key)(self.fn)
            self._tuned[cache_key] = kernel
        return kernel, {}


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
    if A_AFFINE:
        img = (rows // HW).to(tl.int64)

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
