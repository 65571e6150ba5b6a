"""The one front every public op goes through: autocast -> checks -> layout -> select -> call.

:func:`make_op` builds an op's public function from its spec: the signature is the reference
function's (plus a keyword-only ``backend``), the body binds the arguments by name and runs
:func:`run`. The backend is called with the arguments by name too.
"""
from __future__ import annotations

import functools
import inspect
from typing import Dict, Optional

import torch

from .. import backends
from ..specs import OpSpec
from ._autocast import autocast_args

_CL = torch.channels_last


def run(spec: OpSpec, args: Dict[str, object], backend: Optional[str]) -> torch.Tensor:
    """Run ``spec``'s op on ``args`` (every argument by name) on the selected backend."""
    first = args[spec.names[0]]
    device_type = first.device.type if isinstance(first, torch.Tensor) else ""
    args, ctx = autocast_args(device_type, args)
    spec.check(**args)
    for name in spec.channels_last:
        t = args[name]
        if t is not None:
            args[name] = t.contiguous(memory_format=_CL)
    for name in spec.scalars:
        args[name] = float(args[name])
    _, fn = backends.select(spec.name, args[spec.names[0]].device, backend, args)
    with ctx:
        return fn(**args)


def make_op(spec: OpSpec, doc: str):
    """The public function of ``spec``'s op: ``op(*args, backend=None, **kwargs)`` with the
    reference's signature (``help()`` and IDEs show the argument names) and docstring ``doc``."""
    names, n = spec.names, len(spec.names)

    @functools.wraps(spec.reference)
    def op(*args, backend: Optional[str] = None, **kwargs) -> torch.Tensor:
        # Positional calls with every argument skip the general binding (it costs on every call).
        bound = dict(zip(names, args)) if len(args) == n and not kwargs else spec.bind(args, kwargs)
        return run(spec, bound, backend)

    sig = inspect.signature(spec.reference)
    op.__signature__ = sig.replace(parameters=[
        *sig.parameters.values(),
        inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Optional[str])])
    op.__doc__ = doc
    op.__module__ = __name__.rpartition(".")[0]
    return op
