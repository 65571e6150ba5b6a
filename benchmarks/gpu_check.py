"""`make gpu-check`: one prepared run on a lent GPU that validates, sanitizes, times and records.

A GPU is lent now and then for 15 minutes in all, 10 per command, so this run fits in 9 minutes
(``--budget``): each step has its own time budget and runs in a child process killed at its
limit; a step that no longer fits says so in one line and is skipped. Everything is written as
it goes, so a run cut short still returns what it did:

    $OUT/gpu_check.log                 every step's output
    $OUT/<device>_<commit>.json        the record (format below), rewritten after every step
    $OUT/backend_order.json            the shipped order file with this GPU's measured entries
                                       merged in (copy it to convnext_fast/backends/ and commit)

and, at the end of a GPU run, the record is copied to ``benchmarks/results/`` (commit it).

Steps, in order: device and versions; build in place (parallel, for this GPU's arch only); the
GPU checks that matter (every op x backend x dtype, forward and backward, at the four ConvNeXt-T
stage shapes against the reference; model parity against timm for convnext_tiny and
convnextv2_tiny; the compile, CUDA-graph and determinism tests); compute-sanitizer memcheck and
racecheck over every kernel at one small shape; the ceilings (copy bandwidth, bf16 matmul rate,
fp32 matmul without TF32, which runs on the FMA units); the op table; the model table.

``--dry-run`` (``make gpu-check GPU_CHECK_DRY=1``) runs the same steps on this CPU at tiny shapes
in under 2 minutes (the build and the sanitizer are reported as skipped): CI tests the plumbing.

Record format (``"format": 1``)::

    {"format": 1,
     "header": {"device", "capability", "driver", "torch", "triton", "cuda", "timm", "commit",
                "date", "dry_run", "ceilings": {"copy_GBps", "bf16_matmul_TFLOPs",
                "fp32_fma_TFLOPs"}, "steps": {step: "ok" | "failed (...)" | "skipped (...)"}},
     "rows": [
       {"kind": "op", "op": "dwconv_ln" | "mlp" | "mlp_grn", "pass": "fwd" | "fwd_bwd",
        "dtype": "bf16" | "fp16" | "fp32", "N", "C", "H", "W",
        "provider": "cuda" | "triton" | "torch" | "torch_compile" | "cpu", "ms", "roofline_ms"},
       {"kind": "model", "model", "dtype", "batch", "mode": "infer" | "train",
        "provider": "timm_eager" | "timm_compile" | "convnext_fast" | "convnext_fast_compile",
        "img_s", "peak_mem_mb", "max_err_vs_timm"},
       {"kind": "parity", "op" | "model", "provider", "dtype", "shape", "max_err", "ok"}]}

``roofline_ms`` is the larger of bytes / copy bandwidth and FLOPs / the compute ceiling that binds
the op: the fp32 FMA rate for dwconv_ln (a depthwise conv never reaches the tensor cores), the
matmul rate of the op's dtype for the MLPs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package in place, before (and without) an install
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FORMAT = 1

# (step, seconds it may take on an H200, seconds in a dry run): the GPU budgets sum to 540.
STEPS = (("environment", 20, 20), ("build", 150, 5), ("checks", 120, 40), ("sanitizer", 60, 15),
         ("ceilings", 15, 15), ("ops", 60, 30), ("models", 115, 30))


# ---------------------------------------------------------------------------------------------
# The record


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a reader (or a kill) never sees half a record


def _note(path: str, step: str, text: str) -> None:
    """A line about how ``step`` ran (what it left out), kept in the header's ``notes``."""
    print(text)
    notes = _read(path)["header"].get("notes", {})
    _update(path, header={"notes": {**notes, step: text}})


def _update(path: str, header: Optional[dict] = None, rows: Optional[List[dict]] = None) -> None:
    record = _read(path)
    record["header"].update(header or {})
    record["rows"].extend(rows or [])
    _write(path, record)


# ---------------------------------------------------------------------------------------------
# Steps (each runs in its own process: ``gpu_check.py --step NAME --record PATH``)


def _device(dry: bool) -> str:
    import torch

    return "cpu" if dry or not torch.cuda.is_available() else "cuda"


