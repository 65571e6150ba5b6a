"""The command line: `info` reports every op x backend, `bench` times, checks parity, writes JSON."""
import json
import subprocess
import sys

import pytest

from convnext_fast.__main__ import main
from convnext_fast.backends import order
from convnext_fast.bench import STAGES, backend_order_entries


def test_info_lists_ops_backends_and_reasons():
    out = subprocess.run([sys.executable, "-m", "convnext_fast", "info"], capture_output=True,
                         text=True, timeout=300, env={"COLUMNS": "200", **__import__("os").environ})
    assert out.returncode == 0, out.stderr
    words = ["dwconv_ln", "mlp_grn", "torch", "triton", "cuda", "extension:", "automatic choice"]
    if "unavailable" not in out.stdout:
        words += ["CPU mlp GEMMs: bfloat16 inputs in", "CPU mlp inference on packed-weight tiles: float32",
                  "CPU downsample inference as one op"]
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
    done = subprocess.run([sys.executable, str(script), str(bench_json), "--ceilings", str(record), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000


def test_bench_ops_and_ceilings_write_the_backend_order(tmp_path):
    record, order_file = tmp_path / "ops.json", tmp_path / "order.json"
    rc = main(["bench", "--ops", "--ceilings", "--device", "cpu", "--resolution", "32", "--batch", "1",
               "--warmup", "0", "--iters", "2", "--json", str(record), "--write-backend-order", str(order_file)])
    assert rc == 0
    data = json.loads(record.read_text())
    assert data["results"] == [] and {"copy_GBps", "matmul_TFLOPs"} <= set(data["ceilings"])
    assert {(o["op"], o["mode"]) for o in data["ops"]} == {(op, m) for op in ("dwconv_ln", "mlp", "mlp_grn")
                                                         for m in ("fwd", "fwd+bwd")}
    assert all(o["iqr_ms"] >= 0 and o["peak_mem_mb"] is None for o in data["ops"])
    entries = order.load(str(order_file))
    assert {(e["op"], e["training"]) for e in entries} == {(o["op"], o["mode"] != "fwd") for o in data["ops"]}
    for e in entries:
        assert e["device"] == "cpu" and e["dtype"] == "fp32" and "torch" in e["order"]
        assert [e["ms"][b] for b in e["order"]] == sorted(e["ms"].values())
        assert {"device", "torch", "triton", "commit", "date"} <= set(e["measured"])
        assert e["measured"]["source"] == str(record)


def test_backend_order_sums_stages_by_blocks():
    rows = [{"op": "mlp", "backend": b, "mode": "fwd", "device": "cuda:0", "dtype": "bf16",
             "shape": [8, C, H, H], "ms": ms}
            for b, per_stage in {"torch": (1, 1, 1, 1), "triton": (2, 2, 0.5, 2), "cuda": (0.1, 0.1, 0.1, None)}.items()
            for (C, H, _), ms in zip(STAGES, per_stage) if ms is not None]
    (entry,) = backend_order_entries(rows, {"gpu": "H200", "torch": "2.x", "commit": "abc"}, "here")
    # torch 3+3+9+3 = 18, triton 6+6+4.5+6 = 22.5; cuda ran only three stages, so it goes last
    assert entry["order"] == ["torch", "triton", "cuda"] and entry["ms"]["triton"] == 22.5
    assert (entry["device"], entry["training"], entry["measured"]["device"]) == ("cuda", False, "H200")


def test_bench_write_backend_order_needs_ops(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--write-backend-order"])
    assert "needs --ops" in capsys.readouterr().err


def test_bench_rejects_unknown_provider(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--providers", "tvm"])
    assert "unknown provider" in capsys.readouterr().err


def test_bench_table_fits_80_columns_and_json_keeps_every_column(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    monkeypatch.setenv("COLUMNS", "80")
    path = tmp_path / "bench.json"
    rc = main(["bench", "--model", "convnext_atto", "--device", "cpu", "--resolution", "32", "--batch", "2",
               "--warmup", "0", "--iters", "2", "--no-compile", "--providers", "timm", "convnext_fast:torch",
               "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "convnext_fast:torch" in out and "x eager" in out and "--json" in out  # names whole, notes why
    record = json.loads(path.read_text())
    assert {"ms", "iqr_ms", "img_per_s", "speedup_vs_eager", "speedup_vs_compile", "max_err_vs_timm",
            "peak_mem_mb"} <= set(record["results"][0])


@pytest.mark.parametrize("rich", [True, False])
def test_tables_fit_the_terminal_with_notes(monkeypatch, capsys, rich):
    from convnext_fast.__main__ import _Out

    columns = ["op", "torch", "cpu", "cuda", "triton"]
    rows = [["mlp", "available", "available", "no: no cuda implementation of mlp", "available"],
            ["mlp_grn", "available", "no: no cpu implementation of mlp_grn",
             "no: no cuda implementation of mlp_grn", "available"]]
    for width in (200, 60):
        monkeypatch.setenv("COLUMNS", str(width))
        out = _Out()
        if not rich:
            out.console = None
            monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: __import__("os").terminal_size(
                (width, 24)))
        out.table("op x backend", columns, rows)
        text = capsys.readouterr().out
        assert max(len(line) for line in text.splitlines()) <= width, text
        if width == 200:
            assert "no: no cuda implementation of mlp_grn" in text and "[1]" not in text
        else:  # long reasons move below the table, numbered in reading order, each once
            assert "[1] no: no cuda implementation of mlp\n" in text
            assert "[2] no: no cpu implementation of mlp_grn" in text
            assert text.count("no: no cuda implementation of mlp_grn") == 1
