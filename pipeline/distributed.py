"""Training on several processes with DistributedDataParallel, when `torchrun` starts `cxr train`.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE in each process's environment; without them
(or with one process) every helper here does nothing, so a plain `cxr train` is a single ordinary process.
The process group uses gloo on the CPU and NCCL on CUDA (one GPU per process: cuda:LOCAL_RANK).

Rank 0 is the one that talks to MLflow and writes files; the others send and receive Python objects
through these helpers, so every rank takes the same decisions (early stopping, resume) as rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands among torchrun's processes; a process on its own is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0  # its index on this machine: which GPU it uses
    size: int = 1
    local_size: int = 1  # processes on this machine: they share its CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = World()


def torchrun_world() -> World:
    """This process's place in the job torchrun started; ONE_PROCESS when not started by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ONE_PROCESS
    return World(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        size=size,
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


def rank_device(device, world: World):  # -> torch.device
    """Each process on a machine drives its own GPU (cuda:LOCAL_RANK); processes on the CPU share it."""
    import torch

    if device.type == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device


@contextmanager
def process_group(world: World, device) -> Iterator[None]:
    """Join torchrun's process group for the duration of the block: NCCL for CUDA, gloo for the CPU."""
    if world.size == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)  # NCCL and the object collectives use the current device
    # MASTER_ADDR and MASTER_PORT come from torchrun's environment (the env:// rendezvous). The others wait in a
    # collective while rank 0 validates and writes alone: allow that half an hour, NCCL's default being 10 minutes.
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=world.rank, world_size=world.size,
                            timeout=timedelta(minutes=30), device_id=device if on_gpu else None)
    try:
        yield
        dist.barrier()  # no rank leaves while rank 0 still writes its outputs
    finally:
        dist.destroy_process_group()


def wrap_model(model, device, world: World):  # -> torch.nn.Module
    """What the training steps call: the model itself in one process, its DistributedDataParallel wrapper under torchrun.

    On CUDA batch norm is made synchronous (statistics over the whole global batch, as in one process).
    PyTorch's SyncBatchNorm works on GPUs only, so on the CPU each rank normalises with its own share of the batch.
    On CUDA `model` itself changes (its batch-norm layers become SyncBatchNorm layers holding the same parameters):
    call this before building the optimiser.
    """
    if world.size == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    # static_graph: every step uses the same parameters, and some are never used at all (MONAI's ViT blocks
    # carry a cross-attention norm that plain self-attention skips); DDP learns that in the first step.
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index], static_graph=True)
    return DistributedDataParallel(model, static_graph=True)


def broadcast(value: T, world: World) -> T:
    """Rank 0's value, on every rank (any picklable object; the others pass a placeholder such as None)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any, world: World) -> list:
    """Every rank's value, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    import torch.distributed as dist

    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def sum_over_ranks(value: float, world: World) -> float:
    """The sum of every rank's value, added in rank order so every rank gets the same float."""
    if world.size == 1:
        return value
    return sum(all_gather(value, world))
