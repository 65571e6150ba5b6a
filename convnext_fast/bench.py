"""Benchmark harness shared by ``python -m convnext_fast bench`` and ``benchmarks/``.

Times whole models for several providers (timm eager, ``torch.compile`` of timm, convnext_fast)
in one process, same device, dtype and channels-last input, and checks parity against timm.
GPU timings synchronize around every timed call; CPU timings use the same harness.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["environment", "time_callable", "ModelResult", "bench_model", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> Dict[str, object]:
    """Device, versions and commit: recorded beside every figure."""
    env: Dict[str, object] = {
        "device": device, "python": platform.python_version(), "torch": torch.__version__,
        "commit": _git_commit(), "cpu_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    for mod in ("triton", "timm"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def time_callable(fn: Callable[[], object], device: str, warmup: int, iters: int) -> List[float]:
    """Seconds per call, ``iters`` samples after ``warmup`` calls; synchronizes on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class ModelResult:
    provider: str
    model: str
    dtype: str
    batch: int
    resolution: int
    ms: float
    img_per_s: float
    max_err_vs_timm: Optional[float] = None  # max |logit diff| / max |timm logit|
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    samples_ms: List[float] = field(default_factory=list)


def bench_model(model: str = "convnext_tiny", device: str = "cpu", dtype: str = "fp32",
                batch: int = 8, resolution: int = 224, warmup: int = 2, iters: int = 5,
                providers=("timm", "timm_compile", "convnext_fast"), compile_mode: Optional[str] = None,
                progress: Optional[Callable[[str], None]] = None) -> List[ModelResult]:
    """Inference throughput of ``model`` per provider, with parity against timm eager.

    All providers share one set of random weights (timm's init, seed 0) and one input.
    """
    import timm

    from . import from_timm

    say = progress or (lambda msg: None)
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    ref = timm.create_model(model, pretrained=False).eval()
    # Non-trivial layer scale so the blocks matter (timm initialises gamma to 1e-6).
    for name, p in ref.named_parameters():
        if name.endswith("gamma"):
            torch.nn.init.uniform_(p, 0.5, 1.0)
    ref = ref.to(device=device, dtype=dt, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dt)
    x = x.contiguous(memory_format=torch.channels_last)

    runners: Dict[str, Callable[[], torch.Tensor]] = {}
    runners["timm"] = lambda: ref(x)  # the parity baseline; timed only if asked for
    if "timm_compile" in providers:
        mode = compile_mode or ("max-autotune" if device.startswith("cuda") else None)
        compiled = torch.compile(ref, mode=mode)
        runners["timm_compile"] = lambda: compiled(x)
    if "convnext_fast" in providers:
        ours = from_timm(ref).eval()
        runners["convnext_fast"] = lambda: ours(x)

    results: Dict[str, ModelResult] = {}
    with torch.inference_mode():
        base = ref(x).float()
        scale = base.abs().max().item()
        for name, fn in runners.items():
            if name not in providers:
                continue
            say(f"{model} {dtype} batch {batch}: {name} (warm-up{' + compile' if 'compile' in name else ''})")
            out = fn().float()
            err = (out - base).abs().max().item() / max(scale, 1e-12)
            samples = time_callable(fn, device, warmup, iters)
            ms = statistics.median(samples) * 1e3
            results[name] = ModelResult(name, model, dtype, batch, resolution, ms,
                                        batch / (ms / 1e3), err,
                                        samples_ms=[s * 1e3 for s in samples])
    eager = results.get("timm")
    comp = results.get("timm_compile")
    for r in results.values():
        r.speedup_vs_eager = eager.ms / r.ms if eager else None
        r.speedup_vs_compile = comp.ms / r.ms if comp else None
    return list(results.values())


def write_json(path: str, device: str, results: List[ModelResult], extra: Optional[dict] = None) -> None:
    record = {"environment": environment(device), "results": [asdict(r) for r in results]}
    if extra:
        record.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

