"""Calibration text: a Hub dataset, a local file or folder, or text that ships with Python and the
installed packages: the stdlib's docstrings (the default), the packages' README prose (another kind of
documentation, for judging a cut on text the choice never saw), or the docstrings and the pydoc
reference's prose in one sample (python-docs)."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import logging
import os
import re
import sysconfig
from functools import lru_cache
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError, first_line, looks_local

log = logging.getLogger(__name__)

BUILTIN_DATASET = "python-stdlib-docs"
READMES_DATASET = "python-package-readmes"
DOCS_DATASET = "python-docs"
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def stdlib_paragraphs(min_chars: int = 200) -> Iterator[str]:
    """Paragraphs of the docstrings of this Python's standard library, in a fixed order.

    Read with ``ast`` (nothing is imported). Tests and the IDLE sources are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for doc in _docstrings(text):
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if len(para) >= min_chars:
                    yield para


def reference_paragraphs(min_chars: int = 200) -> Iterator[str]:
    """Prose paragraphs of the Python reference that ships with pydoc (``pydoc_data.topics``: the
    language reference's sections on statements, expressions, the data model, ...), by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without it
        return
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= min_chars and sum(c.isalpha() or c == " " for c in para) >= 0.85 * len(para):
                yield para


@lru_cache(maxsize=1)
def python_docs() -> tuple[str, ...]:
    """The stdlib's docstring paragraphs and the pydoc reference's prose, each once, ordered by a hash
    of the text, so the first N texts of a split sample every module and topic rather than the first
    modules by name. Measured as a default calibration text and not adopted (docs/benchmarks.md)."""
    return hash_ordered(chain(stdlib_paragraphs(), reference_paragraphs()))


@lru_cache(maxsize=1)
def readme_paragraphs() -> tuple[str, ...]:
    """English prose paragraphs of the long descriptions (PyPI READMEs) of the installed Python
    distributions, each once, ordered by a hash of the text: what a project is, how to install and
    cite it, its licence and community. The hash order makes the first N of a split sample every
    package (by package name, the first 32 came from 7 packages, 15 from one)."""
    return hash_ordered(package_paragraphs())


def hash_ordered(texts: Iterable[str]) -> tuple[str, ...]:
    """``texts``, each once, ordered by a hash of the text: its first N sample every source evenly."""
    return tuple(sorted(dict.fromkeys(texts), key=lambda t: hashlib.sha256(t.encode()).hexdigest()))


def package_paragraphs(min_chars: int = 200) -> Iterator[str]:
    """The installed distributions' README prose paragraphs, by package name. Code blocks, lists,
    tables, headings and markup are left out; this project's own README is too."""
    seen = {"depth-prune"}
    fence = re.compile(r"^\s*(```|~~~)")
    for d in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = (d.metadata["Name"] or "").lower()
        if name in seen:
            continue
        seen.add(name)
        in_code = False
        for block in re.split(r"\n\s*\n", d.metadata.get_payload() or d.metadata.get("Description") or ""):
            lines = block.splitlines()
            fences = sum(bool(fence.match(line)) for line in lines)
            if fences or in_code:
                in_code ^= fences % 2 == 1
                continue
            if any(line.startswith(("    ", "\t", ">>>", "|", "#", "<", "[!", "![", "* ", "- ", ".. ", "+ ", "=")) for line in lines):
                continue
            para = " ".join(block.split())
            if len(para) >= min_chars and para.endswith((".", ":")) and \
                    sum(c.isalpha() or c == " " for c in para) >= 0.85 * len(para):
                yield para


BUILTINS = {BUILTIN_DATASET: stdlib_paragraphs, READMES_DATASET: readme_paragraphs, DOCS_DATASET: python_docs}


def builtin_split(text: str) -> str:
    """Deterministic 90/10 split of the embedded text by content hash."""
    return "test" if int(hashlib.md5(text.encode()).hexdigest(), 16) % 10 == 0 else "train"


def _builtin(name: str, split: str) -> Iterator[str]:
    if split not in ("train", "test"):
        raise UserError(f"--dataset_subset {split!r} does not exist in {name}; use 'train' or 'test'")
    return (p for p in BUILTINS[name]() if builtin_split(p) == split)


def _load_datasets(dataset: str, config: str | None, split: str, streaming: bool):
    import datasets

    if os.path.exists(dataset):
        p = Path(dataset)
        if p.is_dir():
            args, kw = (str(p),), {}
        elif p.suffix.lower() in LOCAL_BUILDERS:
            check_local_file(p)
            args, kw = (LOCAL_BUILDERS[p.suffix.lower()],), {"data_files": {"train": str(p)}}
        else:
            raise UserError(f"--dataset {dataset}: unknown file type {p.suffix!r}; use one of {', '.join(LOCAL_BUILDERS)}")
    elif looks_local(dataset):
        raise UserError(f"--dataset {dataset} does not exist; give an existing file/folder or a Hub dataset id")
    else:
        args, kw = (dataset, config), {}
    try:
        dd = datasets.load_dataset(*args, streaming=streaming, **kw)
    except Exception as e:  # datasets raises many types; all are "can't load this"
        first = first_line(e)
        raise UserError(f"--dataset {dataset}: cannot load it ({first})") from None
    if split not in dd:
        raise UserError(f"--dataset_subset {split!r} is not in --dataset {dataset}; splits there: {', '.join(dd)}")
    return dd[split]


def check_local_file(p: Path) -> None:
    """An empty file, or a JSON Lines file with a bad line, named precisely before datasets sees it."""
    if p.stat().st_size == 0:
        raise UserError(f"--dataset {p} is empty; give a file with at least one row")
    if p.suffix.lower() != ".jsonl":
        return
    import json

    rows = 0
    with open(p, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--dataset {p} line {i} is not valid JSON ({e.msg}); fix or remove that line") from None
            rows += 1
    if not rows:
        raise UserError(f"--dataset {p} has no rows; give a file with at least one JSON object per line")


def load_texts(
    dataset: str = BUILTIN_DATASET,
    column: str = "text",
    split: str = "train",
    size: int | None = None,
    config: str | None = None,
    streaming: bool = False,
) -> list[str]:
    """The first ``size`` texts of ``column`` (all when ``size`` is None). Empty texts are kept
    here and counted as skipped by the scan, so nothing is dropped silently."""
    if size is not None and size < 1:
        raise ValueError(f"--dataset_size must be >= 1, got {size}")
    if dataset in BUILTINS:
        texts = list(islice(_builtin(dataset, split), size))
    else:
        ds = _load_datasets(dataset, config, split, streaming)
        names = list(ds.column_names or []) if ds.column_names is not None else None
        if names is not None and column not in names:
            raise UserError(f"--dataset_column {column!r} is not in {dataset}; columns there: {', '.join(names)}")
        rows = islice(iter(ds), size)
        texts = []
        for row in rows:
            if column not in row:
                raise UserError(f"--dataset_column {column!r} is not in {dataset}; columns there: {', '.join(row)}")
            v = row[column]
            texts.append(v if isinstance(v, str) else "" if v is None else str(v))
    if not texts:
        raise UserError(f"--dataset {dataset} (split {split!r}) is empty; give a dataset with at least one row")
    return texts


def load_calibration(dataset: str, column: str, split: str, size: int | None,
                     config: str | None = None) -> tuple[list[str], dict]:
    """Calibration texts for a repair, and the provenance recorded beside the bridges."""
    texts = load_texts(dataset, column, split, size, config)
    return texts, {"dataset": dataset, "column": column, "split": split, "size": len(texts), "config": config}
