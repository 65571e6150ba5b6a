"""Pictures of benchmark results (matplotlib, imported on use: ``pip install 'convnext_fast[bench]'``).

- :func:`speedup_vs_batch`: whole-model speedup over timm eager against batch size, one line per
  provider, one panel per (model, mode, dtype).
- :func:`roofline`: each op measurement as achieved FLOP/s against arithmetic intensity
  (FLOP/byte), under the two measured ceilings (copy bandwidth, matmul rate).

Both take plain records, so ``python -m convnext_fast bench --plot`` and
``python -m convnext_fast plot`` (a pytest-benchmark JSON of ``benchmarks/``, through
:func:`from_pytest_benchmark`) draw the same figures.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["speedup_vs_batch", "roofline", "save_figure", "from_pytest_benchmark", "load_ceilings",
           "add_arguments", "plot_suite"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("plots need matplotlib: pip install 'convnext_fast[bench]'") from e
    return plt


def speedup_vs_batch(ax, rows: Iterable[Dict], title: str = "") -> None:
    """rows: dicts with provider, batch, speedup_vs_eager (None rows are skipped)."""
    by_provider: Dict[str, List] = {}
    for r in rows:
        if r.get("speedup_vs_eager") is not None:
            by_provider.setdefault(r["provider"], []).append((r["batch"], r["speedup_vs_eager"]))
    for provider, points in sorted(by_provider.items()):
        points.sort()
        ax.plot([b for b, _ in points], [s for _, s in points], marker="o", label=provider)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    batches = sorted({b for pts in by_provider.values() for b, _ in pts})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup vs timm eager")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def roofline(ax, points: Iterable[Dict], bandwidth_GBps: Optional[float], matmul_TFLOPs: Optional[float],
             title: str = "") -> None:
    """points: dicts with label, flops, bytes, ms. Ceilings draw when given."""
    pts = [p for p in points if p.get("flops") and p.get("bytes") and p.get("ms")]
    if not pts:
        ax.text(0.5, 0.5, "no op measurements", ha="center", transform=ax.transAxes)
        return
    xs = [p["flops"] / p["bytes"] for p in pts]
    ys = [p["flops"] / (p["ms"] * 1e-3) / 1e12 for p in pts]
    markers = "os^vDP*X"
    labels = sorted({p["label"] for p in pts})
    for i, label in enumerate(labels):
        sel = [(x, y) for x, y, p in zip(xs, ys, pts) if p["label"] == label]
        ax.scatter([x for x, _ in sel], [y for _, y in sel], marker=markers[i % len(markers)], label=label, s=22)
    lo, hi = min(xs) / 2, max(xs) * 2
    if bandwidth_GBps and matmul_TFLOPs:
        ridge = matmul_TFLOPs * 1e3 / bandwidth_GBps
        grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(grid, [min(bandwidth_GBps * x / 1e3, matmul_TFLOPs) for x in grid], color="black", lw=1,
                label=f"ceiling: {bandwidth_GBps:.0f} GB/s, {matmul_TFLOPs:.1f} TFLOP/s (ridge {ridge:.0f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, which="both")


def save_figure(path: str, model_panels: Sequence[tuple], op_points: Sequence[Dict],
                ceilings: Optional[Dict] = None, suptitle: str = "") -> str:
    """One PNG: a speedup panel per (title, rows) in model_panels, then the roofline."""
    plt = _plt()
    n = len(model_panels) + 1
    cols = min(n, 3)
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 4.2 * rows_), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, rows) in zip(flat, model_panels):
        speedup_vs_batch(ax, rows, title)
    for ax in flat[n:]:
        ax.set_visible(False)
    ceilings = ceilings or {}
    roofline(flat[n - 1], op_points, ceilings.get("copy_GBps"), ceilings.get("matmul_TFLOPs"),
             "ops vs the measured ceilings")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def from_pytest_benchmark(record: Dict, op_mode: str = "fwd") -> Tuple[List[tuple], List[Dict], str]:
    """(model panels, op points, title) of a pytest-benchmark JSON of ``benchmarks/``: a panel per
    (model, mode, dtype), the ops of ``op_mode`` but torch.compile, timings as median ms."""
    from .bench import describe_environment

    panels: Dict[str, List[Dict]] = {}
    ops = []
    for bench in record["benchmarks"]:
        info = dict(bench["extra_info"], ms=bench["stats"]["median"] * 1e3)
        if info.get("kind") == "model":
            panels.setdefault(f"{info['model']} {info['mode']} {info['dtype']}", []).append(info)
        elif info.get("kind") == "op" and info.get("mode") == op_mode and info["provider"] != "torch_compile":
            ops.append(dict(info, label=f"{info['op']} {info['provider']}"))
    env = record.get("machine_info", {}).get("convnext_fast", {})
    return sorted(panels.items()), ops, f"convnext_fast on {describe_environment(env)}"


def load_ceilings(path: str) -> Dict:
    """The ceilings in a JSON of ``python -m convnext_fast bench --ceilings --json``."""
    with open(path) as f:
        return json.load(f)["ceilings"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json) of benchmarks/")
    parser.add_argument("--ceilings", default=None,
                        help="JSON of python -m convnext_fast bench --ceilings --json (or --plot --json)")
    parser.add_argument("--mode", default="fwd", help="op mode on the roofline: fwd or fwd+bwd")
    parser.add_argument("-o", "--output", default="bench.png")


def plot_suite(args: argparse.Namespace) -> int:
    """``python -m convnext_fast plot``: one PNG of a pytest-benchmark JSON (see :func:`add_arguments`)."""
    with open(args.json) as f:
        panels, ops, title = from_pytest_benchmark(json.load(f), args.mode)
    save_figure(args.output, panels, ops, load_ceilings(args.ceilings) if args.ceilings else None, title)
    print(f"wrote {args.output}")
    return 0
