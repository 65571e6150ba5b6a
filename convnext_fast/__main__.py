"""Command line: ``python -m convnext_fast info | bench | plot``.

rich draws the tables when it is installed (``pip install 'convnext_fast[bench]'``); without it
they come out as plain text.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import sys
import textwrap
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

EXTRA = "pip install 'convnext_fast[bench]'"


class _Out:
    """Lines, tables and a progress status: through rich when it is installed, else plain text."""

    def __init__(self):
        try:
            from rich.console import Console
        except ImportError:
            self.console = None
        else:
            self.console = Console()

    def line(self, text: str, style: Optional[str] = None) -> None:
        if self.console is None:
            print(text)
        else:
            from rich.markup import escape

            self.console.print(escape(text), style=style)

    def width(self) -> int:
        """The terminal's columns (``COLUMNS`` when set; 80 when not a terminal)."""
        if self.console is not None:
            return self.console.width
        return shutil.get_terminal_size((80, 24)).columns

    def _needs(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)]
        # rich: a space either side of each cell and a rule between and around them; plain: 2 spaces
        return sum(widths) + (3 * len(widths) + 1 if self.console is not None else 2 * (len(widths) - 1))

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
              text_columns: Optional[int] = None,
              compact: Optional[Tuple[Sequence[str], Sequence[Sequence[str]], str]] = None) -> None:
        """The first ``text_columns`` columns (default: all) left-justified, the rest right.

        Wider than the terminal, the table is shown as ``compact`` = (columns, rows, a note saying
        what the short headers mean) when given, and then long texts move below it as
        numbered notes, so that it fits (the full table: a wider terminal, or ``COLUMNS=200``).
        """
        n = len(columns) if text_columns is None else text_columns
        width, notes = self.width(), []
        if compact is not None and self._needs(columns, rows) > width:
            columns, rows, note = compact
            notes.append(note)
        if self._needs(columns, rows) > width:
            rows, footnotes = _footnoted(rows, width, lambda r: self._needs(columns, r))
            notes = footnotes + notes
        if self.console is not None:
            from rich.markup import escape
            from rich.table import Table

            table = Table(title=escape(title))
            for i, col in enumerate(columns):
                table.add_column(col, justify="left" if i < n else "right", no_wrap=i == 0, overflow="fold")
            for row in rows:
                table.add_row(*(escape(cell) for cell in row))
            self.console.print(table)
        else:
            widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)]

            def fmt(cells):
                return "  ".join(c.ljust(w) if i < n else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

            print(title)
            print(fmt(columns))
            print(fmt(["-" * w for w in widths]))
            for row in rows:
                print(fmt(row))
        for note in notes:
            if self.console is None:
                note = textwrap.fill(note, width, subsequent_indent="    ")
            self.line(note)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[Callable[[str], None]]:
        if self.console is not None:
            with self.console.status(text) as status:
                yield status.update
        else:
            yield lambda msg: print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.console is None:
            print(f"(plain tables: rich is not installed; {EXTRA})", file=sys.stderr)


def _footnoted(rows: Sequence[Sequence[str]], width: int, needs: Callable[[Sequence[Sequence[str]]], int],
               short: int = 12) -> Tuple[List[List[str]], List[str]]:
    """``rows`` with the texts longer than ``short`` of their widest columns (never the first, which
    names the row) replaced by numbered marks, widest column first, until ``needs(rows)`` fits
    ``width``; and the notes "[k] text" for the marks."""
    rows = [list(r) for r in rows]
    marks: dict = {}
    done = {0}
    while rows and needs(rows) > width:
        widest, i = max(((max(len(r[j]) for r in rows), j) for j in range(len(rows[0])) if j not in done),
                        default=(0, None))
        if i is None or widest <= short:
            break
        done.add(i)
        for r in rows:
            if len(r[i]) > short:
                r[i] = marks.setdefault(r[i], f"[{len(marks) + 1}]")
    # Numbered again in reading order (row by row), as a reader meets them.
    order: dict = {}
    for r in rows:
        for cell in r:
            if cell in marks.values():
                order.setdefault(cell, f"[{len(order) + 1}]")
    text = {mark: t for t, mark in marks.items()}
    return [[order.get(c, c) for c in r] for r in rows], [f"{new} {text[old]}" for old, new in order.items()]


def _drop_empty(columns: Sequence[str], rows: Sequence[Sequence[str]], keep: int = 1):
    """The columns (after the first ``keep``) that have something other than "-" in some row."""
    cols = [i for i in range(len(columns)) if i < keep or any(r[i] != "-" for r in rows)]
    return [columns[i] for i in cols], [[r[i] for i in cols] for r in rows]


def _digits4(v: float) -> str:
    """``v`` with 4 significant digits and no exponent (1683, 787.9, 84.91, 5.123)."""
    return f"{v:.{max(0, 4 - len(str(int(abs(v)))))}f}"


def _cell(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ms_iqr(ms: float, iqr_ms: float) -> str:
    return f"{ms:.3g} ({100 * iqr_ms / ms:.0f}%)"


def _info(_args, out: _Out) -> int:
    from . import _ext, backends
    from .backends import order, registry
    from .bench import OPS, probe_inputs

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "timm"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError as e:
            versions[mod] = f"not installed ({e.name})"
    out.line("convnext_fast " + ", ".join(f"{k} {v}" for k, v in versions.items()), style="bold")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.line(f"device: cuda:0 {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs),"
                 f" CUDA {torch.version.cuda}")
    else:
        built = "CUDA build" if torch.version.cuda else "CPU build"
        out.line(f"device: cpu ({torch.get_num_threads()} threads; torch is a {built}, no GPU visible)")
    if _ext.error():
        out.line(f"extension: unavailable: {_ext.error()}", style="red")
    else:
        info = _ext.build_info()
        cuda = f"CUDA kernels for {info['cuda_arch_list']}" if info["with_cuda"] else "no CUDA kernels"
        out.line(f"extension: convnext_fast._C built against torch {info['torch_version']}, "
                 f"CPU ISA {info['cpu_flags']}, {cuda}")
        try:
            gemm = _ext.cpu_gemm_dtypes()
        except RuntimeError as e:
            out.line(f"CPU mlp GEMMs: {e}", style="red")
        else:
            forced = os.environ.get("CONVNEXT_FAST_CPU_GEMM")
            how = (f"set by CONVNEXT_FAST_CPU_GEMM={forced}" if forced and forced != "auto" else
                   "the input's dtype where oneDNN has it natively; CONVNEXT_FAST_CPU_GEMM=native|fp32 "
                   "overrides")
            out.line("CPU mlp GEMMs: " + ", ".join(f"{k} inputs in {v}" for k, v in gemm.items())
                     + f" ({how})")
            per_dtype = (
                ("CPU mlp inference on packed-weight tiles", _ext.cpu_mlp_tiles(),
                 "bf16 needs AVX512-BF16 without AMX; CONVNEXT_FAST_MLP_CPU_TILES=0 turns them off; "
                 "training and compiled graphs use the GEMMs above"),
                ("CPU downsample inference as one op (LayerNorm + patch conv on the tiles)",
                 _ext.cpu_downsample(),
                 "CONVNEXT_FAST_CPU_DOWNSAMPLE=0 turns it off; elsewhere LayerNorm2d, then the conv"),
            )
            for what, runs, how in per_dtype:
                if runs:
                    out.line(f"{what}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in runs.items())
                             + f" ({how})")
    env = os.environ.get(backends.ENV_VAR)
    out.line(f"requested backend: {env + ' (from ' + backends.ENV_VAR + ')' if env else 'automatic'}")
    off = registry.disabled_ops()
    if off:
        out.line("kernels OFF, the torch reference runs: " + ", ".join(f"{op} (by {by})" for op, by in off.items()),
                 style="yellow")
    else:
        out.line(f"kernels: on ({registry.DISABLE_VAR}=1, or =mlp,dwconv_ln, or convnext_fast.disable_kernels() "
                 "turns them off)")

    cells = {}
    for op, b, reason in backends.describe():
        cells.setdefault(op, {})[b] = "available" if reason is None else f"no: {reason}"
    out.table("op x backend", ["op", *backends.BACKENDS],
              [[op, *(row[b] for b in backends.BACKENDS)] for op, row in cells.items()])

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out.line("order records for: " + ", ".join(f"{dev} {order.device_kind(dev) or '(kind unknown)'}"
                                               for dev in devices)
             + f" (newest entry for the kind, else the shipped default; {order.PATH})")
    rows = []
    for dev in devices:
        device = torch.device(dev)
        for dt in (torch.float32, torch.bfloat16):
            for training in (False, True):
                for op in OPS:
                    args = probe_inputs(op, dev, dt, requires_grad=training)
                    try:
                        name, _ = backends.select(op, device, "auto", args)
                        skipped = "; ".join(f"{b}: {r}" for b, r in backends.last_selections()[op][1])
                        if op in off:
                            skipped = f"every kernel: turned off by {off[op]}"
                    except backends.BackendError as e:
                        name, skipped = "none", str(e)
                    rows.append([dev, str(dt).replace("torch.", ""), "training" if training else "inference",
                                 op, name, order.source(op, device, dt, training), skipped or "-"])
    out.table("automatic choice (ConvNeXt-T stage-3 shape, batch 2)",
              ["device", "dtype", "mode", "op", "backend", "order from", "skipped"], rows)
    return 0


def _op_table(out: _Out, rows: List[dict], stages: Sequence[Tuple[int, int, int]], title: str) -> None:
    from .bench import stage_sums

    sums = stage_sums(rows, stages)
    cells = {}
    for r in rows:
        cells.setdefault((r["op"], r["mode"], r["backend"]), {})[tuple(r["shape"][1:3])] = _ms_iqr(r["ms"], r["iqr_ms"])
    table = []
    for (op, device, dtype, mode, backend), (total, complete) in sums.items():
        torch_total, torch_complete = sums.get((op, device, dtype, mode, "torch"), (None, False))
        table.append([op, mode, backend, *(cells[(op, mode, backend)].get((C, H), "-") for C, H, _ in stages),
                      _cell(total if complete else None, ".1f"),
                      _cell(torch_total / total if complete and torch_complete else None, ".2f")])
    compact = [[*row[:3], *(c.split(" (")[0] for c in row[3:3 + len(stages)]), *row[3 + len(stages):]]
               for row in table]
    out.table(f"{title}; sum weighted by the {'/'.join(str(b) for *_, b in stages)} blocks",
              ["op", "mode", "backend", *(f"C{C} H{H}" for C, H, _ in stages), "sum ms", "torch/this"], table,
              text_columns=3,
              compact=(["op", "mode", "backend", *(f"C{C}" for C, _, _ in stages), "sum", "x torch"], compact,
                       "C: the stage's channels (H: " + "/".join(str(H) for _, H, _ in stages)
                       + "); ms per call without the IQR; x torch: torch's sum / this one's. Every column: --json "
                       "FILE, or a wider terminal (COLUMNS=140)."))


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


def _bench(args, out: _Out) -> int:
    from .bench import (MODES, bench_model, bench_ops, describe_environment, environment, measure_ceilings,
                        stage_shapes, write_backend_order, write_json)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        out.line("--device cuda asked for, but no CUDA device is visible", style="red")
        return 2
    run_models = args.plot is not None or not (args.ops or args.ceilings)
    run_ops = args.ops or args.plot is not None
    run_ceilings = args.ceilings or args.plot is not None
    for module, needed, why in (("timm", run_models, "the model benchmarks compare against timm"),
                                ("matplotlib", args.plot is not None, "--plot draws with matplotlib")):
        if needed and _missing(module):
            out.line(f"{why}, which is not installed: {EXTRA}", style="red")
            return 2
    providers = args.providers or (["timm", "timm_patched", "convnext_fast"]
                                   + ([] if args.no_compile else ["timm_compile"]))
    stages = stage_shapes(args.resolution)
    results, op_rows, ceilings = [], [], None
    with out.status("benchmarking") as update:
        if run_models:
            for batch in args.batch:
                results += bench_model(args.model, device, args.dtype, batch, args.resolution,
                                       args.warmup, args.iters, providers, args.compile_mode, args.mode,
                                       progress=update)
        if run_ceilings:
            update("ceilings: copy bandwidth and matmul rate")
            ceilings = measure_ceilings(device, args.dtype)
        if run_ops:
            # The roofline of --plot alone shows forward calls only.
            op_rows = bench_ops(device, args.dtype, max(args.batch), stages=stages,
                                modes=MODES if args.ops else ("fwd",), warmup=args.warmup, iters=args.iters,
                                progress=lambda msg: update(f"op benchmarks: {msg}"))
    env = environment(device)
    where = describe_environment(env)
    if results:
        rows = [[r.provider, str(r.batch), f"{r.ms:.2f}", _cell(r.iqr_ms, ".2f"), f"{r.img_per_s:.1f}",
                 _cell(r.speedup_vs_eager, ".2f"), _cell(r.speedup_vs_compile, ".2f"),
                 _cell(r.max_err_vs_timm, ".2e"), _cell(r.peak_mem_mb, ".0f")] for r in results]
        short = [[r.provider, str(r.batch), _digits4(r.ms) + (f"±{100 * r.iqr_ms / r.ms:.0f}%" if r.iqr_ms else ""),
                  f"{r.img_per_s:.1f}", _cell(r.speedup_vs_eager, ".2f"), _cell(r.speedup_vs_compile, ".2f"),
                  _cell(r.max_err_vs_timm, ".1e"), _cell(r.peak_mem_mb, ".0f")] for r in results]
        short_columns, short = _drop_empty(["provider", "N", "ms ±IQR", "img/s", "x eager", "x comp", "err", "MB"],
                                           short, keep=7)
        out.table(f"{args.model} {args.mode}, {args.dtype}, {args.resolution}px, channels_last - {where}",
                  ["provider", "batch", "ms", "IQR ms", "img/s", "vs eager", "vs compile", "max err vs timm",
                   "peak MB"], rows, text_columns=1,
                  compact=(short_columns, short,
                           "N: batch; x eager, x comp: speed-up vs timm eager and vs torch.compile of timm; "
                           "err: max |logit - timm| / max |logit|" + ("; MB: peak memory" if "MB" in short_columns
                                                                       else "")
                           + ". Every column: --json FILE, or a wider terminal (COLUMNS=120)."))
    if ceilings:
        out.line(f"ceilings on {where}: copy {ceilings['copy_GBps']:.1f} GB/s, {ceilings['matmul_dtype']} matmul "
                 f"{ceilings['matmul_TFLOPs']:.2f} TFLOP/s (n={ceilings['matmul_n']})")
    if args.ops:
        _op_table(out, op_rows, stages, f"ops, {args.dtype}, batch {max(args.batch)}, {where}: median ms per call "
                           "(IQR in % of it)")
    if args.json:
        extra = {k: v for k, v in (("ops", op_rows), ("ceilings", ceilings)) if v}
        write_json(args.json, device, results, extra)
        out.line(f"wrote {args.json}")
    if args.write_backend_order:
        source = args.json or "python -m convnext_fast " + " ".join(args.argv)
        entries = write_backend_order(op_rows, env, source, args.write_backend_order, stages)
        out.line(f"wrote {len(entries)} backend order entries to {args.write_backend_order}")
    if args.plot:
        from .plot import save_figure

        save_figure(args.plot, [(f"{args.model} {args.mode} {args.dtype}", [vars(r) for r in results])],
                    [r for r in op_rows if r["mode"] == "fwd"], ceilings, f"convnext_fast on {where}")
        out.line(f"wrote {args.plot}")
    bad = [r for r in results if r.max_err_vs_timm is not None and r.max_err_vs_timm > args.max_err]
    if bad:
        out.line(f"parity failed: {', '.join(r.provider for r in bad)} differ from timm "
                 f"by more than {args.max_err:g} of max |logit|", style="red")
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .backends import order
    from .plot import add_arguments as add_plot_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m convnext_fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, extension build, op x backend availability")
    b = sub.add_parser("bench", help="ConvNeXt: convnext_fast vs timm eager vs torch.compile; the ops per backend")
    b.add_argument("--model", default="convnext_tiny")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if visible")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    b.add_argument("--resolution", type=int, default=224)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--iters", type=int, default=5)
    b.add_argument("--no-compile", action="store_true", help="skip torch.compile of timm")
    b.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for timm (default: max-autotune on GPU, default on CPU)")
    b.add_argument("--mode", choices=["inference", "train"], default="inference",
                   help="inference, or a training step (forward + backward)")
    b.add_argument("--providers", nargs="+", default=None, metavar="P",
                   help="default: timm timm_patched convnext_fast timm_compile; also convnext_fast:<backend>")
    b.add_argument("--ops", action="store_true",
                   help="instead of the model: each op per backend, forward and forward + backward, at the "
                        "ConvNeXt-T stage shapes (scaled to --resolution) and the largest --batch")
    b.add_argument("--ceilings", action="store_true",
                   help="instead of the model: the copy bandwidth and the matmul rate in --dtype")
    b.add_argument("--write-backend-order", nargs="?", const=order.PATH, default=None, metavar="JSON",
                   help="with --ops: merge the measured backend order (per op, device, dtype, forward or "
                        "training; fastest summed over the stages first) into JSON (default: the file the selection "
                        "reads, convnext_fast/backends/backend_order.json)")
    b.add_argument("--json", default=None, help="write results and environment to this file")
    b.add_argument("--plot", default=None, metavar="PNG",
                   help="also time the ops and the ceilings, and draw speedup vs batch + a roofline here")
    b.add_argument("--max-err", type=float, default=None,
                   help="parity bound on max |logit diff| / max |logit| (default: 1e-4 fp32, 5e-2 bf16/fp16)")
    add_plot_arguments(sub.add_parser("plot", help="draw a pytest-benchmark JSON of benchmarks/"))
    args = parser.parse_args(argv)
    args.argv = argv
    if args.cmd == "plot":
        from .plot import plot_suite

        return plot_suite(args)
    # torch.compile imports torch.utils.cpp_extension, which notes "No CUDA runtime is found" on
    # any machine without a GPU: nothing to act on, and the bench runs on the CPU there anyway.
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found"))
    out = _Out()
    try:
        if args.cmd == "info":
            return _info(args, out)
        from .bench import PROVIDERS

        unknown = [p for p in args.providers or [] if p not in PROVIDERS]
        if unknown:
            parser.error(f"unknown provider(s) {unknown}; expected some of {list(PROVIDERS)}")
        if args.write_backend_order and not args.ops:
            parser.error("--write-backend-order needs --ops (the order is measured on the ops)")
        if args.max_err is None:
            args.max_err = 1e-4 if args.dtype == "fp32" else 5e-2
        return _bench(args, out)
    finally:
        out.close()


if __name__ == "__main__":
    sys.exit(main())
