"""mlp (V1) and mlp_grn (V2) per backend vs eager PyTorch and torch.compile of it, forward and
forward+backward; FLOPs and bytes counted by convnext_fast.bench.op_cost."""
import pytest
import torch

from convnext_fast import backends, ops, reference
from convnext_fast.bench import op_cost

# ConvNeXt-T stage shapes (C, H=W) at 224px; D = 4C.
STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]
PROVIDERS = [*backends.BACKENDS, "torch_compile"]


def _inputs(N, C, H, dtype, device, train):
    D = 4 * C

    def t(*s, scale=1.0):
        return (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_(train)

    y = t(N, C, H, H).detach().contiguous(memory_format=torch.channels_last).requires_grad_(train)
    x = t(N, C, H, H).detach().contiguous(memory_format=torch.channels_last).requires_grad_(train)
    return y, t(D, C, scale=C ** -0.5), t(D), t(C, D, scale=D ** -0.5), t(C), t(D), t(D), t(C), x


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op_name", ["mlp", "mlp_grn"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"C{s[0]}")
def test_mlp(run, full, device, bench_options, stage, dtype, provider, op_name, mode):
    C, H = stage
    if not full and (C, H) != STAGES[0]:
        pytest.skip("smoke mode runs the first stage shape only")
    if not full and provider == "torch_compile":
        pytest.skip("torch.compile is timed only with --benchmark")
    N = (128 if device == "cuda" else 8) if full else 1
    H = H if full else 7
    train = mode != "fwd"
    y, w1, b1, w2, b2, gw, gb, gamma, x = _inputs(N, C, H, dtype, device, train)
    if op_name == "mlp":
        args = (y, w1, b1, w2, b2, gamma, x)
        fused, ref = ops.mlp, reference.mlp
    else:
        args = (y, w1, b1, gw, gb, w2, b2, x, 1e-6)
        fused, ref = ops.mlp_grn, reference.mlp_grn
    if provider == "torch_compile":
        fn = torch.compile(ref, mode=bench_options["compile_mode"])
    else:
        try:
            backends.select(op_name, y.device, provider, args, {})
        except backends.BackendError as e:
            pytest.skip(str(e))
        fn = lambda *a: fused(*a, backend=provider)  # noqa: E731
    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    grad = torch.randn_like(y)

    def step():
        if not train:
            with torch.no_grad():
                return fn(*args)
        for a in leaves:
            a.grad = None
        out = fn(*args)
        out.backward(grad)
        return out

    flops, nbytes = op_cost(op_name, N, C, H, H, dtype.itemsize, mode)
    run(step, kind="op", op=op_name, mode=mode, case=f"{op_name} {mode} {str(dtype)[6:]} {[N, C, H, H]}",
        provider=provider, flops=flops, bytes=nbytes)
