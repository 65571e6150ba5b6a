"""The wheel and the torch it was built against.

- ``_C`` built against another torch is not loaded (a warning says why and what to do), and the
  package still runs on the reference backend; ``info`` shows it (fast: a copy of the package with
  a made-up build record).
- ``python -m build --wheel`` makes a wheel holding ``_C`` and its build record, which installs in a
  fresh virtual environment and runs ``convnext_fast.convnext_tiny()``. Building compiles the
  extension, so this test is slow: by default (and in CI) with the CPU kernels only
  (``CONVNEXT_FAST_SKIP_CUDA_BUILD=1``, a few minutes on 2 cores); ``CONVNEXT_FAST_TEST_WHEEL=full``
  builds what ``make wheel`` builds (with the CUDA kernels where torch and a toolkit allow);
  ``CONVNEXT_FAST_TEST_WHEEL=0`` skips it.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import convnext_fast

ROOT = Path(__file__).resolve().parents[1]
MODE = os.environ.get("CONVNEXT_FAST_TEST_WHEEL", "cpu")
# Backends that run without convnext_fast._C: the reference, Triton, and torch's own oneDNN.
NO_EXTENSION_BACKENDS = {"torch", "triton", "onednn"}

PROBE = """
import json, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import convnext_fast
from convnext_fast import _ext
model = convnext_fast.convnext_tiny().eval()
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    out = convnext_fast.convnext_atto()(x)
    if _ext.error() is None:  # the C++ kernels, asked for by name
        with convnext_fast.use_backend({"dwconv_ln": "cpu", "mlp": "cpu"}):
            out = out + convnext_fast.convnext_atto()(x)
print(json.dumps({"file": convnext_fast.__file__, "error": _ext.error(), "recorded": _ext.recorded_build(),
                  "warnings": [str(w.message) for w in caught], "finite": bool(torch.isfinite(out).all()),
                  "selected": {op: b for op, (b, _) in convnext_fast.backends.last_selections().items()}}))
"""


def _probe(python, cwd, env=None):
    done = subprocess.run([str(python), "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fake_record(package_dir: Path, torch_version: str) -> None:
    (package_dir / "_build_info.py").write_text(
        f"BUILD = {{'torch': {torch_version!r}, 'cuda': None, 'with_cuda': False, "
        "'cuda_arch_list': '', 'cpu_flags': 'avx2'}\n")


def _info(python, cwd, env=None) -> str:
    done = subprocess.run([str(python), "-m", "convnext_fast", "info"], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**(env or os.environ), "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_extension_for_another_torch_is_not_loaded(tmp_path):
    package = Path(convnext_fast.__file__).parent
    shutil.copytree(package, tmp_path / "convnext_fast", ignore=shutil.ignore_patterns("__pycache__"))
    _fake_record(tmp_path / "convnext_fast", "1.0.0+made.up")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    got = _probe(sys.executable, tmp_path, env)
    assert got["file"].startswith(str(tmp_path))
    message = f"built against torch 1.0.0+made.up, but torch {torch.__version__} is installed, so it is not loaded"
    assert message in got["error"] and "Rebuild it" in got["error"]
    assert any(message in w for w in got["warnings"])
    # not the extension's cpu backend: the reference, or backends that need no _C
    assert got["finite"] and set(got["selected"].values()) <= NO_EXTENSION_BACKENDS
    assert "extension: unavailable: convnext_fast._C was built against torch 1.0.0+made.up" in _info(
        sys.executable, tmp_path, env)


def test_build_record_of_this_torch_loads():
    from convnext_fast import _ext

    recorded = _ext.recorded_build()
    if not recorded:
        pytest.skip("this checkout's _C was built before setup.py recorded the torch version")
    assert recorded["torch"] == torch.__version__ and _ext.torch_mismatch() is None


def test_extension_for_a_wider_cpu_isa_is_not_loaded(monkeypatch):
    """An AVX-512 build on an AVX2-only CPU would die of SIGILL at the first kernel: not loaded."""
    from convnext_fast import _ext

    monkeypatch.setattr(_ext, "recorded_build", lambda: {"torch": torch.__version__, "cpu_flags": "avx512"})
    avx2 = {"avx2", "fma", "f16c", "sse4_2"}
    why = _ext.isa_mismatch(avx2)
    assert "compiled for avx512 CPUs, but this CPU lacks avx512f, avx512bw, avx512vl, avx512dq" in why
    assert "CONVNEXT_FAST_CPU_ISA=avx2" in why
    assert _ext.isa_mismatch(avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}) is None
    monkeypatch.setattr(_ext, "recorded_build", lambda: {"torch": torch.__version__, "cpu_flags": "avx2"})
    assert "lacks avx2, fma, f16c" in _ext.isa_mismatch({"sse4_2"})
    assert _ext.isa_mismatch(avx2) is None
    monkeypatch.setattr(_ext, "recorded_build", lambda: {"torch": torch.__version__, "cpu_flags": "default"})
    assert _ext.isa_mismatch(set()) is None


def test_this_build_fits_this_cpu():
    from convnext_fast import _ext

    assert _ext.isa_mismatch() is None


def _tree(dest: Path) -> None:
    """The checkout's files as git sees them (tracked, and new ones not ignored): no build outputs."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
@pytest.mark.skipif(MODE == "0", reason="CONVNEXT_FAST_TEST_WHEEL=0")
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_wheel_installs_in_a_fresh_venv(tmp_path):
    pytest.importorskip("build", reason="pip install build (make wheel installs it)")
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    _tree(src)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    if MODE != "full":
        env["CONVNEXT_FAST_SKIP_CUDA_BUILD"] = "1"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), "."],
                           cwd=src, capture_output=True, text=True, timeout=1800, env=env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("convnext_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert any(n.startswith("convnext_fast/_C.") and n.endswith(".so") for n in names), names
        record = z.read("convnext_fast/_build_info.py").decode()
    assert repr(torch.__version__) in record

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=600)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", str(wheel)], capture_output=True, text=True,
                         timeout=1200)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    # From a folder outside the checkout, so the installed package is the one imported.
    got = _probe(python, tmp_path)
    assert got["file"].startswith(str(venv)), got["file"]
    assert got["error"] is None and got["warnings"] == [] and got["finite"]
    assert got["recorded"]["torch"] == torch.__version__
    if MODE != "full":
        assert got["recorded"]["with_cuda"] is False

    # The same wheel under a torch it was not built for: a warning, and the reference runs.
    _fake_record(Path(got["file"]).parent, "1.0.0+made.up")
    got = _probe(python, tmp_path)
    assert "built against torch 1.0.0+made.up" in got["error"] and got["finite"]
    assert set(got["selected"].values()) <= NO_EXTENSION_BACKENDS