def step_environment(record: str, dry: bool) -> None:
    import torch

    from convnext_fast import bench

    env = bench.environment(_device(dry))
    header = {k: env.get(k) for k in ("torch", "triton", "timm", "cuda", "capability", "commit")}
    header["device"] = bench.device_name(env)
    header["driver"] = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        header["driver"] = out.stdout.strip() or None
    print(json.dumps(header, indent=1))
    print("cuda available:", torch.cuda.is_available())
    subprocess.run([sys.executable, "-m", "convnext_fast", "info"], check=False, timeout=60)
    _update(record, header=header)


def step_build(record: str, dry: bool) -> None:
    if dry:
        _note(record, "build", "dry run: not rebuilt (CI builds the extension before the tests)")
        return
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 4),
           "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}  # this GPU only: half the nvcc work
    # In place (the steps import the package from ROOT): no pip, no network, no build isolation.
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], check=True, env=env,
                   cwd=ROOT)


def _stage_cases(dry: bool):
    from convnext_fast import bench

    # batch 2 at the real stage shapes on a GPU; the interpreter and the CPU take tiny ones
    return [(1, 8, 5)] if dry else [(2, C, H) for C, H, _ in bench.STAGES]


def step_checks(record: str, dry: bool) -> None:
    """Parity of every op x backend x dtype, forward and backward, at the stage shapes (bf16
    first: what the model runs in); model parity against timm; then the compile / CUDA-graph /
    determinism tests. Rows are recorded as they come: a step stopped at its limit keeps them."""
    from convnext_fast import backends, bench
    from convnext_fast.specs import FORWARD_OPS, SPECS

    device = _device(dry)
    failed = []

    def record_rows(rows):
        _update(record, rows=rows)
        for r in rows:
            print("parity", "ok  " if r["ok"] else "FAIL", r.get("op", r.get("model")), r["provider"],
                  r["dtype"], r["shape"], f"{r['max_err']:.2e}", flush=True)
            if not r["ok"]:
                failed.append(f"{r.get('op', r.get('model'))} {r['provider']} {r['dtype']} {r['shape']}")

    for dtype in ("bf16", "fp32", "fp16"):
        for op in FORWARD_OPS:
            for provider in backends.registered(op):
                rows = []
                for N, C, H in _stage_cases(dry):
                    args = bench.op_inputs(op, device, dtype, N, C, H, requires_grad=True)
                    if backends.why_not(op, provider, args) is None:
                        err, ok = _op_parity(op, provider, args, SPECS[op].reference)
                        rows.append({"kind": "parity", "op": op, "provider": provider, "dtype": dtype,
                                     "shape": [N, C, H, H], "max_err": err, "ok": ok})
                record_rows(rows)
    res_px = 32 if dry else 224
    for model in ("convnext_atto", "convnextv2_atto") if dry else ("convnext_tiny", "convnextv2_tiny"):
        for dtype in ("fp32", "bf16"):
            res = bench.bench_model(model, device, dtype, batch=2, resolution=res_px, warmup=0, iters=1,
                                    providers=("timm", "convnext_fast"))
            err = next(r for r in res if r.provider == "convnext_fast").max_err_vs_timm
            record_rows([{"kind": "parity", "model": model, "provider": "convnext_fast", "dtype": dtype,
                          "shape": [2, 3, res_px, res_px], "max_err": err,
                          "ok": err <= (1e-4 if dtype == "fp32" else 3e-2)}])
    tests = (["tests/test_determinism.py::test_rerun_gives_the_same_bits"] if dry else
             ["tests/test_determinism.py", "tests/models/test_compile.py"])
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT).returncode
    if code not in (0, 5):  # 5: nothing selected
        failed.append(f"pytest exit {code}")
    if failed:
        raise SystemExit("checks failed: " + "; ".join(failed))


