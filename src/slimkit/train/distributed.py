"""Data-parallel training under ``torchrun``: process group, rank-sliced batches, rank-0 side effects.

Every process draws the same sequence of global batches (the loader's generator is
seeded identically on all ranks) and trains on its slice of each; DistributedDataParallel
averages the gradients, so with equal slices a step equals one single-process step on the
whole global batch. Only rank 0 writes checkpoints, models, metrics and progress.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl with CUDA); False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


class RankSlices:
    """This rank's share of every global batch (contiguous slices, sizes differing by at most one)."""

    def __init__(self, batches: BatchSampler, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield np.array_split(np.asarray(batch), self.size)[self.rank].tolist()

    def __len__(self) -> int:
        return len(self.batches)
