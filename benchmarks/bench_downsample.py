"""The stage downsample at CPU inference: one op (``convnext_fast::downsample``, LayerNorm into the
rows of a GEMM on the mlp tiles) vs its two modules (LayerNorm2d, then the packed oneDNN conv;
``CONVNEXT_FAST_CPU_DOWNSAMPLE=0``), at ConvNeXt-T's three downsample shapes, batch 1 and 8
(smoke mode: batch 1 at 8x8). Caches stay warm between rounds; in a model each downsample follows
an mlp's weights, which favours the fused op further (README, CPU results)."""
import pytest
import torch

from convnext_fast import _ext
from convnext_fast.bench import STAGES
from convnext_fast.models.convnext import Downsample, LayerNorm2d
from convnext_fast.models.cpu_conv import Fp32ComputeConv2d

# (C_in, H_in) -> C_out: the inputs of stages 2-4's downsamples
SHAPES = [(C, H, STAGES[i + 1][0]) for i, (C, H, _) in enumerate(STAGES[:-1])]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", ["modules", "fused"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"C{s[0]}_H{s[1]}")
def test_downsample(shape, dtype, provider, batch, run, full, device, monkeypatch):
    if device != "cpu":
        pytest.skip("the fused downsample is a CPU inference path")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if provider == "fused" and not _ext.cpu_downsample().get(str(torch_dtype).replace("torch.", "")):
        pytest.skip(f"no fused {dtype} downsample here: {_ext.cpu_downsample() or _ext.error()}")
    if not full and batch != 1:
        pytest.skip("smoke mode runs batch 1")
    C, H, C_out = shape
    H = H if full else 8
    mod = Downsample(LayerNorm2d(C), Fp32ComputeConv2d(C, C_out, kernel_size=2, stride=2)).eval()
    mod = mod.to(torch_dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, C, H, H, dtype=torch_dtype).to(memory_format=torch.channels_last)
    monkeypatch.setenv("CONVNEXT_FAST_CPU_DOWNSAMPLE", "1" if provider == "fused" else "0")

    def step():
        with torch.inference_mode():
            return mod(x)

    flops = 2 * batch * (H // 2) ** 2 * C_out * 4 * C
    run(step, kind="downsample", case=f"downsample C={C} H={H} {dtype} batch={batch}",
        provider=provider, batch=batch, flops=flops)
