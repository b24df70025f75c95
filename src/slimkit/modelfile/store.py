"""A model's stored tensors: model directories (safetensors + digest), ``.slim`` files, bare weights files.

Everything read here is untrusted: sizes are bounded before allocation, a model directory's
weights are checked against the SHA-256 recorded when they were saved (safetensors itself has
no checksum, so a flipped byte would otherwise load as a changed weight), and pickled files are
read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..codec import encode_state
from ..codec.container import SUFFIX as SLIM_SUFFIX
from ..codec.container import open_container, reencode, write_container
from ..errors import SlimkitError
from ..io import atomic_dir
from ..limits import echo_text
from .schema import DIGEST_PREFIX, FORMAT_NAME, FORMAT_VERSION, META_FILE, WEIGHTS_FILE, parse_meta, validate_meta


@dataclass
class StoredModel:
    """A model file opened for reading: its validated metadata and the shapes of its stored tensors, known
    before the tensors themselves are read (``read``), so they can be checked against the architecture."""

    meta: dict[str, Any]
    stream_shapes: dict[str, tuple[int, ...]]
    read: Callable[[], dict[str, torch.Tensor]]


def open_stored(path: Path, verify: bool) -> StoredModel:
    """A model directory or a ``.slim`` file."""
    if path.is_file():
        container = open_container(path)
        meta = validate_meta(container.meta, f"{path} (header)")
        return StoredModel(meta, container.stream_shapes(), container.tensors)
    meta = read_meta(path)
    tensors = _read_weights(path, meta, verify)
    return StoredModel(meta, {k: tuple(v.shape) for k, v in tensors.items()}, lambda: tensors)


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise SlimkitError(f"{model_dir}: not a slimkit model directory (no {META_FILE})")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SlimkitError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_meta(text, str(path))


def weights_digest(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def _read_weights(model_dir: Path, meta: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    """The directory's safetensors, checked against its recorded digest (directories from before digests were
    recorded have none, and load unchecked)."""
    path = model_dir / WEIGHTS_FILE
    data = _read_bytes(path)
    recorded = meta.get("files", {}).get(WEIGHTS_FILE)
    if verify and recorded is not None and weights_digest(data) != recorded:
        raise SlimkitError(
            f"{path} is damaged: its SHA-256 differs from the one recorded in {META_FILE} when it was saved "
            "(a corrupted or changed file). If you edited it on purpose, load it with verify=False "
            "(CLI: slimkit --no-verify ...) and save it again to record the new digest")
    return _parse_safetensors(data, path)


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise SlimkitError(f"{path}: file not found")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SlimkitError(f"{path}: cannot read ({exc.strerror})") from None


def _parse_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = dict(sorted(load(data).items()))  # in name order, as load_file gives (load's order varies by run)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise SlimkitError(f"{path}: not a readable safetensors file ({echo_text(str(exc))})") from None
    check_finite(state, str(path))
    return state


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A bare safetensors file (no digest to check), with truncation and corruption as clear errors."""
    path = Path(path)
    return _parse_safetensors(_read_bytes(path), path)


def read_pickled_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth`` state dict without ever executing code from it."""
    import pickle

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as exc:
        raise SlimkitError(
            f"{path}: refused: not a plain tensor state dict loadable with weights_only=True "
            f"({unpickle_reason(exc)}). Save weights with safetensors or model.state_dict()."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise SlimkitError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    check_finite(obj, str(path))
    return obj


def unpickle_reason(exc: Exception) -> str:
    """The informative line of torch's long weights-only error (e.g. 'Unsupported global: ...')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("Unsupported") or "Unsupported global" in line]
    if reasons:
        return echo_text(reasons[0].removeprefix("WeightsUnpickler error:").strip())
    return echo_text((lines or [type(exc).__name__])[0])


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise SlimkitError(f"{source}: tensor '{name}' has {bad} NaN/Inf values")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with key, shape and dtype mismatches named for people.

    Floating-point weights of another precision are cast (an fp16 file for an fp32 model); an integer
    tensor where the architecture has a float one, or the other way round, is an error, not a cast.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short_list(unexpected)}")
        raise SlimkitError(f"{source}: weights do not match the architecture: {'; '.join(parts)}")
    for name, tensor in state.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise SlimkitError(f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                               f"the architecture expects {tuple(want.shape)}")
        if tensor.dtype != want.dtype and not (tensor.is_floating_point() and want.is_floating_point()):
            raise SlimkitError(f"{source}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, "
                               f"the architecture expects {str(want.dtype).removeprefix('torch.')}")
    model.load_state_dict(state, strict=True)


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(echo_text(n, 80) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, de-aliased copies on the CPU (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, out: str | os.PathLike, meta: dict[str, Any],
               int8_scales: dict[str, tuple[torch.Tensor, int | None]] | None = None,
               derived: set[str] = frozenset(), companions: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` and its metadata as a model directory (or a ``.slim`` file), atomically, each tensor
    in its smallest lossless encoding; the ``derived`` tensors, which loading rebuilds, are left out.
    ``companions`` (relative path -> bytes: a text model's tokenizer) go into the directory beside them."""
    state = {k: v for k, v in state_dict_for_saving(model).items() if k not in derived}
    check_finite(state, f"model being saved to {out}")
    tensors, encodings = encode_state(state, int8_scales)
    full_meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta, "tensors": encodings}
    if Path(out).suffix == SLIM_SUFFIX:
        write_container(out, *reencode(full_meta, tensors, str(out)))
    else:
        write_model_dir(out, full_meta, tensors, companions)
    return Path(out)


def write_model_dir(out_dir: str | os.PathLike, full_meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    companions: dict[str, bytes] | None = None) -> None:
    """A model directory (safetensors + slimkit.json with the weights' digest, and any companion files) holding
    already-encoded tensors, written atomically."""
    from safetensors.torch import save

    data = save(tensors)
    meta = {**{k: v for k, v in full_meta.items() if k != "files"}, "files": {WEIGHTS_FILE: weights_digest(data)}}
    with atomic_dir(out_dir) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(data)
        # compact: a pruning plan lists channel indices, and every byte of the model counts
        (tmp / META_FILE).write_text(json.dumps(meta, separators=(",", ":")) + "\n", encoding="utf-8")
        for name, data in (companions or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
