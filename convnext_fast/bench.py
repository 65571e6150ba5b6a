"""The benchmark harness: every figure of ``python -m convnext_fast bench`` and ``benchmarks/``.

- :data:`STAGES`: ConvNeXt-T's stages, the shapes every op benchmark runs at.
- :func:`time_callable`: the timer (median, IQR and peak memory in a :class:`Timing`).
- :func:`measure_ceilings`: copy bandwidth and matmul rate, what kernel figures are read against.
- Ops: :func:`op_inputs` (from the op's spec), :func:`op_step`, :func:`op_cost`, :func:`bench_ops`,
  and :func:`backend_order_entries` / :func:`write_backend_order`, which turn op timings into the
  measured backend order (:mod:`convnext_fast.backends.order`).
- Models: :data:`PROVIDERS` (timm eager, ``torch.compile`` of timm, timm patched by
  :func:`convnext_fast.patch_timm`, convnext_fast on automatic or forced backends),
  :func:`make_reference`, :func:`make_runner`, :func:`bench_model`, with parity against timm.

Every timing runs in one process on one device, dtype and channels-last layout; CUDA timings
synchronize around every timed call. Nothing here needs rich or matplotlib; timm is imported by
the model benchmarks only.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .specs import FORWARD_OPS

__all__ = [
    "DTYPES", "AUTOCAST", "MODEL_DTYPES", "autocast_dtype", "STAGES", "OPS", "MODES", "stage_shapes",
    "environment", "device_name", "describe_environment",
    "Timing", "PeakMemory", "time_callable", "measure_ceilings",
    "op_inputs", "probe_inputs", "op_unavailable", "op_step", "op_cost", "bench_ops",
    "stage_sums", "backend_order_entries", "write_backend_order",
    "ModelResult", "PROVIDERS", "make_reference", "model_input", "logits_error", "make_runner",
    "provider_unavailable", "bench_model", "write_json",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The model benchmarks' other way to run in low precision: fp32 weights and input under
# torch.autocast to this dtype (what most users of a CPU or GPU do), rather than a model cast to it.
AUTOCAST = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}
MODEL_DTYPES = (*DTYPES, *AUTOCAST)
DtypeLike = Union[str, torch.dtype]

# ConvNeXt-T at 224 px: (channels C, H = W, blocks) per stage; the MLPs' hidden width is 4C.
STAGES = ((96, 56, 3), (192, 28, 3), (384, 14, 9), (768, 7, 3))
OPS = FORWARD_OPS  # dwconv_ln, mlp, mlp_grn
MODES = ("fwd", "fwd+bwd")


def stage_shapes(resolution: int = 224) -> Tuple[Tuple[int, int, int], ...]:
    """:data:`STAGES` at another input resolution (the stem divides by 4, each downsample by 2)."""
    return tuple((C, max(resolution * H // 224, 1), blocks) for C, H, blocks in STAGES)


def _dtype(dtype: DtypeLike) -> torch.dtype:
    """The storage dtype: fp32 for the autocast names."""
    if isinstance(dtype, str):
        return torch.float32 if dtype in AUTOCAST else DTYPES[dtype]
    return dtype


def autocast_dtype(dtype: DtypeLike) -> Optional[torch.dtype]:
    """The autocast dtype of a model dtype name ("amp_bf16" -> bf16), None for the others."""
    return AUTOCAST.get(dtype) if isinstance(dtype, str) else None


def _dtype_name(dtype: DtypeLike) -> str:
    return dtype if isinstance(dtype, str) else next(k for k, v in DTYPES.items() if v == dtype)


# ---------------------------------------------------------------------------------------------
# Environment


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    # platform.processor() says only "x86_64" on Linux; the model name is in /proc/cpuinfo.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide which CPU kernels are fast (backends.order.cpu_kind).
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_flags(info: Mapping[str, str]) -> List[str]:
    have = set(info.get("flags", "").split())
    return [f for f in _CPU_FLAGS if f in have]


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
    from importlib import metadata

    for dist in ("openvino", "onnxruntime"):  # the [compare] engines, without importing them
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        from .backends.order import cpu_kind

        info = _cpuinfo()
        # a VM's model name can be as bare as "AMD EPYC": family and model tell the generation
        env.update(cpu=_cpu_name(), cpu_kind=cpu_kind(), cpu_flags=_cpu_flags(info),
                   cpu_family_model=f"{info.get('cpu family', '?')}/{info.get('model', '?')}")
    return env


def device_name(env: Mapping[str, object]) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if env.get("gpu") or not env.get("cpu"):
        return str(env.get("gpu", "?"))
    return f"{env.get('cpu_threads', '?')}-thread {env['cpu']}"


def describe_environment(env: Mapping[str, object]) -> str:
    """One line for titles: device, torch, commit (``?`` for what ``env`` lacks)."""
    return (f"{device_name(env)} ({env.get('device', '?')}), torch {env.get('torch', '?')}, "
            f"commit {env.get('commit', '?')}")


# ---------------------------------------------------------------------------------------------
# The timer


@dataclass
class Timing:
    """Samples of one timed callable; peak_mem_mb: the most CUDA memory it allocated above what was
    allocated before (None on the CPU, which keeps no allocator statistics)."""

    samples_ms: List[float] = field(default_factory=list)
    peak_mem_mb: Optional[float] = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q3 - q1

    def __add__(self, other: "Timing") -> "Timing":
        peaks = [p for p in (self.peak_mem_mb, other.peak_mem_mb) if p is not None]
        return Timing(self.samples_ms + other.samples_ms, max(peaks) if peaks else None)


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.mb`` is the most CUDA memory allocated
    above the start while the block ran (None on the CPU)."""

    def __init__(self, device: str):
        self.device, self.cuda, self.mb = device, str(device).startswith("cuda"), None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20


