"""Draw a pytest-benchmark JSON of this suite: speedup vs batch size per provider (one panel per
model, mode and dtype) and the ops on a roofline under the measured ceilings.

    pytest benchmarks/ --benchmark --benchmark-json=bench.json
    python benchmarks/ceilings.py --json ceilings.json          # on a GPU
    python benchmarks/plot.py bench.json --ceilings ceilings.json -o benchmarks/results/plot.png
"""
import argparse
import json
from collections import defaultdict

from convnext_fast.plot import save_figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json) of benchmarks/")
    parser.add_argument("--ceilings", default=None, help="JSON from benchmarks/ceilings.py")
    parser.add_argument("--mode", default="fwd", help="op mode on the roofline: fwd or fwd+bwd")
    parser.add_argument("-o", "--output", default="bench.png")
    args = parser.parse_args(argv)

    with open(args.json) as f:
        record = json.load(f)
    panels = defaultdict(list)
    ops = []
    for bench in record["benchmarks"]:
        info = dict(bench["extra_info"], ms=bench["stats"]["median"] * 1e3)
        if info.get("kind") == "model":
            panels[f"{info['model']} {info['mode']} {info['dtype']}"].append(info)
        elif info.get("kind") == "op" and info.get("mode") == args.mode and info["provider"] != "torch_compile":
            ops.append(dict(info, label=f"{info['op']} {info['provider']}"))
    ceilings = None
    if args.ceilings:
        with open(args.ceilings) as f:
            c = json.load(f)
        ceilings = {"copy_GBps": c.get("copy_GBps"),
                    "matmul_TFLOPs": c.get("matmul_TFLOPs", c.get("bf16_matmul_TFLOPs"))}
    env = record.get("machine_info", {}).get("convnext_fast", {})
    where = env.get("gpu") or env.get("cpu") or record.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    title = f"convnext_fast on {where}, torch {env.get('torch', '?')}, commit {env.get('commit', '?')}"
    save_figure(args.output, sorted(panels.items()), ops, ceilings, title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
