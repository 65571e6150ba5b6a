"""mlp (V1) and mlp_grn (V2) forward per backend vs eager PyTorch; FLOPs recorded for TFLOP/s."""
import pytest
import torch

from convnext_fast import backends, ops

# ConvNeXt-T stage shapes (C, H=W) at 224px; D = 4C.
STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]


def _inputs(N, C, H, dtype, device):
    D = 4 * C
    t = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype)  # noqa: E731
    y = t(N, C, H, H).contiguous(memory_format=torch.channels_last)
    return y, t(D, C, scale=C ** -0.5), t(D), t(C, D, scale=D ** -0.5), t(C), t(D), t(D), t(C)


@pytest.mark.parametrize("op", ["mlp", "mlp_grn"])
@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"C{s[0]}")
def test_mlp_fwd(run, full, device, stage, dtype, backend, op):
    C, H = stage
    N = (128 if device == "cuda" else 8) if full else 1
    H = H if full else 7
    y, w1, b1, w2, b2, gw, gb, gamma = _inputs(N, C, H, dtype, device)
    if op == "mlp":
        args = (y, w1, b1, w2, b2, gamma, y)
        fn = lambda: ops.mlp(*args, backend=backend)  # noqa: E731
    else:
        args = (y, w1, b1, gw, gb, w2, b2, y, 1e-6)
        fn = lambda: ops.mlp_grn(*args, backend=backend)  # noqa: E731
    try:
        backends.select(op, y.device, backend, args, {})
    except backends.BackendError as e:
        pytest.skip(str(e))
    flops = 2 * 2 * N * H * H * C * 4 * C  # two GEMMs, M x C x 4C each
    run(fn, flops=flops, backend=backend, shape=[N, C, H, H], op=op)
