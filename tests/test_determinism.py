"""Determinism: the same inputs give bit-identical outputs and gradients run to run on every
backend (no float atomics or racing partial sums decide a result), and every backend runs under
``torch.use_deterministic_algorithms(True)`` with the same bits as without it."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/_cases.py (--import-mode=importlib adds none)
from _cases import (ARG_NAMES, INFERENCE_ONLY, call, inputs, leaves, op_backend_params,  # noqa: E402
                    skip_unless_runs)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for the test; the previous setting afterwards."""
    was, warn_only = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _shape(backend):
    # large enough that the compiled backwards split their reductions over several blocks and
    # threads; tiny (and k = 3) on the Triton interpreter
    if backend == "triton":
        return dict(N=2, C=12, H=5, W=4, k=3)
    return dict(N=3, C=40, H=11, W=9, k=7)


def _run(op, backend, args, grad_out):
    """(output, gradients of every tensor argument) of one forward + backward (the forward alone
    on an inference-only backend)."""
    if backend in INFERENCE_ONLY:
        with torch.no_grad():
            return call(op, args, backend), []
    live = leaves(args)
    out = call(op, live, backend)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in live if isinstance(t, torch.Tensor)]


def _assert_same_bits(a, b, op, what):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b), f"{op}: output differs ({what})"
    for name, ga, gb in zip(ARG_NAMES[op], grads_a, grads_b):
        assert torch.equal(ga, gb), f"{op}: d{name} differs ({what})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_rerun_gives_the_same_bits(op, backend, device, dtype):
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in inputs(op, dtype=dtype, **_shape(backend))]
    skip_unless_runs(op, backend, args)
    g = torch.randn(args[0].shape, device=device).to(dtype)
    first = _run(op, backend, args, g)
    for _ in range(1 if backend == "triton" else 2):  # interpreter time
        _assert_same_bits(first, _run(op, backend, args, g), op, "rerun")


@pytest.mark.parametrize("op,backend,device", op_backend_params())
def test_use_deterministic_algorithms(op, backend, device, deterministic):
    """Runs (nothing raises for a nondeterministic op) and gives the bits of a run without it."""
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in inputs(op, **_shape(backend))]
    skip_unless_runs(op, backend, args)
    g = torch.randn(args[0].shape, device=device)
    on = _run(op, backend, args, g)
    _assert_same_bits(on, _run(op, backend, args, g), op, "rerun under the flag")
    torch.use_deterministic_algorithms(False)
    off = _run(op, backend, args, g)
    torch.use_deterministic_algorithms(True)
    _assert_same_bits(on, off, op, "with and without use_deterministic_algorithms")


def test_model_training_step_is_deterministic(deterministic):
    """A ConvNeXt (automatic backends) forward + backward: the same loss and gradients twice."""
    import convnext_fast

    torch.manual_seed(0)
    model = convnext_fast.convnext_atto(num_classes=10, ls_init_value=1.0).train()
    x = torch.randn(4, 3, 32, 32)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = step()
    loss_b, grads_b = step()
    assert torch.equal(loss_a, loss_b)
    for (name, _), ga, gb in zip(model.named_parameters(), grads_a, grads_b):
        assert torch.equal(ga, gb), name
