"""Every op x registered backend x device x dtype on the cases of its spec's ``sample_inputs``:
forward parity against the fp64 reference (the parity rule per dtype), fp32 gradients of every
input against fp64 autograd of the reference, and the backend's custom ops (forward and backward)
under ``torch.library.opcheck``. A backend registered later is covered without editing this file;
the per-backend files next to it hold only what is particular to one backend (edge cases, tiling
arithmetic, limits). Kernels fill their outputs with NaN first (CONVNEXT_FAST_POISON_OUTPUTS=1, set
by conftest.py), so an unwritten element fails parity."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/_cases.py
from _cases import (ARG_NAMES, OPS, check_grads, check_output, leaves,  # noqa: E402
                    op_backend_params, skip_unless_runs)

from convnext_fast import ops  # noqa: E402
from convnext_fast.specs import SPECS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The custom ops behind each backend: forward op, backward op (None: the backend is a composite).
BACKEND_OPS = {"torch": None, "cpu": "{op}", "cuda": "{op}", "triton": "{op}_triton",
               "onednn": "{op}_onednn"}
# Inference-only backends: no autograd, no backward op.
NO_BACKWARD = {"onednn"}
# Under TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel itself, so fake and
# functional tensors reach the interpreter ("Cannot access data pointer", meta storage errors):
# test_faketensor and test_aot_dispatch_dynamic of the triton ops run on a GPU only (DESIGN.md, 6).
_INTERPRETED_UTILS = ("test_schema", "test_autograd_registration")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op, backend, device", op_backend_params())
def test_forward_parity(op, backend, device, dtype):
    for case in SPECS[op].sample_inputs(device, dtype):
        args = list(case.values())
        skip_unless_runs(op, backend, args)
        out = getattr(ops, op)(**case, backend=backend)
        assert out.shape == args[0].shape and out.dtype == dtype and out.device == args[0].device
        assert out.is_contiguous(memory_format=torch.channels_last)
        check_output(op, out, args, name=f"{op}[{backend}] {list(args[0].shape)}", ulps=2)


@pytest.mark.parametrize("op, backend, device", op_backend_params())
def test_backward_parity_fp32(op, backend, device):
    for case in SPECS[op].sample_inputs(device, torch.float32):
        args = leaves(list(case.values()))
        skip_unless_runs(op, backend, args)
        out = getattr(ops, op)(*args, backend=backend)
        grad = torch.randn_like(out)
        out.backward(grad)
        check_grads(op, args, grad, names=ARG_NAMES[op])


@pytest.mark.parametrize("op, backend, device",
                         [p for p in op_backend_params() if BACKEND_OPS[p.values[1]] is not None])
def test_backend_ops_opcheck(op, backend, device):
    fwd_name = BACKEND_OPS[backend].format(op=op)
    if not hasattr(torch.ops.convnext_fast, fwd_name):
        pytest.skip(f"convnext_fast::{fwd_name} is not defined here")
    utils = _INTERPRETED_UTILS if backend == "triton" and device == "cpu" else None
    kw = {} if utils is None else {"test_utils": utils}
    fwd, bwd = SPECS[op], SPECS[SPECS[op].backward]
    grad = backend not in NO_BACKWARD
    for case in fwd.sample_inputs(device, torch.float32):
        skip_unless_runs(op, backend, list(case.values()))
        inputs = {n: v.requires_grad_(grad) if isinstance(v, torch.Tensor) else v for n, v in case.items()}
        torch.library.opcheck(getattr(torch.ops.convnext_fast, fwd_name).default,
                              tuple(inputs.values()), **kw)
    if not grad:
        return
    bwd_op = getattr(torch.ops.convnext_fast, f"{fwd_name}_bwd").default
    for case in bwd.sample_inputs(device, torch.float32):
        torch.library.opcheck(bwd_op, tuple(case.values()), **kw)


@pytest.mark.parametrize("op", OPS)
def test_sample_inputs_cover_the_optional_arguments(op):
    """The cases exercise each optional argument both present and absent, so every backend's
    None handling is under test."""
    cases = SPECS[op].sample_inputs("cpu", torch.float32)
    for name in SPECS[op].optional:
        assert any(c[name] is None for c in cases) and any(c[name] is not None for c in cases), name
