"""The automatic backend order: measured records, read from a data file.

``backend_order.json`` (next to this module) holds the entries that benchmark runs measured, one per
(op, device type, device kind, dtype, mode): the backends fastest first, the figures behind the
order and where they came from (device, versions, commit, source). The benchmarks write it
(``pytest benchmarks/ --benchmark --write-backend-order``, through :func:`merge`); nothing here
holds a measured number.

Lookup (:func:`auto_order`), for a call's op, device, dtype and mode:

1. the newest entry (by ``measured.date``, then the later in the file) for the device's kind
   (:func:`device_kind`: ``"sm_90"`` for a CUDA device of capability 9.0, :func:`cpu_kind` for the
   CPU);
2. else the entry without a ``kind``: the shipped default for that device type;
3. else :data:`DEFAULT_ORDER`: the compiled extension first, ``torch`` last because it always
   runs; Triton only where measured to win.

:func:`source` says which of the three applies (``python -m convnext_fast info`` shows it).

Entry format (``"format": 1``)::

    {"op": "mlp", "device": "cpu" | "cuda", "dtype": "fp32" | "bf16" | "fp16",
     "kind": "sm_90",                 # optional: the device kind measured (see device_kind);
                                      # without it the entry is the device type's default
     "training": false,               # true: the call needs a backward (an input requires grad)
     "order": ["cpu", "torch"],       # tried first to last
     "ms": {"cpu": 415.0, "torch": 582.0},   # the figures behind the order (see "what")
     "what": "...",                   # what the figures are (shapes, batch, summed over blocks)
     "measured": {"device": ..., "torch": ..., "triton": ..., "commit": ..., "date": ...,
                  "source": "benchmarks/results/..."}}
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

__all__ = ["PATH", "DEFAULT_ORDER", "DTYPE_NAMES", "load", "table", "cpu_kind", "cuda_kind",
           "device_kind", "auto_order", "merge", "source"]

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_order.json")
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
_FORMAT = 1

Key = Tuple[str, str, str, str, bool]
"""(op, device type, device kind ("" for the default entry), dtype name, training)."""
Device = Union[torch.device, str]


# ---------------------------------------------------------------------------------------------
# Device kinds


def cpu_kind() -> str:
    """This CPU's kind, for the order records: ``"amx"`` (AMX tiles: oneDNN's bf16 GEMMs run on
    them), ``"avx512_bf16"`` (AVX-512 with native bf16 dot products), else the vector ISA torch's
    CPU kernels dispatch to, lower case: ``"avx512"``, ``"avx2"``, ``"default"`` (none),
    ``"sve256"``... (``torch.backends.cpu.get_cpu_capability()``).

    The bf16 flags come from ``torch.cpu``'s private probes where this torch has them, else from
    oneDNN's bf16 check (which also holds on AVX-512 without native bf16)."""
    isa = torch.backends.cpu.get_cpu_capability().lower()
    try:
        amx, bf16 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    except (AttributeError, RuntimeError):
        amx = False
        try:
            bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            bf16 = False
    if amx:
        return "amx"
    return "avx512_bf16" if bf16 and isa.startswith("avx512") else isa


def cuda_kind(capability: Union[str, Tuple[int, int]]) -> str:
    """``"sm_90"`` for capability ``(9, 0)`` or ``"9.0"``."""
    major, minor = capability.split(".") if isinstance(capability, str) else capability
    return f"sm_{major}{minor}"


@torch.compiler.assume_constant_result
def _find_kind(device_type: str, index: Optional[int]) -> str:
    # torch.compile runs this once while tracing and keeps the result as a constant.
    if device_type == "cpu":
        return cpu_kind()
    if device_type == "cuda" and torch.cuda.is_available():
        return cuda_kind(torch.cuda.get_device_capability(index))
    return ""


_KINDS: Dict[Tuple[str, Optional[int]], str] = {}


def _as_device(device: Device) -> torch.device:
    return torch.device(device) if isinstance(device, str) else device


def device_kind(device: Device) -> str:
    """The kind of ``device`` its order records are kept for: the CUDA capability (``"sm_90"``),
    :func:`cpu_kind` for the CPU, ``""`` where unknown (no CUDA visible, another device type).
    Found once per device type and index (``cuda`` without an index: the current device at the
    first call)."""
    device = _as_device(device)
    if torch.compiler.is_compiling():  # no cache: one filled while tracing would fail its guards
        return _find_kind(device.type, device.index)
    key = (device.type, device.index)
    kind = _KINDS.get(key)
    if kind is None:
        kind = _KINDS[key] = _find_kind(device.type, device.index)
    return kind


# ---------------------------------------------------------------------------------------------
# The records


