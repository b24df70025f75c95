"""Every ``--data`` spec ends up here as a :class:`Splits` of in-memory tensors.

Data the built-in models use is small, so keeping it in memory is both the
fastest and the most reproducible choice: batches come from a seeded
generator, never from worker processes.
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import SlimkitError
from ..inputs import Inputs, concat
from ..limits import MAX_CLASSES, echo_text
from .augment import draw_shifts, random_shift, shift_collate, stack_batch

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Splits:
    """Train/val/test tensors of one dataset; ``x`` is ``N x C x H x W`` float32, ``y`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_val.max(), self.y_test.max())) + 1

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {which!r}")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")


def make_loader(
    splits: Splits, which: str, batch_size: int = 64, shuffle: bool = False, seed: int = 0, augment: bool = False
) -> DataLoader:
    """A loader over one split; shuffling uses its own seeded generator (no global RNG).

    ``augment`` applies random one-pixel shifts (for image training sets). Under data-parallel training
    a shuffled loader yields this rank's share of each global batch (see ``global_batch_share``).
    """
    from ..train.distributed import world

    x, y = splits.split(which)
    # Always a private generator: DataLoader draws a seed from it on every iteration, and without one it
    # would draw from the global RNG, so merely evaluating would change later dropout and augmentation.
    generator = torch.Generator().manual_seed(seed)
    dataset, collate = TensorDataset(x, y), shift_collate if augment else None
    rank, size = world()
    if shuffle and size > 1:  # every rank draws the same global batches (same generator) and keeps its share
        collate = functools.partial(global_batch_share, augment=augment, rank=rank, size=size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


def global_batch_share(batch: list[tuple[torch.Tensor, torch.Tensor]], augment: bool, rank: int,
                       size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch. Its augmentation is drawn once for the whole batch, by rank 0 as
    one process would draw it, and sent to every rank, so the ranks together train on exactly the batch a
    single process would."""
    from ..train.distributed import from_main, rank_share

    x, y = stack_batch(batch)
    if augment and x.dim() == 4:
        x = random_shift(x, shifts=from_main(lambda: draw_shifts(len(x))))
    share = rank_share(len(x), rank, size)
    return x[share], y[share]


def calibration_subset(splits: Splits, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` training inputs chosen with a seeded permutation, for calibrating observers."""
    if n <= 0:
        raise ValueError(f"calibration size must be positive, got {n}")
    x = splits.x_train
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: min(n, len(x))]
    return x[idx]


def first_samples(inputs: Iterable[Inputs], limit: int) -> Inputs:
    """The first ``limit`` samples of an iterable of input batches, as one batch (packed text batches cut to
    different lengths padded to the longest)."""
    from ..models.text import concat_text_batches

    taken, count = [], 0
    for x in inputs:
        taken.append(x[: limit - count])
        count += len(taken[-1])
        if count >= limit:
            break
    if not taken:
        raise SlimkitError("the data holds no batches")
    packed_text = all(isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == 3 and not x.is_floating_point()
                      for x in taken)
    return concat_text_batches(taken) if packed_text else concat(taken)


DATA_OPTIONS = re.compile(r"^(?P<source>.+?):(?P<options>[a-z]+=\w+(?:,[a-z]+=\w+)*)$")
MAX_IMAGE_SIZE = 1024


def load_data(spec: str | os.PathLike, seed: int = 0) -> Splits:
    """``digits``, a ``.npz`` file, or a folder of images with one sub-folder per class, optionally followed by
    ``:size=N,channels=C``: images resized to N x N (bilinear) and given C channels (1 or 3; grey replicated), so
    ImageNet-style architectures train on real labels offline (``digits:size=32,channels=3``)."""
    text = str(spec)
    source, size, channels = _data_options(text)
    if source == "digits":
        splits = _digits(seed)
    else:
        path = Path(source)
        if path.is_dir():
            splits = _image_folder(path, seed, size, channels)
        elif path.suffix == ".npz":
            if not path.is_file():
                raise SlimkitError(f"{path}: data file not found")
            splits = _npz(path, seed)
        else:
            raise SlimkitError(
                f"data {echo_text(text)}: expected 'digits', an existing .npz file or a folder of class sub-folders, "
                "optionally followed by :size=N,channels=C")
    return _reshape(splits, text, size, channels)


def _data_options(text: str) -> tuple[str, int | None, int | None]:
    match = DATA_OPTIONS.match(text)
    if match is None:
        return text, None, None
    options = dict(pair.split("=") for pair in match["options"].split(","))
    unknown = set(options) - {"size", "channels"}
    if unknown:
        raise SlimkitError(f"data {echo_text(text)}: unknown option {sorted(unknown)[0]!r}; options are size and "
                           "channels")
    size, channels = options.get("size"), options.get("channels")
    if size is not None and not (size.isdigit() and 4 <= int(size) <= MAX_IMAGE_SIZE):
        raise SlimkitError(f"data {echo_text(text)}: size must be a whole number of pixels, 4 to {MAX_IMAGE_SIZE}")
    if channels not in (None, "1", "3"):
        raise SlimkitError(f"data {echo_text(text)}: channels must be 1 or 3")
    return match["source"], int(size) if size else None, int(channels) if channels else None


def _reshape(splits: Splits, name: str, size: int | None, channels: int | None) -> Splits:
    """Images resized (bilinear) and channel-replicated as the data spec asks; the name is the full spec, so a
    model trained on it records how to load its data again."""
    def change(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise SlimkitError(f"data {name}: size and channels apply to images (N x C x H x W), not {tuple(x.shape)}")
        if size is not None and x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if channels is not None and x.shape[1] != channels:
            if x.shape[1] != 1:
                raise SlimkitError(f"data {name}: {x.shape[1]}-channel images cannot become {channels}-channel")
            x = x.expand(-1, channels, -1, -1)
        return x.contiguous()

    if size is None and channels is None:
        return splits
    return Splits(name, change(splits.x_train), splits.y_train, change(splits.x_val), splits.y_val,
                  change(splits.x_test), splits.y_test)


def _digits(seed: int) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    return _split_and_normalize("digits", x, digits.target.astype(np.int64), seed)


def _split_and_normalize(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> Splits:
    """Stratified 60/20/20 split, then standardize with the training split's statistics."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    if len(x) < 10 or (counts[counts > 0] < 3).any():
        raise SlimkitError(f"{name}: too few samples to split (need at least 3 per class)")
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=SPLIT_FRACTIONS[0], stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return _as_splits(name, (x_train, y_train, x_val, y_val, x_test, y_test), normalize=True)


