"""Command line: ``python -m convnext_fast info`` and ``python -m convnext_fast bench``."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def _info(_args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import _ext, backends, ops  # noqa: F401  (ops registers the backends)
    from .bench import probe_args

    console = Console()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "timm"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError as e:
            versions[mod] = f"not installed ({e.name})"
    console.print("[bold]convnext_fast[/bold] " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        console.print(f"device: cuda:0 {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs),"
                      f" CUDA {torch.version.cuda}")
    else:
        built = "CUDA build" if torch.version.cuda else "CPU build"
        console.print(f"device: cpu ({torch.get_num_threads()} threads; torch is a {built}, no GPU visible)")
    if _ext.error():
        console.print(f"extension: [red]unavailable[/red]: {_ext.error()}")
    else:
        info = _ext.build_info()
        cuda = f"CUDA kernels for {info['cuda_arch_list']}" if info["with_cuda"] else "no CUDA kernels"
        console.print(f"extension: convnext_fast._C built against torch {info['torch_version']}, "
                      f"CPU ISA {info['cpu_flags']}, {cuda}")
        try:
            gemm = _ext.cpu_gemm_dtypes()
        except RuntimeError as e:
            console.print(f"CPU mlp GEMMs: [red]{e}[/red]")
        else:
            forced = os.environ.get("CONVNEXT_FAST_CPU_GEMM")
            how = (f"set by CONVNEXT_FAST_CPU_GEMM={forced}" if forced and forced != "auto" else
                   "the input's dtype where oneDNN has it natively; CONVNEXT_FAST_CPU_GEMM=native|fp32 "
                   "overrides")
            console.print("CPU mlp GEMMs: " + ", ".join(f"{k} inputs in {v}" for k, v in gemm.items())
                          + f" ({how})")
    env = os.environ.get(backends.ENV_VAR)
    console.print(f"requested backend: {env + ' (from ' + backends.ENV_VAR + ')' if env else 'automatic'}")

    table = Table(title="op x backend")
    table.add_column("op")
    for b in backends.BACKENDS:
        table.add_column(b)
    rows = {}
    for op, b, reason in backends.describe():
        rows.setdefault(op, {})[b] = "[green]available[/green]" if reason is None else f"[red]no[/red]: {reason}"
    for op, cells in rows.items():
        table.add_row(op, *(cells[b] for b in backends.BACKENDS))
    console.print(table)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    auto = Table(title="automatic choice (ConvNeXt-T stage-3 shape, batch 2)")
    for col in ("device", "dtype", "op", "backend", "skipped"):
        auto.add_column(col)
    for dev in devices:
        for dt in (torch.float32, torch.bfloat16):
            for op, args in probe_args(dev, dt).items():
                try:
                    name, _ = backends.select(op, torch.device(dev), "auto", args, {})
                    skipped = "; ".join(f"{b}: {r}" for b, r in backends.last_selections()[op][1])
                except backends.BackendError as e:
                    name, skipped = "[red]none[/red]", str(e)
                auto.add_row(dev, str(dt).replace("torch.", ""), op, name, skipped or "-")
    console.print(auto)
    return 0


def _bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bench import bench_model, bench_ops, environment, measure_ceilings, write_json

    console = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda asked for, but no CUDA device is visible[/red]")
        return 2
    providers = args.providers or (["timm", "timm_patched", "convnext_fast"]
                                   + ([] if args.no_compile else ["timm_compile"]))
    results, op_rows, ceilings = [], [], None
    with console.status("benchmarking") as status:
        for batch in args.batch:
            results += bench_model(args.model, device, args.dtype, batch, args.resolution,
                                   args.warmup, args.iters, providers, args.compile_mode, args.mode,
                                   progress=lambda msg: status.update(msg))
        if args.plot:
            status.update("ceilings: copy bandwidth and matmul rate")
            ceilings = measure_ceilings(device, args.dtype)
            r = args.resolution
            stages = ((96, r // 4), (192, r // 8), (384, r // 16), (768, max(r // 32, 1)))  # ConvNeXt-T
            op_rows = bench_ops(device, args.dtype, max(args.batch), stages=stages, warmup=args.warmup, iters=args.iters,
                                progress=lambda msg: status.update(f"op benchmarks: {msg}"))
    env = environment(device)
    where = f"{env.get('gpu') or env.get('cpu')} ({device}), torch {env['torch']}"
    table = Table(title=f"{args.model} {args.mode}, {args.dtype}, {args.resolution}px, channels_last - {where}")
    for col in ("provider", "batch", "ms", "img/s", "vs eager", "vs compile", "max err vs timm", "peak MB"):
        table.add_column(col, justify="right", no_wrap=True)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in results:
        table.add_row(r.provider, str(r.batch), f"{r.ms:.2f}", f"{r.img_per_s:.1f}",
                      fmt(r.speedup_vs_eager, ".2f"), fmt(r.speedup_vs_compile, ".2f"),
                      fmt(r.max_err_vs_timm, ".2e"), fmt(r.peak_mem_mb, ".0f"))
    console.print(table)
    if args.json:
        write_json(args.json, device, results, {"ops": op_rows, "ceilings": ceilings} if args.plot else None)
        console.print(f"wrote {args.json}")
    if args.plot:
        from .plot import save_figure

        rows = [vars(r) for r in results]
        save_figure(args.plot, [(f"{args.model} {args.mode} {args.dtype}", rows)], op_rows, ceilings,
                    f"convnext_fast on {where}, commit {env['commit']}")
        console.print(f"wrote {args.plot}")
    bad = [r for r in results if r.max_err_vs_timm is not None and r.max_err_vs_timm > args.max_err]
    if bad:
        console.print(f"[red]parity failed[/red]: {', '.join(r.provider for r in bad)} differ from timm "
                      f"by more than {args.max_err:g} of max |logit|")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convnext_fast")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, extension build, op x backend availability")
    b = sub.add_parser("bench", help="ConvNeXt inference: convnext_fast vs timm eager vs torch.compile")
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
    b.add_argument("--json", default=None, help="write results and environment to this file")
    b.add_argument("--plot", default=None, metavar="PNG",
                   help="also time the ops and the ceilings, and draw speedup vs batch + a roofline here")
    b.add_argument("--max-err", type=float, default=None,
                   help="parity bound on max |logit diff| / max |logit| (default: 1e-4 fp32, 5e-2 bf16/fp16)")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info(args)
    from .bench import PROVIDERS

    unknown = [p for p in args.providers or [] if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown provider(s) {unknown}; expected some of {list(PROVIDERS)}")
    if args.max_err is None:
        args.max_err = 1e-4 if args.dtype == "fp32" else 5e-2
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
