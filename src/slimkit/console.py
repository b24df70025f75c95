"""What the command line prints: tables never cut short, progress a log can hold, warnings as one line.

On a terminal, tables are drawn by rich (cells wrap, never end in "…"); anywhere else (a CI log,
``| tee``, a file) they are plain text with every cell in full, columns padded to their widest cell.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import IO, Iterator, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], stream: IO[str] | None = None) -> None:
    """A table: the first column left-aligned (names), the others right-aligned (numbers)."""
    stream = stream or sys.stdout
    if is_terminal(stream):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        Console(file=stream).print(table)
        return
    stream.write(plain_table(title, columns, rows))
    stream.flush()


def plain_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    body = [line(columns), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
    return "\n".join([title, *(b.rstrip() for b in body)]) + "\n"


@contextlib.contextmanager
def one_line_warnings(stream: IO[str] | None = None) -> Iterator[None]:
    """slimkit's own warnings as ``warning: message`` lines (other packages' warnings keep their format)."""
    with warnings.catch_warnings():
        # torch 2.13 warns about its own deprecated pytree API whenever a captured graph is copied: nothing a
        # user of slimkit can act on
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
                print(f"warning: {message}", file=stream or sys.stderr, flush=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
