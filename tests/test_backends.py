"""Backend selection: explicit argument > use_backend() > CONVNEXT_FAST_BACKEND > automatic."""
import pytest
import torch

from convnext_fast import BackendError, backends, ops, use_backend


def args(C=8):
    return (torch.randn(1, C, 4, 4), torch.randn(C, 1, 3, 3), torch.randn(C), torch.randn(C),
            torch.randn(C))


def picked(replace_backend, **kw):
    seen = []
    fn = backends.registered("dwconv_ln")["torch"].fn
    replace_backend("dwconv_ln", "torch", fn=lambda **a: seen.append("torch") or fn(**a))
    ops.dwconv_ln(*args(), **kw)
    return seen


def test_precedence(monkeypatch, replace_backend):
    monkeypatch.setenv("CONVNEXT_FAST_BACKEND", "torch")
    assert picked(replace_backend) == ["torch"]
    with use_backend("auto"):
        assert backends.requested_backend() == (None, "use_backend()")
    with use_backend("torch"):
        assert backends.requested_backend("auto") == (None, "backend argument")
        assert backends.requested_backend() == ("torch", "use_backend()")
    assert backends.requested_backend() == ("torch", "CONVNEXT_FAST_BACKEND")
    monkeypatch.delenv("CONVNEXT_FAST_BACKEND")
    assert backends.requested_backend() == (None, "automatic")


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    with pytest.raises(BackendError, match=r"dwconv_ln: backend 'cuda' \(from backend argument\) cannot run"):
        ops.dwconv_ln(*args(), backend="cuda")
    # Triton takes no fp64, on the interpreter or a GPU.
    f64 = dict(dtype=torch.float64)
    with use_backend("triton"), pytest.raises(BackendError, match=r"from use_backend\(\).*float64"):
        ops.mlp(torch.randn(1, 4, 2, 2, **f64), torch.randn(8, 4, **f64), None,
                torch.randn(4, 8, **f64), None)


def test_unknown_backend_names():
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        ops.dwconv_ln(*args(), backend="fast")
    with pytest.raises(BackendError, match="unknown backend"):
        with use_backend("nope"):
            pass


def test_env_var_unknown(monkeypatch):
    monkeypatch.setenv("CONVNEXT_FAST_BACKEND", "gpu")
    with pytest.raises(BackendError, match="CONVNEXT_FAST_BACKEND: unknown backend 'gpu'"):
        ops.dwconv_ln(*args())


def test_automatic_records_what_it_skipped(replace_backend):
    replace_backend("dwconv_ln", "cpu", available=lambda: "pretend the extension is missing")
    ops.dwconv_ln(*args())
    name, skipped = backends.last_selections()["dwconv_ln"]
    assert name == "torch"
    assert ("cpu", "pretend the extension is missing") in skipped


def test_describe_lists_every_op_and_backend():
    rows = backends.describe()
    assert {(op, b) for op, b, _ in rows} == {
        (op, b) for op in ("dwconv_ln", "mlp", "mlp_grn") for b in backends.BACKENDS}
    assert all(reason is None for op, b, reason in rows if b == "torch")


def test_use_backend_per_op_mapping(monkeypatch):
    monkeypatch.delenv("CONVNEXT_FAST_BACKEND", raising=False)
    with use_backend("triton"):
        with use_backend({"dwconv_ln": "torch"}):
            assert backends.requested_backend(op="dwconv_ln") == ("torch", "use_backend()")
            assert backends.requested_backend(op="mlp") == ("triton", "use_backend()")
    with use_backend({"mlp": "auto"}):
        assert backends.requested_backend(op="mlp") == (None, "use_backend()")
        assert backends.requested_backend(op="dwconv_ln") == (None, "automatic")
    with pytest.raises(BackendError, match="unknown op 'conv'"):
        with use_backend({"conv": "torch"}):
            pass
    with pytest.raises(BackendError, match="unknown backend 'gpu'"):
        with use_backend({"mlp": "gpu"}):
            pass
