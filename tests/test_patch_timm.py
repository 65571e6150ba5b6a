"""convnext_fast.patch_timm: patched timm models compute what timm computes, and unpatching
restores every original forward; parameters, buffers and state_dict are never touched."""
import pytest
import torch

timm = pytest.importorskip("timm")

import convnext_fast  # noqa: E402
from convnext_fast.backends import BackendError  # noqa: E402
from convnext_fast.testing import assert_parity  # noqa: E402

CASES = {
    "convnext_atto": dict(),
    "convnext_tiny": dict(),
    "convnextv2_atto": dict(),
    "convnext_atto_k7553": dict(kernel_sizes=(7, 5, 5, 3)),
    "convnext_atto_features": dict(features_only=True),
}


def _create(case: str, **kwargs):
    name = case.split("_k")[0].replace("_features", "")
    model = timm.create_model(name, pretrained=False, **CASES[case], **kwargs)
    # timm initialises layer scale at 1e-6 and GRN at 0: give the branches weight so they count.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma") or ".grn." in n:
                p.normal_(0.0, 0.5)
    return model


def _outputs(model, x):
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _block_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]


@pytest.mark.parametrize("case", list(CASES))
def test_patched_matches_timm_fp32(case):
    model = _create(case).train()
    model64 = _create(case).double().train()
    model64.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    params_before = [id(p) for p in model.parameters()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    report = convnext_fast.patch_timm(model)
    assert report.blocks_patched == len(_block_names(model)) > 0, str(report)
    assert not report.skipped, str(report)
    assert [id(p) for p in model.parameters()] == params_before

    xg = x.clone().requires_grad_(True)
    outs = _outputs(model, xg)
    x64 = x.double().requires_grad_(True)
    refs = _outputs(model64, x64)
    sum(o.float().pow(2).mean() for o in outs).backward()
    sum(r.pow(2).mean() for r in refs).backward()
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_parity(o, r, name=f"{case} output {i}", tight=(1e-4, 1e-4))
    assert_parity(xg.grad, x64.grad, name=f"{case} input grad", tight=(1e-5, 1e-3))
    grads64 = dict(model64.named_parameters())
    for n, p in model.named_parameters():
        g64 = grads64[n].grad
        scale = g64.abs().max().item()
        err = (p.grad.double() - g64).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{case} grad {n}: {err:.3g} vs max {scale:.3g}"

    assert convnext_fast.unpatch_timm(model) == len(report.patched)
    for m in model.modules():
        assert "forward" not in m.__dict__ and "extra_repr" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for k, v in state_before.items():
        assert torch.equal(state_after[k], v), k


@pytest.mark.parametrize("case", ["convnext_atto", "convnextv2_atto"])
def test_patched_matches_timm_bf16(case):
    model = _create(case).eval()
    model64 = _create(case).double().eval()
    model64.load_state_dict(model.state_dict())
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref64 = model64(x.double())
        timm_bf16 = model(x.bfloat16())
        convnext_fast.patch_timm(model)
        out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_parity(out, ref64, timm_bf16, name=f"{case} bf16")


def test_patch_twice_is_a_noop_and_repr_shows_it():
    model = _create("convnext_atto")
    first = convnext_fast.patch_timm(model, backend="torch")
    second = convnext_fast.patch_timm(model)
    assert not second.patched and len(second.already) == len(first.patched)
    block = model.get_submodule(_block_names(model)[0])
    assert block._convnext_fast_patch.backend == "torch"  # the first patch's backend is kept
    text = repr(model)
    assert "convnext_fast: dwconv_ln + mlp, backend=torch" in text
    assert "convnext_fast: channels-last LayerNorm2d" in text
    convnext_fast.unpatch_timm(model)
    assert "convnext_fast" not in repr(model)


def test_ineligible_modules_keep_their_forward_and_are_reported():
    model = timm.create_model("convnext_atto", pretrained=False, act_layer="gelu_tanh")
    report = convnext_fast.patch_timm(model)
    blocks = _block_names(model)
    assert report.blocks_patched == 0
    assert {n for n, _ in report.skipped} == set(blocks)
    assert all("exact (erf) GELU" in why for _, why in report.skipped)
    for n in blocks:
        assert "forward" not in model.get_submodule(n).__dict__
    assert "skipped" in str(report)


def test_dilated_blocks_are_skipped():
    model = timm.create_model("convnext_atto", pretrained=False, output_stride=16)
    report = convnext_fast.patch_timm(model)
    skipped = dict(report.skipped)
    assert skipped and all("dilation" in why or "stride" in why for why in skipped.values()), str(report)
    assert report.blocks_patched == len(_block_names(model)) - len(skipped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        convnext_fast.unpatch_timm(model)
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_drop_path_matches_timm_in_training():
    model = timm.create_model("convnext_atto", pretrained=False, drop_path_rate=0.3).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    ref = model(x)
    convnext_fast.patch_timm(model)
    torch.manual_seed(1)
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_unavailable_backend_raises_at_patch_time():
    model = _create("convnext_atto")
    with pytest.raises(BackendError, match="cannot run (dwconv_ln|mlp)"):  # dwconv_ln where built without CUDA
        convnext_fast.patch_timm(model, backend="cuda")
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing half-patched
    with pytest.raises(BackendError, match="unknown backend"):
        convnext_fast.patch_timm(model, backend="tpu")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convnext_fast.patch_timm("convnext_atto")


def test_class_level_patch_applies_to_new_models_and_undoes():
    before = timm.create_model("convnext_atto", pretrained=False)
    convnext_fast.patch_timm()
    try:
        created = timm.create_model("convnext_atto", pretrained=False)
        features = timm.create_model("convnext_atto", pretrained=False, features_only=True)
        assert created.convnext_fast_report.blocks_patched == len(_block_names(created))
        assert all("forward" in features.get_submodule(n).__dict__ for n in _block_names(features))
        assert not any("forward" in m.__dict__ for m in before.modules())
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            patched_out = created(x)
    finally:
        restored = convnext_fast.unpatch_timm()
    assert restored > 0
    assert not any("forward" in m.__dict__ for m in created.modules())
    assert not any("forward" in m.__dict__ for m in features.modules())
    after = timm.create_model("convnext_atto", pretrained=False)
    assert not any("forward" in m.__dict__ for m in after.modules())
    with torch.no_grad():
        torch.testing.assert_close(patched_out, created(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["convnext_atto", "convnext_atto_features"])
def test_stem_and_downsample_convs_compute_reduced_precision_in_fp32(case):
    """The stem and the three downsample convs are patched (and only those convs); on a CPU
    without native bf16 convs their bf16 output is the fp32 conv rounded once."""
    from convnext_fast.models.cpu_conv import cpu_has_native_conv

    model = _create(case).to(torch.bfloat16)
    report = convnext_fast.patch_timm(model)
    convs = [(n, m) for n, m in model.named_modules()
             if type(m) is torch.nn.Conv2d and "forward" in m.__dict__]
    assert len(convs) == 4 and all(m.groups == 1 for _, m in convs), [n for n, _ in convs]
    assert {n for n, what in report.patched if what.startswith("conv")} == {n for n, _ in convs}
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    stem = convs[0][1]
    with torch.no_grad():
        got = stem(x)
        fp32 = torch.nn.functional.conv2d(x.float(), stem.weight.float(), stem.bias.float(), stride=4)
        native = torch.nn.functional.conv2d(x, stem.weight, stem.bias, stride=4)
    assert torch.equal(got, native if cpu_has_native_conv(torch.bfloat16) else fp32.bfloat16())
    convnext_fast.unpatch_timm(model)
    assert not any("forward" in m.__dict__ for _, m in convs)


@pytest.mark.skipif(not convnext_fast._ext.cpu_downsample().get("float32"),
                    reason="no fused CPU downsample in this build")
def test_patched_downsamples_run_as_one_op_at_inference(monkeypatch):
    """A patched timm model's stage downsamples take convnext_fast::downsample at CPU inference
    (and match timm); with gradients they run their two patched modules."""
    from convnext_fast.backends import _cpp

    calls = []
    real = _cpp.call_with_cache

    def counting(op, args):
        if op is torch.ops.convnext_fast.downsample:
            calls.append(op)
        return real(op, args)

    monkeypatch.setattr(_cpp, "call_with_cache", counting)
    model = _create("convnext_atto").eval()
    model64 = _create("convnext_atto").double().eval()
    model64.load_state_dict(model.state_dict())
    report = convnext_fast.patch_timm(model)
    assert sum("downsample:" in what for _, what in report.patched) == 3, str(report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert len(calls) == 3
    model(x.requires_grad_()).sum().backward()
    assert len(calls) == 3
    assert_parity(out, model64(x.detach().double()), tight=(1e-4, 1e-4))