def time_callable(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 5) -> Timing:
    """``iters`` timed calls of ``fn`` after ``warmup`` untimed ones; synchronizes on CUDA."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    with PeakMemory(device) as peak:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples, peak.mb)


def measure_ceilings(device: str, dtype: DtypeLike = "bf16", iters: int = 10) -> Dict[str, object]:
    """Copy bandwidth (bytes read + written per second) and the dense matmul rate in ``dtype``."""
    cuda = device.startswith("cuda")
    n = (1 << 30) if cuda else (1 << 28)  # bytes per buffer, far past the last-level cache
    src = torch.empty(n // 4, device=device).normal_()
    dst = torch.empty_like(src)
    copy = time_callable(lambda: dst.copy_(src), device, 3, iters)
    del src, dst
    m = 8192 if cuda else 1024
    a = torch.randn(m, m, device=device, dtype=_dtype(dtype))
    b = torch.randn(m, m, device=device, dtype=_dtype(dtype))
    mm = time_callable(lambda: a @ b, device, 2, iters)
    return {"copy_GBps": 2 * n / (copy.median_ms * 1e-3) / 1e9,
            "matmul_TFLOPs": 2 * m ** 3 / (mm.median_ms * 1e-3) / 1e12,
            "matmul_dtype": _dtype_name(dtype), "matmul_n": m,
            "method": f"median of {iters} timed calls; copy of {n >> 20} MiB fp32 buffers counts bytes "
                      f"read + written; matmul {m}^3 on random data"}


# ---------------------------------------------------------------------------------------------
# Ops

# The ConvNeXt block's settings where the specs' input factories default to others.
_BLOCK_ARGS = {"dwconv_ln": {"k": 7}}


def op_inputs(op: str, device: str, dtype: DtypeLike, N: int, C: int, H: int, W: Optional[int] = None,
              requires_grad: bool = False) -> Dict[str, object]:
    """``op``'s arguments by name at [N, C, H, W] as in a ConvNeXt block (D = 4C, 7x7 conv), from
    the op's spec."""
    from .specs import spec

    return spec(op).make_inputs(device, _dtype(dtype), N=N, C=C, H=H, W=W or H,
                                requires_grad=requires_grad, **_BLOCK_ARGS.get(op, {}))


