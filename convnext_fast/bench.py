"""Benchmark harness shared by ``python -m convnext_fast bench`` and ``benchmarks/``.

Times whole models for several providers (timm eager, ``torch.compile`` of timm, timm patched by
:func:`convnext_fast.patch_timm`, convnext_fast on automatic or forced backends) in one process,
same device, dtype and channels-last input, inference or a training step, and checks parity
against timm.
GPU timings synchronize around every timed call; CPU timings use the same harness.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["environment", "time_callable", "ModelResult", "PROVIDERS", "make_reference", "make_runner",
           "provider_unavailable", "bench_model", "write_json", "DTYPES", "op_cost", "op_args", "bench_ops",
           "measure_ceilings", "TINY_STAGES"]

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
    mode: str = "inference"  # or "train": forward + backward of a mean-of-logits loss
    max_err_vs_timm: Optional[float] = None  # max |logit diff| / max |timm logit|
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    peak_mem_mb: Optional[float] = None  # CUDA only: peak allocated during the timed calls
    samples_ms: List[float] = field(default_factory=list)


# "timm": eager timm; "timm_compile": torch.compile of it; "timm_patched": the same timm model
# after convnext_fast.patch_timm; "convnext_fast": the native model, automatic backends;
# "convnext_fast:<backend>": the native model with every op that backend has forced onto it.
PROVIDERS = ("timm", "timm_compile", "timm_patched", "convnext_fast",
             *(f"convnext_fast:{b}" for b in ("torch", "cpu", "cuda", "triton")))


def make_reference(model: str, device: str, dtype: str) -> torch.nn.Module:
    """timm's ``model`` with its init (seed 0), non-trivial layer scale / GRN, channels-last."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(model, pretrained=False)
    # timm initialises gamma to 1e-6 and GRN to 0, which would hide the blocks from parity.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
            elif ".grn." in name:
                p.normal_(0.0, 0.1)
    return ref.to(device=device, dtype=DTYPES[dtype], memory_format=torch.channels_last)


def probe_args(device: str, dtype: torch.dtype) -> Dict[str, tuple]:
    """Arguments of each op at a ConvNeXt-T stage-3 shape (batch 2), to ask a backend about."""
    C, D = 384, 1536
    t = lambda *s: torch.empty(*s, device=device, dtype=dtype)  # noqa: E731
    y = t(2, C, 14, 14).contiguous(memory_format=torch.channels_last)
    return {
        "dwconv_ln": (y, t(C, 1, 7, 7), t(C), t(C), t(C), 1e-6),
        "mlp": (y, t(D, C), t(D), t(C, D), t(C), t(C), y),
        "mlp_grn": (y, t(D, C), t(D), t(D), t(D), t(C, D), t(C), y, 1e-6),
    }


