"""Whole-model inference: convnext_fast vs timm eager vs torch.compile of timm."""
import pytest
import torch

timm = pytest.importorskip("timm")

import convnext_fast  # noqa: E402


@pytest.fixture(scope="module")
def models(full, device):
    name = "convnext_tiny" if full else "convnext_atto"
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval().to(device, memory_format=torch.channels_last)
    return name, ref, convnext_fast.from_timm(ref).eval()


@pytest.mark.parametrize("provider", ["timm", "timm_compile", "convnext_fast"])
@pytest.mark.parametrize("batch", [1, 8])
def test_model_inference(run, full, device, models, provider, batch):
    name, ref, ours = models
    if provider == "timm_compile" and not full:
        pytest.skip("torch.compile is timed only with --benchmark (compiling takes minutes on CPU)")
    res = 224 if full else 32
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
    model = {"timm": ref, "convnext_fast": ours}.get(provider) or torch.compile(ref)
    with torch.inference_mode():
        if provider == "convnext_fast":
            scale = ref(x).abs().max()
            assert (ours(x) - ref(x)).abs().max() <= 1e-4 * scale
        run(lambda: model(x), model=name, batch=batch, provider=provider)
