"""The CPU race: ConvNeXt inference per engine a CPU user would pick, on this machine.

    python benchmarks/cpu_race.py [--batch 1 8] [--dtypes fp32 amp_bf16 bf16] [--iters 10]
    python benchmarks/cpu_race.py --ops [--write-backend-order]

timm eager, torch.compile of timm, convnext_fast, OpenVINO and ONNX Runtime (the [compare] extra;
a line says so when one is not installed), one set of weights, interleaved rounds per case
(:func:`convnext_fast.bench.bench_model`). Writes ``benchmarks/results/cpu_<kind>_race.json``
(CPU model, family/model, flags, kind, versions, commit, every timing) and prints the table the
README's CPU section is made from, with convnext_fast's speed-up over the faster of torch.compile
and OpenVINO. bf16 runs both ways users run it: ``amp_bf16`` (fp32 weights under autocast;
OpenVINO with its bf16 precision hint) and ``bf16`` (the model cast; OpenVINO as for amp_bf16).

``--ops``: instead, each op's forward on every CPU backend at the ConvNeXt-T stage shapes, fp32
and bf16, batch 1 and 8 (``bench.bench_ops``), written to ``benchmarks/results/cpu_<kind>_ops.json``;
with ``--write-backend-order`` the inference order for this CPU kind (fastest over both batches)
goes into ``convnext_fast/backends/backend_order.json`` as entries with this machine's ``kind``,
so other kinds of CPU keep their own (or the default) order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

from convnext_fast import bench
from convnext_fast.backends.order import cpu_kind

PROVIDERS = ("timm", "timm_compile", "convnext_fast", "openvino", "onnxruntime")
RIVALS = ("timm_compile", "openvino")  # the bar: convnext_fast against the faster of these
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def table(rows: List[Dict], env: Dict) -> str:
    """Markdown: one row per (dtype, batch), ms per provider, convnext_fast vs the bar."""
    cases: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        cases.setdefault((r["dtype"], r["batch"]), {})[r["provider"]] = r
    lines = [f"{env['cpu']} (family/model {env['cpu_family_model']}, {env['cpu_threads']} threads, kind "
             f"{env['cpu_kind']}: {' '.join(env['cpu_flags'])}), torch {env['torch']}, commit {env['commit']}; "
             "median ms per batch",
             "",
             "| dtype | batch | " + " | ".join(PROVIDERS) + " | vs the faster of compile and OpenVINO |",
             "|---|---|" + "---|" * len(PROVIDERS) + "---|"]
    for (dtype, batch), by in cases.items():
        cells = [f"{by[p]['ms']:.1f}" if p in by else "-" for p in PROVIDERS]
        rivals = [by[p]["ms"] for p in RIVALS if p in by]
        ours = by.get("convnext_fast")
        ratio = f"{min(rivals) / ours['ms']:.2f}x" if rivals and ours else "-"
        lines.append(f"| {dtype} | {batch} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def ops(args, env: Dict, command: str) -> int:
    rows = []
    for dtype in ("fp32", "bf16"):
        for batch in args.batch:
            rows += bench.bench_ops("cpu", dtype, batch, modes=("fwd",), iters=args.iters,
                                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    out = args.out or os.path.join(RESULTS, f"cpu_{cpu_kind()}_ops.json")
    with open(out, "w") as f:
        json.dump({"environment": env, "command": command, "ops": rows}, f, indent=1)
    for (op, _, dtype, _, backend), (ms, full) in sorted(bench.stage_sums(rows).items()):
        print(f"{op:10s} {dtype} {backend:8s} {ms:8.2f} ms summed over the ConvNeXt-T blocks, "
              f"batch {'+'.join(map(str, args.batch))}{'' if full else ' (some stages only)'}")
    print(f"wrote {out}")
    if args.write_backend_order:
        entries = bench.write_backend_order(rows, env, f"benchmarks/results/{os.path.basename(out)}")
        print(f"wrote {len(entries)} backend order entries (kind {cpu_kind()})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "amp_bf16", "bf16"], choices=bench.MODEL_DTYPES)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/cpu_<kind>_race.json")
    parser.add_argument("--ops", action="store_true", help="time the ops per backend instead of the models")
    parser.add_argument("--write-backend-order", action="store_true",
                        help="with --ops: merge this CPU kind's inference order into backend_order.json")
    args = parser.parse_args(argv)
    env = bench.environment("cpu")
    command = "python benchmarks/cpu_race.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.ops:
        return ops(args, env, command)
    for p in args.providers:
        why = bench.provider_unavailable(p, "cpu", "fp32")
        if why:
            print(f"{p}: {why}", flush=True)
    rows = []
    for dtype in args.dtypes:
        for batch in args.batch:
            for r in bench.bench_model(args.model, "cpu", dtype, batch, warmup=2, iters=args.iters,
                                       providers=args.providers,
                                       progress=lambda msg: print(msg, file=sys.stderr, flush=True)):
                rows.append({k: v for k, v in vars(r).items() if k != "samples_ms"} | {"samples_ms": r.samples_ms})
    out = args.out or os.path.join(RESULTS, f"cpu_{cpu_kind()}_race.json")
    with open(out, "w") as f:
        json.dump({"environment": env, "command": command, "results": rows}, f, indent=1)
    print(table(rows, env))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
