"""Fallbacks are visible: without Triton, without the compiled extension, with a kernel size or a
dilation a kernel cannot run, the model still runs on the best backend that can, ``python -m
convnext_fast info`` and ``backends.last_selections()`` say which and why, and an explicit request
that cannot be honoured raises :class:`BackendError` with the reason.

Missing pieces are simulated by monkeypatching ``convnext_fast._ext`` and the backend registry
(nothing is uninstalled); one subprocess hides ``triton`` and ``convnext_fast._C`` from the import
system to check the real detection end to end.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import convnext_fast
from convnext_fast import BackendError, _ext, backends, ops, use_backend
from convnext_fast.__main__ import main

sys.path.insert(0, os.path.dirname(__file__))  # tests/_cases.py (--import-mode=importlib adds none)
from _cases import OPS, inputs  # noqa: E402

from convnext_fast.specs import SPECS  # noqa: E402

NO_EXT = "convnext_fast._C could not be imported (simulated: not built)"


@pytest.fixture
def no_extension(monkeypatch, replace_backend):
    """As if the extension had failed to import: ``_ext`` says so, and every cpu/cuda backend
    (they ask the extension once, at import) reports it. The subprocess test below checks the
    real detection."""
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", NO_EXT)
    monkeypatch.setattr(_ext, "_tried", True)
    for op in OPS:
        for b in ("cpu", "cuda"):
            if b in backends.registered(op):
                replace_backend(op, b, available=_ext.error)


@pytest.fixture
def no_triton(replace_backend):
    """As if triton were not installed (the registry's triton entries say so)."""
    for op in OPS:
        replace_backend(op, "triton", available=lambda: "triton is not installed")


def _info(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the reasons at 80 columns
    assert main(["info"]) == 0
    return capsys.readouterr().out


def _model(**kw):
    torch.manual_seed(0)
    return convnext_fast.convnext_atto(num_classes=10, ls_init_value=1.0, **kw).eval()


def test_without_the_extension(no_extension, capsys, monkeypatch):
    for op in OPS:
        for b in ("cpu", "cuda"):
            if b in backends.registered(op):
                assert backends.available(op, b) == NO_EXT, (op, b)
    model, x = _model(), torch.randn(2, 3, 32, 32)
    backends.clear_selections()
    with torch.no_grad():
        out = model(x)
        picks = {op: sel[0] for op, sel in backends.last_selections().items()}
        # the best that can run: the reference, or torch's own oneDNN where measured faster
        assert set(picks.values()) <= {"torch", "onednn"}, picks
        with use_backend(picks):
            want = model(x)
    assert torch.equal(out, want)
    picked, skipped = backends.last_selections()["dwconv_ln"]
    assert picked == "torch" and ("cpu", NO_EXT) in skipped
    with pytest.raises(BackendError, match=r"dwconv_ln: backend 'cpu' \(from backend argument\) "
                                           r"cannot run this call: convnext_fast._C could not be imported"):
        ops.dwconv_ln(*inputs("dwconv_ln"), backend="cpu")
    with use_backend("cpu"), pytest.raises(BackendError, match=r"from use_backend\(\).*simulated"):
        model(x)
    out = _info(capsys, monkeypatch)
    assert f"extension: unavailable: {NO_EXT}" in out
    assert out.count("simulated: not built") >= 3  # the extension line, the op x backend table, ...
    auto = out[out.index("automatic choice"):]
    assert "cpu: " + NO_EXT in auto  # ... and why the automatic choice skipped it


def test_without_triton(no_triton, capsys, monkeypatch):
    for op in OPS:
        assert backends.available(op, "triton") == "triton is not installed"
        with pytest.raises(BackendError, match=rf"{op}: backend 'triton' .* triton is not installed"):
            getattr(ops, op)(*inputs(op, k=3), backend="triton")
    model, x = _model(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    out = _info(capsys, monkeypatch)
    assert out.count("triton is not installed") == len(OPS)


def test_nothing_compiled_and_no_triton_in_a_fresh_process():
    """The real detection: triton and convnext_fast._C unimportable (None in sys.modules) before
    convnext_fast is imported. Everything runs on torch; info and the selections say why."""
    code = r"""
import json, sys
sys.modules["triton"] = None
sys.modules["convnext_fast._C"] = None
import torch, convnext_fast
from convnext_fast import backends
from convnext_fast.__main__ import main
torch.manual_seed(0)
m = convnext_fast.convnext_atto(num_classes=10).eval()
with torch.no_grad():
    out = m(torch.randn(2, 3, 32, 32))
print(json.dumps({"finite": bool(torch.isfinite(out).all()),
                  "rows": [list(r) for r in backends.describe()],
                  "last": {k: [v[0], [list(s) for s in v[1]]] for k, v in backends.last_selections().items()}}))
main(["info"])
"""
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, info = proc.stdout.split("\n", 1)
    got = json.loads(first)
    assert got["finite"]
    for op, b, reason in got["rows"]:
        if b == "torch":
            assert reason is None
        elif b == "triton":
            assert reason == "triton is not installed", (op, reason)
        elif b == "onednn":  # torch's own oneDNN: needs neither the extension nor triton
            assert reason is None or reason.startswith(("no onednn implementation", "this torch")), reason
        elif reason != f"no {b} implementation of {op}":  # (not every op has every backend)
            assert "convnext_fast._C could not be imported" in reason, (op, b, reason)
    for op in ("dwconv_ln", "mlp"):
        picked, skipped = got["last"][op]
        assert picked in ("torch", "onednn"), (op, picked)  # onednn where measured first
        assert picked == "onednn" or any(b == "cpu" and "convnext_fast._C" in r for b, r in skipped), skipped
    assert "extension: unavailable: convnext_fast._C could not be imported" in info
    assert "triton is not installed" in info


def _fake_cuda(*shape):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # shapes and devices only: no GPU needed, nothing runs
        return torch.empty(*shape, device="cuda")


def _cuda_supports(args) -> backends.Reason:
    """The cuda backend's support rule on ``args`` (positional), whether or not it is built."""
    return backends.registered("dwconv_ln")["cuda"].supports(**SPECS["dwconv_ln"].bind(args))


def _select(device, backend, args):
    return backends.select("dwconv_ln", device, backend, SPECS["dwconv_ln"].bind(args))


def test_kernel_size_the_cuda_kernel_lacks(replace_backend):
    """k = 9: the CUDA kernel (k in 3, 5, 7) says why not; automatic selection skips it (even
    where it is built: simulated here), an explicit request raises."""
    C = 16
    x = _fake_cuda(2, C, 8, 8).contiguous(memory_format=torch.channels_last)
    w9, vec = _fake_cuda(C, 1, 9, 9), _fake_cuda(C)
    args = (x, w9, vec, vec, vec, 1e-6)
    assert _cuda_supports(args) == "the CUDA kernel supports k in (3, 5, 7), got 9"
    assert _cuda_supports((x, _fake_cuda(C, 1, 7, 7), vec, vec, vec, 1e-6)) is None
    replace_backend("dwconv_ln", "cuda", available=lambda: None)  # "built with CUDA"
    picked, _ = _select(x.device, None, args)
    _, skipped = backends.last_selections()["dwconv_ln"]
    assert picked != "cuda" and ("cuda", "the CUDA kernel supports k in (3, 5, 7), got 9") in skipped
    with pytest.raises(BackendError, match=r"backend 'cuda' .* k in \(3, 5, 7\), got 9"):
        _select(x.device, "cuda", args)


@pytest.mark.parametrize("gpu, optin", [
    ("sm_86", 99 * 1024), ("sm_80", 163 * 1024), ("sm_90", 227 * 1024), ("sm_80", 64 * 1024)],
    ids=["sm_86", "sm_80", "sm_90", "64KiB"])
def test_a_gpu_with_less_shared_memory_than_the_kernels_budget_falls_back(monkeypatch, replace_backend,
                                                                          gpu, optin):
    """The CUDA kernels' tilings stay within one shared-memory budget at every C (96 KiB,
    ``_C.cuda_limits()["max_shared_bytes"]``), which every supported GPU grants a block (sm_86/89:
    99 KiB); on a GPU that grants less (simulated: 64 KiB) the CUDA backend says why and automatic
    selection skips it, instead of failing at launch. A GPU is simulated: fake CUDA tensors and the
    device queries patched (arch and properties of the named GPU)."""
    from types import SimpleNamespace

    from convnext_fast.backends import _cpp

    major, minor = int(gpu[3]), int(gpu[4])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(shared_memory_per_block_optin=optin))
    monkeypatch.setattr(_ext, "cuda_arch_unsupported", lambda capability: None)

    def args(C):
        return (_fake_cuda(1, C, 7, 7).contiguous(memory_format=torch.channels_last),
                _fake_cuda(C, 1, 7, 7), _fake_cuda(C), _fake_cuda(C), _fake_cuda(C), 1e-6)

    need = _cpp.cuda_shared_bytes(4096)
    for C in (96, 4096):
        if optin >= need:
            assert _cuda_supports(args(C)) is None
            continue
        reason = _cuda_supports(args(C))
        assert reason == (f"C = {C} needs {need} bytes of shared memory per block, more than this "
                          f"GPU's {optin}"), reason
        replace_backend("dwconv_ln", "cuda", available=lambda: None)  # "built with CUDA"
        picked, _ = _select(torch.device("cuda"), None, args(C))
        assert picked != "cuda" and ("cuda", reason) in backends.last_selections()["dwconv_ln"][1]
    assert "outside the CUDA kernel's limits" in _cuda_supports(args(4097))


def test_cuda_kernel_refuses_rows_too_wide_for_its_int32_indexing():
    C = 4096
    x = _fake_cuda(1, C, 1, 2 ** 31 // C + 1).contiguous(memory_format=torch.channels_last)
    vec = _fake_cuda(C)
    assert "one image row or plane is too large" in _cuda_supports((x, _fake_cuda(C, 1, 7, 7), vec, vec,
                                                                     vec, 1e-6))


def test_kernel_size_the_triton_kernels_lack():
    """k = 17 > MAX_K: triton refuses with the reason, automatic runs (correctly) on the CPU."""
    args = inputs("dwconv_ln", N=1, C=8, H=5, W=4, k=17)
    if backends.available("dwconv_ln", "triton") is not None:
        pytest.skip(backends.available("dwconv_ln", "triton"))
    with pytest.raises(BackendError, match=r"backend 'triton' .* odd kernel of size <= \d+, got 17"):
        ops.dwconv_ln(*args, backend="triton")
    y = ops.dwconv_ln(*args)
    torch.testing.assert_close(y, convnext_fast.reference.dwconv_ln(*args), rtol=2e-5, atol=2e-5)


def test_model_with_a_large_kernel_runs_on_the_best_backend():
    """kernel_sizes=9 (beyond the CUDA kernel): on this CPU the C++ kernel takes any odd k."""
    model, x = _model(kernel_sizes=9), torch.randn(1, 3, 32, 32)
    backends.clear_selections()
    with torch.no_grad():
        out = model(x)
        picked, skipped = backends.last_selections()["dwconv_ln"]
        with use_backend("torch"):
            want = model(x)
    assert picked == ("cpu" if _ext.error() is None else "torch"), (picked, skipped)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_even_kernel_and_dilation_are_refused_by_the_model_with_the_way_out():
    with pytest.raises(ValueError, match=r"ConvNeXt: kernel sizes must be odd, got \(8, 8, 8, 8\)"):
        convnext_fast.convnext_atto(kernel_sizes=8, device="meta")
    for os_ in (8, 16):
        with pytest.raises(NotImplementedError, match=rf"output_stride={os_} \(dilated stages\) is not "
                                                      r"supported.*convnext_fast.patch_timm"):
            convnext_fast.convnext_atto(output_stride=os_, device="meta")


def test_dilated_timm_model_runs_patched_with_the_dilated_blocks_reported():
    """The way out the error names: timm's dilated ConvNeXt, patched. Undilated blocks run on the
    fused ops (automatic backend), dilated ones keep timm's forward and the report says why."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", output_stride=16, num_classes=10, ls_init_value=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    report = convnext_fast.patch_timm(model)
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"}
    dilated = {n for n, m in blocks.items() if m.conv_dw.dilation != (1, 1)}
    assert dilated and dilated == {n for n, why in report.skipped if "dilation" in why}, str(report)
    assert report.blocks_patched == len(blocks) - len(dilated)
    backends.clear_selections()
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert backends.last_selections()["dwconv_ln"][0] == ("cpu" if _ext.error() is None else "torch")


def test_env_var_request_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("CONVNEXT_FAST_BACKEND", "cuda")
    with pytest.raises(BackendError, match=r"backend 'cuda' \(from CONVNEXT_FAST_BACKEND\) cannot run"):
        _model()(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("arch_list,capability,runs", [
    ("8.0;9.0", (8, 0), True), ("8.0;9.0", (8, 9), True), ("8.0;9.0", (9, 0), True),
    ("8.0;9.0", (7, 5), False), ("8.0;9.0", (10, 0), False), ("8.0;9.0+PTX", (10, 0), True),
    ("8.0;9.0+PTX", (7, 0), False), ("visible GPU", (7, 0), True),
])
def test_cuda_backend_refuses_a_gpu_the_build_has_no_kernels_for(monkeypatch, arch_list, capability, runs):
    """An old (or newer, without PTX) GPU falls back visibly instead of failing at kernel launch."""
    from convnext_fast import _ext

    monkeypatch.setattr(_ext, "build_info", lambda: {"with_cuda": True, "cuda_arch_list": arch_list})
    _ext.cuda_arch_unsupported.cache_clear()
    try:
        why = _ext.cuda_arch_unsupported(capability)
    finally:
        _ext.cuda_arch_unsupported.cache_clear()
    if runs:
        assert why is None
    else:
        assert f"sm_{capability[0]}{capability[1]}" in why and "TORCH_CUDA_ARCH_LIST" in why
