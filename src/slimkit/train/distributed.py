"""Data-parallel training under ``torchrun``: process group, rank-sliced batches, rank-0 side effects.

Every process draws the same sequence of global batches (the loader's generator is
seeded identically on all ranks, and augmentation is drawn once per global batch) and
trains on its share of each; DistributedDataParallel
averages the gradients, so with equal slices a step equals one single-process step on the
whole global batch.

Every rank runs every step of a command (the compression steps between trainings too), so
the collectives inside training line up. Only rank 0's files are kept: the other ranks write
into a private folder that is deleted at the end (``rank_folder``), and what a run reads back
from its own folder (checkpoints, finished stages) is read by rank 0 and sent to the others
(``from_main``), so nodes need no shared file system for the run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl with CUDA); False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():  # one GPU per process; nccl's collectives run on the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
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


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over all ranks (the values themselves when alone)."""
    if world()[1] == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


T = TypeVar("T")


def from_main(produce: Callable[[], T]) -> T:
    """``produce()`` run on rank 0 and its result (pickled) sent to every rank; just ``produce()`` when alone.

    An exception on rank 0 is raised on every rank, so no rank waits for a result that never comes.
    """
    rank, size = world()
    if size == 1:
        return produce()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = (True, produce())
        except Exception as exc:  # re-raised below, on every rank
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def mirror_from_main(folder: Path, names: tuple[str, ...] | None = None) -> bool:
    """Give this rank rank 0's copy of a folder of the run (``names``: only those entries of it).

    Each rank passes its own path of the folder; rank 0 reads its files and the others write them
    there. Returns whether rank 0 has the folder. Alone, only checks that it exists.
    """
    if world()[1] == 1:
        return folder.is_dir()
    files = from_main(lambda: _read_tree(folder, names))
    if files is None:
        return False
    if not is_main():
        for relative, data in files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return True


def _read_tree(folder: Path, names: tuple[str, ...] | None) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    roots = [folder / name for name in names] if names is not None else [folder]
    files = [f for root in roots for f in ([root] if root.is_file() else sorted(root.rglob("*"))) if f.is_file()]
    return {str(f.relative_to(folder)): f.read_bytes() for f in files}


def check_same_model(model: torch.nn.Module, where: str) -> None:
    """Raise if the ranks' copies of ``model`` differ (they take compression decisions independently)."""
    if world()[1] == 1:
        return
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests: list = [None] * world()[1]
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        from ..errors import SlimkitError

        raise SlimkitError(f"data-parallel ranks disagree on the model after {where}: run every rank with the same "
                           "software, data and thread count (OMP_NUM_THREADS)")


@contextlib.contextmanager
def rank_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Where this process writes a run: ``out`` on rank 0; elsewhere a private folder, deleted afterwards."""
    rank = world()[0]
    if rank == 0:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix=f"slimkit-rank{rank}-") as tmp:
        yield Path(tmp)


def rank_share(count: int, rank: int, size: int) -> slice:
    """This rank's contiguous share of ``count`` items: shares differ by at most one, the first ones larger."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))
