"""The tile configs of the mlp / mlp_grn Triton kernels against the GPUs' limits, for every C of
every ConvNeXt variant (no kernel runs: plain arithmetic, so it holds without a GPU).

For each C (40 .. 3072), input width (2 bytes: bf16/fp16; 4: fp32) and architecture (sm_90: 227
KiB of shared memory per block, sm_80: 163 KiB), every kernel the launchers would start must have
at least one config, each config's shared memory - spelled out here, independently of the
kernels' own pruning - must fit, and no row tile may be a toy (BLOCK_M >= 64: a Hopper warpgroup
MMA is 64 rows high). Also: which C take the fused (hidden on chip) path, how C is split into
power-of-two chunks, and what fp32's "tf32x3" dot costs in accuracy.
"""
import pytest
import torch

pytest.importorskip("triton")

from convnext_fast.kernels import gemm, mlp, mlp_grn  # noqa: E402
from convnext_fast.kernels.runtime import dot_precision  # noqa: E402
from convnext_fast.models.registry import VARIANTS  # noqa: E402
from convnext_fast.testing import assert_fp32  # noqa: E402

SMEM = {9: 227 * 1024, 8: 163 * 1024}  # opt-in shared memory per block: H100/H200, A100
MIN_BLOCK_M = 64
CHANNELS = sorted({c for v in VARIANTS.values() for c in v["dims"]})
STAGE_HW = (56 * 56, 28 * 28, 14 * 14, 7 * 7)  # the four stages at 224 px
ITEMSIZES = {2: "16-bit", 4: "fp32"}


def _fused_smem(kind, bm, bh, stages, c0, c1, isz, grn):
    """Bytes of shared memory of one fused program: (operand tiles streamed per pipeline stage)
    x stages + operand tiles resident for the whole program + the epilogue's fp32 tile + for
    fp32 (tf32x3) one more fp32 copy of each shared-memory MMA operand (its TF32 split) + for
    mlp_grn the fp32 [rows, BLOCK_H] gathers of S (and coef) the pipeline prefetches."""
    c = c0 + c1
    gathers = (1 if kind == "fwd" else 2) if grn else 0
    if kind == "fwd":
        per_stage = bh * c * isz + c * bh * isz  # W1[chunk, :] + W2[:, chunk]
        resident = bm * c * isz + bm * bh * isz  # y tile + hidden chunk (fc2's A operand)
        epilogue = bm * c0 * 4                   # fp32 accumulator, one C chunk at a time
        split = 2 * bh * c * 4                   # W1, W2 chunks
    elif kind == "bwd_dx":
        per_stage = bh * c * isz + c * bh * isz  # W1, W2 chunks
        resident = 2 * bm * c * isz + bm * bh * isz  # y and g tiles + dpre (A operand of dy)
        epilogue = bm * c0 * 4                   # dy
        split = 3 * bh * c * 4                   # W1^T, W2, W1
    else:  # bwd_dw: one hidden chunk, streaming the rows
        per_stage = bm * c * isz + bm * c * isz  # y and g row tiles
        resident = 2 * bh * c * isz + 2 * bm * bh * isz  # W1, W2 chunks + h and dpre operands
        epilogue = bh * c0 * 4                   # the dW1 / G partials
        split = 4 * bm * c * 4                   # y^T, g^T, y, g
    return (stages * per_stage + resident + epilogue + (split if isz == 4 else 0)
            + (stages - 1) * gathers * bm * bh * 4)


def _meta(cfg):
    return cfg.kwargs, cfg.num_warps, cfg.num_stages


def _check_fused(kind, C, isz, arch, grn=False):
    c0, c1 = gemm.split_channels(C)
    cfgs = gemm.fused_configs(arch, {"KIND": kind, "BLOCK_C0": c0, "BLOCK_C1": c1, "ITEMSIZE": isz,
                                     "GRN": grn})
    assert cfgs, f"{kind} C={C} {ITEMSIZES[isz]} sm_{arch}0 grn={grn}: no config"
    for cfg in cfgs:
        kw, warps, stages = _meta(cfg)
        bm, bh = kw["BLOCK_M"], kw["BLOCK_H"]
        smem = _fused_smem(kind, bm, bh, stages, c0, c1, isz, grn)
        assert smem == gemm.fused_smem_bytes(kind, bm, bh, stages, c0, c1, isz, grn)
        assert smem <= SMEM[arch], f"{kind} C={C} sm_{arch}0 {kw} x{stages}: {smem} B"
        assert bm >= MIN_BLOCK_M and bh >= 16 and warps in (4, 8)
    return cfgs


