"""Write the standard library's docstrings as a plain-text corpus: `python -I stdlib_docs.py OUT`.

One document per importable public module (packages walked recursively): the module docstring,
then the docstrings of its public classes (with their public methods) and functions, as
paragraphs, one a line, documents separated by a blank line -- the `.txt` layout `mbert-prep`
reads. Doctest blocks and code-like paragraphs are dropped so what remains is prose.

Run as a separate, isolated interpreter (`-I`: no user site, no PYTHON* variables, no script
directory on sys.path) because importing ~400 modules leaves state behind. Modules with side
effects on import (opening a browser, printing, GUIs, running tests) are never imported. Output
depends only on the Python build: modules are visited in sorted order and the text is written
only after everything is collected, via an atomic rename. This file imports nothing outside
the standard library so it runs without the package.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import warnings

SKIP_TOP = frozenset((
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "readline", "ensurepip", "distutils", "encodings", "pydoc_data", "msilib", "winreg",
    "winsound", "msvcrt", "_winapi", "nt",
))
SKIP_LEAVES = frozenset(("__main__", "test", "tests", "idle_test", "testing"))
_WORD = re.compile(r"[A-Za-z][a-z]+[,.;:!?]?$")


def _quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                return importlib.import_module(name)
            except BaseException:  # SystemExit and friends, raised by odd modules, too
                return None


def module_names() -> list[str]:
    names = sorted(n for n in sys.stdlib_module_names
                   if not n.startswith("_") and n not in SKIP_TOP)
    out: list[str] = []
    for name in names:
        out.append(name)
        module = _quiet_import(name)
        if module is None or not hasattr(module, "__path__"):
            continue
        pending = [(module.__path__, name)]
        while pending:
            path, prefix = pending.pop(0)
            for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
                if info.name.startswith("_") or info.name in SKIP_LEAVES:
                    continue
                full = f"{prefix}.{info.name}"
                out.append(full)
                if info.ispkg:
                    sub = _quiet_import(full)
                    if sub is not None and hasattr(sub, "__path__"):
                        pending.append((sub.__path__, full))
    return out


def prose_paragraphs(doc: str | None) -> list[str]:
    """The prose paragraphs of one docstring, each joined into a single line."""
    if not doc:
        return []
    paragraphs = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line.lstrip().startswith((">>>", "...", "$ ")) for line in lines):
            continue
        if lines[0].startswith((" ", "\t")):
            continue  # indented blocks are code samples or tables
        words = " ".join(line.strip() for line in lines).split()
        # Keep text that reads as sentences: mostly ordinary words, not signatures or tables.
        if len(words) < 4 or sum(bool(_WORD.match(w)) for w in words) < 0.6 * len(words):
            continue
        paragraphs.append(" ".join(words))
    return paragraphs


def module_document(module) -> list[str]:
    name = module.__name__
    paragraphs = prose_paragraphs(module.__doc__)
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue  # re-exported from elsewhere: documented where it is defined
        paragraphs.extend(prose_paragraphs(getattr(obj, "__doc__", None)))
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isroutine(meth):
                    paragraphs.extend(prose_paragraphs(getattr(meth, "__doc__", None)))
    seen: set[str] = set()
    # Inherited boilerplate repeats verbatim; keep the first copy only.
    return [p for p in paragraphs if not (p in seen or seen.add(p))]


def collect() -> list[list[str]]:
    docs = []
    with warnings.catch_warnings():
        # Reading attributes of deprecated modules (typing.io) warns; the text is still fine.
        warnings.simplefilter("ignore")
        for name in module_names():
            module = _quiet_import(name)
            if module is not None:
                doc = module_document(module)
                if doc:
                    docs.append(doc)
    return docs


def main(out_path: str) -> None:
    docs = collect()
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write("\n".join(doc) + "\n\n")
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