def _op_parity(op, provider, args, reference) -> tuple:
    """(max error relative to the output's scale, within the rule?) of forward and input
    gradients against the reference in fp64 (fp32 rule 1e-4; bf16/fp16: 2x PyTorch's own error in
    that dtype plus a rounding step)."""
    import torch

    from convnext_fast import ops

    out = getattr(ops, op)(**args, backend=provider)
    grad = torch.randn_like(out)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
    got = [out, *torch.autograd.grad(out, leaves, grad, allow_unused=True)]

    def ref_in(dt):
        a = {n: v.detach().to(dt).requires_grad_() if isinstance(v, torch.Tensor) else v
             for n, v in args.items()}
        o = reference(**a)
        ls = [v for v in a.values() if isinstance(v, torch.Tensor)]
        return [o.detach(), *torch.autograd.grad(o, ls, grad.to(dt), allow_unused=True)]

    want = ref_in(torch.float64)
    low = ref_in(out.dtype) if out.dtype != torch.float32 else None
    worst, ok = 0.0, True
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            continue
        scale = w.abs().max().item() or 1.0
        err = (g.double() - w).abs().max().item() / scale
        worst = max(worst, err)
        if low is None:
            ok &= err <= 1e-4
        else:
            base = (low[i].double() - w).abs().max().item() / scale
            ok &= err <= 2 * base + 2 * torch.finfo(out.dtype).eps
    return worst, bool(ok)


def step_kernels(record: str, dry: bool) -> None:
    """Every backend's kernels once, forward and backward, at one small shape (what the
    sanitizer watches)."""
    import torch

    from convnext_fast import backends, bench
    from convnext_fast.specs import FORWARD_OPS

    device = _device(dry)
    for op in FORWARD_OPS:
        for provider in backends.registered(op):
            if provider == "torch":
                continue
            for dtype in ("bf16", "fp32"):
                args = bench.op_inputs(op, device, dtype, 2, 40, 9, requires_grad=True)
                if backends.why_not(op, provider, args) is None:
                    bench.op_step(op, provider, args, "fwd+bwd")()
                    print("ran", op, provider, dtype)
    if device == "cuda":
        torch.cuda.synchronize()


def step_sanitizer(record: str, dry: bool, deadline: float) -> None:
    tool = shutil.which("compute-sanitizer")
    if dry or tool is None:
        why = "dry run" if dry else "compute-sanitizer not found"
        _note(record, "sanitizer", f"{why}: the kernels ran once without the sanitizer")
        step_kernels(record, dry)
        return
    failed = []
    for check in ("memcheck", "racecheck"):
        left = deadline - time.time()
        if left < 10:
            print(f"SKIP sanitizer {check}: {left:.0f} s left")
            continue
        cmd = [tool, "--tool", check, "--error-exitcode", "1", "--target-processes", "all",
               sys.executable, os.path.abspath(__file__), "--step", "kernels", "--record", record]
        try:
            code = subprocess.run(cmd, cwd=ROOT, timeout=left / (2 if check == "memcheck" else 1)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"sanitizer {check}: {'clean' if code == 0 else code}")
        if code != 0:
            failed.append(f"{check}: {code}")
    if failed:
        raise SystemExit("sanitizer: " + "; ".join(failed))