def _check_gemm(N, K, isz, arch):
    """The two-GEMM forward's kernel for out[M, N] = a[M, K] @ w[N, K]^T."""
    cfgs = gemm.gemm_configs(arch, {"ITEMSIZE": isz})
    assert cfgs
    for cfg in cfgs:
        kw, _, stages = _meta(cfg)
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        # A, W tiles per stage + epilogue (+ fp32's tf32x3 copy of the W tile)
        smem = stages * (bm * bk + bk * bn) * isz + bm * bn * 4 + (bk * bn * 4 if isz == 4 else 0)
        assert smem <= SMEM[arch] and bm >= MIN_BLOCK_M, (N, K, kw)


def _check_row_tiles(block_m, n_gemm, isz, arch):
    """The kernels with a launcher-fixed row tile and ``n_gemm`` GEMMs over K = C."""
    assert block_m >= MIN_BLOCK_M
    cfgs = gemm.row_tile_configs(arch, block_m, n_gemm, isz)
    assert cfgs
    for cfg in cfgs:
        kw, _, stages = _meta(cfg)
        bd, bk = kw["BLOCK_D"], kw["BLOCK_K"]
        smem = (stages * n_gemm * (block_m * bk + bk * bd) * isz + block_m * bd * 4
                + (n_gemm * bk * bd * 4 if isz == 4 else 0))
        assert smem <= SMEM[arch], (block_m, n_gemm, kw)


@pytest.mark.parametrize("arch", [9, 8], ids=["sm90", "sm80"])
@pytest.mark.parametrize("isz", list(ITEMSIZES), ids=list(ITEMSIZES.values()))
def test_every_variant_has_real_tiles(arch, isz):
    for C in CHANNELS:
        D = 4 * C
        for grn in (False, True):  # mlp, mlp_grn
            if mlp.fused_fits(C, isz, arch, grn=grn):
                _check_fused("fwd", C, isz, arch, grn)
            else:
                _check_gemm(D, C, isz, arch)  # fc1 (+ GELU; + sums of squares for GRN)
                _check_gemm(C, D, isz, arch)  # fc2 (+ GRN prologue, gamma, residual)
            if mlp.fused_fits(C, isz, arch, backward=True, grn=grn):
                _check_fused("bwd_dx", C, isz, arch, grn)
                _check_fused("bwd_dw", C, isz, arch, grn)
            elif not grn:
                _check_row_tiles(mlp.BWD_BLOCK_M, 2, isz, arch)
        for hw in STAGE_HW:  # mlp_grn: the per-image first pass and backward
            bm = mlp_grn.grn_block_m(hw, mlp_grn.GRN_BLOCK_M_CANDIDATES)
            _check_row_tiles(bm, 1, isz, arch)
            _check_row_tiles(bm, 2, isz, arch)


def test_hidden_on_chip_up_to_192():
    """16-bit inputs: the fused forward and backward of mlp run every C <= 192 on both GPUs,
    the forward with its default sm_90 tile 128 rows high; past 192 two GEMMs. mlp_grn's
    backward gathers two more fp32 tiles per hidden chunk (S and coef): fused up to C = 160,
    at 192 its sm_90 weight-gradient tile would spill registers."""
    for C in CHANNELS:
        for arch in (9, 8):
            for grn in (False, True):
                fits = (mlp.fused_fits(C, 2, arch, grn=grn),
                        mlp.fused_fits(C, 2, arch, backward=True, grn=grn))
                want = (C <= 192, C <= (160 if grn and arch == 9 else 192))
                assert fits == want, (C, arch, grn)
        if C <= 192:
            first = _check_fused("fwd", C, 2, 9)[0]
            assert first.kwargs["BLOCK_M"] == 128 and first.num_warps == 8, C


