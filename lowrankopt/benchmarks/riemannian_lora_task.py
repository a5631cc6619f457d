r"""The text task of the ``riemannian-lora`` benchmark: which standard-library package does a sentence of a docstring
come from?

Built offline from the source files of the running Python's standard library (they ship with every installation): every
module, class and function docstring of the packages in :data:`PACKAGES` — ``asyncio``, ``email``, ``http``,
``importlib``, ``logging``, ``multiprocessing``, ``unittest``, ``urllib``, ``wsgiref`` and ``xml``: ten packages with
many docstrings in several files each, in every CPython 3.10–3.13 (tkinter and idlelib, which distributions ship
separately, are left out) — is read with :mod:`ast` (the files are parsed, never imported, so no module with side
effects runs), whitespace-collapsed, cut into :func:`sentences` of at least :data:`MIN_WORDS` words, and each sentence
is labelled with its top-level package. Docstrings under ``test`` / ``tests`` directories and in ``test*.py`` files are
left out, as is every sentence that occurs in more than one package ("Return the value of the header." says nothing
about its package). Sentences rather than whole docstrings: twice the examples, and a task on which fine-tuning the
encoder gains more over a head on frozen features (the pilot in :mod:`.riemannian_lora`).

**Split by file.** Train and test share no source file: within each package the files are ordered by a hash of their
path (fixed, independent of the benchmark's seed) and taken into the test set in that order until it holds about
:data:`TEST_FRACTION` of the package's sentences (a file that would take it past 1.5× that is passed over; at least one
file on each side); a test sentence that also occurs in the package's train files is dropped. **Balance**: each package
contributes at most ``max_train`` (400) train and ``max_test`` (100) test sentences, a fixed, hash-ordered subsample
(Python 3.11.7: 2593 train sentences, 70 (wsgiref) to 400 per package, and 899 test sentences, 49 to 100 per
package). The task is deterministic for one Python version; other versions ship other docstrings, so the benchmark
records the Python version, the counts and a fingerprint of the texts (:attr:`DocstringTask.fingerprint`).

Cost: parsing the packages' ~200 files, about a second.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MIN_WORDS",
    "PACKAGES",
    "TEST_FRACTION",
    "Docstring",
    "DocstringTask",
    "docstring_task",
    "stdlib_docstrings",
]

#: The labels (see the module docstring).
PACKAGES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
)
MIN_WORDS = 6  # words per sentence: shorter pieces ("Close.", "Return x.") are joined to the next
TEST_FRACTION = 0.3
_SKIP_DIRS = {"test", "tests", "__pycache__"}


@dataclass(frozen=True)
class Docstring:
    """One docstring: its whitespace-collapsed ``text``, its ``package`` (the label), the ``file`` it is in (relative
    to the standard library's root), ``kind`` (``"module"``, ``"class"`` or ``"function"``) and qualified ``name``."""

    text: str
    package: str
    file: str
    kind: str
    name: str


@dataclass(frozen=True)
class DocstringTask:
    """The classification task: ``train`` and ``test`` docstrings (no file in both), the ``packages`` (label ``i`` is
    ``packages[i]``) and the ``python`` version whose standard library they come from."""

    packages: tuple[str, ...]
    train: tuple[Docstring, ...]
    test: tuple[Docstring, ...]
    python: str

    def texts(self, split: str) -> list[str]:
        """The texts of ``split`` (``"train"`` or ``"test"``)."""
        return [d.text for d in self._split(split)]

    def labels(self, split: str) -> list[int]:
        """The labels of ``split``: the index of each docstring's package in :attr:`packages`."""
        index = {p: i for i, p in enumerate(self.packages)}
        return [index[d.package] for d in self._split(split)]

    def counts(self, split: str) -> dict[str, int]:
        """Docstrings per package in ``split``."""
        out = dict.fromkeys(self.packages, 0)
        for d in self._split(split):
            out[d.package] += 1
        return out

    @property
    def fingerprint(self) -> str:
        """A short hash of every (split, package, file, text): equal fingerprints, equal tasks."""
        h = hashlib.blake2b(digest_size=8)
        for split in ("train", "test"):
            for d in self._split(split):
                h.update(f"{split}\0{d.package}\0{d.file}\0{d.text}\0".encode())
        return h.hexdigest()

    def _split(self, split: str) -> tuple[Docstring, ...]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train if split == "train" else self.test


def _hash(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _files(root: Path, package: str) -> list[Path]:
    """The package's ``.py`` files outside test directories, sorted."""
    top = root / package
    if not top.is_dir():
        raise FileNotFoundError(f"standard-library package {package!r} not found under {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return sorted(out)


def _docstrings_of(path: Path, root: Path, package: str, min_words: int) -> list[Docstring]:
    rel = path.relative_to(root).as_posix()
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    except (SyntaxError, UnicodeDecodeError, ValueError):  # a file this Python cannot parse: not part of the task
        return []
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                found.append((kind, name, ast.get_docstring(child)))
                visit(child, name + ".")
            elif not isinstance(child, ast.expr | ast.Lambda):
                visit(child, prefix)  # defs inside if/try blocks at module or class level

    found.append(("module", rel, ast.get_docstring(tree)))
    visit(tree, "")
    out = []
    for kind, name, doc in found:
        text = " ".join(doc.split()) if doc else ""
        if len(text.split()) >= min_words:
            out.append(Docstring(text, package, rel, kind, name))
    return out


def _unique(docs: list[Docstring]) -> list[Docstring]:
    """``docs`` without the texts found in more than one package, each text kept once (its first occurrence)."""
    where: dict[str, set[str]] = {}
    for d in docs:
        where.setdefault(d.text, set()).add(d.package)
    seen: set[str] = set()
    out = []
    for d in docs:
        if len(where[d.text]) == 1 and d.text not in seen:
            seen.add(d.text)
            out.append(d)
    return out


def stdlib_docstrings(
    packages: Sequence[str] = PACKAGES, *, root: str | os.PathLike | None = None, min_words: int = 3
) -> list[Docstring]:
    """Every docstring of at least ``min_words`` words of ``packages`` in the standard library at ``root`` (default:
    this Python's, from ``sysconfig``), by :mod:`ast` (nothing is imported); texts found in more than one package are
    dropped, and a text repeated within one package is kept once. Raises ``FileNotFoundError`` for a package that is
    not there."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return _unique([d for p in packages for f in _files(root, p) for d in _docstrings_of(f, root, p, min_words)])


_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")


def sentences(text: str, min_words: int = MIN_WORDS) -> list[str]:
    """``text`` cut after each ``.``, ``!``, ``?`` or ``:`` that a space follows, consecutive pieces joined until
    each has at least ``min_words`` words; a shorter remainder at the end is dropped."""
    out, buf = [], []
    for piece in _SENTENCE_END.split(text):
        buf.append(piece)
        if len(" ".join(buf).split()) >= min_words:
            out.append(" ".join(buf))
            buf = []
    return out


def stdlib_sentences(
    packages: Sequence[str] = PACKAGES, *, root: str | os.PathLike | None = None, min_words: int = MIN_WORDS
) -> list[Docstring]:
    """The :func:`sentences` of every docstring of ``packages`` (each keeps its docstring's package, file, kind and
    name); sentences found in more than one package are dropped, one found twice in a package is kept once."""
    docs = stdlib_docstrings(packages, root=root, min_words=1)
    return _unique([dataclasses.replace(d, text=t) for d in docs for t in sentences(d.text, min_words)])


def _split_files(docs: list[Docstring], test_fraction: float) -> tuple[set[str], set[str]]:
    """Train and test files of one package: files in hash order go to test until it holds about ``test_fraction``
    of the docstrings (a file that would take it past 1.5× that is passed over); at least one file each side."""
    per_file: dict[str, int] = {}
    for d in docs:
        per_file[d.file] = per_file.get(d.file, 0) + 1
    if len(per_file) < 2:
        raise ValueError(f"package {docs[0].package!r} has docstrings in one file only: no file split is possible")
    order = sorted(per_file, key=_hash)
    target, test, n_test = test_fraction * len(docs), set(), 0
    for f in order:
        if n_test >= target:
            break
        if n_test + per_file[f] <= 1.5 * target and len(test) < len(order) - 1:
            test.add(f)
            n_test += per_file[f]
    if not test:  # every file alone is too large: take the smallest
        test.add(min(order, key=lambda f: (per_file[f], _hash(f))))
    return set(order) - test, test


def docstring_task(
    packages: Sequence[str] = PACKAGES,
    *,
    max_train: int = 400,
    max_test: int = 100,
    test_fraction: float = TEST_FRACTION,
    whole_docstrings: bool = False,
    root: str | os.PathLike | None = None,
) -> DocstringTask:
    """The docstring-to-package task over ``packages`` (see the module docstring): deterministic, split by file, at
    most ``max_train`` / ``max_test`` texts per package (hash-ordered subsample); the texts are the docstrings'
    :func:`sentences` (``whole_docstrings=True``: the docstrings of at least 3 words, the pilot's first variant).
    ``root``: another standard library's directory (default: this Python's). Raises ``ValueError`` for fewer than two
    packages, repeated packages, bad sizes or a package whose texts sit in one file."""
    packages = tuple(packages)
    if len(packages) < 2 or len(set(packages)) != len(packages):
        raise ValueError(f"packages must be at least two distinct names, got {packages!r}")
    if min(max_train, max_test) < 1 or not 0 < test_fraction < 1:
        raise ValueError(
            f"need max_train, max_test >= 1 and 0 < test_fraction < 1, got {max_train}, {max_test}, {test_fraction}"
        )
    docs = stdlib_docstrings(packages, root=root) if whole_docstrings else stdlib_sentences(packages, root=root)
    train: list[Docstring] = []
    test: list[Docstring] = []
    for p in packages:
        mine = [d for d in docs if d.package == p]
        if not mine:
            raise ValueError(f"package {p!r} has no docstring text of {MIN_WORDS} words or more")
        train_files, test_files = _split_files(mine, test_fraction)
        tr = [d for d in mine if d.file in train_files]
        seen = {d.text for d in tr}
        te = [d for d in mine if d.file in test_files and d.text not in seen]
        key = lambda d: _hash(f"{d.file}:{d.name}:{d.text}")  # noqa: E731
        train += sorted(sorted(tr, key=key)[:max_train], key=lambda d: (d.file, d.name))
        test += sorted(sorted(te, key=key)[:max_test], key=lambda d: (d.file, d.name))
    return DocstringTask(packages, tuple(train), tuple(test), sys.version.split()[0])
