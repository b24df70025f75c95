"""Whether slimkit may write an output path, and one writer per output.

The rule, for every command that writes (and the Python ``save``, ``pack``, ``unpack``, exports):

* an output that is an input, contains an input, or lies inside an input (or inside any model
  directory) is refused; an input is what is read: a model directory (a run folder's ``model/``),
  a ``.slim`` file, a data file or folder, a recipe;
* an existing path is replaced only if slimkit wrote it, as the same kind of artifact (a model
  directory, a ``.slim`` file, an ONNX file, a sensitivity folder), or is an empty folder;
  anything else needs ``overwrite``, and a directory is never replaced by a file;
* an existing run folder (``train``, ``run`` and the commands built on it) needs ``resume``
  (continue it) or ``overwrite`` (start over), so forgetting ``--resume`` never discards a run.

``claim_output`` checks the rule and holds a lock file beside the output (the holder's host, pid
and start time) while the command writes: a second writer is refused, a dead writer's lock replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import SlimkitError
from .io import TEMP_TAG, host_tag, named_path, os_errors, pid_alive, write_json_atomic

OUTPUT_MARKER = ".slimkit-output"  # in folders slimkit creates that are not model directories
MODEL_META = "slimkit.json"  # a model directory's own marker
RUN_KINDS = ("train", "recipe")
DIR_KINDS = ("model", "sensitivity", "huggingface", *RUN_KINDS)
KIND_NAMES = {"model": "model directory", "slim": ".slim file", "onnx": "ONNX file", "sensitivity": "sensitivity folder",
              "huggingface": "Hugging Face directory", "train": "training run", "recipe": "recipe run",
              "tflite": "LiteRT file", "executorch": "ExecuTorch program", "openvino": "OpenVINO model",
              "html": "HTML report"}
# what an earlier run leaves in its folder; --overwrite clears these (of any run kind) before a new run starts
RUN_LAYOUT = {"train": ("model", "checkpoint", "metrics.json"),
              "recipe": ("baseline", "stages", "model", "report.json", "report.html", "model.onnx", "model.slim",
                         "model-openvino.xml", "model-openvino.bin", "model-openvino-int8.xml",
                         "model-openvino-int8.bin", "model-executorch.pte", "model-executorch-int8.pte",
                         "model-tflite.tflite", "model-tflite-fp16.tflite", "model-tflite-int8.tflite")}
ONNX_PRODUCER = "slimkit"  # slimkit's ONNX files name it as their producer


def output_kind(path: Path) -> str | None:
    """What slimkit artifact ``path`` holds: a kind of ``KIND_NAMES``, "empty" (an empty folder), or None
    (something slimkit did not write). Run folders of earlier versions, which had no marker, are recognised
    by their layout."""
    if path.is_dir():
        if (path / MODEL_META).is_file():
            return "model"
        marker = path / OUTPUT_MARKER
        if marker.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
                return kind if kind in KIND_NAMES else None
            return None
        if (path / "checkpoint" / "last.pt").is_file() or (
                (path / "metrics.json").is_file() and (path / "model" / MODEL_META).is_file()):
            return "train"
        if (path / "stages").is_dir() or (path / "report.json").is_file():
            return "recipe"
        with contextlib.suppress(OSError):
            if not any(path.iterdir()):
                return "empty"
        return None
    if path.is_file():
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(4)
            if head == b"SLIM":
                return "slim"
        if path.suffix == ".onnx" and _slimkit_onnx(path):
            return "onnx"
    return None


def _slimkit_onnx(path: Path) -> bool:
    try:
        import onnx

        return onnx.load_model(str(path), load_external_data=False).producer_name == ONNX_PRODUCER
    except Exception:  # noqa: BLE001 - any file onnx cannot parse is not one slimkit wrote
        return False


def check_disjoint(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is an input, contains one, or lies inside one (or inside a model directory)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if target == source:
            raise SlimkitError(f"the output {out} is the input {given}; slimkit never writes over its inputs")
        if target in source.parents:
            raise SlimkitError(f"the output {out} contains the input {given}; slimkit never replaces its inputs")
        if source in target.parents:
            raise SlimkitError(f"the output {out} lies inside the input {given}; slimkit never changes its inputs")
    for parent in target.parents:
        if (parent / MODEL_META).is_file():
            raise SlimkitError(f"the output {out} lies inside the model directory {parent}; write beside it instead")


def check_output(path: Path, kind: str, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                 resume: bool = False) -> None:
    """Raise unless slimkit may write a ``kind`` artifact at ``path`` (the rule is in the module docstring)."""
    check_disjoint(path, inputs)
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise SlimkitError(f"cannot write {path}: {blocking} is a file, not a folder")
    if not path.exists() and not path.is_symlink():
        return
    existing = output_kind(path)
    is_dir = kind in DIR_KINDS
    if path.is_dir() and not is_dir:  # never replaced by a file, even with overwrite
        raise SlimkitError(f"{path} is a directory; a {KIND_NAMES[kind]} is written as a file: name the file")
    if existing == "empty" or (existing == kind and kind not in RUN_KINDS):
        return
    if existing == kind:
        if resume or overwrite:
            return
        raise SlimkitError(f"{path} holds an earlier slimkit {KIND_NAMES[kind]}: pass --resume to continue it, "
                           "or --overwrite to start over (its results are then deleted)")
    if overwrite:
        return
    what = f"a slimkit {KIND_NAMES[existing]}" if existing else "files slimkit did not write"
    raise SlimkitError(f"{path} already exists and holds {what}; slimkit replaces only an earlier "
                       f"{KIND_NAMES[kind]} of its own: choose another path, or pass --overwrite (overwrite=True) to "
                       "replace it")


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                 overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Check that ``path`` may receive a ``kind`` artifact, and lock it for this process while the block runs.

    A folder kind (a run or a sensitivity folder) is created with slimkit's marker; with ``overwrite`` and
    without ``resume`` an earlier run's results are removed first.
    """
    path = Path(path)
    check_output(path, kind, inputs, overwrite, resume)
    with output_lock(path):
        if kind not in RUN_KINDS + ("sensitivity",):
            yield path
            return
        created = not path.exists()
        _prepare_folder(path, kind, clear=overwrite and not resume)
        try:
            yield path
        except BaseException:
            if created and [p.name for p in path.iterdir()] == [OUTPUT_MARKER]:  # failed before writing anything
                shutil.rmtree(path, ignore_errors=True)
            raise


