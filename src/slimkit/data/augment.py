"""Training-time augmentation for small images: random shifts of up to ``max_shift`` pixels.

Randomness comes from torch's global generator, which the training loop forks,
seeds and checkpoints, so augmented runs stay deterministic and resumable. Under
data-parallel training the shifts of each global batch are drawn once, by rank 0
exactly as one process would draw them, and every rank applies that same draw to
its share (``datasets.make_loader``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def stack_batch(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def draw_shifts(n: int, max_shift: int = 1) -> torch.Tensor:
    """``[2, n]`` offsets (rows, then columns) in ``[0, 2 * max_shift]``, from the global generator."""
    dy = torch.randint(0, 2 * max_shift + 1, (n,))
    dx = torch.randint(0, 2 * max_shift + 1, (n,))
    return torch.stack([dy, dx])


def random_shift(x: torch.Tensor, max_shift: int = 1, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Shift each image by an independent offset in [-max_shift, max_shift], replicating the border.

    ``shifts`` (from :func:`draw_shifts`) are drawn here when not given."""
    if max_shift <= 0 or x.dim() != 4:
        return x
    n, _, h, w = x.shape
    dy, dx = draw_shifts(n, max_shift) if shifts is None else shifts
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n x w
    batch = torch.arange(n)[:, None, None]
    # gather per-sample windows: result n x c x h x w
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def shift_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = stack_batch(batch)
    return random_shift(x), y
