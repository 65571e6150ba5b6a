"""The command line: `info` reports every op x backend, `bench` times, checks parity, writes JSON."""
import json
import subprocess
import sys

import pytest

from convnext_fast.__main__ import main


def test_info_lists_ops_backends_and_reasons():
    out = subprocess.run([sys.executable, "-m", "convnext_fast", "info"], capture_output=True,
                         text=True, timeout=300, env={"COLUMNS": "200", **__import__("os").environ})
    assert out.returncode == 0, out.stderr
    for word in ("dwconv_ln", "mlp_grn", "torch", "triton", "cuda", "extension:", "automatic choice"):
        assert word in out.stdout


def test_bench_small_model_writes_json_with_parity(tmp_path):
    pytest.importorskip("timm")
    path = tmp_path / "bench.json"
    rc = main(["bench", "--model", "convnext_atto", "--device", "cpu", "--resolution", "32",
               "--batch", "2", "--warmup", "0", "--iters", "1", "--no-compile", "--json", str(path)])
    assert rc == 0
    record = json.loads(path.read_text())
    assert {"device", "torch", "commit"} <= set(record["environment"])
    by_provider = {r["provider"]: r for r in record["results"]}
    assert set(by_provider) == {"timm", "convnext_fast"}
    assert by_provider["convnext_fast"]["max_err_vs_timm"] <= 1e-4
    assert by_provider["timm"]["speedup_vs_eager"] == 1.0
