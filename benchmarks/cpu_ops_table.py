"""Per-op CPU figures behind the ``("...", "cpu", dtype, training)`` entries of MEASURED_ORDER:
dwconv_ln and mlp at ConvNeXt-T stage shapes, C++ ``cpu`` backend vs eager ``torch``, forward and
forward+backward, summed over the 3/3/9/3 blocks of the four stages.

    python benchmarks/cpu_ops_table.py --batch 8 --dtype fp32 [--threads 2] >> benchmarks/results/cpu2core_ops.txt

Each figure is the minimum over ``--iters`` calls (after one warm-up): on a shared machine the
minimum is the figure least disturbed by other processes; the median is printed beside it.
"""
import argparse
import time

import torch

from convnext_fast import ops
from convnext_fast.bench import environment

STAGES = [(96, 56, 3), (192, 28, 3), (384, 14, 9), (768, 7, 3)]  # C, H=W, blocks
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time(fn, iters):
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3, sorted(ts)[len(ts) // 2] * 1e3


def _inputs(op, N, C, H, dtype, train):
    def t(*s, scale=1.0):
        return (torch.randn(*s) * scale).to(dtype).requires_grad_(train)

    def nhwc():
        return torch.randn(N, C, H, H).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(train)

    if op == "dwconv_ln":
        return (nhwc(), t(C, 1, 7, 7, scale=1 / 7), t(C), t(C), t(C))
    D = 4 * C
    return (nhwc(), t(D, C, scale=C ** -0.5), t(D), t(C, D, scale=D ** -0.5), t(C), t(C), nhwc())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ops", nargs="+", default=["dwconv_ln", "mlp"])
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    env = environment("cpu")
    print(f"# {a.dtype} batch {a.batch}, {torch.get_num_threads()} threads, torch {env['torch']}, "
          f"commit {env['commit']}; ms, min/median of {a.iters}")
    for op in a.ops:
        fn = getattr(ops, op)
        for mode in ("fwd", "fwd+bwd"):
            train = mode != "fwd"
            totals = {}
            for C, H, blocks in STAGES:
                args = _inputs(op, a.batch, C, H, dtype, train)
                g = torch.randn(a.batch, C, H, H).to(dtype).contiguous(memory_format=torch.channels_last)
                row = []
                for backend in ("cpu", "torch"):
                    def call():
                        out = fn(*args, backend=backend)
                        if train:
                            out.backward(g)
                    ctx = torch.enable_grad() if train else torch.inference_mode()
                    with ctx:
                        mn, md = _time(call, a.iters)
                    totals[backend] = totals.get(backend, 0.0) + blocks * mn
                    row.append(f"{backend} {mn:8.2f}/{md:8.2f}")
                print(f"{op:9s} {mode:7s} C={C:3d} H={H:2d}: " + "  ".join(row))
            ratio = totals["torch"] / totals["cpu"]
            print(f"{op:9s} {mode:7s} sum over blocks: cpu {totals['cpu']:.1f} ms, torch "
                  f"{totals['torch']:.1f} ms, torch/cpu {ratio:.2f}x")


if __name__ == "__main__":
    main()
