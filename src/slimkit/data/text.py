"""Text data: ``.txt`` (one text per line), ``.jsonl`` (``{"text": ..., "label": ...}`` per line) and the
built-in corpora, split into train/val/test.

The built-in corpora are made from text present on every machine, so calibration, distillation and
evaluation of text models need no download: ``docstrings``, the first paragraph of the docstrings of a
fixed list of Python standard-library modules (1,356 texts on 3.11), and ``stdlib``, every other docstring
paragraph of the standard library's Python source, read as source (nothing imported; about 8,500 texts),
for training that needs more text: the two share no text, so a model trained on ``stdlib`` is fairly
evaluated on ``docstrings``. Their texts depend on the Python version (3.11 and 3.12 document their
modules differently); within one version they are the same on every machine.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import random
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimkitError
from ..limits import MAX_CLASSES, echo_text
from .datasets import SPLIT_FRACTIONS

TEXT_SUFFIXES = (".txt", ".jsonl")
STDLIB_SKIPPED = ("site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo")  # tests, GUIs
MAX_TEXTS = 200_000
MAX_TEXT_CHARS = 20_000
DOCSTRING_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox",
    "mimetypes", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "wave", "weakref", "xml.dom.minidom", "zipfile",
)


@dataclass(frozen=True)
class TextSplits:
    """Train/val/test texts of one dataset, with integer labels where the data has them."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]
    labels: tuple[list[int], list[int], list[int]] | None = None

    def split(self, which: str) -> list[str]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {which!r}")
        return getattr(self, which)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else max(max(part) for part in self.labels if part) + 1


def is_text_spec(spec: str) -> bool:
    """Whether a ``--data`` spec names text (options included, well-formed or not: ``_options`` says what is
    wrong with them)."""
    text = str(spec)
    head = text.rsplit(":", 1)[0]
    return bool(set(BUILT_INS) & {text, head}) or any(Path(t).suffix in TEXT_SUFFIXES for t in (text, head))


def load_text(spec: str, seed: int = 0) -> TextSplits:
    """``docstrings``, ``stdlib``, a ``.txt`` or a ``.jsonl`` file, optionally followed by ``:limit=N`` (the first N
    texts after a seeded shuffle): texts split 60/20/20 with a seeded shuffle."""
    source, limit = _options(str(spec))
    if source in BUILT_INS:
        texts, labels = BUILT_INS[source](), None
    else:
        path = Path(source)
        if not path.is_file():
            raise SlimkitError(f"{path}: text data file not found")
        texts, labels = _jsonl(path) if path.suffix == ".jsonl" else (_txt(path), None)
    if len(texts) < 10:
        raise SlimkitError(f"{source}: {len(texts)} texts; at least 10 are needed to split into train/val/test")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    order = order[:limit] if limit else order
    n_train, n_val = int(SPLIT_FRACTIONS[0] * len(order)), int(SPLIT_FRACTIONS[1] * len(order))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    split_labels = None if labels is None else tuple([labels[i] for i in part] for part in parts)
    return TextSplits(str(spec), *([texts[i] for i in part] for part in parts), labels=split_labels)


def docstring_corpus() -> list[str]:
    """The first paragraph of every public docstring (module, classes, functions, methods) of
    ``DOCSTRING_MODULES``, whitespace collapsed, 40-400 characters, each once, in a stable order."""
    return list(_docstring_texts())


def stdlib_corpus() -> list[str]:
    """Every docstring paragraph (40-400 characters, each once) of the standard library's Python source that is not
    in ``docstring_corpus``, in file order, read with ``ast``: importing every module would run code
    (``antigravity`` opens a browser). Tests and GUI modules are left out."""
    return list(_stdlib_texts())


@functools.lru_cache(maxsize=1)
def _docstring_texts() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without it (sqlite3, for one): the corpus does without
            continue
        for obj in _documented(module):
            with warnings.catch_warnings():  # (typing.io and typing.re warn when read)
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj) or ""
            text = " ".join(doc.split("\n\n", 1)[0].split())
            if 40 <= len(text) <= 400 and not text.startswith(("Return self", "Implement ")):
                seen.setdefault(text)
    return tuple(seen)


def _paragraphs(doc: str) -> list[str]:
    texts = (" ".join(part.split()) for part in doc.split("\n\n"))
    return [t for t in texts if 40 <= len(t) <= 400 and not t.startswith((">>>", "Return self", "Implement "))]


@functools.lru_cache(maxsize=1)
def _stdlib_texts() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    taken = set(_docstring_texts())
    seen: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & set(STDLIB_SKIPPED):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):  # (a few files are templates or deliberately invalid)
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for text in _paragraphs(ast.get_docstring(node) or ""):
                    if text not in taken:
                        seen.setdefault(text)
    return tuple(seen)


def _documented(module) -> list[object]:
    objects: list[object] = [module]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member):
            objects.append(member)
            objects += [m for n, m in sorted(vars(member).items()) if not n.startswith("_") and callable(m)]
        elif inspect.isfunction(member):
            objects.append(member)
    return objects


OPTIONS = re.compile(r"^(?P<source>.+?):limit=(?P<limit>\d+)$")


def _options(text: str) -> tuple[str, int | None]:
    match = OPTIONS.match(text)
    if match is None:
        if ":" in text and not Path(text).suffix in TEXT_SUFFIXES and text not in BUILT_INS:
            raise SlimkitError(f"data {echo_text(text)}: the one option of text data is :limit=N")
        return text, None
    limit = int(match["limit"])
    if limit < 10:
        raise SlimkitError(f"data {echo_text(text)}: limit must be at least 10 texts")
    return match["source"], limit


def _lines(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8") as handle:
            lines = []
            for number, line in enumerate(handle, 1):
                if number > MAX_TEXTS:
                    raise SlimkitError(f"{path}: more than {MAX_TEXTS:,} lines; split the file")
                lines.append(line.rstrip("\n"))
            return lines
    except UnicodeDecodeError as exc:
        raise SlimkitError(f"{path}: not UTF-8 text ({echo_text(str(exc))})") from None
    except OSError as exc:
        raise SlimkitError(f"{path}: unreadable ({exc.strerror or exc})") from None


def _txt(path: Path) -> list[str]:
    texts = [line.strip() for line in _lines(path)]
    for number, text in enumerate(texts, 1):
        if len(text) > MAX_TEXT_CHARS:
            raise SlimkitError(f"{path}:{number}: a text of {len(text):,} characters; at most {MAX_TEXT_CHARS:,}")
    return [t for t in texts if t]


def _jsonl(path: Path) -> tuple[list[str], list[int] | None]:
    texts, labels = [], []
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise SlimkitError(f"{path}:{number}: not JSON ({echo_text(str(exc))})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise SlimkitError(f"{path}:{number}: each line needs a non-empty \"text\" string")
        if len(text) > MAX_TEXT_CHARS:
            raise SlimkitError(f"{path}:{number}: a text of {len(text):,} characters; at most {MAX_TEXT_CHARS:,}")
        label = record.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)
                                  or not 0 <= label < MAX_CLASSES):
            raise SlimkitError(f"{path}:{number}: \"label\" must be a class number, 0 to {MAX_CLASSES - 1}")
        texts.append(text)
        labels.append(label)
    given = [label is not None for label in labels]
    if any(given) and not all(given):
        missing = given.index(False) + 1
        raise SlimkitError(f"{path}: some lines have a \"label\" and some do not (record {missing} has none)")
    return texts, labels if given and all(given) else None


BUILT_INS = {"docstrings": docstring_corpus, "stdlib": stdlib_corpus}
