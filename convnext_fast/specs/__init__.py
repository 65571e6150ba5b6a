"""One spec per op: the contract every backend, test and benchmark draws from.

An :class:`OpSpec` holds an op's argument names (read from its reference function's signature,
so they are written once), the output names of its backend ops, the argument check, the fake
(shapes of the outputs without computing them), the autograd wiring to its backward op, and the
input factories: ``make_inputs(device, dtype, **shape)`` for one case (benchmarks, probes) and
``sample_inputs(device, dtype)`` for the small, awkward cases every test runs (as
pytorch/extension-cpp does). The public front functions live in :mod:`convnext_fast.ops`, the
backends in :mod:`convnext_fast.backends`.

Ops: ``dwconv_ln``, ``mlp``, ``mlp_grn`` and their backward ops ``dwconv_ln_bwd``, ``mlp_bwd``,
``mlp_grn_bwd``.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["OpSpec", "SPECS", "spec", "FORWARD_OPS"]

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class OpSpec:
    """The contract of one op.

    name: the op name (``convnext_fast::<name>`` in the extension, ``<name>_triton`` in Triton).
    reference: the pure-PyTorch function; its signature names the arguments, their order,
        defaults and types (``Optional[Tensor]`` = may be None, ``float`` = a scalar).
    outputs: names of what the backend ops return, in order (the public op returns the first).
    check: raises a clear error for bad arguments; takes them by name.
    fake: output tensors of the right shape, dtype, device and layout; takes arguments by name.
    make_inputs: ``(device, dtype, **shape) -> {name: value}``, fresh random inputs of one case.
    sample_inputs: ``(device, dtype) -> [{name: value}, ...]``, the small awkward cases of tests.
    channels_last: arguments the front converts to NHWC memory.
    backward: the name of the backward op's spec (forward ops only).
    passthrough: inputs whose gradient is the output gradient itself (the residual).
    """

    name: str
    reference: Callable
    outputs: Tuple[str, ...]
    fake: Callable
    make_inputs: Callable[..., Dict[str, object]]
    sample_inputs: Callable[[object, torch.dtype], List[Dict[str, object]]]
    check: Optional[Callable[..., None]] = None
    channels_last: Tuple[str, ...] = ()
    backward: Optional[str] = None
    passthrough: Tuple[str, ...] = ()
    names: Tuple[str, ...] = field(init=False)
    defaults: Dict[str, object] = field(init=False)
    optional: Tuple[str, ...] = field(init=False)
    scalars: Tuple[str, ...] = field(init=False)

    def __post_init__(self):
        sig = inspect.signature(self.reference)
        hints = typing.get_type_hints(self.reference)
        names = tuple(sig.parameters)
        set_ = object.__setattr__
        set_(self, "names", names)
        set_(self, "defaults", {n: p.default for n, p in sig.parameters.items()
                                if p.default is not _REQUIRED})
        set_(self, "optional", tuple(n for n in names if type(None) in typing.get_args(hints[n])))
        set_(self, "scalars", tuple(n for n in names if hints[n] is float))

    @property
    def schema(self) -> str:
        """The op's schema without its name, e.g. ``(Tensor x, Tensor? b, float eps) -> Tensor``."""
        def arg(n):
            kind = "float" if n in self.scalars else "Tensor?" if n in self.optional else "Tensor"
            return f"{kind} {n}"
        outs = "Tensor" if len(self.outputs) == 1 else "(" + ", ".join(["Tensor"] * len(self.outputs)) + ")"
        return "(" + ", ".join(arg(n) for n in self.names) + ") -> " + outs

    def bind(self, args: Sequence[object] = (), kwargs: Optional[Mapping[str, object]] = None
             ) -> Dict[str, object]:
        """Positional and keyword arguments -> {name: value} with the defaults filled in."""
        if len(args) > len(self.names):
            raise TypeError(f"{self.name}() takes {len(self.names)} arguments, got {len(args)}")
        bound = dict(zip(self.names, args))
        for n, v in (kwargs or {}).items():
            if n not in self.names:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {n!r}")
            if n in bound:
                raise TypeError(f"{self.name}() got multiple values for argument {n!r}")
            bound[n] = v
        for n in self.names[len(args):]:
            if n not in bound:
                if n not in self.defaults:
                    raise TypeError(f"{self.name}() missing required argument {n!r}")
                bound[n] = self.defaults[n]
        return bound


def autograd_formula(fwd: OpSpec, bwd: OpSpec, call_backward: Callable[[Dict[str, object]], tuple]):
    """(setup_context, backward) for ``torch.library.register_autograd`` of a forward op.

    Saves what ``bwd`` takes (its arguments after the output gradient, each one an input or an
    output of ``fwd``) and maps the backward op's outputs ``d_<input>`` back to the forward
    inputs: None for inputs that were None, scalars and non-differentiable outputs; the output
    gradient itself for ``fwd.passthrough`` inputs. ``call_backward({name: value})`` runs the
    backward op of the backend and returns its outputs in ``bwd.outputs`` order.
    """
    grad_name, saved = bwd.names[0], bwd.names[1:]
    d_index = {o[2:]: i for i, o in enumerate(bwd.outputs)}  # "d_x" -> position

    def setup_context(ctx, inputs, output):
        values = dict(zip(fwd.names, inputs))
        values.update(zip(fwd.outputs, output if isinstance(output, tuple) else (output,)))
        ctx.scalars = {n: values[n] for n in saved if n in fwd.scalars}
        ctx.tensors = tuple(n for n in saved if n not in fwd.scalars)
        ctx.save_for_backward(*(values[n] for n in ctx.tensors))
        ctx.present = tuple(values[n] is not None for n in fwd.names)
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad, *_):
        args = {grad_name: grad.contiguous(memory_format=torch.channels_last)}
        args.update(zip(ctx.tensors, ctx.saved_tensors))
        args.update(ctx.scalars)
        grads = call_backward({n: args[n] for n in bwd.names})
        out = []
        for n, present in zip(fwd.names, ctx.present):
            if not present or n in fwd.scalars:
                out.append(None)
            elif n in fwd.passthrough:
                out.append(grad)
            else:
                out.append(grads[d_index[n]])
        return tuple(out)

    return setup_context, backward


def _load() -> Dict[str, OpSpec]:
    from . import dwconv_ln, mlp, mlp_grn

    specs = {}
    for mod in (dwconv_ln, mlp, mlp_grn):
        specs[mod.SPEC.name] = mod.SPEC
        specs[mod.BWD_SPEC.name] = mod.BWD_SPEC
    return specs


SPECS: Dict[str, OpSpec] = _load()
FORWARD_OPS: Tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.backward is not None)


def spec(name: str) -> OpSpec:
    """The spec of op ``name``; a clear error for an unknown one."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; expected one of {sorted(SPECS)}") from None
