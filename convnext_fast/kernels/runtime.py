"""How the Triton kernels here are launched: interpreter or GPU, autotuned or not, with which tiles.

Every kernel module and the ``triton`` backend ask this module, so that "is the interpreter on?"
and "do we autotune?" have one answer per process.

Autotuning: on a GPU every tunable kernel is wrapped in ``triton.autotune`` (keyed on the
channel counts) with a config list for the device's architecture (sm_90+ or sm_80-class);
``CONVNEXT_FAST_TRITON_AUTOTUNE=0`` uses the first config of the list instead. Under
``TRITON_INTERPRET=1`` nothing is autotuned: each kernel runs with one heuristic config whose
tiles are fitted to the problem (:func:`fit_block`), because the interpreter pays for padded
work and per program/loop step, not for real FLOPs.

Interpreter caveats (CPU tests only): its ``tl.dot`` multiplies bf16 tensors as raw uint16, so
bf16 operands are upcast to fp32 there (:func:`dot_upcast`, exact), and it converts fp32 -> bf16
by truncation instead of round-to-nearest-even (the compiled kernels round to nearest).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRET", "interpreter_problem", "autotune_enabled", "next_pow2", "fit_block",
           "dot_precision", "dot_upcast", "TunedKernel"]


@triton.jit
def _probe():
    pass


# Whether @triton.jit hands out interpreted functions in this process: triton decides that from
# TRITON_INTERPRET when a kernel is decorated, so asking it is exact where parsing the variable
# ourselves could disagree with triton's own reading of it.
INTERPRET: bool = not isinstance(_probe, JITFunction)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def interpreter_problem() -> Optional[str]:
    """For CPU tensors: None when the Triton interpreter really runs the kernels, else why not.

    TRITON_INTERPRET=1 must be set before triton is first imported (timm and torch._dynamo
    import it), or triton's own library functions stay compiled-only and every launch fails.
    The variable is read again on each call, so a caller that clears it sees the refusal.
    """
    if not _interpret_requested():
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton runs on CUDA)"
    if isinstance(tl.zeros, JITFunction):
        return ("TRITON_INTERPRET=1 was set after triton had been imported; the interpreter only "
                "takes effect when it is set before the first import of triton")
    if not INTERPRET:
        return ("TRITON_INTERPRET=1 was set after convnext_fast.kernels had been imported; its "
                "kernels were compiled for CUDA")
    return None


def autotune_enabled() -> bool:
    """``CONVNEXT_FAST_TRITON_AUTOTUNE=0`` launches each kernel with the first config of its list
    instead of benchmarking them all on first use (faster start-up, e.g. for test runs). The
    interpreter has nothing to measure, so it never autotunes."""
    if INTERPRET:
        return False
    flag = os.environ.get("CONVNEXT_FAST_TRITON_AUTOTUNE", "1")
    return flag.strip().lower() not in ("0", "false", "no")


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def fit_block(n: int, candidates: Sequence[int] = (128, 64, 32, 16), slack: float = 1.25) -> int:
    """The largest candidate tile whose padded extent is within ``slack`` x the least padded one.

    Used for the interpreter's single config: there padded work costs as much as real work (its
    dot is a plain numpy loop), but every extra program / loop step costs fixed overhead too.
    """
    padded = {b: triton.cdiv(max(n, 1), b) * b for b in candidates}
    best = min(padded.values())
    return max(b for b in candidates if padded[b] <= slack * best)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` for ``tl.dot`` with fp32 operands: "tf32" where the user allowed TF32
    for CUDA matmuls, else "tf32x3" (tensor cores, three TF32 MMAs: about fp32 accuracy, within
    the fp32 parity rule). The interpreter computes every dot in fp32 whatever the value.

    Only fp32 operands are affected; for fp16/bf16 operands the value is ignored by Triton.
    """
    if dtype != torch.float32:
        return "ieee"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Feed bf16 MMA operands to ``tl.dot`` as fp32 (exact: products of bf16 values are exact in
    fp32, accumulation is fp32 either way). Only under the interpreter, whose dot multiplies
    bf16 tensors as their raw uint16 storage."""
    return dtype == torch.bfloat16 and INTERPRET


def _arch(device: torch.device) -> int:
    """Major compute capability (0 under the interpreter / on CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_capability(device)[0]


class TunedKernel:
    """A ``@triton.jit`` kernel plus how to pick its tile sizes.

    ``configs(arch, static)`` returns the autotune candidates for a GPU of major capability
    ``arch`` (9 -> the sm_90 list, else the sm_80 list), given the launch's static constexprs
    (e.g. the padded channel count, used to drop configs whose accumulator cannot fit).
    ``heuristic(static)`` returns the single config dict used under the interpreter.
    ``get(device, static)`` returns ``(kernel, meta)``: ``meta`` holds the tile constexprs the
    launcher must pass itself (empty when the autotuner picks them).
    """

    def __init__(self, fn, configs: Callable[[int, dict], List["triton.Config"]], key: Sequence[str],
                 heuristic: Callable[[dict], dict]):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.heuristic = heuristic
        self._tuned: Dict[Tuple, object] = {}

    def get(self, device: torch.device, static: Optional[dict] = None, **hints):
        """``hints`` (problem sizes) feed only the interpreter heuristic, never the GPU cache key."""
        static = dict(static or {})
        if INTERPRET or device.type != "cuda":
            return self.fn, self.heuristic({**static, **hints})
        arch = _arch(device)
        if not autotune_enabled():  # first (default) config of the architecture's list
            cfg = self.configs(arch, static)[0]
            return self.fn, {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        cache_key = (arch, tuple(sorted(static.items())))
        kernel = self._tuned.get(cache_key)
        if kernel is None:
            kernel = triton.autotune(configs=self.configs(arch, static), key=self.key)(self.fn)
            self._tuned[cache_key] = kernel
        return kernel, {}
