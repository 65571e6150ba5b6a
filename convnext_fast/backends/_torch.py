"""The ``torch`` backend: each op's reference composite (:mod:`convnext_fast.reference`); always
available, any device and dtype."""
from __future__ import annotations

from ..specs import FORWARD_OPS, SPECS
from .registry import Impl, register

for _op in FORWARD_OPS:
    register(_op, "torch", Impl(SPECS[_op].reference))
