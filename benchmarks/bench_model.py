"""Whole models, inference and a training step (forward + backward), for every provider:
timm eager, torch.compile of timm (max-autotune on GPU), timm patched by convnext_fast.patch_timm,
convnext_fast on automatic backends and on each backend (convnext_fast.bench.PROVIDERS).
Same dtype, channels-last input, one set of weights; parity of the logits is asserted."""
import os

import pytest
import torch

pytest.importorskip("timm")

from convnext_fast.bench import (PROVIDERS, autocast_dtype, logits_error, make_reference, make_runner, model_input,  # noqa: E402
                                 provider_unavailable)

CUDA = torch.cuda.is_available()
MODELS = ["convnext_tiny", "convnext_base", "convnextv2_tiny"]
SMOKE_MODEL = {"convnext_tiny": "convnext_atto", "convnextv2_tiny": "convnextv2_atto"}
BATCHES = [1, 32, 256] if CUDA else [1, 8]
# amp_bf16: fp32 weights under torch.autocast (bench.AUTOCAST), the other way users run bf16
DTYPES = ["bf16"] if CUDA else ["fp32", "amp_bf16", "bf16"]
_REFS = {}


def _reference(name, device, dtype):
    key = (name, device, dtype)
    if key not in _REFS:
        _REFS.clear()  # one model at a time: convnext_base in fp32 is large
        _REFS[key] = make_reference(name, device, dtype)
    return _REFS[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
def test_model(run, full, device, bench_options, model, dtype, mode, batch, provider):
    if bench_options["models"] and model not in bench_options["models"]:
        pytest.skip("not selected by --bench-model")
    if bench_options["batches"] and batch not in bench_options["batches"]:
        pytest.skip("not selected by --bench-batch")
    if not full:
        if model not in SMOKE_MODEL or batch != 1:
            pytest.skip("smoke mode runs the atto models at batch 1 only")
        if "compile" in provider:
            pytest.skip("torch.compile is timed only with --benchmark (compiling takes minutes on CPU)")
        if provider == "convnext_fast:triton" and os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("the Triton interpreter takes minutes per model; the op smoke tests cover it")
        model = SMOKE_MODEL[model]
    why = provider_unavailable(provider, device, dtype, mode)
    if why:
        pytest.skip(why)
    res = 224 if full else 32
    ref = _reference(model, device, dtype)
    x = model_input(batch, res, device, dtype)
    ref.eval()
    amp = autocast_dtype(dtype)
    with torch.inference_mode(), torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None):
        base = ref(x)
    step = make_runner(provider, ref, x, mode, bench_options["compile_mode"], dtype)
    bound = 1e-4 if dtype == "fp32" else 5e-2
    err = logits_error(step(), base)
    assert err <= bound, f"{provider}: logits differ from timm by {err:.3g} of max |logit|"
    run(step, kind="model", model=model, mode=mode, dtype=dtype, resolution=res,
        case=f"{model} {mode} {dtype} b{batch} {res}px", provider=provider, batch=batch, max_err_vs_timm=err)
