"""Training-time augmentation for small images: random shifts of up to ``max_shift`` pixels.

Randomness comes from torch's global generator, which the training loop forks,
seeds and checkpoints, so augmented runs stay deterministic and resumable.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_shift(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by an independent offset in [-max_shift, max_shift], replicating the border."""
    if max_shift <= 0 or x.dim() != 4:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,))
    dx = torch.randint(0, 2 * max_shift + 1, (n,))
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n x w
    batch = torch.arange(n)[:, None, None]
    # gather per-sample windows: result n x c x h x w
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def shift_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    return random_shift(x), y
