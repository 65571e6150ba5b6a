"""Native and timm-patched models under torch.compile (fullgraph, dynamic batch), autocast,
gradient checkpointing, no_grad and inference_mode.

On CPU the compile tests run the torch and cpu backends (the triton backend cannot be compiled
under the interpreter, DESIGN.md section 6); with a GPU they run cuda and triton too. Graph-break
tests trace with dynamo only (``aot_eager``, no code generation) to stay fast; one test compiles
with inductor end to end.
"""
import pytest
import torch

timm = pytest.importorskip("timm")

import convnext_fast  # noqa: E402
from convnext_fast import backends  # noqa: E402
from convnext_fast.testing import assert_parity  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILE_BACKENDS = ["torch", "cpu"] if DEVICE == "cpu" else ["torch", "cuda", "triton"]


def _timm(name="convnext_atto", **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # layer scale 1e-6 / GRN 0 at init would hide the branches
        for n, p in model.named_parameters():
            if n.endswith("gamma") or ".grn." in n:
                p.normal_(0.0, 0.5)
    return model.to(DEVICE)


def _model(kind: str, name="convnext_atto", **kwargs):
    ref = _timm(name, **kwargs)
    if kind == "native":
        return convnext_fast.from_timm(ref)
    convnext_fast.patch_timm(ref)
    return ref


def _ops_on(backend: str) -> dict:
    """Each op the backend implements, mapped to it (the others stay automatic)."""
    mapping = {op: backend for op in ("dwconv_ln", "mlp", "mlp_grn") if backends.available(op, backend) is None}
    if not mapping:
        pytest.skip(f"{backend} backend: {backends.available('dwconv_ln', backend)}")
    return mapping


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Each backend sees a V1 and a V2 model, one native and one patched (the four cost ~10 s each).
_PAIRINGS = ((("native", "convnext_atto"), ("patched", "convnextv2_atto")),
             (("native", "convnextv2_atto"), ("patched", "convnext_atto")))
GRAPH_CASES = [(backend, kind, name) for i, backend in enumerate(COMPILE_BACKENDS)
               for kind, name in _PAIRINGS[i % 2]]


@pytest.mark.parametrize("backend,kind,name", GRAPH_CASES)
def test_no_graph_breaks(backend, kind, name):
    model = _model(kind, name).train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with convnext_fast.use_backend(_ops_on(backend)):
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(x)
        out.sum().backward()
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["native", "patched"])
def test_dynamic_batch_does_not_recompile(kind):
    model = _model(kind).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 32, 32, device=DEVICE))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (3, 5):
                x = torch.randn(batch, 3, 32, 32, device=DEVICE)
                torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["native", "patched"])
def test_inductor_compile_matches_eager(kind):
    model = _model(kind).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["native", "patched"])
def test_autocast(kind, dtype):
    if DEVICE == "cpu" and dtype == torch.float16 and not hasattr(torch, "get_autocast_dtype"):
        pytest.skip("fp16 autocast on CPU needs torch >= 2.4")
    ref = _timm().eval()
    model64 = _timm().double().eval()
    model64.load_state_dict(ref.state_dict())
    model = _model(kind).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        ref64 = model64(x.double())
        with torch.autocast(DEVICE, dtype=dtype):
            timm_lowp = ref(x)
            out = model(x)
    assert out.dtype == dtype
    assert_parity(out, ref64, timm_lowp.to(dtype), name=f"{kind} autocast {dtype}")

    # training under autocast: fp32 parameters get fp32 gradients
    model.train()
    with torch.autocast(DEVICE, dtype=dtype):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_autocast_under_compile():
    model = _model("native").train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = compiled(x)
        ref = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["native", "patched"])
def test_grad_checkpointing_matches(kind):
    model = _model(kind, "convnextv2_atto").train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    model(x).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("kind", ["native", "patched"])
def test_no_grad_and_inference_mode(kind):
    model = _model(kind).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        a = model(x)
    with torch.inference_mode():
        b = model(x)
    assert not a.requires_grad and b.is_inference()
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["native", "patched"])
def test_reduce_overhead_cuda_graphs(kind):
    model = _model(kind).eval().to(torch.bfloat16)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(1, 3, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):  # warm-up runs, then replays of the recorded graph
            out = compiled(x)
        torch.testing.assert_close(out.float(), model(x).float(), atol=2e-2, rtol=2e-2)
