"""dwconv_ln per backend vs eager PyTorch (the reference: cuDNN/ATen conv + LayerNorm)."""
import pytest
import torch

from convnext_fast import backends, ops

# ConvNeXt-T stage shapes (C, H=W) at 224px.
STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]


def _bytes(N, C, H, W, dtype):
    return 2 * N * C * H * W * torch.finfo(dtype).bits // 8  # read x once, write y once


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"C{s[0]}")
def test_dwconv_ln_fwd(run, full, device, stage, dtype, backend):
    C, H = stage
    N = (128 if device == "cuda" else 8) if full else 1
    H = H if full else 7
    x = torch.randn(N, C, H, H, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    args = (x, torch.randn(C, 1, 7, 7, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype),
            torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype), 1e-6)
    try:
        backends.select("dwconv_ln", x.device, backend, args, {})
    except backends.BackendError as e:
        pytest.skip(str(e))
    run(lambda: ops.dwconv_ln(*args, backend=backend), bytes=_bytes(N, C, H, H, dtype),
        backend=backend, shape=[N, C, H, H])