def provider_unavailable(provider: str, device: str, dtype: str = "fp32") -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` in ``dtype`` (None when it can)."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}; expected one of {PROVIDERS}"
    if provider.startswith("convnext_fast:"):
        from . import backends

        backend = provider.split(":")[1]
        if not _backend_ops(backend):
            return f"backend {backend}: {backends.available('dwconv_ln', backend)}"
        args = probe_args(device, DTYPES[dtype])["dwconv_ln"]
        try:
            backends.select("dwconv_ln", torch.device(device), backend, args, {})
        except backends.BackendError as e:
            return str(e)
    return None


def _backend_ops(backend: str) -> Dict[str, str]:
    from . import backends, ops  # noqa: F401  (ops registers the backends)

    return {op: backend for op in ("dwconv_ln", "mlp", "mlp_grn") if backends.available(op, backend) is None}


def make_runner(provider: str, ref: torch.nn.Module, x: torch.Tensor, mode: str = "inference",
                compile_mode: Optional[str] = None) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one inference or training step of ``provider``.

    ref: the timm model (shared by "timm" and "timm_compile"; the other providers copy it), on
    x's device and dtype. Returns the logits (training: after backward of their mean).
    """
    import copy

    from . import backends, from_timm, patch_timm

    training = mode == "train"
    if provider in ("timm", "timm_compile"):
        model = ref
    elif provider == "timm_patched":
        model = copy.deepcopy(ref)
        patch_timm(model)
    else:
        # The layout make_reference gives timm: channels_last 4-D weights spare the stem and
        # downsample convs a weight reorder per call (the trunk is NHWC).
        model = from_timm(ref).to(memory_format=torch.channels_last)
    model.train(training)
    if provider == "timm_compile":
        model = torch.compile(model, mode=compile_mode or ("max-autotune" if x.is_cuda else None))
    mapping = _backend_ops(provider.split(":")[1]) if ":" in provider else None

    def step() -> torch.Tensor:
        ctx = backends.use_backend(mapping) if mapping else contextlib.nullcontext()
        with ctx:
            if not training:
                with torch.inference_mode():
                    return model(x)
            for p in model.parameters():
                p.grad = None
            out = model(x)
            out.float().mean().backward()
            return out.detach()

    return step


def bench_model(model: str = "convnext_tiny", device: str = "cpu", dtype: str = "fp32",
                batch: int = 8, resolution: int = 224, warmup: int = 2, iters: int = 5,
                providers=("timm", "timm_compile", "convnext_fast"), compile_mode: Optional[str] = None,
                mode: str = "inference", progress: Optional[Callable[[str], None]] = None
                ) -> List[ModelResult]:
    """Throughput of ``model`` per provider (inference, or a training step with ``mode="train"``),
    with parity of the logits against timm eager.

    All providers share one set of random weights (timm's init, seed 0) and one input; after
    their warm-ups they are timed in rounds (one call each per round, ``iters`` rounds, median).
    A provider that cannot run here is left out (``provider_unavailable`` says why).
    """
    say = progress or (lambda msg: None)
    ref = make_reference(model, device, dtype)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=torch.channels_last)
    cuda = device.startswith("cuda")

    ref.eval()
    with torch.inference_mode():
        base = ref(x).float()
    scale = base.abs().max().item()
    runners: Dict[str, Tuple[Callable[[], torch.Tensor], float]] = {}
    for name in providers:
        why = provider_unavailable(name, device, dtype)
        if why:
            say(f"{name}: skipped ({why})")
            continue
        say(f"{model} {dtype} {mode} batch {batch}: {name} (warm-up{' + compile' if 'compile' in name else ''})")
        fn = make_runner(name, ref, x, mode, compile_mode)
        out = fn().float()
        err = (out - base).abs().max().item() / max(scale, 1e-12)
        time_callable(fn, device, warmup, 0)
        runners[name] = (fn, err)
    # Timed in rounds, one call per provider each: drift in the machine's speed (a shared CPU,
    # GPU clocks) then falls on every provider alike, not on whichever happened to run last.
    samples: Dict[str, List[float]] = {name: [] for name in runners}
    peaks: Dict[str, float] = {name: 0.0 for name in runners}
    for i in range(iters):
        say(f"{model} {dtype} {mode} batch {batch}: timing round {i + 1}/{iters}")
        for name, (fn, _) in runners.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                start_mem = torch.cuda.memory_allocated(device)
            samples[name] += time_callable(fn, device, 0, 1)
            if cuda:
                peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20)
    results: Dict[str, ModelResult] = {}
    for name, (_, err) in runners.items():
        ms = statistics.median(samples[name]) * 1e3
        results[name] = ModelResult(name, model, dtype, batch, resolution, ms, batch / (ms / 1e3), mode,
                                    err, peak_mem_mb=peaks[name] if cuda else None,
                                    samples_ms=[t * 1e3 for t in samples[name]])
    eager = results.get("timm")
    comp = results.get("timm_compile")
    for r in results.values():
        r.speedup_vs_eager = eager.ms / r.ms if eager else None
        r.speedup_vs_compile = comp.ms / r.ms if comp else None
    return list(results.values())


# ConvNeXt-T stage shapes (C, H=W) at 224px: the op benchmarks' default shapes.
TINY_STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))


def op_cost(op: str, N: int, C: int, H: int, W: int, elem_bytes: int, mode: str = "fwd", k: int = 7):
    """(FLOPs, bytes) of one call: the work and the minimum HBM/DRAM traffic of a fused kernel.

    dwconv_ln forward reads x and writes y; its backward reads x and dy and writes dx (conv
    recomputed: FLOPs of 3 convs). mlp/mlp_grn (D = 4C) forward: 2 GEMMs, reads y, the residual
    and the weights, writes out; backward: 4 GEMMs (the recomputed hidden not counted), reads dy,
    y and the weights, writes dy_in and the weight gradients.
    """
    M = N * H * W
    if op == "dwconv_ln":
        conv = 2 * k * k * M * C
        flops = conv + 8 * M * C if mode == "fwd" else 3 * conv + 20 * M * C
        return flops, (2 if mode == "fwd" else 5) * M * C * elem_bytes
    D = 4 * C
    gemm = 2 * M * C * D
    weights = 2 * C * D * elem_bytes
    if mode == "fwd":
        return 2 * gemm, 3 * M * C * elem_bytes + weights
    return 6 * gemm, 6 * M * C * elem_bytes + 3 * weights


def op_args(op: str, N: int, C: int, H: int, device: str, dtype: torch.dtype) -> tuple:
    """Random arguments of ``op`` at [N, C, H, H] with D = 4C, scaled like trained weights."""
    D = 4 * C

    def t(*s, scale=1.0):
        return (torch.randn(*s, device=device) * scale).to(dtype)

    y = t(N, C, H, H).contiguous(memory_format=torch.channels_last)
    if op == "dwconv_ln":
        return (y, t(C, 1, 7, 7, scale=0.1), t(C), t(C), t(C), 1e-6)
    if op == "mlp":
        return (y, t(D, C, scale=C ** -0.5), t(D), t(C, D, scale=D ** -0.5), t(C), t(C), y)
    return (y, t(D, C, scale=C ** -0.5), t(D), t(D), t(D), t(C, D, scale=D ** -0.5), t(C), y, 1e-6)


def bench_ops(device: str, dtype: str, batch: int, backends_: Sequence[str] = ("torch", "cpu", "cuda", "triton"),
              stages: Sequence[tuple] = TINY_STAGES, warmup: int = 2, iters: int = 5,
              progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Forward time of each op per backend at each (C, H=W) stage shape; rows for
    :mod:`convnext_fast.plot`. The Triton interpreter (CPU) is not timed: it is a correctness tool."""
    from . import backends, ops

    if device == "cpu":
        backends_ = [b for b in backends_ if b != "triton"]
    say = progress or (lambda msg: None)
    dt = DTYPES[dtype]
    rows = []
    for op in ("dwconv_ln", "mlp", "mlp_grn"):
        fn = getattr(ops, op)
        for C, H in stages:
            args = op_args(op, batch, C, H, device, dt)
            flops, nbytes = op_cost(op, batch, C, H, H, dt.itemsize)
            for backend in backends_:
                try:
                    backends.select(op, torch.device(device), backend, args, {})
                except backends.BackendError:
                    continue
                say(f"{op} C={C} {backend}")
                with torch.inference_mode():
                    samples = time_callable(lambda: fn(*args, backend=backend), device, warmup, iters)
                rows.append({"label": f"{op} {backend}", "op": op, "backend": backend,
                             "shape": [batch, C, H, H], "ms": statistics.median(samples) * 1e3,
                             "flops": flops, "bytes": nbytes})
    return rows


def measure_ceilings(device: str, dtype: str = "bf16") -> Dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and the dense matmul rate in ``dtype``."""
    cuda = device.startswith("cuda")
    n = (1 << 30) if cuda else (1 << 28)  # bytes per buffer, far past the last-level cache
    src = torch.empty(n // 4, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = statistics.median(time_callable(lambda: dst.copy_(src), device, 3, 10))
    del src, dst
    m = 8192 if cuda else 1024
    a = torch.randn(m, m, device=device, dtype=DTYPES[dtype])
    b = torch.randn(m, m, device=device, dtype=DTYPES[dtype])
    mm_s = statistics.median(time_callable(lambda: a @ b, device, 2, 5))
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_TFLOPs": 2 * m ** 3 / mm_s / 1e12,
            "matmul_dtype": dtype, "matmul_n": m}


def write_json(path: str, device: str, results: List[ModelResult], extra: Optional[dict] = None) -> None:
    record = {"environment": environment(device), "results": [asdict(r) for r in results]}
    if extra:
        record.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)