@contextlib.contextmanager
def claim_run(path: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike | None] = (),
              overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """``claim_output`` for a run every ``torchrun`` rank takes part in: rank 0 checks and holds the lock,
    and every rank gets its verdict (the other ranks write into private folders)."""
    from .train.distributed import from_main, is_main

    inputs = list(inputs)
    from_main(lambda: check_output(Path(path), kind, inputs, overwrite, resume))
    if not is_main():
        yield Path(path)
        return
    with claim_output(path, kind, inputs=inputs, overwrite=overwrite, resume=resume) as claimed:
        yield claimed


def _prepare_folder(path: Path, kind: str, clear: bool) -> None:
    with os_errors(path):
        if clear and output_kind(path) == "model":  # another slimkit artifact, replaced whole on --overwrite
            shutil.rmtree(path)
        elif clear and path.is_dir():
            for name in sorted({name for layout in RUN_LAYOUT.values() for name in layout}):
                entry = path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()
        elif path.exists() and not path.is_dir():  # a file in the way, replaced on --overwrite
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        marker = path / OUTPUT_MARKER
        if not marker.is_file() or output_kind(path) != kind:
            from . import __version__

            write_json_atomic(marker, {"kind": kind, "slimkit": __version__})


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell a live lock holder from a reused pid."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    return None


STALE_UNREADABLE_LOCK_S = 10.0  # a lock file still empty after this long was left by a crash


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.slimkit-lock`` beside ``path``: a second writer is refused, a dead writer's lock replaced.

    Re-entrant within a process (a command that claims a run folder, then saves into it).
    """
    path = named_path(path)
    lock = path.parent / f".{path.name}.{TEMP_TAG}-lock"
    me = {"pid": os.getpid(), "host": host_tag(), "start": _process_start(os.getpid()), "time": time.time()}
    with os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and holder["host"] == me["host"] and holder["pid"] == me["pid"]:
                yield  # this process holds it already
                return
            if holder is not None and _holder_alive(holder, me["host"]):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
                raise SlimkitError(f"{path} is being written by another slimkit process (pid {holder['pid']} on "
                                   f"{holder['host']}, since {since}); wait for it to finish, or delete {lock} if "
                                   "that process is gone") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its writer died
            continue
        except OSError as exc:
            raise SlimkitError(f"cannot write {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise SlimkitError(f"{path}: cannot take the lock {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file; None for a lock left unreadable by a crash (a live one is kept)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
            return holder
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime < STALE_UNREADABLE_LOCK_S:
            return {"pid": -1, "host": "(being written)", "time": lock.stat().st_mtime}
    return None


def _holder_alive(holder: dict[str, Any], host: str) -> bool:
    if holder["host"] != host:
        return True  # another machine's process: nothing here can tell it is gone
    if holder["pid"] < 0:
        return True
    if not pid_alive(holder["pid"]):
        return False
    start = holder.get("start")
    return start is None or _process_start(holder["pid"]) in (None, start)
