"""`pytest benchmarks/ --benchmark` runs the full comparison with pytest-benchmark; without the flag
every case runs once at a tiny shape through the harness's timer, as a smoke test that keeps the
suite working in CI (and needs no pytest-benchmark).

Shapes, inputs, steps and costs come from the harness (:mod:`convnext_fast.bench`). Each case
records its ``case`` (everything but the provider), its ``provider`` and the work it does
(``batch`` images, ``bytes`` moved, ``flops``). After the run, the figures derived from the
median time (img/s, GB/s, TFLOP/s, speedup vs eager and vs compile of the same case) are added to
each case in the JSON and printed as a table. With ``--benchmark`` every run is also saved to
pytest-benchmark's storage (``.benchmarks/``), so ``--benchmark-compare`` works between runs;
``--benchmark-json=FILE`` writes one file; ``--write-backend-order`` merges the measured backend
order into the file the selection reads (:mod:`convnext_fast.backends.order`).
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from convnext_fast.backends import BACKENDS
from convnext_fast.bench import (DTYPES, MODES, STAGES, PeakMemory, environment, op_cost, op_inputs, op_step,
                                 op_unavailable, time_callable, write_backend_order)

# Baselines per kind of case: eager first, then compiled.
BASELINES = {"model": ("timm", "timm_compile"), "op": ("torch", "torch_compile"),
             "downsample": ("modules", "")}
_RESULTS = pytest.StashKey[List[Tuple[Dict, Optional[float]]]]()
_ORDER_NOTE = pytest.StashKey[str]()
EXTRA = "pip install 'convnext_fast[bench]'"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks at full size (default: one tiny round each)")
    parser.addoption("--bench-model", action="append", default=None,
                     help="model benchmarks: only these models (repeatable; default: all)")
    parser.addoption("--bench-batch", action="append", type=int, default=None,
                     help="model benchmarks: only these batch sizes (repeatable; default: all)")
    parser.addoption("--bench-compile-mode", default=None,
                     help="torch.compile mode of the compiled baselines (default: max-autotune on GPU)")
    parser.addoption("--write-backend-order", action="store_true", default=False,
                     help="with --benchmark: per op, device, dtype and mode, order the backends by their "
                          "time summed over the ConvNeXt-T stages and merge that into "
                          "convnext_fast/backends/backend_order.json")


def pytest_configure(config):
    config.stash[_RESULTS] = []
    full = config.getoption("--benchmark")
    if config.getoption("--write-backend-order") and not full:
        raise pytest.UsageError("--write-backend-order needs --benchmark: the order is measured at full size")
    if full and not hasattr(config.option, "benchmark_autosave"):
        raise pytest.UsageError(f"--benchmark needs pytest-benchmark: {EXTRA}")
    if full:
        config.option.benchmark_autosave = True


# The op benchmarks' cases, for every test that takes ``op_case``: parametrised in the order of
# the test's arguments, so that each file names its cases as it always has; ``op_name`` takes the
# test module's OP_NAMES.
_OP_CASES = {
    "stage": ([s[:2] for s in STAGES], lambda s: f"C{s[0]}"),
    "dtype": (["fp32", "bf16"], None),
    "provider": ([*BACKENDS, "torch_compile"], None),
    "mode": (list(MODES), None),
}


def pytest_generate_tests(metafunc):
    if "op_case" not in metafunc.fixturenames:
        return
    for name in inspect.signature(metafunc.function).parameters:
        if name == "op_name":
            metafunc.parametrize(name, metafunc.module.OP_NAMES)
        elif name in _OP_CASES:
            values, ids = _OP_CASES[name]
            metafunc.parametrize(name, values, ids=ids)


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
def run(request, full, device):
    """run(fn, **extra_info): time fn (pytest-benchmark with --benchmark, else one call of the
    harness's timer) and record extra_info with the median and the peak CUDA memory."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def _run(fn, **extra_info):
        info = dict(extra_info, device=device)
        if full:
            benchmark = request.getfixturevalue("benchmark")

            def timed():
                out = fn()
                sync()
                return out

            with PeakMemory(device) as peak:
                benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
            info["peak_mem_mb"] = peak.mb
            benchmark.extra_info.update(info)
            median = benchmark.stats.stats.median if benchmark.stats else None  # None: --benchmark-disable
        else:
            timing = time_callable(fn, device, 0, 1)
            info["peak_mem_mb"] = timing.peak_mem_mb
            median = timing.median_ms / 1e3
        request.config.stash[_RESULTS].append((info, median))

    return _run


@pytest.fixture
def op_case(run, full, device, bench_options):
    """op_case(op, stage, dtype, provider, mode): one op on one provider (a backend or
    torch_compile) at a stage shape, inputs from the op's spec; smoke mode: the first stage's
    channels at 7x7, batch 1."""
    def _case(op: str, stage: Tuple[int, int], dtype: str, provider: str, mode: str) -> None:
        C, H = stage
        if not full and stage != STAGES[0][:2]:
            pytest.skip("smoke mode runs the first stage shape only")
        if not full and provider == "torch_compile":
            pytest.skip("torch.compile is timed only with --benchmark")
        N = (128 if device == "cuda" else 8) if full else 1
        H = H if full else 7
        args = op_inputs(op, device, dtype, N, C, H, requires_grad=mode != "fwd")
        why = op_unavailable(op, provider, args)
        if why:
            pytest.skip(why)
        step = op_step(op, provider, args, mode, bench_options["compile_mode"])
        flops, nbytes = op_cost(op, N, C, H, H, DTYPES[dtype].itemsize, mode)
        run(step, kind="op", op=op, mode=mode, dtype=dtype, shape=[N, C, H, H], provider=provider,
            case=f"{op} {mode} {str(DTYPES[dtype])[6:]} {[N, C, H, H]}", flops=flops, bytes=nbytes)

    return _case


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


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    _derive([(b["extra_info"], b["stats"]["median"]) for b in output_json["benchmarks"] if b.get("stats")])


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["convnext_fast"] = environment("cuda" if torch.cuda.is_available() else "cpu")


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not config.getoption("--write-backend-order"):
        return
    rows = [dict(info, backend=info["provider"], ms=median * 1e3)
            for info, median in config.stash[_RESULTS] if info.get("kind") == "op" and median]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = "pytest " + " ".join(config.invocation_params.args)
    entries = write_backend_order(rows, environment(device), source)
    config.stash[_ORDER_NOTE] = (f"wrote {len(entries)} backend order entries (cases that ran at every "
                                 f"stage shape) to convnext_fast/backends/backend_order.json")


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    rows = [(info, median) for info, median in config.stash.get(_RESULTS, []) if median and "case" in info]
    if rows:
        _derive(rows)
        tr.write_sep("-", "convnext_fast: speed per case (median; speedups vs eager and vs compile in this run)")
        tr.write_line(f"{'case':<52} {'provider':<22} {'ms':>9} {'img/s':>9} {'GB/s':>7} {'TFLOP/s':>8} "
                      f"{'vs eager':>8} {'vs comp':>8} {'peak MB':>8}")
        for info, _ in sorted(rows, key=lambda r: (r[0]["case"], r[0]["provider"])):
            tr.write_line(f"{info['case']:<52} {info['provider']:<22} {info['ms']:>9.3f} "
                          f"{_fmt(info.get('img_per_s'), '9.1f'):>9} {_fmt(info.get('GBps'), '7.1f'):>7} "
                          f"{_fmt(info.get('TFLOPs'), '8.2f'):>8} {_fmt(info.get('speedup_vs_eager'), '8.2f'):>8} "
                          f"{_fmt(info.get('speedup_vs_compile'), '8.2f'):>8} "
                          f"{_fmt(info.get('peak_mem_mb'), '8.1f'):>8}")
    if _ORDER_NOTE in config.stash:
        tr.write_line(config.stash[_ORDER_NOTE])
