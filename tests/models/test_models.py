"""Model parity with timm: structure, parameter counts, logits, features, options, gradients.

timm is the oracle (only used here). Everything runs on CPU in fp32 at small resolutions.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import convnext_fast
from convnext_fast.models import ConvNeXt, ConvNeXtFeatures, create_model, list_models
from convnext_fast.models.registry import VARIANTS

timm = pytest.importorskip("timm")

SMALL = ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
         "convnext_small", "convnext_base", "convnextv2_atto", "convnextv2_femto", "convnextv2_pico",
         "convnextv2_nano", "convnextv2_tiny", "convnextv2_small", "convnextv2_base"]
BIG = ["convnext_large", "convnext_xlarge", "convnext_xxlarge", "convnextv2_large", "convnextv2_huge"]
ALL = SMALL + BIG

# timm's parameter counts of the full-size (1000-class) models, as a fixed record.
PARAM_COUNTS = {"convnext_tiny": 28_589_128}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small shapes: one intra-op thread is faster, and immune to OpenMP spinning when the machine is
    shared (2 threads on a busy 2-core box can be 20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial 1-D parameters (layer scale, GRN, norm affine, biases) so that they matter;
    multi-dim weights keep their (seeded) init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() != 1:
            continue
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("gamma"):
            v = 0.5 + torch.rand(p.shape, generator=g)  # layer scale 0.5 .. 1.5
        elif ".grn." in name:
            v = 0.5 * r
        elif name.endswith("weight"):  # LayerNorm scale
            v = 1.0 + 0.2 * r
        else:  # biases
            v = 0.1 * r
        p.copy_(v.to(p.dtype))
    return model


def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    # timm.create_model drops None-valued kwargs (ls_init_value=None would be ignored); the model's
    # entrypoint takes them as given, like our create_model.
    entry = getattr(timm.models.convnext, name)
    return randomize_(entry(pretrained=False, **kwargs), seed).eval()


def ours_from(t: nn.Module, name: str, **kwargs) -> ConvNeXt:
    m = create_model(name, **kwargs)
    m.load_state_dict(t.state_dict(), strict=True)
    return m.eval()


def pair(name: str, seed: int = 0, **kwargs):
    t = timm_model(name, seed, **kwargs)
    return t, ours_from(t, name, **kwargs)


def x_input(n=2, c=3, hw=64, seed=1) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Structure and parameter counts, every variant at full size (meta device: no memory, no init)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_structure_and_param_count_match_timm(name):
    t = timm.create_model(name, pretrained=False, device="meta")
    o = create_model(name, device="meta")
    ts, os_ = t.state_dict(), o.state_dict()
    assert list(os_) == list(ts), "state_dict keys (and their order) differ from timm's"
    for k in ts:
        assert os_[k].shape == ts[k].shape, k
    n_t = sum(p.numel() for p in t.parameters())
    n_o = sum(p.numel() for p in o.parameters())
    assert n_o == n_t
    if name in PARAM_COUNTS:
        assert n_o == PARAM_COUNTS[name]
    # the same module types where the parameters live (the stem/downsample convs are an
    # nn.Conv2d subclass, Fp32ComputeConv2d)
    tm, om = dict(t.named_modules()), dict(o.named_modules())
    for k in ts:
        mod = k.rsplit(".", 1)[0]
        assert type(om[mod]).__name__ == type(tm[mod]).__name__ or {
            type(om[mod]).__name__, type(tm[mod]).__name__} <= {"LayerNorm", "LayerNorm2d"} or (
            type(tm[mod]) is nn.Conv2d and type(om[mod]).__name__ == "Fp32ComputeConv2d"), mod
    assert o.feature_info == t.feature_info
    # the variant's settings (conv MLP, layer scale, GRN, eps) are timm's
    for tb, ob in ((t.stages[0].blocks[0], o.stages[0].blocks[0]), (t.stages[3].blocks[-1], o.stages[3].blocks[-1])):
        assert type(tb.mlp.fc1) is type(ob.mlp.fc1)
        assert (tb.gamma is None) == (ob.gamma is None)
        assert hasattr(tb.mlp, "grn") == hasattr(ob.mlp, "grn")
        assert tb.norm.eps == ob.norm.eps and tb.conv_dw.kernel_size == ob.conv_dw.kernel_size
    assert t.stem[1].eps == o.stem[1].eps and t.head.norm.eps == o.head.norm.eps
    assert o.num_features == t.num_features and o.head_hidden_size == t.head_hidden_size


def test_convnext_tiny_param_count():
    m = convnext_fast.convnext_tiny(device="meta")
    assert sum(p.numel() for p in m.parameters()) == 28_589_128


# --------------------------------------------------------------------------------------------
# Logits, every variant
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_logits_match_timm(name):
    t, o = pair(name)
    # and the other direction: ours loads into timm strictly
    t.load_state_dict(o.state_dict(), strict=True)
    x = x_input()
    with torch.no_grad():
        ref, out = t(x), o(x)
    assert out.shape == ref.shape == (2, 1000)
    assert max_rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("name", BIG)
def test_logits_match_timm_big(name):
    """Full depth and width at 32x32 with 10 classes. timm's model is built on the meta device and
    filled with seeded random values (its own init of ~1e9 parameters would dominate the run)."""
    t = timm.create_model(name, pretrained=False, num_classes=10, device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
    randomize_(t, 0).eval()
    o = create_model(name, num_classes=10, device="meta")
    o.load_state_dict(t.state_dict(), strict=True, assign=True)
    o.eval()
    x = x_input(hw=32)
    with torch.no_grad():
        ref, out = t(x), o(x)
    assert out.shape == (2, 10)
    assert max_rel_err(out, ref) <= 1e-4


# --------------------------------------------------------------------------------------------
# Features, intermediates, head
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny"])
def test_forward_features_head_intermediates(name):
    t, o = pair(name)
    x = x_input()
    with torch.no_grad():
        ft, fo = t.forward_features(x), o.forward_features(x)
        assert fo.shape == ft.shape and max_rel_err(fo, ft) <= 1e-5
        pt, po = t.forward_head(ft, pre_logits=True), o.forward_head(fo, pre_logits=True)
        assert po.shape == pt.shape == (2, o.num_features) and max_rel_err(po, pt) <= 1e-5
        it = t.forward_intermediates(x, intermediates_only=True)
        io = o.forward_intermediates(x, intermediates_only=True)
        assert len(io) == len(it) == 4
        for a, b, info in zip(io, it, o.feature_info):
            assert a.shape == b.shape and a.shape[1] == info["num_chs"]
            assert a.shape[-1] == 64 // info["reduction"]
            assert max_rel_err(a, b) <= 1e-5
        assert [f["reduction"] for f in o.feature_info] == [4, 8, 16, 32]
        for kwargs in (dict(indices=2), dict(indices=[0, -1]), dict(indices=[1], stop_early=True),
                       dict(indices=None, norm=True)):
            xt, lt = t.forward_intermediates(x, **kwargs)
            xo, lo = o.forward_intermediates(x, **kwargs)
            assert xo.shape == xt.shape and max_rel_err(xo, xt) <= 1e-5, kwargs
            assert len(lo) == len(lt), kwargs
            for a, b in zip(lo, lt):
                assert max_rel_err(a, b) <= 1e-5, kwargs


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3)])
def test_features_only_matches_timm(out_indices):
    torch.manual_seed(0)
    t = randomize_(timm.create_model("convnext_atto", features_only=True, out_indices=out_indices)).eval()
    o = create_model("convnext_atto", features_only=True, out_indices=out_indices)
    assert isinstance(o, ConvNeXtFeatures)
    o.load_state_dict(t.state_dict(), strict=True)  # timm's FeatureListNet names
    o.eval()
    assert o.feature_info.channels() == t.feature_info.channels()
    assert o.feature_info.reduction() == t.feature_info.reduction()
    assert o.feature_info.module_name() == t.feature_info.module_name()
    x = x_input()
    with torch.no_grad():
        ft, fo = t(x), o(x)
    assert len(fo) == len(ft) == len(out_indices)
    for a, b in zip(fo, ft):
        assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5


@pytest.mark.skipif(tuple(int(v) for v in timm.__version__.split(".")[:3]) < (1, 0, 31),
                    reason="mirrors timm >= 1.0.31, which also drops head.norm when pruning the end")
def test_prune_intermediate_layers_matches_timm():
    t, o = pair("convnext_atto")
    assert o.prune_intermediate_layers([1]) == t.prune_intermediate_layers([1])
    assert list(o.state_dict()) == list(t.state_dict())
    x = x_input()
    with torch.no_grad():
        it = t.forward_intermediates(x, indices=[1], intermediates_only=True)
        io = o.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert max_rel_err(io[0], it[0]) <= 1e-5
        out, ref = o(x), t(x)  # head reset to (no pool, no classifier) like timm
        assert out.shape == ref.shape == (2, 80, 8, 8) and max_rel_err(out, ref) <= 1e-5


def test_reset_classifier_matches_timm():
    t, o = pair("convnext_atto")
    cases = [(5,), (0,), (7, "max")]
    if "reset_other" in inspect.signature(t.reset_classifier).parameters:  # timm >= 1.0.31
        cases.append((3, "", True))
    for args in cases:
        t.reset_classifier(*args)
        o.reset_classifier(*args)
        assert list(o.state_dict()) == list(t.state_dict()), args
        assert type(o.get_classifier()).__name__ == type(t.get_classifier()).__name__, args
        o.load_state_dict(t.state_dict(), strict=True)
        x = x_input()
        with torch.no_grad():
            ref, out = t(x), o(x)
        assert out.shape == ref.shape and max_rel_err(out, ref) <= 1e-4, args


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [
    ("convnext_atto", dict(num_classes=10)),
    ("convnext_atto", dict(num_classes=0)),
    ("convnext_atto", dict(in_chans=1)),
    ("convnext_atto", dict(kernel_sizes=(7, 5, 5, 3))),
    ("convnextv2_atto", dict(kernel_sizes=(7, 5, 5, 3), num_classes=0)),
    ("convnext_atto", dict(ls_init_value=0.5)),
    ("convnext_atto", dict(ls_init_value=None)),
    ("convnext_atto", dict(conv_bias=False)),
    ("convnext_atto", dict(norm_eps=1e-5, global_pool="avgmax")),
    ("convnext_atto", dict(global_pool="max", head_hidden_size=64)),
    ("convnext_atto", dict(global_pool="")),
    ("convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), ls_init_value=0.1,
                           num_classes=10, patch_size=2)),
    ("convnextv2_tiny", dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128), num_classes=10,
                             head_init_scale=0.5)),
    ("convnext_atto", dict(drop_path_rate=0.2, drop_rate=0.1)),  # eval: no effect
])
def test_options_match_timm(name, kwargs):
    t, o = pair(name, **kwargs)
    c = kwargs.get("in_chans", 3)
    x = x_input(c=c)
    with torch.no_grad():
        ref, out = t(x), o(x)
    assert out.shape == ref.shape
    assert max_rel_err(out, ref) <= 1e-4
    if kwargs.get("num_classes") == 0:
        assert out.shape == (2, o.num_features)
        assert isinstance(o.get_classifier(), nn.Identity)


def test_init_equals_timm_with_same_seed():
    """Same construction order and init (trunc normal by inverse CDF) as timm: same seed, same weights."""
    for name, kwargs in (("convnext_atto", {}), ("convnextv2_atto", dict(head_init_scale=0.3))):
        torch.manual_seed(123)
        t = timm.create_model(name, pretrained=False, **kwargs)
        torch.manual_seed(123)
        o = create_model(name, **kwargs)
        ts, os_ = t.state_dict(), o.state_dict()
        for k in ts:
            assert torch.equal(ts[k], os_[k]), (name, k)


def test_drop_path_train_mode():
    kwargs = dict(drop_path_rate=0.3)
    t, o = pair("convnext_atto", **kwargs)
    rates_t = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
               for s in t.stages for b in s.blocks]
    rates_o = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
               for s in o.stages for b in s.blocks]
    assert rates_o == pytest.approx(rates_t)
    t.train()
    o.train()
    x = x_input(n=8)
    # same RNG draws in the same order as timm: identical stochastic-depth masks
    torch.manual_seed(7)
    ref = t(x)
    torch.manual_seed(7)
    out = o(x)
    assert torch.isfinite(out).all()
    assert max_rel_err(out, ref) <= 1e-4
    out.sum().backward()
    assert all(p.grad is not None for p in o.parameters())
    # different seeds drop different samples
    torch.manual_seed(8)
    with torch.no_grad():
        assert not torch.allclose(o(x), out.detach())
    # eval: deterministic and equal to timm
    t.eval()
    o.eval()
    with torch.no_grad():
        assert max_rel_err(o(x), t(x)) <= 1e-4


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_grad_checkpointing_same_output_and_grads(drop_path_rate):
    torch.manual_seed(0)
    o = randomize_(create_model("convnextv2_atto", num_classes=10, drop_path_rate=drop_path_rate))
    o.train()
    x = x_input()

    def run():
        o.zero_grad()
        torch.manual_seed(3)
        out = o(x)
        (out * torch.linspace(-1, 1, 10)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in o.named_parameters()}

    out0, g0 = run()
    o.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in o.stages)
    out1, g1 = run()
    o.set_grad_checkpointing(False)
    assert max_rel_err(out1, out0) <= 1e-6
    for n in g0:
        assert max_rel_err(g1[n], g0[n]) <= 1e-5, n


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_gradients_match_timm(name):
    t, o = pair(name, num_classes=10)
    t.train()
    o.train()
    x = x_input()
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    (t(xt) * w).sum().backward()
    (o(xo) * w).sum().backward()
    assert max_rel_err(xo.grad, xt.grad) <= 1e-5
    tp = dict(t.named_parameters())
    for n, p in o.named_parameters():
        assert p.grad is not None, n
        ref = tp[n].grad
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item() + 1e-9, (n, err)


# --------------------------------------------------------------------------------------------
# Layout and the fused-op contract
# --------------------------------------------------------------------------------------------

def test_channels_last_trunk_and_nchw_input():
    t, o = pair("convnextv2_atto")
    seen = []

    def check(module, args):
        x = args[0]
        seen.append(x.is_contiguous(memory_format=torch.channels_last))

    handles = [b.register_forward_pre_hook(check) for s in o.stages for b in s.blocks]
    x = x_input(hw=96)  # stage 3 is 3x3: no 1x1 ambiguity
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = t(x), o(x)
        out_cl = o(x.contiguous(memory_format=torch.channels_last))
    for h in handles:
        h.remove()
    assert seen and all(seen)
    assert max_rel_err(out, ref) <= 1e-4
    assert torch.equal(out, out_cl)
    feats = o.forward_features(x)
    assert feats.shape == (2, 320, 3, 3) and feats.is_contiguous(memory_format=torch.channels_last)


def test_blocks_call_the_fused_ops_not_the_modules():
    o = create_model("convnext_atto").eval()
    called = []
    for s in o.stages:
        for b in s.blocks:
            for m in (b.conv_dw, b.norm, b.mlp.fc1, b.mlp.fc2):
                m.register_forward_hook(lambda mod, a, r: called.append(mod))
    counts = {}
    import convnext_fast.ops as ops_pkg
    orig = {n: getattr(ops_pkg, n) for n in ("dwconv_ln", "mlp", "mlp_grn")}
    from convnext_fast.models import convnext as convnext_mod

    class Spy:
        def __getattr__(self, name):
            fn = orig[name]

            def wrapped(*a, **k):
                counts[name] = counts.get(name, 0) + 1
                return fn(*a, **k)
            return wrapped

    saved = convnext_mod.ops
    convnext_mod.ops = Spy()
    try:
        with torch.no_grad():
            o(x_input())
    finally:
        convnext_mod.ops = saved
    n_blocks = sum(len(s.blocks) for s in o.stages)
    assert not called
    assert counts == {"dwconv_ln": n_blocks, "mlp": n_blocks}


# --------------------------------------------------------------------------------------------
# Registry and unsupported options
# --------------------------------------------------------------------------------------------

def test_registry():
    names = list_models()
    assert set(names) == set(VARIANTS) and len(names) == 19
    assert list_models("convnextv2_*") == sorted(n for n in names if n.startswith("convnextv2_"))
    for n in names:
        assert n in convnext_fast.__all__ and callable(getattr(convnext_fast, n))
    for n in ("ConvNeXt", "create_model", "list_models", "from_timm", "load_pretrained", "convert_state_dict"):
        assert n in convnext_fast.__all__
    with pytest.raises(ValueError, match="convnext_tiny"):
        create_model("convnext_gigantic")
    with pytest.raises(ValueError, match="local"):
        create_model("convnext_atto", pretrained=3)
    m = create_model("convnext_atto.fb_in1k", num_classes=3)  # timm pretrained tags are accepted
    assert m.num_classes == 3 and m.head.fc.out_features == 3
    assert convnext_fast.convnext_atto(pretrained=False).num_classes == 1000


@pytest.mark.parametrize("kwargs", [
    dict(stem_type="overlap"), dict(output_stride=16), dict(head_norm_first=True),
    dict(norm_layer="rmsnorm2d"), dict(act_layer="gelu_tanh"), dict(global_pool="catavgmax"),
    dict(use_grn=True),  # GRN with layer scale (ls_init_value=1e-6): no fused op has both
])
def test_unsupported_options_raise(kwargs):
    with pytest.raises(NotImplementedError):
        create_model("convnext_atto", device="meta", **kwargs)


def test_every_variants_blocks_pass_the_judge_patch_timm_uses():
    """One judge: each block the models build is one that patch_timm would bind the same forward to."""
    from convnext_fast.models import support

    for name in list_models():
        o = create_model(name, device="meta")
        reasons = {support.block_reason(b) or support.tensors_reason(b) for s in o.stages for b in s.blocks}
        assert reasons == {None}, (name, reasons)


def test_even_kernel_raises():
    with pytest.raises(ValueError, match="odd"):
        create_model("convnext_atto", kernel_sizes=(7, 6, 5, 3), device="meta")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True], ids=["stored", "autocast"])
def test_stem_and_downsample_convs_in_reduced_precision(dtype, autocast):
    """On a CPU without native bf16/fp16 convolutions, the stem and downsample convs compute in
    fp32 and round once (PyTorch's own reduced-precision conv there is the slow im2col path)."""
    from convnext_fast.models.cpu_conv import cpu_has_native_conv

    o = create_model("convnext_atto")
    convs = [o.stem[0]] + [s.downsample[1] for s in o.stages if not isinstance(s.downsample, nn.Identity)]
    assert len(convs) == 4
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
        w, b = conv.weight.detach(), conv.bias.detach()
        if autocast:
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                out = conv(x)
        else:
            conv.to(dtype)
            x = x.to(dtype)
            w, b = w.to(dtype), b.to(dtype)
            with torch.no_grad():
                out = conv(x)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        if cpu_has_native_conv(dtype):
            with torch.no_grad():
                want = nn.functional.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), stride=conv.stride)
        else:
            want = nn.functional.conv2d(x.float(), w.float(), b.float(), stride=conv.stride).to(dtype)
        assert torch.equal(out, want)
