"""dwconv_ln per backend vs eager PyTorch (cuDNN/ATen depthwise conv + LayerNorm) and
torch.compile of it, forward and forward+backward; bytes counted for GB/s."""
import pytest
import torch

from convnext_fast import backends, ops, reference
from convnext_fast.bench import op_cost

# ConvNeXt-T stage shapes (C, H=W) at 224px.
STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]
PROVIDERS = [*backends.BACKENDS, "torch_compile"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"C{s[0]}")
def test_dwconv_ln(run, full, device, bench_options, stage, dtype, provider, mode):
    C, H = stage
    if not full and (C, H) != STAGES[0]:
        pytest.skip("smoke mode runs the first stage shape only")
    if not full and provider == "torch_compile":
        pytest.skip("torch.compile is timed only with --benchmark")
    N = (128 if device == "cuda" else 8) if full else 1
    H = H if full else 7
    train = mode != "fwd"
    t = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=train)  # noqa: E731
    x = torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(train)
    args = (x, t(C, 1, 7, 7), t(C), t(C), t(C), 1e-6)
    if provider == "torch_compile":
        op = torch.compile(reference.dwconv_ln, mode=bench_options["compile_mode"])
    else:
        try:
            backends.select("dwconv_ln", x.device, provider, args, {})
        except backends.BackendError as e:
            pytest.skip(str(e))
        op = lambda *a: ops.dwconv_ln(*a, backend=provider)  # noqa: E731
    grad = torch.randn_like(x)

    def step():
        if not train:
            with torch.no_grad():
                return op(*args)
        for a in args[:5]:
            a.grad = None
        y = op(*args)
        y.backward(grad)
        return y

    flops, nbytes = op_cost("dwconv_ln", N, C, H, H, dtype.itemsize, mode)
    run(step, kind="op", op="dwconv_ln", mode=mode, case=f"dwconv_ln {mode} {str(dtype)[6:]} {[N, C, H, H]}",
        provider=provider, flops=flops, bytes=nbytes)
