"""Values prepared once from parameters (convnext_fast._prepared): reused while the parameter is
unchanged, made again after an in-place change, dropped with the parameter; and the two users of
it, the autocast cast of parameters and the oneDNN backend's packed weights, stay correct across
a weight update (a stale cache would fail parity after the update)."""
import copy
import gc

import pytest
import torch

from convnext_fast import backends, ops, reference
from convnext_fast._prepared import Prepared
from convnext_fast.ops import _autocast


def test_made_once_then_again_after_an_in_place_change():
    cache, w = Prepared("test"), torch.randn(4)
    first = cache.get((w, None), lambda: w * 2)
    assert cache.get((w, None), lambda: w * 3) is first and cache.made == 1
    w.add_(1)
    again = cache.get((w, None), lambda: w * 2)
    assert cache.made == 2 and torch.equal(again, w * 2)


def test_a_view_is_keyed_by_the_tensor_it_views():
    cache, w = Prepared("test"), torch.randn(6, 4, 1, 1)
    first = cache.get((w.view(6, 4),), lambda: 1)
    assert cache.get((w.view(6, 4),), lambda: 2) == first and cache.made == 1
    assert cache.get((w.view(24),), lambda: 3) == 3  # another shape of it: another value
    w.view(6, 4).mul_(2)  # a change through a view bumps the shared version
    assert cache.get((w.view(6, 4),), lambda: 4) == 4


def test_entry_dies_with_its_tensor_and_a_reused_id_is_not_confused():
    cache = Prepared("test")
    w = torch.randn(4)
    cache.get((w,), lambda: "old")
    assert len(cache) == 1
    del w
    gc.collect()
    assert len(cache) == 0
    # a new tensor gets a fresh value even where CPython hands it the dead one's id
    for _ in range(50):
        v = torch.randn(4)
        assert cache.get((v,), lambda: "new") == "new"
        del v


def test_inference_tensors_are_not_cached():
    cache = Prepared("test")
    with torch.inference_mode():
        w = torch.randn(4)
    cache.get((w,), lambda: 1)
    cache.get((w,), lambda: 1)
    assert cache.made == 0 and len(cache) == 0


def _mlp_params(C=8, D=32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(t) for t in (torch.randn(D, C) / C ** 0.5, torch.randn(D),
                                            torch.randn(C, D) / D ** 0.5, torch.randn(C), torch.rand(C))]


def _rows(C=8, dtype=torch.float32):
    return torch.randn(2, C, 3, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_autocast_casts_a_parameter_once_per_version(mode):
    w1, b1, w2, b2, g = _mlp_params()
    y = _rows()
    cache = _autocast._CASTS[torch.bfloat16]
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with ctx(), torch.autocast("cpu", torch.bfloat16):
        before = cache.made
        outs = [ops.mlp(y, w1, b1, w2, b2, g, y, backend="torch") for _ in range(3)]
        assert cache.made - before == 1  # the five parameters cast together, once for three calls
        assert all(torch.equal(o, outs[0]) for o in outs)
    with torch.no_grad():
        w1.mul_(-1)  # an optimizer step, in place: the next call must see it
    with ctx(), torch.autocast("cpu", torch.bfloat16):
        out = ops.mlp(y, w1, b1, w2, b2, g, y, backend="torch")
    expect = reference.mlp(*(t.to(torch.bfloat16) for t in (y, w1, b1, w2, b2, g, y)))
    torch.testing.assert_close(out, expect)


def test_autocast_cast_keeps_gradients_when_training():
    w1, b1, w2, b2, g = _mlp_params()
    y = _rows()
    with torch.autocast("cpu", torch.bfloat16):
        ops.mlp(y, w1, b1, w2, b2, g, y, backend="torch").float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (w1, b1, w2, b2, g))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_mlp_converted_weights_follow_in_place_changes(monkeypatch, dtype):
    """The C++ CPU mlp converts reduced-precision weights for its fp32 GEMMs once per weight
    version (csrc/cpu/mlp_cpu.cpp, ConvertedWeights), keyed by what the weight views."""
    if backends.available("mlp", "cpu") is not None:
        pytest.skip(str(backends.available("mlp", "cpu")))
    monkeypatch.setenv("CONVNEXT_FAST_CPU_GEMM", "fp32")
    C, D = 16, 64
    y = _rows(C, dtype)
    w1 = torch.randn(D, C, 1, 1, dtype=dtype) / C ** 0.5  # 1x1-conv weights, passed as views
    w2 = torch.randn(C, D, 1, 1, dtype=dtype) / D ** 0.5
    b1, b2, g = torch.randn(D, dtype=dtype), torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype)

    def call():
        args = (y, w1.view(D, C), b1, w2.view(C, D), b2, g, y)
        with torch.inference_mode():
            return ops.mlp(*args, backend="cpu"), args

    first, _ = call()
    assert torch.equal(call()[0], first)
    for w in (w1, w2):
        w.mul_(-1.5)
        out, args = call()
        expect = reference.mlp(*(t.double() for t in args)).to(dtype)
        torch.testing.assert_close(out, expect, rtol=2e-2, atol=2e-2)
        assert not torch.equal(out, first)


