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
    words = ["dwconv_ln", "mlp_grn", "torch", "triton", "cuda", "extension:", "automatic choice"]
    if "unavailable" not in out.stdout:
        words.append("CPU mlp GEMMs: bfloat16 inputs in")
    for word in words:
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
    assert set(by_provider) == {"timm", "timm_patched", "convnext_fast"}
    assert by_provider["timm_patched"]["max_err_vs_timm"] <= 1e-4
    assert by_provider["convnext_fast"]["max_err_vs_timm"] <= 1e-4
    assert by_provider["timm"]["speedup_vs_eager"] == 1.0


def test_bench_plot_and_plot_script(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    png, record = tmp_path / "bench.png", tmp_path / "bench.json"
    rc = main(["bench", "--model", "convnext_atto", "--device", "cpu", "--resolution", "32", "--batch", "1", "2",
               "--warmup", "0", "--iters", "1", "--no-compile", "--mode", "train", "--json", str(record),
               "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    data = json.loads(record.read_text())
    assert {r["mode"] for r in data["results"]} == {"train"}
    assert {"copy_GBps", "matmul_TFLOPs"} <= set(data["ceilings"])
    assert {o["op"] for o in data["ops"]} == {"dwconv_ln", "mlp", "mlp_grn"}

    # benchmarks/plot.py draws a pytest-benchmark JSON of the suite
    bench_json = tmp_path / "suite.json"
    bench_json.write_text(json.dumps({"machine_info": {}, "benchmarks": [
        {"extra_info": {"kind": "model", "model": "m", "mode": "inference", "dtype": "fp32", "batch": b,
                        "provider": p, "speedup_vs_eager": s}, "stats": {"median": 0.01}}
        for b, p, s in [(1, "timm", 1.0), (8, "timm", 1.0), (1, "convnext_fast", 1.2), (8, "convnext_fast", 1.5)]
    ] + [{"extra_info": {"kind": "op", "op": "mlp", "mode": "fwd", "provider": "torch", "flops": 1e9,
                         "bytes": 1e7}, "stats": {"median": 0.002}}]}))
    out = tmp_path / "suite.png"
    script = __import__("pathlib").Path(__file__).parents[1] / "benchmarks" / "plot.py"
    done = subprocess.run([sys.executable, str(script), str(bench_json), "-o", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000


def test_bench_rejects_unknown_provider(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--providers", "tvm"])
    assert "unknown provider" in capsys.readouterr().err
