"""This process's place in a ``torchrun`` job (rank, world size, device) and the collectives stage 2
uses; a plain run is rank 0 of 1, and every collective is then a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vq3d_nerfstudio.errors import Vq3dError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
        return values


def init_distributed(device: str) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on
    CPUs); a plain run is rank 0 of 1. ``device``: ``--device`` (auto, cpu, cuda)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise Vq3dError("--device cuda but no GPU is visible; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1:
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        return Dist(torch.distributed.get_rank(), world_size, local_rank, dev)
    return Dist(0, 1, 0, dev)
