"""`make gpu-check`'s plumbing on this CPU (the GPU run has minutes, so its script must not fail
there for a reason a dry run would have shown): the dry run at tiny shapes writes every step and
the record in its documented format; a budget too small for a step skips it with a line."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_dry_run_records_every_step(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mod = _module()
    files = [f for f in os.listdir(tmp_path)
             if f.endswith(".json") and f not in ("gpu_check.json", "backend_order.json")]
    assert files == [f"cpu_{json.load(open(tmp_path / 'gpu_check.json'))['header']['commit']}.json"]
    record = json.load(open(tmp_path / files[0]))
    assert record["format"] == mod.FORMAT
    header = record["header"]
    assert header["dry_run"] is True
    assert header["steps"] == {name: "ok" for name, *_ in mod.STEPS}
    for key in ("device", "torch", "triton", "commit", "date", "ceilings"):
        assert key in header, key
    assert set(header["ceilings"]) >= {"copy_GBps", "bf16_matmul_TFLOPs", "fp32_fma_TFLOPs"}
    rows = record["rows"]
    ops = [r for r in rows if r["kind"] == "op"]
    models = [r for r in rows if r["kind"] == "model"]
    parity = [r for r in rows if r["kind"] == "parity"]
    assert ops and models and parity
    for r in ops:
        assert set(r) == {"kind", "op", "pass", "dtype", "N", "C", "H", "W", "provider", "ms", "roofline_ms"}
        assert r["pass"] in ("fwd", "fwd_bwd") and r["dtype"] == "bf16" and r["ms"] > 0
        assert 0 < r["roofline_ms"]
    assert {r["provider"] for r in ops} >= {"torch", "cpu", "torch_compile"}
    for r in models:
        assert r["mode"] in ("infer", "train") and r["provider"] in ("timm_eager", "convnext_fast")
        assert r["img_s"] > 0
    assert all(r["ok"] for r in parity), [r for r in parity if not r["ok"]]
    assert {r.get("op") for r in parity} >= {"dwconv_ln", "mlp", "mlp_grn"}
    entries = json.load(open(tmp_path / "backend_order.json"))["entries"]
    measured = [e for e in entries if e["measured"].get("commit") == header["commit"]]
    assert {(e["op"], e["training"]) for e in measured} >= {("dwconv_ln", False), ("mlp", True)}
    log = open(tmp_path / "gpu_check.log").read()
    assert "== done" in log


def test_a_budget_too_small_skips_steps_with_a_line(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--budget", "3", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.load(open(tmp_path / "gpu_check.json"))
    for name, *_ in _module().STEPS:
        assert record["header"]["steps"][name].startswith("skipped (needs ~"), record["header"]["steps"]
        assert f"== SKIP {name}:" in proc.stdout


def test_roofline_and_file_names():
    mod = _module()
    ceilings = {"copy_GBps": 1000.0, "bf16_matmul_TFLOPs": 100.0, "fp32_fma_TFLOPs": 10.0}
    # dwconv_ln is bound by the FMA rate even in bf16; an MLP in bf16 by the matmul rate
    assert mod._roofline_ms("dwconv_ln", "bf16", 1e10, 1e6, ceilings) == pytest.approx(1.0)
    assert mod._roofline_ms("mlp", "bf16", 1e10, 1e6, ceilings) == pytest.approx(0.1)
    assert mod._roofline_ms("mlp", "bf16", 1e6, 1e9, ceilings) == pytest.approx(1.0)  # bytes bind
    assert mod._roofline_ms("mlp", "bf16", 1.0, 1.0, {}) is None
    assert mod._slug("NVIDIA H200") == "h200"
    assert mod._slug("NVIDIA H100 80GB HBM3") == "h100"
    assert mod._slug("2-thread AMD EPYC") == "cpu"
