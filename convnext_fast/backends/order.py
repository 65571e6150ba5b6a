"""The automatic backend order: measured records, read from a data file.

``backend_order.json`` (next to this module) holds one entry per (op, device type, dtype, mode)
that a benchmark run measured: the backends fastest first, the figures behind the order and where
they came from (device, versions, commit, source). The benchmarks write it
(``pytest benchmarks/ --benchmark --write-backend-order``, through :func:`merge`); nothing here
holds a measured number. Where no entry matches, :data:`DEFAULT_ORDER` applies: the compiled
extension first, ``torch`` last because it always runs; Triton only where measured to win.

Entry format (``"format": 1``)::

    {"op": "mlp", "device": "cpu" | "cuda", "dtype": "fp32" | "bf16" | "fp16",
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
from typing import Dict, Iterable, List, Optional, Tuple

import torch

__all__ = ["PATH", "DEFAULT_ORDER", "DTYPE_NAMES", "load", "table", "auto_order", "merge", "source"]

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_order.json")
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
_FORMAT = 1

Key = Tuple[str, str, str, bool]  # (op, device type, dtype name, training)


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
    return entry["op"], entry["device"], entry["dtype"], bool(entry["training"])


def _read_table() -> Dict[Key, Tuple[str, ...]]:
    return {_key(e): tuple(e["order"]) for e in load()}


# Read at import: a file access inside a traced function would break torch.compile's graph.
_TABLE = _read_table()


def table() -> Dict[Key, Tuple[str, ...]]:
    """(op, device type, dtype name, training) -> backends in order, as read from :data:`PATH`."""
    return _TABLE


def auto_order(op: str, device_type: str, dtype: Optional[torch.dtype], training: bool = False
               ) -> Tuple[str, ...]:
    """Backends tried, in order, when nothing is requested."""
    found = _TABLE.get((op, device_type, DTYPE_NAMES.get(dtype, ""), training))
    return found if found is not None else DEFAULT_ORDER.get(device_type, ("torch",))


def source(op: str, device_type: str, dtype: Optional[torch.dtype], training: bool = False
           ) -> str:
    """Where :func:`auto_order` takes this order from, in words (for ``python -m convnext_fast info``)."""
    for e in load():
        if _key(e) == (op, device_type, DTYPE_NAMES.get(dtype, ""), training):
            m = e.get("measured", {})
            return f"measured on {m.get('device', '?')} at {m.get('commit', '?')}"
    return "default (no measurement for this case)"


def merge(entries: Iterable[dict], path: str = PATH) -> None:
    """Write ``entries`` into the data file at ``path``, replacing those with the same key; the
    others stay. Each entry must carry ``measured`` (device, versions, commit)."""
    global _TABLE
    by_key = {_key(e): e for e in load(path)}
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
        _TABLE = _read_table()
