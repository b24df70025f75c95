"""Safe file writing: every artifact is written whole or not at all.

Each file or directory is written under a temporary sibling name that carries the writing
process's host and pid, then renamed into place, so a crash never leaves a half-written
artifact, and the leftovers of a killed writer are recognised and removed by the next write to
the same path. File-system failures (full disk, read-only file system, no permission) become a
``SlimkitError`` naming the path and the cause, with nothing partial left behind. Whether a path
may be written at all is ``outputs``'s decision.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from .errors import SlimkitError

TEMP_TAG = "slimkit"


@contextlib.contextmanager
def os_errors(target: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` into a ``SlimkitError`` that names ``target`` and the cause."""
    try:
        yield
    except OSError as exc:
        cause = exc.strerror or str(exc)
        hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (disk quota exceeded)"}.get(exc.errno, "")
        raise SlimkitError(f"cannot write {target}: {cause}{hint}; nothing was written there") from None


def host_tag() -> str:
    return "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:32] or "host"


def named_path(path: str | os.PathLike) -> Path:
    """``path`` with a last component to name siblings after (``.`` or ``runs/x/..`` resolved)."""
    path = Path(path)
    return path if path.name and path.name != ".." else path.resolve()


def _temp_path(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}.{TEMP_TAG}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Remove what killed writers of ``target`` on this host left beside it (their pid is gone).

    A replaced directory is moved aside before the new one is renamed in; if the writer died in
    between, the old one is put back rather than removed.
    """
    prefix = f".{target.name}.{TEMP_TAG}-{host_tag()}-"
    try:
        leftovers = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in leftovers:
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if path.name.endswith("-old") and not target.exists():
                os.replace(path, target)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (changing it races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Give ``path`` (and everything under it) the permissions a plain ``open``/``mkdir`` would have."""
    mask = _umask()
    if path.is_dir():
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _file_target(target: str | os.PathLike) -> Path:
    """``target`` checked to name a file (not a directory), its folder created, a killed writer's leftovers gone."""
    target = named_path(target)
    with os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            raise SlimkitError(f"{target} is a directory; expected a file name")
        remove_stale_temps(target)
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` when the block succeeds."""
    target = _file_target(target)
    tmp = _temp_path(target, ".tmp")
    try:
        with os_errors(target):
            yield tmp
            _follow_umask(tmp)
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_files(target: str | os.PathLike, side_suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a path with ``target``'s name in a fresh temporary directory beside it, for a file that comes with
    side files of the same stem (OpenVINO's ``NAME.bin``); when the block succeeds the side files written there
    replace theirs first, then the file replaces ``target``."""
    target = _file_target(target)
    tmp = _temp_path(target)
    with os_errors(target):
        tmp.mkdir()
    try:
        with os_errors(target):
            yield tmp / target.name
            _follow_umask(tmp)
            for suffix in side_suffixes:
                side = tmp / target.with_suffix(suffix).name
                if side.exists():
                    os.replace(side, target.with_suffix(suffix))
            os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block succeeds it replaces ``target`` whole."""
    target = named_path(target)
    tmp = _temp_path(target)
    with os_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp.mkdir()
    try:
        with os_errors(target):
            yield tmp
            _follow_umask(tmp)
            if target.exists() or target.is_symlink():
                old = _temp_path(target, "-old")
                os.replace(target, old)
                os.replace(tmp, target)
                (shutil.rmtree if old.is_dir() and not old.is_symlink() else os.unlink)(old)
            else:
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def dir_bytes(path: str | os.PathLike) -> int:
    """Real bytes on disk of every regular file under ``path`` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** exp:.1f} {['B', 'KiB', 'MiB', 'GiB'][exp]}"
