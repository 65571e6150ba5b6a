"""Inputs, backend lists and reference calls shared by the reliability tests (bad input, numerics,
determinism, fallbacks).

Backends are read from the registry, so a backend registered later is covered without editing
the tests: ``torch``, ``cpu`` and ``triton`` (under TRITON_INTERPRET=1) run on the CPU; ``cuda`` and
``triton`` on a GPU are listed too and skip, visibly, where no GPU is visible.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence

import pytest
import torch

from convnext_fast import backends, ops, reference
from convnext_fast.specs import FORWARD_OPS, SPECS
from convnext_fast.testing import assert_fp32, assert_parity

OPS = FORWARD_OPS
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA device visible")
# Backends with no backward (inference only): the fwd+bwd edge-case tests run their forward.
INFERENCE_ONLY = frozenset({"onednn"})
_DEVICES = {"torch": ("cpu",), "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cpu", "cuda"), "onednn": ("cpu",)}
# tensor argument names, in the ops' positional order (the scalar eps comes last)
ARG_NAMES = {op: tuple(n for n in SPECS[op].names if n not in SPECS[op].scalars) for op in OPS}


def backend_params(op: str) -> List:
    """pytest params ``(backend, device)`` for every backend registered for ``op``."""
    return [pytest.param(b, d, id=f"{b}-{d}", marks=[needs_gpu] if d == "cuda" else [])
            for b in backends.registered(op) for d in _DEVICES[b]]


def op_backend_params(ops_: Sequence[str] = OPS) -> List:
    """pytest params ``(op, backend, device)`` over ``ops_`` x their backends."""
    return [pytest.param(op, *p.values, id=f"{op}-{p.id}", marks=p.marks)
            for op in ops_ for p in backend_params(op)]


def skip_unless_runs(op: str, backend: str, args) -> None:
    """Skip (with the registry's reason) when ``backend`` cannot run this call at all here, e.g.
    the extension is not built. A backend that can run must then pass the test."""
    reason = backends.why_not(op, backend, SPECS[op].bind(args))
    if reason is not None:
        pytest.skip(f"{op} on {backend}: {reason}")


def inputs(op: str, N=2, C=8, H=3, W=3, dtype=torch.float32, device="cpu", **kw) -> list:
    """Fresh random tensor inputs of ``op`` from its spec, positional, scalars (eps) left at their
    defaults (k for dwconv_ln; D, bias, gamma, residual for the MLPs; options an op does not take
    are ignored)."""
    spec = SPECS[op]
    accepted = inspect.signature(spec.make_inputs).parameters
    kw = {k: v for k, v in kw.items() if k in accepted}
    args = spec.make_inputs(device, dtype, N=N, C=C, H=H, W=W, **kw)
    return [v for n, v in args.items() if n not in spec.scalars]


def call(op: str, args, backend: Optional[str] = None) -> torch.Tensor:
    return getattr(ops, op)(*args, backend=backend)


def ref(op: str, args) -> torch.Tensor:
    """The torch reference (PyTorch's own kernels) in the inputs' dtype."""
    return getattr(reference, op)(*args)


def as64(args):
    return [t.detach().double() if isinstance(t, torch.Tensor) else t for t in args]


def leaves(args, which=None):
    """``args`` as new leaves (detached aliases: same memory and strides, so views stay views);
    those at positions ``which`` (default: every tensor) require grad."""
    out = []
    for i, t in enumerate(args):
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if which is None or i in which:
                t.requires_grad_()
        out.append(t)
    return out


def grads64(op, args, grad_out):
    """fp64 reference gradients w.r.t. every tensor of ``args`` that requires grad (None elsewhere)."""
    a64 = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
           for t in args]
    live = [t for t in a64 if isinstance(t, torch.Tensor) and t.requires_grad]
    got = iter(torch.autograd.grad(ref(op, a64), live, grad_out.double()))
    return [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in a64]


def check_output(op, out, args, name=None, ulps=0.0):
    """``out`` against the fp64 reference under the project's parity rule. ``ulps`` (fp16/bf16):
    also allow that many rounding steps of the output's scale - at a handful of elements
    PyTorch's own error, which the rule scales, can be far below one rounding step by luck."""
    name = name or op
    want = ref(op, as64(args))
    if out.dtype in (torch.float32, torch.float64):
        assert_parity(out, want, name=name)
        return
    lowp = ref(op, [t.detach() if isinstance(t, torch.Tensor) else t for t in args])
    if not ulps or out.numel() == 0:
        assert_parity(out, want, lowp, name=name)
        return
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), fin), f"{name}: non-finite where the reference is finite"
    w = want[fin]
    err = (out.double()[fin] - w).abs().max().item()
    base = (lowp.double()[fin] - w).abs().max().item()
    bound = 2 * base + ulps * torch.finfo(out.dtype).eps * w.abs().max().item()
    assert err <= bound, (f"{name}: max error {err:.3g} vs fp64 exceeds 2x PyTorch's own "
                          f"{out.dtype} error ({base:.3g}) + {ulps:g} rounding steps ({bound:.3g})")


def check_grads(op, args, grad_out, names=None):
    """fp32 gradients of the leaves in ``args`` against the fp64 reference (relative to scale);
    a leaf that does not require grad must have no gradient."""
    names = names or ARG_NAMES[op]
    want = grads64(op, args, grad_out)
    for nm, t, w in zip(names, args, want):
        if not isinstance(t, torch.Tensor):
            continue
        if w is None:
            assert t.grad is None, f"d{nm}: a gradient for an input that does not require grad"
            continue
        assert t.grad is not None, f"d{nm}: missing gradient"
        assert t.grad.shape == t.shape, f"d{nm}: shape {tuple(t.grad.shape)} != {tuple(t.shape)}"
        assert_fp32(t.grad, w, name=f"{op} d{nm}", rtol=2e-5, atol=1e-6)