def step_ceilings(record: str, dry: bool) -> None:
    from convnext_fast import bench

    device = _device(dry)
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmul on the FMA units: their ceiling
    try:
        bf16 = bench.measure_ceilings(device, "bf16", iters=3 if dry else 10)
        fp32 = bench.measure_ceilings(device, "fp32", iters=3 if dry else 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ceilings = {"copy_GBps": bf16["copy_GBps"], "bf16_matmul_TFLOPs": bf16["matmul_TFLOPs"],
                "fp32_fma_TFLOPs": fp32["matmul_TFLOPs"], "method": bf16["method"]}
    print(json.dumps(ceilings, indent=1))
    _update(record, header={"ceilings": ceilings})


def _roofline_ms(op: str, dtype: str, flops: float, nbytes: float, ceilings: dict) -> Optional[float]:
    if not ceilings:
        return None
    fma = op == "dwconv_ln" or dtype == "fp32"
    rate = ceilings["fp32_fma_TFLOPs"] if fma else ceilings["bf16_matmul_TFLOPs"]
    return max(nbytes / (ceilings["copy_GBps"] * 1e9), flops / (rate * 1e12)) * 1e3


def step_ops(record: str, dry: bool, deadline: float) -> None:
    """Every backend at the stage shapes (bf16, batch 128), then torch.compile of the reference,
    forward only, for as many shapes as the deadline leaves time to compile."""
    from convnext_fast import bench

    device = _device(dry)
    ceilings = _read(record)["header"].get("ceilings", {})
    batch, stages = (1, ((8, 5, 1),)) if dry else (128, bench.STAGES)
    warmup, iters = (1, 2) if dry else (3, 10)
    rows = []
    for op in bench.OPS:  # recorded op by op: a step stopped at its limit keeps what it timed
        got = bench.bench_ops(device, "bf16", batch, stages=stages, ops_=(op,), warmup=warmup,
                              iters=iters, progress=print)
        rows += got
        _update(record, rows=[_op_row(r, ceilings) for r in got])
    # The measured order, merged into a copy of the shipped order file next to the record: the
    # next session commits it (only $OUT comes back from the GPU machine).
    from convnext_fast.backends import order

    order_file = os.path.join(os.path.dirname(record), "backend_order.json")
    shutil.copyfile(order.PATH, order_file)
    header = _read(record)["header"]
    source = f"benchmarks/results/{_slug(str(header.get('device', '')))}_{header.get('commit')}.json"
    entries = bench.write_backend_order(rows, bench.environment(device), source, path=order_file,
                                        stages=stages)
    _note(record, "ops", f"{len(entries)} backend order entries merged into {order_file}")
    for op in bench.OPS:
        for C, H, _ in stages:
            if deadline - time.time() < 20:
                _note(record, "ops", "torch_compile rows cut short by the step's deadline")
                return
            args = bench.op_inputs(op, device, "bf16", batch, C, H)
            t = bench.time_callable(bench.op_step(op, "torch_compile", args), device, warmup, iters)
            flops, nbytes = bench.op_cost(op, batch, C, H, H, 2)
            row = {"op": op, "backend": "torch_compile", "mode": "fwd", "dtype": "bf16",
                   "shape": [batch, C, H, H], "ms": t.median_ms, "flops": flops, "bytes": nbytes}
            _update(record, rows=[_op_row(row, ceilings)])


def _op_row(r: dict, ceilings: dict) -> dict:
    """A row of :func:`convnext_fast.bench.bench_ops` in the record's op-row format."""
    N, C, H, W = r["shape"]
    return {"kind": "op", "op": r["op"], "pass": "fwd" if r["mode"] == "fwd" else "fwd_bwd",
            "dtype": r["dtype"], "N": N, "C": C, "H": H, "W": W, "provider": r["backend"], "ms": r["ms"],
            "roofline_ms": _roofline_ms(r["op"], r["dtype"], r["flops"], r["bytes"], ceilings)}


def step_models(record: str, dry: bool, deadline: float) -> None:
    """The model table: every case eager first (timm and convnext_fast: seconds each), then the
    compiled providers (a minute of compiling each) case by case in order of importance, each only
    while it fits the deadline."""
    from convnext_fast import bench

    device = _device(dry)
    names = {"timm": "timm_eager", "convnext_fast": "convnext_fast", "timm_compile": "timm_compile",
             "convnext_fast_compile": "convnext_fast_compile"}
    if dry:
        cases = [("convnext_atto", 1, "inference"), ("convnextv2_atto", 1, "train")]
        phases = [("timm", "convnext_fast")]
        _note(record, "models", "dry run: the compiled providers left out (compiling a model takes a "
                                "minute on a CPU)")
    else:
        cases = [(m, b, mode) for m in ("convnext_tiny", "convnextv2_tiny") for b in (256, 64, 1)
                 for mode in ("inference", "train")]
        phases = [("timm", "convnext_fast"), ("timm_compile", "convnext_fast_compile")]
    for providers in phases:
        last = 0.0
        for model, batch, mode in cases:
            left = deadline - time.time()
            if left < 1.5 * last + 5:
                _note(record, f"models {'+'.join(providers)}",
                      f"skipped from {model} batch {batch} {mode} on: {left:.0f} s left, "
                      f"a case takes ~{last:.0f} s")
                break
            t0 = time.time()
            res = bench.bench_model(model, device, "bf16", batch, resolution=32 if dry else 224,
                                    warmup=1 if dry else 3, iters=2 if dry else 10, providers=providers,
                                    compile_mode="default", mode=mode,  # max-autotune: many minutes
                                    progress=print)
            rows = [{"kind": "model", "model": model, "dtype": "bf16", "batch": batch,
                     "mode": "infer" if mode == "inference" else "train", "provider": names[r.provider],
                     "img_s": r.img_per_s, "peak_mem_mb": r.peak_mem_mb,
                     "max_err_vs_timm": r.max_err_vs_timm} for r in res]
            _update(record, rows=rows)
            for r in rows:
                print(f"{model} b{batch} {mode} {r['provider']}: {r['img_s']:.1f} img/s", flush=True)
            last = time.time() - t0


STEP_FNS: Dict[str, Callable] = {
    "environment": step_environment, "build": step_build, "checks": step_checks,
    "sanitizer": step_sanitizer, "ceilings": step_ceilings, "ops": step_ops, "models": step_models,
    "kernels": step_kernels,
}
_WITH_DEADLINE = ("sanitizer", "ops", "models")


# ---------------------------------------------------------------------------------------------
# The run


def _slug(device: str) -> str:
    """A file-name word for the device: "NVIDIA H200" -> "h200", a CPU run -> "cpu"."""
    words = [w for w in device.lower().replace("-", " ").split() if w not in ("nvidia", "tesla")]
    return (words[0] if words and not device.lower().endswith("cpu") and "thread" not in device
            else "cpu").replace("/", "_")


def run(out_dir: str, budget: float, dry: bool) -> int:
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    deadline = start + budget
    record = os.path.join(out_dir, "gpu_check.json")
    _write(record, {"format": FORMAT, "header": {"date": datetime.datetime.now(datetime.timezone.utc)
                                                  .isoformat(timespec="seconds"), "dry_run": dry,
                                                  "steps": {}}, "rows": []})
    log = open(os.path.join(out_dir, "gpu_check.log"), "a", buffering=1)

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")

    status = 0
    for name, gpu_s, dry_s in STEPS:
        need = dry_s if dry else gpu_s
        left = deadline - time.time()
        if left < min(need, 30):
            result = f"skipped (needs ~{need} s, {left:.0f} s left of the {budget:.0f} s budget)"
            say(f"== SKIP {name}: {result}")
            _update(record, header={"steps": {**_read(record)["header"]["steps"], name: result}})
            continue
        # A dry run shares a CPU with whatever else runs (CI): only the whole budget binds it.
        limit = left if dry or name in _WITH_DEADLINE else min(need, left)
        say(f"== {name} (budget {need} s, {left:.0f} s left, {time.strftime('%H:%M:%S')})")
        cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--record", record,
               "--deadline", str(time.time() + limit)] + (["--dry-run"] if dry else [])
        env = dict(os.environ)
        if name in ("checks", "sanitizer"):  # correctness: one config, not minutes of autotuning
            env["CONVNEXT_FAST_TRITON_AUTOTUNE"] = "0"
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                                  env=env)
            result = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}, see gpu_check.log)"
        except subprocess.TimeoutExpired:
            result = f"stopped at its limit of {limit:.0f} s (what it recorded before stays)"
        status |= result != "ok"
        say(f"   {name}: {result} in {time.time() - t0:.0f} s")
        steps = _read(record)["header"]["steps"]
        _update(record, header={"steps": {**steps, name: result}})
    header = _read(record)["header"]
    name = f"{_slug(str(header.get('device', 'cpu')))}_{header.get('commit', 'unknown')}.json"
    final = os.path.join(out_dir, name)
    shutil.copyfile(record, final)
    if not dry and os.path.abspath(out_dir) != os.path.abspath(RESULTS):
        shutil.copy(final, RESULTS)
    say(f"== done in {time.time() - start:.0f} s, status {status}: {final}")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(RESULTS, "gpu_check"),
                        help="where the log and the record go (default: $OUT, else "
                             "benchmarks/results/gpu_check)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 540; dry run: twice the sum of its "
                             "step budgets, ~90 s of work)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on this CPU at tiny shapes")
    parser.add_argument("--step", choices=sorted(STEP_FNS), help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        fn = STEP_FNS[args.step]
        if args.step in _WITH_DEADLINE:
            fn(args.record, args.dry_run, args.deadline or time.time() + 60)
        else:
            fn(args.record, args.dry_run)
        return 0
    budget = args.budget or (2 * sum(dry for *_, dry in STEPS) if args.dry_run else 540.0)
    return run(args.out, budget, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