def test_a_data_swap_is_seen_though_the_version_stays():
    """``p.data = ...`` (what ``module.to(dtype)`` and some loaders do) keeps the parameter and its
    version counter; the cache must still see new memory, a new dtype or a new device."""
    cache, p = Prepared("test"), torch.nn.Parameter(torch.randn(4))
    assert torch.equal(cache.get((p,), lambda: p.detach().clone()), p)
    for _ in range(50):  # swaps with and without a call between: freed addresses get reused
        p.data = torch.randn(4)
        p.data = torch.randn(4)
        assert p._version == 0
        assert torch.equal(cache.get((p,), lambda: p.detach().clone()), p)
    p.data = p.data.to(torch.bfloat16)
    assert cache.get((p,), lambda: p.detach().clone()).dtype == torch.bfloat16


def test_clear_all_forgets_every_cache():
    from convnext_fast import clear_prepared
    cache, p = Prepared("test"), torch.nn.Parameter(torch.randn(4))
    cache.get((p,), lambda: p.detach().clone())
    p.data.mul_(2)  # bypasses the version counter: unseen until the caches are cleared
    assert not torch.equal(cache.get((p,), lambda: p.detach().clone()), p)
    clear_prepared()
    assert torch.equal(cache.get((p,), lambda: p.detach().clone()), p)


