"""The ``onednn`` mlp and mlp_grn backend beyond the contract tests (tests/ops/test_contract.py): ConvNeXt
stage widths, awkward row counts, weights changed in place between calls (the packed weights are
cached per version), the refusal to run a call that needs gradients, and the whole model."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/_cases.py
from _cases import check_output  # noqa: E402

import convnext_fast  # noqa: E402
from convnext_fast import backends, ops  # noqa: E402
from convnext_fast.backends import _onednn  # noqa: E402
from convnext_fast.specs import SPECS  # noqa: E402

pytestmark = pytest.mark.skipif(backends.available("mlp", "onednn") is not None,
                                reason=str(backends.available("mlp", "onednn")))
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.bfloat16 in _onednn._DTYPES else [])


def _case(N, C, H, W, dtype, gamma=True, residual=True):
    D = 4 * C
    y = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)
    args = [y, (torch.randn(D, C) / C ** 0.5).to(dtype), torch.randn(D, dtype=dtype),
            (torch.randn(C, D) / D ** 0.5).to(dtype), torch.randn(C, dtype=dtype),
            torch.rand(C, dtype=dtype) if gamma else None,
            torch.randn_like(y) if residual else None]
    return args


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 96, 7, 7), (2, 40, 5, 3), (1, 80, 1, 1), (3, 24, 9, 11)],
                         ids=lambda s: "x".join(map(str, s)))
def test_parity(shape, dtype):
    for gamma, residual in ((True, True), (False, True), (True, False)):
        args = _case(*shape, dtype, gamma, residual)
        with torch.inference_mode():
            out = ops.mlp(*args, backend="onednn")
        assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
        check_output("mlp", out, args, name=f"onednn {shape} gamma={gamma} residual={residual}")


def test_empty_batch():
    args = _case(0, 16, 4, 4, torch.float32)
    with torch.inference_mode():
        assert ops.mlp(*args, backend="onednn").shape == (0, 16, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_changed_in_place_are_seen(dtype):
    args = _case(2, 32, 4, 4, dtype)
    params = [torch.nn.Parameter(t) for t in args[1:6]]
    args = [args[0], *params, args[6]]
    made = _onednn._PACKED.made
    with torch.inference_mode():
        ops.mlp(*args, backend="onednn")
        ops.mlp(*args, backend="onednn")
    assert _onednn._PACKED.made == made + 1  # packed once for both calls
    for p in params:
        with torch.no_grad():
            p.mul_(-0.5)  # each one alone must invalidate the packed weights
        with torch.inference_mode():
            out = ops.mlp(*args, backend="onednn")
        check_output("mlp", out, args, name="after an in-place weight change")


def test_refuses_calls_that_need_gradients():
    args = _case(1, 16, 3, 3, torch.float32)
    args[1].requires_grad_()
    assert "inference only" in backends.why_not("mlp", "onednn", SPECS["mlp"].bind(args))
    with pytest.raises(backends.BackendError, match="inference only"):
        ops.mlp(*args, backend="onednn")
    out = ops.mlp(*args)  # automatic selection: a backend with a backward
    out.sum().backward()
    assert args[1].grad is not None


@pytest.mark.parametrize("model_name", ["convnext_atto", "convnextv2_atto"])
@pytest.mark.parametrize("dtype", ["fp32", "amp_bf16", "bf16"])
def test_model_matches_timm(dtype, model_name):
    timm = pytest.importorskip("timm")
    if dtype != "fp32" and torch.bfloat16 not in _onednn._DTYPES:
        pytest.skip("oneDNN has no native bf16 on this CPU")
    from convnext_fast.bench import autocast_dtype, logits_error, make_reference, model_input

    del timm
    ref = make_reference(model_name, "cpu", dtype).eval()
    x = model_input(2, 64, "cpu", dtype)
    model = convnext_fast.from_timm(ref).to(memory_format=torch.channels_last).eval()
    amp = autocast_dtype(dtype)
    with torch.inference_mode(), torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
        base = ref(x)
        with backends.use_backend({"mlp": "onednn", "mlp_grn": "onednn"}):
            made = _onednn._PACKED.made
            out = model(x)
            # every block's MLP ran on oneDNN: one set of packed weights each, made once (atto's
            # 1x1-conv weights reach the op as views made anew on every call)
            assert _onednn._PACKED.made - made == sum(len(s.blocks) for s in ref.stages)
            made = _onednn._PACKED.made
            torch.testing.assert_close(model(x), out, rtol=0, atol=0)
            assert _onednn._PACKED.made == made
    assert logits_error(out, base) <= (1e-5 if dtype == "fp32" else 5e-2)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_row_chunks(monkeypatch, dtype):
    """Rows in chunks (the hidden of a chunk stays in cache): a last chunk shorter than the rest,
    with and without the residual."""
    C = 16
    for residual in (True, False):
        args = _case(2, C, 7, 5, dtype, residual=residual)  # 70 rows: chunks of 2C = 32, 32, 6
        monkeypatch.setattr(_onednn, "_CHUNK_BYTES", 2 * C * 4 * C * args[0].element_size())
        with torch.inference_mode():
            out = ops.mlp(*args, backend="onednn")
        check_output("mlp", out, args, name=f"onednn in row chunks, residual={residual}")