def probe_inputs(op: str, device: str, dtype: DtypeLike, requires_grad: bool = False) -> Dict[str, object]:
    """``op``'s arguments at the ConvNeXt-T stage-3 shape, batch 2: what ``info`` and the model
    providers ask the backends about."""
    C, H, _ = STAGES[2]
    return op_inputs(op, device, dtype, 2, C, H, requires_grad=requires_grad)


def op_unavailable(op: str, provider: str, args: Mapping[str, object]) -> Optional[str]:
    """Why ``provider`` (a backend, or ``torch_compile``) cannot run ``op`` on ``args``."""
    if provider == "torch_compile":
        return None
    from . import backends

    return backends.why_not(op, provider, args)


def op_step(op: str, provider: str, args: Mapping[str, object], mode: str = "fwd",
            compile_mode: Optional[str] = None) -> Callable[[], torch.Tensor]:
    """A zero-argument callable: one call of ``op`` on ``provider`` (a backend, or
    ``torch_compile``: torch.compile of the reference), forward, or forward + backward (``args``
    then require grad)."""
    from . import ops
    from .specs import spec

    s = spec(op)
    if provider == "torch_compile":
        fn = torch.compile(s.reference, mode=compile_mode)
    else:
        fn = functools.partial(getattr(ops, op), backend=provider)
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return fn(**args)
        return forward
    leaves = [a for a in args.values() if isinstance(a, torch.Tensor) and a.requires_grad]
    grad = torch.randn_like(args[s.names[0]])  # every op's output has its first input's shape

    def forward_backward():
        for a in leaves:
            a.grad = None
        out = fn(**args)
        out.backward(grad)
        return out

    return forward_backward


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


