"""Measure the two ceilings every kernel figure is read against: device-to-device copy bandwidth
(bytes read + written per second) and the dense bf16 matmul rate. CUDA only.

    python benchmarks/ceilings.py --json ceilings.json
"""
import argparse
import json

import torch


def _median_ms(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure() -> dict:
    n = 1 << 30  # 1 GiB per buffer: far past L2
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = _median_ms(lambda: a @ b)
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "copy_GBps": 2 * n / (copy_ms * 1e-3) / 1e9,
        "bf16_matmul_TFLOPs": 2 * m**3 / (mm_ms * 1e-3) / 1e12,
        "method": "median of 20 CUDA-event timings; copy counts bytes read + written (1 GiB "
                  "buffers); matmul 8192^3 bf16 on random data",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = measure()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
