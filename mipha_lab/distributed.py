"""The process group of a run: torchrun / SLURM environment -> ranks, device, collectives."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank, world size, local rank and device, with the collectives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def _free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(process_group: bool = False) -> Distributed:
    """torchrun / SLURM environment -> process group (gloo on the CPU, NCCL on GPUs) via DeepSpeed.
    `process_group` makes one for a single process too (DeepSpeed needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if process_group and "WORLD_SIZE" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or process_group) and not torch.distributed.is_initialized():
        import deepspeed  # optional and heavy: only for several processes

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return Distributed(rank, world, local, device)


def gather_objects(dist: Distributed, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if dist.world_size == 1:
        return [value]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, value)
    return out


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module, zero3: bool, modifier_rank: int | None = None) -> Iterator[None]:
    """Under ZeRO-3 each rank holds a shard of every parameter: inside this block every rank sees them whole
    (changes made by `modifier_rank` are scattered back on exit). Without ZeRO-3 it does nothing."""
    if not zero3:
        yield
        return
    import deepspeed  # optional and heavy: only under ZeRO-3

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank):
        yield
