"""`pytest benchmarks/ --benchmark` runs the full comparison; without the flag every case runs once
at a tiny shape, as a smoke test that keeps the suite working in CI.

Each case records in ``extra_info`` its ``case`` (everything but the provider), its ``provider``
and the work it does (``batch`` images, ``bytes`` moved, ``flops``). After the run, the figures
derived from the median time (img/s, GB/s, TFLOP/s, speedup vs eager and vs compile of the same
case) are added to each case in the JSON and printed as a table. With ``--benchmark`` every run is
also saved to pytest-benchmark's storage (``.benchmarks/``), so ``--benchmark-compare`` works
between runs; ``--benchmark-json=FILE`` writes one file.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch

# Baselines per kind of case: eager first, then compiled.
BASELINES = {"model": ("timm", "timm_compile"), "op": ("torch", "torch_compile")}


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks at full size (default: one tiny round each)")
    parser.addoption("--bench-model", action="append", default=None,
                     help="model benchmarks: only these models (repeatable; default: all)")
    parser.addoption("--bench-batch", action="append", type=int, default=None,
                     help="model benchmarks: only these batch sizes (repeatable; default: all)")
    parser.addoption("--bench-compile-mode", default=None,
                     help="torch.compile mode of the compiled baselines (default: max-autotune on GPU)")


def pytest_configure(config):
    if config.getoption("--benchmark") and hasattr(config.option, "benchmark_autosave"):
        config.option.benchmark_autosave = True


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--benchmark")


@pytest.fixture(scope="session")
def bench_options(request) -> dict:
    opt = request.config.getoption
    return {"models": opt("--bench-model"), "batches": opt("--bench-batch"),
            "compile_mode": opt("--bench-compile-mode")}


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def run(benchmark, full, device):
    """run(fn, **extra_info): time fn with pytest-benchmark (synchronizing on CUDA; one round in
    smoke mode) and record extra_info, plus the peak CUDA memory the timed calls allocate."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def _run(fn, **extra_info):
        def timed():
            out = fn()
            sync()
            return out

        benchmark.extra_info.update(extra_info, device=device)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        if full:
            result = benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
        else:
            result = benchmark.pedantic(timed, rounds=1, iterations=1)
        if cuda:
            benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return result

    return _run


def _derive(rows: List[Tuple[Dict, float]]) -> None:
    """Add throughput and speedups to each (extra_info, median seconds) row, in place."""
    medians: Dict[Tuple[str, str], float] = {}
    for info, median in rows:
        if "case" in info:
            medians[(info["case"], info["provider"])] = median
    for info, median in rows:
        if not median or "case" not in info:
            continue
        info["ms"] = median * 1e3
        if info.get("batch"):
            info["img_per_s"] = info["batch"] / median
        if info.get("bytes"):
            info["GBps"] = info["bytes"] / median / 1e9
        if info.get("flops"):
            info["TFLOPs"] = info["flops"] / median / 1e12
        eager, compiled = BASELINES[info.get("kind", "op")]
        for name, base in (("speedup_vs_eager", eager), ("speedup_vs_compile", compiled)):
            ref = medians.get((info["case"], base))
            info[name] = ref / median if ref else None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _derive([(b["extra_info"], b["stats"]["median"]) for b in output_json["benchmarks"] if b.get("stats")])


def pytest_benchmark_update_machine_info(config, machine_info):
    from convnext_fast.bench import environment

    machine_info["convnext_fast"] = environment("cuda" if torch.cuda.is_available() else "cpu")


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = [(b.extra_info, b.stats.median) for b in session.benchmarks if b.stats and "case" in b.extra_info]
    if not rows:
        return
    _derive(rows)
    tr = terminalreporter
    tr.write_sep("-", "convnext_fast: speed per case (median; speedups vs eager and vs compile in this run)")
    tr.write_line(f"{'case':<52} {'provider':<22} {'ms':>9} {'img/s':>9} {'GB/s':>7} {'TFLOP/s':>8} "
                  f"{'vs eager':>8} {'vs comp':>8} {'peak MB':>8}")
    for info, _ in sorted(rows, key=lambda r: (r[0]["case"], r[0]["provider"])):
        tr.write_line(f"{info['case']:<52} {info['provider']:<22} {info['ms']:>9.3f} "
                      f"{_fmt(info.get('img_per_s'), '9.1f'):>9} {_fmt(info.get('GBps'), '7.1f'):>7} "
                      f"{_fmt(info.get('TFLOPs'), '8.2f'):>8} {_fmt(info.get('speedup_vs_eager'), '8.2f'):>8} "
                      f"{_fmt(info.get('speedup_vs_compile'), '8.2f'):>8} {_fmt(info.get('peak_mem_mb'), '8.1f'):>8}")
