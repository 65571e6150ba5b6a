"""Values derived from parameters once, not on every call: a cast weight, a prepacked GEMM weight.

A :class:`Prepared` cache keys each value by the identity and version counter of the tensors it
was made from, so an in-place change (an optimizer step, ``load_state_dict``, ``copy_``) makes
the next call prepare it again, and drops it when its first source tensor is freed. Tensors
without a version counter (inference tensors) are never cached: their in-place changes would go
unseen. A view (a 1x1 conv weight seen as [D, C], made anew on every call) is keyed by the tensor
it views and its shape: the view shares that tensor's version counter.

Swapping a parameter's ``.data`` (``module.to(dtype)``, ``.half()``, loaders that assign
``p.data = ...``) keeps the parameter and its version counter, so a value is also tied to the
memory, dtype and device its sources had: an entry holds a reference to its sources' memory
(until it is replaced or dropped), so no new tensor can reuse that address while the entry
lives. Unseen, as by any version check: in-place writes through ``p.data`` (``p.data.mul_(2)``
changes another tensor's version counter); call :func:`clear_all` after them.

Nothing is cached while torch.distributed is initialized (:func:`caching_allowed`): FSDP2
all-gathers new values into the memory of its unsharded parameters with their version counters
preserved, so a cache would hand out the first step's weights forever.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["Prepared", "caching_allowed", "owner", "clear_all"]

_ALL: "weakref.WeakSet[Prepared]" = weakref.WeakSet()


def owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s memory and version counter: ``t``, or the tensor it views."""
    return t if t._base is None else t._base


def clear_all() -> None:
    """Forget every prepared value (casts, packed weights): the next call prepares them again.
    Needed only after in-place writes that bypass the version counter (``p.data.copy_(...)``)."""
    for cache in list(_ALL):
        cache.clear()
    from . import _ext  # the C++ kernels' own cache (csrc/include/derived_cache.h)
    module = _ext.load()
    if module is not None and hasattr(module, "clear_cache"):
        module.clear_cache()


_DIST = torch.distributed if torch.distributed.is_available() else None


def caching_allowed() -> bool:
    """Whether values may be cached at all now: not under torch.distributed (see above)."""
    return _DIST is None or not _DIST.is_initialized()


class Prepared:
    """``get(sources, make)``: ``make()``'s value for these source tensors at their current
    versions, made once. ``None`` sources are allowed (an absent bias)."""

    def __init__(self, name: str):
        self.name = name
        self._entries: Dict[tuple, Tuple[tuple, tuple, object, tuple]] = {}
        self._lock = threading.Lock()
        self.made = 0  # how many values were made: a test's way to see reuse
        _ALL.add(self)

    def get(self, sources: Sequence[Optional[torch.Tensor]], make: Callable[[], object]) -> object:
        # Runs on every op call (autocast casts, packed weights), where Python's cost shows at
        # batch 1: one pass over the sources.
        owners, key, states = [], [], []
        for t in sources:
            if t is None:
                owners.append(None)
                key.append(None)
                states.append(())
                continue
            if t.is_inference():  # no version counter: in-place changes would go unseen
                return make()
            o = owner(t)
            owners.append(o)
            key.append((id(o), t.shape))
            states.append((t._version, t.data_ptr(), t.dtype, t.device))
        if not caching_allowed():
            return make()
        key, states = tuple(key), tuple(states)
        entry = self._entries.get(key)  # a single dict read: atomic, no lock needed
        # ids are reused after a tensor dies: the weak references say whether these are the same
        if entry is not None and entry[1] == states and all(
                (o is None) if r is None else (r() is o) for r, o in zip(entry[0], owners)):
            return entry[2]
        value = make()
        refs = tuple(None if o is None else weakref.ref(o) for o in owners)
        # the sources' memory, held so that no other tensor takes its address while the entry lives
        pins = tuple(None if t is None else t.detach() for t in sources)
        with self._lock:
            fresh = entry is None
            self._entries[key] = (refs, states, value, pins)
            self.made += 1
        first = next((o for o in owners if o is not None), None)
        if fresh and first is not None:  # a version update keeps the finalizer it had
            weakref.finalize(first, self._drop, key)
        return value

    def _drop(self, key) -> None:
        with self._lock:
            entry = self._entries.get(key)
            # the key may hold a newer tensor that reuses the id of the one that died
            if entry is not None and next(r for r in entry[0] if r is not None)() is None:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
