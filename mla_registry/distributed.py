"""Running under ``torchrun`` / ``accelerate launch``: the process group, which share of the work is this rank's,
and gathering results so that rank 0 alone writes them.

Nothing here is home-made distribution: the launchers set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
``torch.distributed`` does the communication (gloo on CPU, NCCL on GPUs). Without a launcher every function is a
no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the initialised process group or the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str = "cpu") -> tuple[World, str]:
    """Join the launcher's process group (gloo for CPU, NCCL for CUDA) when ``WORLD_SIZE > 1``; returns the
    world and the device this rank should use (``cuda:LOCAL_RANK`` with several GPUs)."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        w = world()
    if device == "cuda" and w.size > 1:
        device = f"cuda:{w.local_rank}"
    return w, device


def my_share(n: int) -> list[int]:
    """Indices ``0..n-1`` this rank handles: round-robin, so every index is handled by exactly one rank."""
    w = world()
    return list(range(w.rank, n, w.size))


def gather(obj: T) -> list[T]:
    """``obj`` from every rank, in rank order (a one-item list in a single process)."""
    w = world()
    if w.size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and world().size > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world().size == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (unchanged in a single process)."""
    if world().size > 1 and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
