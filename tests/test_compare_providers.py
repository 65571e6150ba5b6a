"""The benchmark's optional CPU engines (convnext_fast.bench: "openvino", "onnxruntime", the
[compare] extra) and the autocast dtypes: each engine runs timm's weights and matches timm's logits;
one that is not installed, or asked for what it does not run, says why in one line."""
import importlib.util

import pytest
import torch

from convnext_fast import bench

timm = pytest.importorskip("timm")
ENGINES = ("openvino", "onnxruntime")


def _installed(name):
    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_timm(engine):
    if not _installed(engine):
        pytest.skip(f"{engine} is not installed ({bench.COMPARE_EXTRA})")
    ref = bench.make_reference("convnext_atto", "cpu", "fp32").eval()
    x = bench.model_input(2, 32, "cpu", "fp32")
    with torch.inference_mode():
        base = ref(x)
    step = bench.make_runner(engine, ref, x, dtype="fp32")
    out = step()
    assert out.shape == base.shape
    assert bench.logits_error(out, base) < 1e-4
    assert torch.equal(step(), out)  # the input array is made once: a second call sees the same


def test_openvino_bf16_hint():
    if not _installed("openvino"):
        pytest.skip(f"openvino is not installed ({bench.COMPARE_EXTRA})")
    ref = bench.make_reference("convnext_atto", "cpu", "fp32").eval()
    x = bench.model_input(1, 32, "cpu", "fp32")
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        base = ref(x)
    out = bench.make_runner("openvino", ref, x, dtype="amp_bf16")()
    assert bench.logits_error(out, base) < 5e-2


def test_not_installed_says_how(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ENGINES else real(name, *a))
    for engine in ENGINES:
        why = bench.provider_unavailable(engine, "cpu", "fp32")
        assert why == f"{engine} is not installed: pip install 'convnext_fast[compare]'"


@pytest.mark.parametrize("engine,device,dtype,mode,expect", [
    ("openvino", "cuda", "fp32", "inference", "compared on the CPU only"),
    ("openvino", "cpu", "fp32", "train", "inference only"),
    ("openvino", "cpu", "fp16", "inference", "in f"),
    ("onnxruntime", "cpu", "amp_bf16", "inference", "in fp32 only"),
])
def test_what_an_engine_does_not_run(engine, device, dtype, mode, expect):
    assert expect in bench.provider_unavailable(engine, device, dtype, mode)


def test_autocast_dtype_names():
    assert bench.autocast_dtype("amp_bf16") is torch.bfloat16 and bench.autocast_dtype("bf16") is None
    ref = bench.make_reference("convnext_atto", "cpu", "amp_bf16")
    assert next(ref.parameters()).dtype == torch.float32  # autocast keeps fp32 weights
    x = bench.model_input(1, 32, "cpu", "amp_bf16")
    assert x.dtype == torch.float32
    out = bench.make_runner("convnext_fast", ref.eval(), x, dtype="amp_bf16")()
    assert out.dtype == torch.bfloat16  # the head ran under autocast