def _as_splits(name: str, arrays: tuple[np.ndarray, ...], normalize: bool) -> Splits:
    x_train, y_train, x_val, y_val, x_test, y_test = arrays
    if normalize:
        mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
        x_train, x_val, x_test = ((a - mean) / std for a in (x_train, x_val, x_test))

    def tx(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def ty(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Splits(name, tx(x_train), ty(y_train), tx(x_val), ty(y_val), tx(x_test), ty(y_test))


NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def _npz(path: Path, seed: int) -> Splits:
    if not zipfile.is_zipfile(path):  # np.load would read a .npy or a pickle under an .npz name
        raise SlimkitError(f"{path}: not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as exc:
        raise SlimkitError(f"{path}: unreadable .npz ({echo_text(str(exc))}); object arrays are refused") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise SlimkitError(f"{path}: unreadable .npz ({echo_text(str(exc))})") from None
    keys = set(arrays)
    if keys >= set(NPZ_SPLIT_KEYS):
        splits = tuple(_image_array(arrays[k], path, k) if k.startswith("x") else _labels(arrays[k], path, k)
                       for k in NPZ_SPLIT_KEYS)
        for part in ("train", "val", "test"):
            if len(splits[NPZ_SPLIT_KEYS.index(f"x_{part}")]) != len(splits[NPZ_SPLIT_KEYS.index(f"y_{part}")]):
                raise SlimkitError(f"{path}: x_{part} and y_{part} have different lengths")
        for part in ("train", "val", "test"):
            if len(splits[NPZ_SPLIT_KEYS.index(f"x_{part}")]) == 0:
                raise SlimkitError(f"{path}: x_{part} is empty; every split needs samples")
        shapes = {s.shape[1:] for s in splits[0::2]}
        if len(shapes) != 1:
            raise SlimkitError(f"{path}: x_train, x_val and x_test have different sample shapes {sorted(shapes)}")
        return _as_splits(path.name, splits, normalize=False)
    if keys >= {"x", "y"}:
        x, y = _image_array(arrays["x"], path, "x"), _labels(arrays["y"], path, "y")
        if len(x) != len(y):
            raise SlimkitError(f"{path}: x has {len(x)} samples but y has {len(y)}")
        return _split_and_normalize(path.name, x, y, seed)
    present = [k for k in NPZ_SPLIT_KEYS if k in keys]
    missing = [k for k in NPZ_SPLIT_KEYS if k not in keys]
    if present:
        raise SlimkitError(f"{path}: missing {', '.join(missing)} (an .npz needs all of {', '.join(NPZ_SPLIT_KEYS)}, or x and y)")
    raise SlimkitError(f"{path}: expected arrays {', '.join(NPZ_SPLIT_KEYS)} or x and y, found {sorted(keys) or 'none'}")


def _image_array(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.number):
        raise SlimkitError(f"{path}: {key} must be numeric, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim == 2:
        a = a[:, None, None, :]
    if a.ndim != 4:
        raise SlimkitError(f"{path}: {key} must have shape N x C x H x W (or N x H x W, N x F), got {a.shape}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise SlimkitError(f"{path}: {key} contains NaN or Inf")
    return a


def _labels(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise SlimkitError(f"{path}: {key} must be a 1-D integer array of class labels, got {a.dtype} {a.shape}")
    if len(a) and a.min() < 0:
        raise SlimkitError(f"{path}: {key} has negative class labels")
    if len(a) and a.max() >= MAX_CLASSES:
        raise SlimkitError(f"{path}: {key} has class label {a.max()}; labels are 0 to {MAX_CLASSES - 1}")
    return a.astype(np.int64)


def _image_folder(root: Path, seed: int, size: int | None = None, channels: int | None = None) -> Splits:
    """One sub-folder per class, sorted by name; images are read as grey (or RGB with ``channels=3``) and
    resized to ``size`` x ``size`` when given, else they must all have one size."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise SlimkitError(f"{root}: an image folder needs at least two class sub-folders, found {len(classes)}")
    xs, ys, shape = [], [], None
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SlimkitError(f"{folder}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert("RGB" if channels == 3 else "L")
                    if size is not None:
                        img = img.resize((size, size), Image.Resampling.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, DecompressionBombError, OSError) as exc:
                raise SlimkitError(f"{file}: not a readable image ({echo_text(str(exc))})") from None
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise SlimkitError(f"{file}: image is {arr.shape[1]}x{arr.shape[0]}, the others are "
                                   f"{shape[1]}x{shape[0]} (or pass :size=N to resize them)")
            xs.append(arr)
            ys.append(label)
    images = np.stack(xs)
    images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]  # N x C x H x W
    return _split_and_normalize(root.name, images, np.asarray(ys, dtype=np.int64), seed)
