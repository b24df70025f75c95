"""Bounds on the work an untrusted input can ask for, in one place (the README lists them).

A model file, a recipe or a plan is data from outside; each size it declares is checked
against these bounds before anything is allocated or iterated, so a hostile or damaged file
is a named error instead of a hang or an out-of-memory kill. They are far above what the
models slimkit targets need (the largest tensor of BERT-large or ViT-H is about 2^25 elements).
"""

from __future__ import annotations

import os

MAX_TENSOR_ELEMENTS = 1 << 28  # one tensor of a model file (1 GiB as float32)
MAX_MODEL_ELEMENTS = 1 << 31  # all tensors a model file declares, and a built-in model's parameters
MAX_TENSOR_DIMS = 8
MAX_INPUT_ELEMENTS = 1 << 24  # one sample of a recorded input shape (a 4096 x 4096 RGB image)
MAX_CLASSES = 1 << 20  # class labels of a dataset
MAX_RECIPE_BYTES = 1 << 20  # a recipe file
MAX_META_BYTES = 64 << 20  # a model's slimkit.json (a pruning plan lists every kept channel)
MAX_YAML_NODES = 100_000  # a recipe's values after expanding its YAML aliases
MAX_ECHO_CHARS = 120  # a value quoted back in an error message


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int, what: str = "--threads") -> int:
    """A thread count between 1 and the cores available: more only oversubscribes and can stall for minutes."""
    from .errors import SlimkitError

    cores = available_cores()
    if not 1 <= threads <= cores:
        raise SlimkitError(f"{what} {threads}: this machine gives slimkit {cores} core{'s' if cores > 1 else ''}; "
                           f"use 1 to {cores}")
    return threads


def echo(value: object) -> str:
    """``repr(value)`` cut to a readable length, for error messages that quote user input."""
    import reprlib

    short = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    short.maxlevel, short.maxstring, short.maxother = 3, 80, 80
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 6
    text = short.repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


def echo_text(text: str, limit: int = 4 * MAX_ECHO_CHARS) -> str:
    """A message from a library (which may quote a whole input line) cut to a readable length."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's run to pages), cut to a readable length."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return echo_text(lines[0] if lines else type(exc).__name__)
