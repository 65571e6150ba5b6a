"""Numerics of the fused ops on every backend: fp16/bf16 statistics (LayerNorm mean/variance, GRN
norms) accumulate in fp32 and never overflow, and random shapes stay within the parity rule of
the fp64 reference (a property test, bounded in time and reproducible: derandomized, no example
database)."""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convnext_fast import backends, reference
from convnext_fast.specs import SPECS
from convnext_fast.testing import assert_parity

sys.path.insert(0, os.path.dirname(__file__))  # tests/_cases.py (--import-mode=importlib adds none)
from _cases import (INFERENCE_ONLY, as64, call, check_grads, check_output, inputs, leaves,  # noqa: E402
                    op_backend_params, skip_unless_runs)

LOWP = [torch.float16, torch.bfloat16]


def _scaled(op, dtype, device, scale):
    """Inputs whose activations reach ``scale`` (~1e4) while the op's output stays inside fp16's
    range: the statistics (sums of squares ~1e8 and more) would overflow fp16 if they were
    accumulated in it."""
    if op == "dwconv_ln":
        args = inputs(op, N=2, C=48, H=5, W=6, k=7, dtype=torch.float32)
        args[0] = args[0] * scale
        args[2] = args[2] * (scale / 10)  # a large conv bias: a large mean to subtract
    elif op == "mlp_grn":
        args = inputs(op, N=2, C=8, H=4, W=4, dtype=torch.float32, residual=False)
        args[0] = args[0] * (scale / 3)  # hidden activations ~scale, sum of squares over H*W ~1e9
    else:
        args = inputs(op, N=2, C=8, H=4, W=4, dtype=torch.float32)
        args[0] = args[0] * (scale / 3)
        args[5] = args[5] / 4  # gamma: keep the output (+ residual) inside fp16's range
    return [t.to(device, dtype) if isinstance(t, torch.Tensor) else t for t in args]


@pytest.mark.parametrize("dtype", LOWP, ids=["fp16", "bf16"])
@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_large_magnitude_low_precision(op, backend, device, dtype):
    args = _scaled(op, dtype, device, 1e4)
    skip_unless_runs(op, backend, args)
    out = call(op, args, backend)
    assert torch.isfinite(out).all(), "overflow: non-finite output from finite inputs"
    want = reference.__dict__[op](*as64(args))
    assert want.abs().max() < torch.finfo(dtype).max / 2
    lowp = reference.__dict__[op](*args)
    assert torch.isfinite(lowp).all()
    assert_parity(out, want, lowp, name=f"{op} {dtype} x1e4")


def _stats_op(backend):
    """The op that returns (y, mean, rstd) for ``backend``, or None when it has none."""
    return {"cpu": "dwconv_ln", "cuda": "dwconv_ln", "triton": "dwconv_ln_triton"}.get(backend)


