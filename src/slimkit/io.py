"""Safe, atomic file writing and model-directory I/O.

A model directory holds ``model.safetensors`` (weights, never pickled) and
``slimkit.json`` (how to rebuild the module, plus the compression plan that
later stages add). Everything is written to a temporary sibling and renamed,
so a crash never leaves a half-written artifact and an input is never touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import SlimkitError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "slimkit.json"
FORMAT_NAME = "slimkit-model"
FORMAT_VERSION = 2  # 2: integer codes may be stored at sparse positions (1 is read too)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dir_bytes(path: str | os.PathLike) -> int:
    """Real bytes on disk of every regular file under ``path`` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise SlimkitError(f"{source}: tensor '{name}' has {bad} NaN/Inf values")


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, de-aliased copies on the CPU (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, out_dir: str | os.PathLike, meta: dict[str, Any],
               int8_scales: dict[str, tuple[torch.Tensor, int | None]] | None = None,
               derived: set[str] = frozenset()) -> Path:
    """Write ``model`` and its metadata as a model directory (or a ``.slim`` file), atomically, each tensor
    in its smallest lossless encoding; the ``derived`` tensors, which loading rebuilds, are left out."""
    from .codec import encode_state

    state = {k: v for k, v in state_dict_for_saving(model).items() if k not in derived}
    check_finite(state, f"model being saved to {out_dir}")
    tensors, encodings = encode_state(state, int8_scales)
    full_meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta, "tensors": encodings}
    from .codec.container import SUFFIX as SLIM_SUFFIX

    if Path(out_dir).suffix == SLIM_SUFFIX:
        from .codec.container import reencode, write_container

        write_container(out_dir, *reencode(full_meta, tensors, str(out_dir)))
    else:
        write_model_dir(out_dir, full_meta, tensors)
    return Path(out_dir)


def write_model_dir(out_dir: str | os.PathLike, full_meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A model directory (safetensors + slimkit.json) holding already-encoded tensors, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        # compact: a pruning plan lists channel indices, and every byte of the model counts
        (tmp / META_FILE).write_text(json.dumps(full_meta, separators=(",", ":")) + "\n", encoding="utf-8")


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise SlimkitError(f"{model_dir}: not a slimkit model directory (no {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlimkitError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise SlimkitError(f"{path}: expected a JSON object with \"format\": \"{FORMAT_NAME}\"")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise SlimkitError(
            f"{path}: format version {meta['version']} is newer than this slimkit reads ({FORMAT_VERSION})"
        )
    return meta


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning truncation and corruption into a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"{path}: file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SlimkitError(f"{path}: not a readable safetensors file ({exc})") from None
    check_finite(state, str(path))
    return state


def read_pickled_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth`` state dict without ever executing code from it."""
    import pickle

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise SlimkitError(
            f"{path}: refused: not a plain tensor state dict loadable with weights_only=True "
            f"({_unpickle_reason(exc)}). Save weights with safetensors or model.state_dict()."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SlimkitError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    check_finite(obj, str(path))
    return obj


def _unpickle_reason(exc: Exception) -> str:
    """The informative line of torch's long weights-only error (e.g. 'Unsupported global: ...')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("Unsupported") or "Unsupported global" in line]
    return reasons[0].removeprefix("WeightsUnpickler error:").strip() if reasons else (lines or [type(exc).__name__])[0]


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with shape and key mismatches named for people."""
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
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SlimkitError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"the architecture expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** exp:.1f} {['B', 'KiB', 'MiB', 'GiB'][exp]}"