def test_split_channels():
    for C in CHANNELS + [16, 24, 136, 320, 352]:
        c0, c1 = gemm.split_channels(C)
        for c in (c0, c1):
            assert c == 0 or (c >= 16 and c & (c - 1) == 0), (C, c0, c1)
        assert c0 + c1 >= C and c1 < c0
        if C % 16 == 0 and C // 16 & (C // 16 - 1) == 0 or C in (48, 96, 192, 80, 160, 320):
            assert c0 + c1 == C, (C, c0, c1)  # 2^k, 3 * 2^k, 5 * 2^k: exact, no padding
    assert gemm.split_channels(96) == (64, 32)
    assert gemm.split_channels(192) == (128, 64)
    assert gemm.split_channels(40) == (32, 16)  # 8 columns of padding (tl.dot's minimum is 16)


# ----------------------------------------------------------------------------------------------
# fp32: tensor cores via tf32x3

def test_fp32_dot_precision():
    cuda = torch.device("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32, cuda) == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32, cuda) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert dot_precision(torch.bfloat16, cuda) == "ieee"


def _tf32(x):
    """Round fp32 to TF32 (10 explicit mantissa bits), to nearest with ties away from zero, as
    the cvt.rna.tf32.f32 that Triton's tf32x3 lowering uses."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _mm_tf32x3(a, b):
    """a @ b as Triton's tf32x3 dot computes it: split each operand into a TF32 head and a TF32
    tail, then lo*hi + hi*lo + hi*hi (the lo*lo term is dropped), fp32 accumulation. The
    products of TF32 values are exact in fp32, so fp32 matmuls of the parts emulate it."""
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi


@pytest.mark.parametrize("C", [96, 768])
def test_tf32x3_mlp_within_fp32_rule(C):
    """The MLP forward with every GEMM emulated as tf32x3 passes the fp32 parity rule against
    fp64 (K up to 4C = 3072), where plain TF32 does not."""
    torch.manual_seed(C)
    M, D = 64, 4 * C
    y = torch.randn(M, C)
    w1, w2 = torch.randn(D, C) / C ** 0.5, torch.randn(C, D) / D ** 0.5
    b1, b2, gamma, res = torch.randn(D), torch.randn(C), torch.rand(C), torch.randn(M, C)

    def mlp_with(mm, t):
        h = torch.nn.functional.gelu(mm(t(y), t(w1).T) + t(b1))
        return t(res) + t(gamma) * (mm(h, t(w2).T) + t(b2))

    want = mlp_with(torch.mm, torch.Tensor.double)
    assert_fp32(mlp_with(_mm_tf32x3, torch.Tensor.float), want, f"tf32x3 C={C}")
    tf32 = mlp_with(lambda a, b: _tf32(a) @ _tf32(b), torch.Tensor.float)
    with pytest.raises(AssertionError):
        assert_fp32(tf32, want)


def test_interpreter_ignores_input_precision():
    """Under TRITON_INTERPRET=1 every tl.dot is a plain fp32 matmul whatever its
    input_precision, so the interpreter's parity tests cannot see tf32x3's rounding: that is
    what the emulation above is for (and the GPU run's parity rows)."""
    from convnext_fast.kernels import runtime

    if not runtime.INTERPRET:
        pytest.skip("compiled kernels: the GPU parity tests cover tf32x3")
    import triton
    import triton.language as tl

    @triton.jit
    def dots(A, B, OUT, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(A + i[:, None] * N + i[None, :])
        b = tl.load(B + i[:, None] * N + i[None, :])
        tl.store(OUT + i[:, None] * N + i[None, :], tl.dot(a, b, input_precision="tf32x3"))
        tl.store(OUT + N * N + i[:, None] * N + i[None, :], tl.dot(a, b, input_precision="tf32"))

    a, b = torch.randn(32, 32), torch.randn(32, 32)
    out = torch.empty(2, 32, 32)
    dots[(1,)](a, b, out, N=32)
    exact = (a.double() @ b.double()).float()
    assert (out[0] - exact).abs().max() <= 1e-5 and torch.equal(out[0], out[1])