@pytest.mark.parametrize("dtype", LOWP, ids=["fp16", "bf16"])
@pytest.mark.parametrize("op,backend,device", op_backend_params(["dwconv_ln"]))
def test_layernorm_statistics_are_fp32_and_exact(op, backend, device, dtype):
    """The saved mean/rstd (what backward uses) against fp64 for inputs of magnitude 1e4."""
    if _stats_op(backend) is None:
        pytest.skip(f"the {backend} backend saves no statistics of its own")
    args = _scaled(op, dtype, device, 1e4)
    skip_unless_runs(op, backend, args)
    x, w, b, lw, lb = args
    _, mean, rstd = getattr(torch.ops.convnext_fast, _stats_op(backend))(x, w, b, lw, lb, 1e-6)
    z = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=3, groups=x.shape[1])
    var, mu = torch.var_mean(z, dim=1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32
    assert mu.abs().max() > 100 and var.max() > torch.finfo(torch.float16).max  # fp16 would overflow
    torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-5 * mu.abs().max().item())
    torch.testing.assert_close(rstd.double(), (var + 1e-6).rsqrt(), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------
# property tests
# ------------------------------------------------------------------------------------------------
# Examples per backend: the Triton interpreter costs ~0.05-0.3 s per forward call.
EXAMPLES = {"torch": 30, "cpu": 60, "cuda": 60, "triton": 30, "onednn": 60}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KERNEL_SIZES = {"triton": [1, 3, 5, 7], "cuda": [3, 5, 7]}  # interpreter time; the CUDA kernel's k


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _shape(data, backend):
    """(N, C, H, W): tiny on the interpreter; N = 0, 1x1 images, odd and single channels allowed."""
    small = backend == "triton"
    return (data.draw(st.sampled_from([1, 2, 3, 1, 2, 0]), label="N"),  # N = 0 one time in six
            data.draw(st.integers(1, 24 if small else 48), label="C"),
            data.draw(st.integers(1, 6 if small else 10), label="H"),
            data.draw(st.integers(1, 6 if small else 10), label="W"))


def _check(op, backend, args, out):
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_output(op, out, args, name=f"{op}[{backend}] {tuple(args[0].shape)} {args[0].dtype}", ulps=2)


def _property(op, backend, device, draw_inputs):
    """Hypothesis examples: inputs from ``draw_inputs(data)``, forward against fp64, and for fp32
    on the compiled/torch backends the gradients too. Every drawn call must run on ``backend``."""
    skip_unless_runs(op, backend, inputs(op, N=1, C=8, H=3, W=3, k=3, device=device))

    @_settings(EXAMPLES[backend])
    @given(data=st.data())
    def run(data):
        torch.manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))
        args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in draw_inputs(data)]
        # (dwconv_ln at C = 1: dx is an exact zero times rstd = 1/sqrt(eps), fp32 rounding noise)
        grads = (args[0].dtype == torch.float32 and backend not in ("triton", *INFERENCE_ONLY)
                 and args[0].numel() > 0
                 and not (op == "dwconv_ln" and args[0].shape[1] == 1))
        live = leaves(args) if grads else args
        out = call(op, live, backend)
        _check(op, backend, args, out.detach())
        if grads:
            g = torch.randn_like(out)
            out.backward(g)
            check_grads(op, live, g)

    run()


@pytest.mark.parametrize("op,backend,device", op_backend_params(["dwconv_ln"]))
def test_dwconv_ln_property(op, backend, device):
    def draw(data):
        N, C, H, W = _shape(data, backend)
        k = data.draw(st.sampled_from(KERNEL_SIZES.get(backend, [1, 3, 5, 7, 9])), label="k")
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        bias = data.draw(st.booleans(), label="bias")
        return inputs(op, N=N, C=C, H=H, W=W, k=k, dtype=dtype, bias=bias)

    _property(op, backend, device, draw)


def _dtypes(op, backend, device):
    """The dtypes of DTYPES that ``backend`` runs (the oneDNN MLP has no fp16)."""
    return [d for d in DTYPES if backends.why_not(
        op, backend, SPECS[op].bind(inputs(op, N=1, C=8, H=3, W=3, dtype=d, device=device))) is None]


@pytest.mark.parametrize("op,backend,device", op_backend_params(["mlp", "mlp_grn"]))
def test_mlp_property(op, backend, device):
    dtypes = _dtypes(op, backend, device) or DTYPES

    def draw(data):
        N, C, H, W = _shape(data, backend)
        D = data.draw(st.integers(1, 4 * C + 8), label="D")
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        kw = dict(bias=data.draw(st.booleans(), label="bias"),
                  residual=data.draw(st.booleans(), label="residual"))
        if op == "mlp":
            kw["gamma"] = data.draw(st.booleans(), label="gamma")
        return inputs(op, N=N, C=C, H=H, W=W, D=D, dtype=dtype, **kw)

    _property(op, backend, device, draw)