def load(path: str = PATH) -> List[dict]:
    """The entries of the data file at ``path`` (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != _FORMAT:
        raise ValueError(f"{path}: backend order format {data.get('format')!r}, expected {_FORMAT}")
    return list(data["entries"])


def _key(entry: dict) -> Key:
    return entry["op"], entry["device"], entry.get("kind") or "", entry["dtype"], bool(entry["training"])


def _newest(entries: Iterable[dict]) -> Dict[Key, dict]:
    """key -> the entry with that key measured last (by ``measured.date``, then position)."""
    ranked = sorted(enumerate(entries), key=lambda p: (str(p[1].get("measured", {}).get("date") or ""), p[0]))
    return {_key(e): e for _, e in ranked}


def _set_entries(entries: Iterable[dict]) -> None:
    global _ENTRIES, _TABLE
    _ENTRIES = _newest(entries)
    _TABLE = {k: tuple(e["order"]) for k, e in _ENTRIES.items()}
    _ORDERS.clear()


# (op, device, dtype, training) -> order, outside torch.compile: select() asks on every op call,
# and a torch.device hashes faster than its .type reads (0.1 vs 0.5 us). Emptied when the records
# change.
_ORDERS: Dict[tuple, Tuple[str, ...]] = {}
# Read at import: a file access inside a traced function would break torch.compile's graph.
_ENTRIES: Dict[Key, dict] = {}
_TABLE: Dict[Key, Tuple[str, ...]] = {}
_set_entries(load())


def table() -> Dict[Key, Tuple[str, ...]]:
    """(op, device type, device kind or "", dtype name, training) -> backends in order: the newest
    entry of each key in :data:`PATH`."""
    return _TABLE


def _lookup(op: str, device: Device, dtype: Optional[torch.dtype], training: bool
            ) -> Tuple[str, str, Optional[Tuple[str, ...]]]:
    """(device type, kind, order of the matching entry or None); the entry's key has the kind
    when an entry for it exists, else ""."""
    device = _as_device(device)
    kind, dtype_name = device_kind(device), DTYPE_NAMES.get(dtype, "")
    found = _TABLE.get((op, device.type, kind, dtype_name, training)) if kind else None
    if found is None:
        found, kind = _TABLE.get((op, device.type, "", dtype_name, training)), ""
    return device.type, kind, found


def auto_order(op: str, device: Device, dtype: Optional[torch.dtype], training: bool = False
               ) -> Tuple[str, ...]:
    """Backends tried, in order, when nothing is requested: the entry for the device's kind, else
    the device type's default entry, else :data:`DEFAULT_ORDER` (see the module docstring).
    ``device``: a ``torch.device`` or a string such as ``"cuda:0"``."""
    if torch.compiler.is_compiling():  # as in device_kind: traced once, no cache
        key, found = None, None
    else:
        key = (op, device, dtype, training)
        found = _ORDERS.get(key)
    if found is None:
        device_type, _, found = _lookup(op, device, dtype, training)
        if found is None:
            found = DEFAULT_ORDER.get(device_type, ("torch",))
        if key is not None:
            _ORDERS[key] = found
    return found


def source(op: str, device: Device, dtype: Optional[torch.dtype], training: bool = False) -> str:
    """Which entry :func:`auto_order` takes this order from, in words (for ``python -m
    convnext_fast info``)."""
    device_type, kind, found = _lookup(op, device, dtype, training)
    if found is None:
        return "default (no measurement for this case)"
    m = _ENTRIES[(op, device_type, kind, DTYPE_NAMES.get(dtype, ""), training)].get("measured", {})
    if kind:
        return f"measured on {m.get('device', '?')} ({kind}) at {m.get('commit', '?')}, {m.get('date', '?')}"
    wanted = device_kind(device)
    return (f"shipped default entry{f' (no record for {wanted})' if wanted else ''}: measured on "
            f"{m.get('device', '?')} at {m.get('commit', '?')}, {m.get('date', '?')}")


def merge(entries: Iterable[dict], path: str = PATH) -> None:
    """Write ``entries`` into the data file at ``path``, replacing those with the same key (op,
    device type, kind, dtype, training: an entry with a kind leaves the default entry in place);
    the others stay. Each entry must carry ``measured`` (device, versions, commit)."""
    by_key = _newest(load(path))
    for e in entries:
        missing = {"op", "device", "dtype", "training", "order", "measured"} - set(e)
        if missing:
            raise ValueError(f"backend order entry {e!r} lacks {sorted(missing)}")
        e = dict(e)
        e["measured"] = {"date": datetime.date.today().isoformat(), **e["measured"]}
        by_key[_key(e)] = e
    with open(path, "w") as f:
        json.dump({"format": _FORMAT, "entries": [by_key[k] for k in sorted(by_key)]}, f, indent=1)
        f.write("\n")
    if path == PATH:
        _set_entries(load())