@pytest.mark.parametrize("backend", ["onednn", "cpu", "torch"])
def test_model_weights_swapped_after_a_call_are_used(backend):
    """A model run (caches filled), then its parameters' ``.data`` replaced (new values, version
    unchanged), then the model cast with ``.to(torch.bfloat16)`` (another ``.data`` swap): each
    call after a swap must use the new weights."""
    import convnext_fast
    why = backends.available("mlp", backend)
    if why is not None:
        pytest.skip(str(why))
    torch.manual_seed(0)
    model = convnext_fast.convnext_atto(num_classes=10).eval()
    with torch.no_grad():  # timm's layer scale of 1e-6 would hide the MLPs from the comparison
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
    x = torch.randn(1, 3, 64, 64)

    def check(x):
        with backends.use_backend({"mlp": backend}):
            out = model(x)
        fresh = copy.deepcopy(model)  # new parameters: nothing cached for them
        with backends.use_backend("torch"):
            expect = fresh(x)
        assert out.dtype == expect.dtype
        torch.testing.assert_close(out.float(), expect.float(), rtol=0.05, atol=0.05)

    def check_fp32_and_autocast():
        with torch.inference_mode():
            for dtype in (torch.float32, torch.bfloat16):
                with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
                    check(x)

    check_fp32_and_autocast()
    # outside inference mode, as a loader runs: the new tensors are ordinary (cacheable) ones
    for p in model.parameters():
        p.data = p.data.flip(0).contiguous()
    check_fp32_and_autocast()
    model.to(torch.bfloat16)
    with torch.inference_mode():
        check(x.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_dwconv_ln_taps_follow_weight_changes(dtype):
    """The C++ CPU dwconv_ln rearranges the conv weight into its tap layout once per version
    (csrc/include/derived_cache.h): in-place changes and .data swaps are seen at the next call;
    writes through .data once convnext_fast.clear_prepared() has run."""
    if backends.available("dwconv_ln", "cpu") is not None:
        pytest.skip(str(backends.available("dwconv_ln", "cpu")))
    import convnext_fast
    torch.manual_seed(0)
    C = 12
    x = torch.randn(2, C, 9, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.nn.Parameter(torch.randn(C, 1, 7, 7, dtype=dtype) / 7)
    b, lw, lb = (torch.nn.Parameter(torch.randn(C, dtype=dtype)) for _ in range(3))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)

    def check(expect_seen=True):
        with torch.inference_mode():
            out = ops.dwconv_ln(x, w, b, lw, lb, 1e-6, backend="cpu")
        expect = reference.dwconv_ln(*(t.double() for t in (x, w, b, lw, lb)), 1e-6).to(dtype)
        if expect_seen:
            torch.testing.assert_close(out, expect, **tol)
        else:
            assert not torch.allclose(out.float(), expect.float(), **tol)

    check()
    check()
    with torch.no_grad():
        w.mul_(-1)
    check()
    w.data = torch.randn_like(w) / 7
    check()
    w.data.mul_(-1)  # bypasses the version counter
    check(expect_seen=False)
    convnext_fast.clear_prepared()
    check()


def test_nothing_is_cached_under_torch_distributed(monkeypatch):
    """FSDP2 writes new values into its parameters' memory with their versions preserved: with
    torch.distributed initialized, casts, packed weights and the C++ derived weights are made per
    call (a write that no version check sees is then seen at once)."""
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    cache, p = Prepared("test"), torch.nn.Parameter(torch.randn(4))
    cache.get((p,), lambda: p.detach().clone())
    p.data.mul_(2)
    assert torch.equal(cache.get((p,), lambda: p.detach().clone()), p) and len(cache) == 0
    if backends.available("dwconv_ln", "cpu") is None:
        C = 8
        x = torch.randn(1, C, 5, 6).contiguous(memory_format=torch.channels_last)
        w = torch.nn.Parameter(torch.randn(C, 1, 7, 7) / 7)
        b, lw, lb = (torch.nn.Parameter(torch.randn(C)) for _ in range(3))
        for _ in range(2):
            with torch.no_grad():
                out = ops.dwconv_ln(x, w, b, lw, lb, 1e-6, backend="cpu")
            torch.testing.assert_close(out, reference.dwconv_ln(x, w, b, lw, lb, 1e-6), rtol=1e-4, atol=1e-4)
            w.data.mul_(-1)


def test_cpu_dwconv_ln_derives_per_call_when_training():
    """With gradients needed, the conv taps are made per call: a write that bypasses the version
    counter (as FSDP2's all-gather does) is seen by the next training call."""
    if backends.available("dwconv_ln", "cpu") is not None:
        pytest.skip(str(backends.available("dwconv_ln", "cpu")))
    C = 8
    x = torch.randn(1, C, 5, 6).contiguous(memory_format=torch.channels_last)
    w = torch.nn.Parameter(torch.randn(C, 1, 7, 7) / 7)
    b, lw, lb = (torch.nn.Parameter(torch.randn(C)) for _ in range(3))
    for _ in range(2):
        out = ops.dwconv_ln(x, w, b, lw, lb, 1e-6, backend="cpu")
        torch.testing.assert_close(out, reference.dwconv_ln(x, w, b, lw, lb, 1e-6), rtol=1e-4, atol=1e-4)
        w.data.mul_(-1)
