"""What the per-backend tests of tests/ops share: inputs from the op's spec, positional; and for
the Triton backend's files (test_dwconv_ln_triton.py, test_mlp_triton.py, test_mlp_grn_triton.py)
the module-level skip, the device, the registry's support check, the kernels' launchers and
forward and gradient checks against the fp64 reference.

On a GPU the Triton kernels compile; without one they run on the interpreter at small shapes
(TRITON_INTERPRET=1, set by tests/conftest.py before anything imports triton). Importing this
module does not import triton.
"""
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/_cases.py
from _cases import as64, leaves  # noqa: E402

from convnext_fast import backends, reference  # noqa: E402
from convnext_fast.specs import SPECS  # noqa: E402
from convnext_fast.testing import assert_fp32, assert_parity  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last


def inputs(op: str, N: int, C: int, H: int, W: int, dtype: torch.dtype, device="cpu", **options):
    """Fresh random inputs of one case from ``op``'s spec, positional; dwconv_ln's and mlp_grn's
    end with eps."""
    return list(SPECS[op].make_inputs(device, dtype, N=N, C=C, H=H, W=W, **options).values())


def dwconv_ln_inputs(shape, dtype: torch.dtype, bias: bool = True, device="cpu"):
    """x, conv_weight, conv_bias, ln_weight, ln_bias of ``shape`` = (N, C, H, W, k) from the spec,
    without its eps: these tests pass eps themselves."""
    N, C, H, W, k = shape
    return inputs("dwconv_ln", N, C, H, W, dtype, device, k=k, bias=bias)[:5]


def skip_module_unless_triton(*ops: str) -> None:
    """Skip the calling test module, with the reason, where the triton backend cannot run ``ops``
    here: triton missing, or on the CPU the interpreter not in effect (a module collected earlier
    imported triton before TRITON_INTERPRET=1 was set: run the file in its own process)."""
    for op in ops:
        reason = backends.available(op, "triton")
        if reason is None and DEVICE == "cpu":
            reason = importlib.import_module("convnext_fast.kernels.runtime").interpreter_problem()
        if reason is not None:
            pytest.skip(f"{op} on triton: {reason}", allow_module_level=True)


def supports(op: str, *args):
    """The triton backend's reason to refuse ``op(*args)`` (None: it takes the call)."""
    return backends.registered(op)["triton"].supports(**SPECS[op].bind(args))


def check_common_refusals(op: str, args) -> None:
    """The backend takes ``args`` (fp32 on DEVICE) and refuses what no Triton kernel runs: fp64,
    and CPU tensors without the interpreter."""
    assert backends.available(op, "triton") is None
    assert supports(op, *args) is None
    assert "dtype" in supports(op, *as64(args))
    if DEVICE == "cuda":
        assert "CUDA" in supports(op, *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        return
    old = os.environ.pop("TRITON_INTERPRET")
    try:
        assert "TRITON_INTERPRET" in supports(op, *args)
    finally:
        os.environ["TRITON_INTERPRET"] = old


def launcher(op: str, which: str):
    """The kernels' launcher ``convnext_fast.kernels.<op>.<op>_<which>`` (``fwd`` or ``bwd``)."""
    return getattr(importlib.import_module(f"convnext_fast.kernels.{op}"), f"{op}_{which}")


def triton_op(op: str):
    """The backend's custom op ``convnext_fast::<op>_triton`` (autograd through ``_triton_bwd``)."""
    return getattr(torch.ops.convnext_fast, f"{op}_triton")


def ref(op: str):
    return getattr(reference, op)


def check_low(got, ref64, torch_same_dtype, name):
    # The Triton interpreter converts fp32 -> bf16 by truncation (round toward zero), which doubles
    # the final rounding error; on a GPU the conversion rounds to nearest even and the rule is 2x.
    interpret = importlib.import_module("convnext_fast.kernels.runtime").INTERPRET
    factor = 3.0 if interpret and got.dtype == torch.bfloat16 else 2.0
    assert_parity(got, ref64, torch_same_dtype, name=name, factor=factor)


def check_forward(op: str, args, name: str, **launch) -> None:
    """The forward launcher writing into a NaN-poisoned ``out=``, against fp64 (fp32) or the
    parity rule (fp16/bf16)."""
    out = torch.full_like(args[0], float("nan"), memory_format=CL)
    assert launcher(op, "fwd")(*args, out=out, **launch) is out
    want = ref(op)(*as64(args))
    if out.dtype == torch.float32:
        assert_fp32(out, want, name)
    else:
        check_low(out, want, ref(op)(*args), name)


def grads(fn, args, grad_out):
    """``fn(*args)`` on fresh leaves and, after ``backward(grad_out)``, each argument's gradient
    (None for None and scalar arguments)."""
    live = leaves(args)
    out = fn(*live)
    out.backward(grad_out)
    return out, [t.grad if isinstance(t, torch.Tensor) else None for t in live]


def check_low_gradients(op: str, args, grad_out, name: str = "") -> None:
    """bf16/fp16 autograd through the backend's custom op against the fp64 reference, within the
    low-precision rule (2x PyTorch's own error in that dtype)."""
    _, got = grads(triton_op(op), args, grad_out)
    _, same = grads(ref(op), args, grad_out)
    _, want = grads(ref(op), as64(args), grad_out.double())
    for arg, g, s, w in zip(SPECS[op].names, got, same, want):
        if g is not None:
            check_low(g, w, s, f"d{arg}-{name}")


def check_gradients(op: str, args, grad_out, name: str = "") -> None:
    """fp32 autograd through the backend's custom op against autograd of the fp64 reference."""
    out, got = grads(triton_op(op), args, grad_out)
    want_out, want = grads(ref(op), as64(args), grad_out.double())
    assert out.is_contiguous(memory_format=CL)
    assert_fp32(out.detach(), want_out.detach(), f"out{name}")
    for arg, g, w, a in zip(SPECS[op].names, got, want, args):
        if not isinstance(a, torch.Tensor):
            assert g is None, arg
            continue
        assert g is not None, f"d{arg}: missing gradient"
        assert g.shape == a.shape and g.dtype == a.dtype, arg
        assert_fp32(g, w, f"d{arg}{name}")
