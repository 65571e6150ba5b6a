"""One rank of tests/test_distributed.py (a module of its own: spawned processes import it by name).

Trains convnext_atto (32x32, automatic backends: dwconv_ln on the C++ CPU kernel) for two SGD
steps under DDP and FSDP2, each with and without gradient checkpointing, on this rank's half of a
fixed global batch, and has rank 0 save the full (unsharded) gradients of both steps and the final
parameters per configuration, or the error, to ``out_dir/<config>.pt``.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

CONFIGS = ("ddp", "ddp_ckpt", "fsdp2", "fsdp2_ckpt")
GLOBAL_BATCH, STEPS, LR = 8, 2, 0.5


def make_model():
    """The same initial weights in every process; layer scale 1, so the blocks matter."""
    import convnext_fast

    torch.manual_seed(0)
    return convnext_fast.convnext_atto(num_classes=10, ls_init_value=1.0)


def batches():
    """STEPS global batches of (images [GLOBAL_BATCH, 3, 32, 32], labels [GLOBAL_BATCH])."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
             torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def train(model, params, shard, full_grad):
    """STEPS SGD steps on this process's ``shard`` of each batch; the full gradients per step."""
    opt = torch.optim.SGD(params, lr=LR)
    grads = []
    for x, y in batches():
        x, y = x[shard], y[shard]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads.append([full_grad(p.grad) for p in params])
        opt.step()
    return grads


def _wrap(kind, model, world):
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), model, lambda t: t.detach().clone()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for stage in model.stages:
        fully_shard(stage, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model, lambda t: t.full_tensor().detach().clone()


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from convnext_fast import backends

    per = GLOBAL_BATCH // world
    shard = slice(rank * per, (rank + 1) * per)
    try:
        for config in CONFIGS:
            result = {}
            try:
                model = make_model()
                model.set_grad_checkpointing(config.endswith("_ckpt"))
                wrapped, inner, full = _wrap(config.split("_")[0], model, world)
                params = list(inner.parameters())
                grads = train(wrapped, params, shard, full)
                result = {"grads": grads, "params": [full(p) for p in params],
                          "names": [n for n, _ in inner.named_parameters()],
                          "selections": backends.last_selections()}
            except Exception:  # noqa: BLE001 - reported per configuration by the test
                result = {"error": traceback.format_exc()}
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{config}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
