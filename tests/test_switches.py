"""The off switches: CONVNEXT_FAST_DISABLE and disable_kernels() make the torch reference run,
whatever else asks (backend=, use_backend(), CONVNEXT_FAST_BACKEND), and `info` says so."""
import os
import subprocess
import sys

import pytest
import torch

import convnext_fast
from convnext_fast import BackendError, backends, disable_kernels, disabled_ops, enable_kernels, use_backend
from convnext_fast.backends import registry
from convnext_fast.bench import probe_inputs

CPU = torch.device("cpu")
OPS = ("dwconv_ln", "mlp", "mlp_grn")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("CONVNEXT_FAST_DISABLE", raising=False)
    monkeypatch.delenv("CONVNEXT_FAST_BACKEND", raising=False)
    enable_kernels()
    yield
    enable_kernels()


def _picked(op, backend=None):
    return backends.select(op, CPU, backend, probe_inputs(op, "cpu", torch.float32))[0]


@pytest.mark.parametrize("value", ["1", "all", "true"])
def test_env_turns_every_op_off_over_every_other_choice(monkeypatch, value):
    monkeypatch.setenv("CONVNEXT_FAST_DISABLE", value)
    monkeypatch.setenv("CONVNEXT_FAST_BACKEND", "triton")
    assert disabled_ops() == {op: "CONVNEXT_FAST_DISABLE" for op in OPS}
    with use_backend("cpu"):
        for op in OPS:
            assert _picked(op, backend="triton") == "torch"


def test_env_names_ops(monkeypatch):
    monkeypatch.setenv("CONVNEXT_FAST_DISABLE", " mlp, dwconv_ln ")
    assert set(disabled_ops()) == {"mlp", "dwconv_ln"}
    assert _picked("mlp", backend="triton") == "torch"
    # the others still go where they are asked (triton runs on CPU only under the interpreter)
    with pytest.raises(BackendError, match="mlp_grn: backend 'cpu'"):
        _picked("mlp_grn", backend="cpu")
    for off in ("0", "", "false"):
        monkeypatch.setenv("CONVNEXT_FAST_DISABLE", off)
        assert disabled_ops() == {}


def test_env_with_an_unknown_op_says_which_exist(monkeypatch):
    monkeypatch.setenv("CONVNEXT_FAST_DISABLE", "mpl")
    with pytest.raises(BackendError, match=r"CONVNEXT_FAST_DISABLE: unknown op\(s\) \['mpl'\].*dwconv_ln"):
        _picked("mlp")


def test_api_as_context_and_as_call():
    assert disabled_ops() == {}
    with disable_kernels(["mlp"]):
        assert disabled_ops() == {"mlp": "disable_kernels()"}
        assert _picked("mlp", backend="cpu") == "torch"
        with disable_kernels():
            assert set(disabled_ops()) == set(OPS)
            assert _picked("dwconv_ln", backend="cpu") == "torch"
        assert set(disabled_ops()) == {"mlp"}
    assert disabled_ops() == {}
    if backends.why_not("mlp", "cpu") is None:
        assert _picked("mlp", backend="cpu") == "cpu"
    disable_kernels("dwconv_ln,mlp")  # a call stays in force
    assert set(disabled_ops()) == {"dwconv_ln", "mlp"}
    enable_kernels()
    assert disabled_ops() == {}
    with pytest.raises(BackendError, match=r"disable_kernels\(\): unknown op"):
        disable_kernels(["conv"])
    assert disabled_ops() == {}


def test_model_runs_the_reference_when_off(monkeypatch):
    """Every block of a model calls the torch implementation, and nothing else, when off."""
    calls = {}
    previous = {}

    def spy(op, backend, impl):
        def fn(**args):
            calls[(op, backend)] = calls.get((op, backend), 0) + 1
            return impl.fn(**args)
        return registry.Impl(fn, impl.available, impl.supports)

    for op in ("dwconv_ln", "mlp"):
        for backend, impl in registry.registered(op).items():
            previous[(op, backend)] = registry.register(op, backend, spy(op, backend, impl))
    try:
        model = convnext_fast.convnext_atto().eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            with disable_kernels():
                off = model(x)
            # use_backend picks the ops' backend; the fused CPU downsample has its own switch
            monkeypatch.setenv("CONVNEXT_FAST_CPU_DOWNSAMPLE", "0")
            with use_backend("torch"):
                ref = model(x)
            monkeypatch.delenv("CONVNEXT_FAST_CPU_DOWNSAMPLE")
        n_blocks = sum(convnext_fast.models.registry.VARIANTS["convnext_atto"]["depths"])
        assert calls == {("dwconv_ln", "torch"): 2 * n_blocks, ("mlp", "torch"): 2 * n_blocks}
        assert torch.equal(off, ref)
        calls.clear()
        monkeypatch.setenv("CONVNEXT_FAST_DISABLE", "mlp")
        with torch.no_grad(), use_backend("cpu"):
            if backends.why_not("dwconv_ln", "cpu") is None:
                model(x)
                assert calls == {("dwconv_ln", "cpu"): n_blocks, ("mlp", "torch"): n_blocks}
    finally:
        for (op, backend), impl in previous.items():
            registry.register(op, backend, impl)


def test_info_shows_the_switch():
    env = {**os.environ, "COLUMNS": "200", "CONVNEXT_FAST_DISABLE": "mlp,dwconv_ln"}
    out = subprocess.run([sys.executable, "-m", "convnext_fast", "info"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "kernels OFF, the torch reference runs: dwconv_ln (by CONVNEXT_FAST_DISABLE), mlp (by" in out.stdout
    assert "every kernel: turned off by CONVNEXT_FAST_DISABLE" in out.stdout
