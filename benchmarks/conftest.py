"""`pytest benchmarks/ --benchmark` runs the full comparison; without the flag every case runs once
at a tiny shape, as a smoke test that keeps the suite working in CI."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks at full size (default: one tiny round each)")


@pytest.fixture(scope="session")
def full(request) -> bool:
    return request.config.getoption("--benchmark")


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def run(benchmark, full, device):
    """run(fn): time fn with pytest-benchmark (synchronizing on CUDA); one round in smoke mode."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def _run(fn, **extra_info):
        def timed():
            out = fn()
            sync()
            return out

        benchmark.extra_info.update(extra_info)
        if full:
            return benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
        return benchmark.pedantic(timed, rounds=1, iterations=1)

    return _run
