"""Process-group set-up for torchrun (one process per device) and the few collectives the
trainer and ``discon cache`` use. Single-process runs never touch torch.distributed."""
from __future__ import annotations

import os
from typing import Any

import torch


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (WORLD_SIZE>1):
    NCCL on CUDA, gloo on CPU. Multi-node rendezvous is torchrun's."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    from .runtime import resolve_device
    dev = resolve_device(device, what="device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _all_reduce_max(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
