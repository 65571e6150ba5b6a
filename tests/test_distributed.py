"""Distributed training on convnext_fast ops: DDP and FSDP2 (``fully_shard``), with and without
gradient checkpointing, on 2 CPU processes over gloo. The gradients of each step equal those of
single-process training on the concatenated batch (fp32 tolerance), and so do the weights after
two SGD steps.

One spawn runs every configuration (tests/_dist_worker.py); the tests read its results.
"""
import os
import socket
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))  # tests/_dist_worker.py: the spawned ranks import it
import _dist_worker as worker  # noqa: E402

from convnext_fast.testing import assert_fp32  # noqa: E402

WORLD = 2
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """config -> what rank 0 saved (grads per step, final params, names, selections) or an error."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(worker.run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {TIMEOUT_S} s")
    return {c: torch.load(out / f"{c}.pt", weights_only=False) for c in worker.CONFIGS
            if (out / f"{c}.pt").exists()}


@pytest.fixture(scope="module")
def single_process():
    """The same two SGD steps in one process on the whole (concatenated) batch."""
    model = worker.make_model()
    params = list(model.parameters())
    grads = worker.train(model, params, slice(None), lambda t: t.detach().clone())
    return grads, [p.detach().clone() for p in params], [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("config", worker.CONFIGS)
def test_matches_single_process_training(config, results, single_process):
    assert config in results, f"{config}: no result saved"
    got = results[config]
    assert "error" not in got, f"{config} failed on rank 0:\n{got.get('error')}"
    want_grads, want_params, names = single_process
    assert got["names"] == names
    # automatic selection ran dwconv_ln on the C++ CPU kernel, or recorded why it could not
    picked, skipped = got["selections"]["dwconv_ln"]
    assert picked == "cpu" or "cpu" in dict(skipped), got["selections"]
    for step, (g_step, w_step) in enumerate(zip(got["grads"], want_grads)):
        for name, g, w in zip(names, g_step, w_step):
            assert g.shape == w.shape, f"{config} step {step}: {name}"
            assert_fp32(g, w.double(), name=f"{config} step {step} grad {name}", rtol=2e-5, atol=1e-7)
    for name, p, w in zip(names, got["params"], want_params):
        assert_fp32(p, w.double(), name=f"{config} final {name}", rtol=2e-5, atol=1e-7)
