"""The fused MLP kernels' default tiles compiled for real GPUs without one: triton's own compiler
and bundled ptxas build them for sm_90 in a child process (the interpreter must be off there),
and the result must fit - shared memory within the per-block limit and within the arithmetic
of kernels.gemm.fused_smem_bytes, no register spills, warpgroup MMAs.

Opt-in (CONVNEXT_FAST_OFFLINE_COMPILE=1): each compile takes a few seconds of CPU.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

if os.environ.get("CONVNEXT_FAST_OFFLINE_COMPILE", "0") != "1":
    pytest.skip("offline sm_90 compiles: set CONVNEXT_FAST_OFFLINE_COMPILE=1",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Compiles one kernel per line of argv: kind, C, dtype, arch, grn. Prints one JSON line each.
_CHILD = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from convnext_fast.kernels import gemm, mlp

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
KERNELS = {
    "fwd": (mlp._mlp_fwd_kernel, ("Y", "W1", "B1", "W2", "B2", "GAMMA", "RES", "OUT")),
    "bwd_dx": (mlp._mlp_bwd_dx_kernel, ("Y", "G", "W1", "B1", "W2", "GAMMA", "DY")),
    "bwd_dw": (mlp._mlp_bwd_dw_kernel, ("Y", "G", "W1", "B1", "W2", "GAMMA")),
}
FP32_PTRS = ("SCALE", "SHIFT", "COEF", "DW1P", "GP", "DB1P")
for line in sys.argv[1:]:
    kind, C, dt, arch, grn = line.split(",")
    C, arch, grn = int(C), int(arch), grn == "1"
    isz = 2 if dt == "bf16" else 4
    c0, c1 = gemm.split_channels(C)
    cfg = gemm.fused_configs(arch, {"KIND": kind, "BLOCK_C0": c0, "BLOCK_C1": c1,
                                    "ITEMSIZE": isz, "GRN": grn})[0]
    fn, typed = KERNELS[kind]
    const = dict(HAS_B1=True, HAS_GAMMA=not grn, GRN=grn, UPCAST=False,
                 PRECISION="tf32x3" if isz == 4 else "ieee", BLOCK_C0=c0, BLOCK_C1=c1, **cfg.kwargs)
    if kind == "fwd":
        const.update(HAS_B2=True, HAS_RES=True)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        # what a launch on PyTorch tensors specializes: 16-byte aligned pointers, C, D, strides
        sig[name] = f"*{dt}" if name in typed else ("*fp32" if name in FP32_PTRS else "i32")
        if sig[name].startswith("*") or name.startswith("stride") or name in ("C", "D"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", arch * 10, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                           text=True).stdout
    os.unlink(f.name)
    print(json.dumps(dict(
        case=line, shared=k.metadata.shared, limit=gemm.SMEM_LIMIT[arch],
        formula=gemm.fused_smem_bytes(kind, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_H"],
                                      cfg.num_stages, c0, c1, isz, grn),
        regs=int(re.search(r"REG:(\d+)", usage).group(1)),
        spill=int(re.search(r"STACK:(\d+)", usage).group(1)),
        wgmma="wgmma.mma_async" in k.asm["ptx"])), flush=True)
'''

CASES = [f"{kind},{C},bf16,9,0" for kind in ("fwd", "bwd_dx", "bwd_dw") for C in (96, 192)]
CASES += ["fwd,96,bf16,9,1", "bwd_dx,96,bf16,9,1", "bwd_dw,96,bf16,9,1", "fwd,96,fp32,9,0"]


def test_default_tiles_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _CHILD, *CASES], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == CASES
    for r in rows:
        assert r["shared"] <= r["limit"] and r["shared"] <= r["formula"], r
        assert r["spill"] == 0 and r["wgmma"], r