def bench_ops(device: str, dtype: DtypeLike, batch: int, backends_: Optional[Sequence[str]] = None,
              stages: Sequence[Tuple[int, int, int]] = STAGES, modes: Sequence[str] = MODES,
              ops_: Sequence[str] = OPS, warmup: int = 2, iters: int = 5,
              progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Each op on each backend that can run it, at each (C, H=W, blocks) stage shape, forward and
    forward + backward: one row per timing, for :mod:`convnext_fast.plot`, the op table of the
    command line and :func:`backend_order_entries`. The Triton interpreter (CPU) is not timed: it is
    a correctness tool."""
    from . import backends

    backends_ = [b for b in backends_ or backends.BACKENDS if not (b == "triton" and device == "cpu")]
    say = progress or (lambda msg: None)
    name = _dtype_name(dtype)
    rows = []
    for op in ops_:
        for mode in modes:
            for C, H, blocks in stages:
                args = op_inputs(op, device, dtype, batch, C, H, requires_grad=mode != "fwd")
                flops, nbytes = op_cost(op, batch, C, H, H, _dtype(dtype).itemsize, mode)
                for backend in backends_:
                    if op_unavailable(op, backend, args):
                        continue
                    say(f"{op} {mode} C={C} {backend}")
                    t = time_callable(op_step(op, backend, args, mode), device, warmup, iters)
                    rows.append({"label": f"{op} {backend}", "op": op, "backend": backend, "mode": mode,
                                 "device": device, "dtype": name, "shape": [batch, C, H, H], "blocks": blocks,
                                 "ms": t.median_ms, "iqr_ms": t.iqr_ms, "peak_mem_mb": t.peak_mem_mb,
                                 "flops": flops, "bytes": nbytes})
    return rows


def stage_sums(rows: Sequence[Mapping], stages: Sequence[Tuple[int, int, int]] = STAGES
               ) -> Dict[Tuple[str, str, str, str, str], Tuple[float, bool]]:
    """(op, device type, dtype, mode, backend) -> (ms summed over ``stages`` weighted by their
    blocks, whether it ran at every stage), from rows as :func:`bench_ops` returns them."""
    blocks = {(C, H): b for C, H, b in stages}
    sums: Dict[tuple, float] = {}
    seen: Dict[tuple, set] = {}
    for r in rows:
        _, C, H, _ = r["shape"]
        if (C, H) in blocks:
            key = (r["op"], str(r["device"]).split(":")[0], r["dtype"], r["mode"], r["backend"])
            sums[key] = sums.get(key, 0.0) + blocks[(C, H)] * r["ms"]
            seen.setdefault(key, set()).add((C, H))
    return {k: (ms, len(seen[k]) == len(blocks)) for k, ms in sums.items()}


def backend_order_entries(rows: Sequence[Mapping], env: Mapping[str, object], source: str,
                          stages: Sequence[Tuple[int, int, int]] = STAGES) -> List[dict]:
    """Entries of :mod:`convnext_fast.backends.order` from op timings: per (op, device type, dtype,
    training) the backends fastest first by :func:`stage_sums`, each stamped with the ``kind`` of the
    device measured (from ``env``'s capability on CUDA, :func:`~convnext_fast.backends.order.cpu_kind`
    of this machine on the CPU; an entry whose kind is unknown has none, so it becomes the default).

    rows: dicts with op, backend, mode, device, dtype, shape [N, C, H, W] and ms (the rows of
    :func:`bench_ops`). A backend that ran only some stages goes after those that ran them all; a
    case no backend ran at every stage gets no entry.
    """
    from .backends import order as backend_order

    def kind(device: str) -> str:
        if device == "cuda":
            return backend_order.cuda_kind(str(env["capability"])) if env.get("capability") else ""
        return backend_order.device_kind(device)

    cases: Dict[tuple, Dict[str, Tuple[float, bool]]] = {}
    for (op, device, dtype, mode, backend), total in stage_sums(rows, stages).items():
        if backend != "torch_compile":
            cases.setdefault((op, device, dtype, mode != "fwd"), {})[backend] = total
    batch = {r["shape"][0] for r in rows}
    measured = {"device": device_name(env), "torch": env.get("torch"), "triton": env.get("triton"),
                "commit": env.get("commit"), "source": source}
    if env.get("capability"):
        measured["capability"] = env["capability"]
    if env.get("cpu_flags") is not None:
        measured["cpu_flags"] = env["cpu_flags"]
    entries = []
    for (op, device, dtype, training), totals in sorted(cases.items()):
        order = sorted(totals, key=lambda b: (not totals[b][1], totals[b][0]))
        if not totals[order[0]][1]:
            continue
        partial = [b for b in order if not totals[b][1]]
        what = (f"ConvNeXt-T stage shapes at {4 * stages[0][1]} px, batch {'/'.join(map(str, sorted(batch)))}, "
                f"median ms summed over the {'/'.join(str(b) for *_, b in stages)} blocks, "
                f"{'forward + backward' if training else 'forward'}")
        if partial:
            what += f"; {', '.join(partial)} ran only some stages (sum over those)"
        entry = {"op": op, "device": device, "dtype": dtype, "training": training, "order": order,
                 "ms": {b: float(f"{totals[b][0]:.3g}") for b in order}, "what": what,
                 "measured": dict(measured)}
        if kind(device):
            entry["kind"] = kind(device)
        entries.append(entry)
    return entries


def write_backend_order(rows: Sequence[Mapping], env: Mapping[str, object], source: str,
                        path: Optional[str] = None, stages: Sequence[Tuple[int, int, int]] = STAGES
                        ) -> List[dict]:
    """Merge :func:`backend_order_entries` of ``rows`` into the order file (default: the one the
    selection reads); returns the entries written."""
    from .backends import order

    entries = backend_order_entries(rows, env, source, stages)
    order.merge(entries, path or order.PATH)
    return entries


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelResult:
    provider: str
    model: str
    dtype: str
    batch: int
    resolution: int
    ms: float  # median
    img_per_s: float
    mode: str = "inference"  # or "train": forward, backward of the mean logit, an AdamW step
    max_err_vs_timm: Optional[float] = None  # max |logit diff| / max |timm logit|
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    peak_mem_mb: Optional[float] = None  # CUDA only: peak allocated during the timed calls
    samples_ms: List[float] = field(default_factory=list)
    iqr_ms: Optional[float] = None


# "timm": eager timm; "timm_compile": torch.compile of it; "timm_patched": the same timm model
# after convnext_fast.patch_timm; "convnext_fast": the native model, automatic backends;
# "convnext_fast_compile": torch.compile of it; "convnext_fast:<backend>": the native model with
# every op that backend has forced onto it; "openvino" and "onnxruntime": timm's model exported to
# them (CPU inference only, the [compare] extra), the engines a CPU user would otherwise pick.
PROVIDERS = ("timm", "timm_compile", "timm_patched", "convnext_fast", "convnext_fast_compile",
             *(f"convnext_fast:{b}" for b in ("torch", "cpu", "cuda", "triton")), "openvino", "onnxruntime")
COMPARE_EXTRA = "pip install 'convnext_fast[compare]'"
# Engine precision per model dtype: both run fp32 weights; OpenVINO lowers to bf16 by its hint.
_ENGINE_PRECISION = {"openvino": {"fp32": "f32", "bf16": "bf16", "amp_bf16": "bf16"},
                     "onnxruntime": {"fp32": "f32"}}
_ENGINE_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


def make_reference(model: str, device: str, dtype: DtypeLike) -> torch.nn.Module:
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
    return ref.to(device=device, dtype=_dtype(dtype), memory_format=torch.channels_last)


def model_input(batch: int, resolution: int, device: str, dtype: DtypeLike) -> torch.Tensor:
    """Random images [batch, 3, resolution, resolution], channels-last."""
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=_dtype(dtype))
    return x.contiguous(memory_format=torch.channels_last)


def logits_error(out: torch.Tensor, base: torch.Tensor) -> float:
    """max |out - base| / max |base|: the parity figure against timm."""
    base = base.float()
    return (out.float() - base).abs().max().item() / max(base.abs().max().item(), 1e-12)


def _backend_ops(backend: str) -> Dict[str, str]:
    from . import backends

    return {op: backend for op in OPS if backends.why_not(op, backend) is None}


def provider_unavailable(provider: str, device: str, dtype: DtypeLike = "fp32",
                         mode: str = "inference") -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` in ``dtype`` and ``mode`` (None when it can)."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}; expected one of {PROVIDERS}"
    if provider in _ENGINE_MODULES:
        if not device.startswith("cpu"):
            return f"{provider} is compared on the CPU only"
        if mode != "inference":
            return f"{provider} runs inference only"
        if _dtype_name(dtype) not in _ENGINE_PRECISION[provider]:
            return f"{provider} is compared in {', '.join(_ENGINE_PRECISION[provider])} only"
        import importlib.util

        if importlib.util.find_spec(_ENGINE_MODULES[provider]) is None:
            return f"{provider} is not installed: {COMPARE_EXTRA}"
        return None
    if provider.startswith("convnext_fast:"):
        from . import backends

        backend = provider.split(":")[1]
        if not _backend_ops(backend):
            return f"backend {backend}: {backends.why_not('dwconv_ln', backend)}"
        return backends.why_not("dwconv_ln", backend, probe_inputs("dwconv_ln", device, _dtype(dtype)))
    return None


def _engine_runner(provider: str, ref: torch.nn.Module, x: torch.Tensor,
                   precision: str) -> Callable[[], torch.Tensor]:
    """One inference of ``ref`` exported to OpenVINO or ONNX Runtime, fp32 weights (OpenVINO
    lowering to ``precision``), on x as a user of that engine would feed it: a contiguous NCHW
    fp32 array, made once. Returns the logits as a tensor."""
    import copy

    import numpy as np

    model = copy.deepcopy(ref).float().eval()
    x32 = x.float().contiguous()
    feed = np.ascontiguousarray(x32.numpy())
    threads = torch.get_num_threads()
    if provider == "openvino":
        import openvino as ov

        with torch.no_grad():
            exported = ov.convert_model(model, example_input=x32)
        compiled = ov.Core().compile_model(exported, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        return lambda: torch.from_numpy(request.infer({0: feed})[0].copy())
    import onnxruntime as ort

    with torch.no_grad():  # torch.export's exporter (onnxscript): the TorchScript one is deprecated
        program = torch.onnx.export(model, (x32,), input_names=["x"], output_names=["logits"],
                                    dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's pool spins after each run by default, starving the provider timed next in the round.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda: torch.from_numpy(session.run(None, {"x": feed})[0])


def make_runner(provider: str, ref: torch.nn.Module, x: torch.Tensor, mode: str = "inference",
                compile_mode: Optional[str] = None, dtype: DtypeLike = "fp32") -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one inference or training step of ``provider``.

    ref: the timm model (used as it is by "timm" and "timm_compile" for inference; every other
    case works on a copy, so a training step never changes ``ref``), on x's device and dtype.
    dtype: the model dtype name; an autocast name ("amp_bf16") runs the step under torch.autocast.
    A training step is forward, backward of the mean logit and an AdamW step. Returns the logits
    (computed before the optimizer step).
    """
    import copy

    from . import backends, from_timm, patch_timm

    if provider in _ENGINE_MODULES:
        return _engine_runner(provider, ref, x, _ENGINE_PRECISION[provider][_dtype_name(dtype)])
    training = mode == "train"
    if provider in ("timm", "timm_compile"):
        model = copy.deepcopy(ref) if training else ref
    elif provider == "timm_patched":
        model = copy.deepcopy(ref)
        patch_timm(model)
    else:
        # The layout make_reference gives timm: channels_last 4-D weights spare the stem and
        # downsample convs a weight reorder per call (the trunk is NHWC).
        model = from_timm(ref).to(memory_format=torch.channels_last)
    model.train(training)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if training else None
    if provider in ("timm_compile", "convnext_fast_compile"):
        model = torch.compile(model, mode=compile_mode or ("max-autotune" if x.is_cuda else None))
    mapping = _backend_ops(provider.split(":")[1]) if ":" in provider else None
    amp = autocast_dtype(dtype)

    def step() -> torch.Tensor:
        ctx = backends.use_backend(mapping) if mapping else contextlib.nullcontext()
        with ctx, torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            if not training:
                with torch.inference_mode():
                    return model(x)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            out.float().mean().backward()
            opt.step()
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
    x = model_input(batch, resolution, device, dtype)
    ref.eval()
    amp = autocast_dtype(dtype)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        base = ref(x)
    runners: Dict[str, Tuple[Callable[[], torch.Tensor], float]] = {}
    for name in providers:
        why = provider_unavailable(name, device, dtype, mode)
        if why:
            say(f"{name}: skipped ({why})")
            continue
        say(f"{model} {dtype} {mode} batch {batch}: {name} (warm-up{' + compile' if 'compile' in name else ''})")
        fn = make_runner(name, ref, x, mode, compile_mode, dtype)
        err = logits_error(fn(), base)
        time_callable(fn, device, warmup, 0)
        runners[name] = (fn, err)
    # Timed in rounds, one call per provider each: drift in the machine's speed (a shared CPU,
    # GPU clocks) then falls on every provider alike, not on whichever happened to run last. Each
    # round starts one provider further on, so none always runs right after the same other one
    # (whose threads may still be spinning, or whose data fills the cache).
    timings = {name: Timing() for name in runners}
    names = list(runners)
    for i in range(iters):
        say(f"{model} {dtype} {mode} batch {batch}: timing round {i + 1}/{iters}")
        for name in names[i % len(names):] + names[:i % len(names)]:
            timings[name] += time_callable(runners[name][0], device, 0, 1)
    results: Dict[str, ModelResult] = {}
    for name, (_, err) in runners.items():
        t = timings[name]
        ms = t.median_ms
        results[name] = ModelResult(name, model, dtype, batch, resolution, ms, batch / (ms / 1e3), mode,
                                    err, peak_mem_mb=t.peak_mem_mb, samples_ms=t.samples_ms, iqr_ms=t.iqr_ms)
    eager = results.get("timm")
    comp = results.get("timm_compile")
    for r in results.values():
        r.speedup_vs_eager = eager.ms / r.ms if eager else None
        r.speedup_vs_compile = comp.ms / r.ms if comp else None
    return list(results.values())


def write_json(path: str, device: str, results: Sequence[ModelResult] = (), extra: Optional[dict] = None) -> None:
    """The environment, the model results and ``extra`` (op rows, ceilings) as one JSON record."""
    record = {"environment": environment(device), "results": [asdict(r) for r in results]}
    if extra:
        record.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
