"""Sentence splitters: a registry of name -> callable(document text) -> list of sentences.

The default, `rules`, needs no model download and runs at tens of MB/s: every line of a
document is a paragraph (line ends are hard boundaries) and a paragraph is cut after `.`, `!`
or `?` (plus closing quotes/brackets) followed by whitespace, unless the next word starts in
lower case (`e.g. this`), or the word before is a known abbreviation (`Dr.`, `etc.`) or a
single letter (initials: `J. R. R. Tolkien`). That is the rule set of Punkt-style splitters
without the learned parameters, good enough for NSP/SOP, where a boundary one sentence off
changes nothing about the objective.

`register_splitter(name, fn)` adds one; `--splitter package.module:function` on the command
line imports one without registering it.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from data_prep.config import PrepError

Splitter = Callable[[str], list[str]]

_REGISTRY: dict[str, Splitter] = {}

# Lower-cased, without the trailing dot. Titles, Latin abbreviations, and address and
# reference abbreviations that are usually followed by a capitalised word.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt rev hon gov sen rep pres vs etc "
    "e.g i.e cf al approx dept est fig figs eq eqs no nos vol vols pp ch sec inc ltd co corp "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k a.m p.m ph.d b.a m.a".split())

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace.
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")


def register_splitter(name: str, fn: Splitter) -> None:
    """Make `fn` available as `--splitter name`; re-registering a name replaces it."""
    if not callable(fn):
        raise TypeError(f"splitter {name!r} must be callable, got {type(fn).__name__}")
    _REGISTRY[name] = fn


def available_splitters() -> list[str]:
    return sorted(_REGISTRY)


def get_splitter(name: str) -> Splitter:
    """A registered splitter, or `module:function` imported on the spot."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PrepError(f"--splitter {name}: cannot import it ({exc}); pass a registered "
                             f"name ({', '.join(available_splitters())}) or module:function")
        if not callable(fn):
            raise PrepError(f"--splitter {name} is not callable; pass module:function")
        return fn
    raise PrepError(f"--splitter {name} is unknown; choose one of "
                     f"{', '.join(available_splitters())} or pass module:function")


def _ends_with_abbreviation(text: str, start: int, dot: int) -> bool:
    """Whether the word ending at `text[dot] == '.'` is an abbreviation or an initial."""
    # Scan back to the previous space only: slicing or regex-matching the whole prefix would
    # make long paragraphs quadratic.
    begin = max(text.rfind(" ", start, dot), text.rfind("\t", start, dot)) + 1
    word = text[begin:dot].lstrip("\"'(\u201c\u2018[").rstrip(".").lower()
    # A single letter before the dot is an initial ("H. americanus", "J. Smith").
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_paragraph(paragraph: str) -> list[str]:
    """Split one line of prose into sentences with the rules described in the module doc."""
    sentences = []
    start = 0
    for match in _BOUNDARY.finditer(paragraph):
        end = match.end()
        if end >= len(paragraph):
            break
        if paragraph[end].islower():
            continue
        dot = match.start()
        if paragraph[dot] == "." and _ends_with_abbreviation(paragraph, start, dot):
            continue
        sentence = paragraph[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_rules(text: str) -> list[str]:
    """Default splitter: lines are paragraphs, paragraphs are split by `split_paragraph`."""
    sentences: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            sentences.extend(split_paragraph(line))
    return sentences


def split_rules_unwrap(text: str) -> list[str]:
    """For hard-wrapped prose: the whole document is one paragraph (line ends are spaces)."""
    return split_paragraph(" ".join(line.strip() for line in text.split("\n") if line.strip()))


def split_lines(text: str) -> list[str]:
    """Each non-empty line is one sentence (for corpora already split one sentence a line)."""
    return [line.strip() for line in text.split("\n") if line.strip()]


register_splitter("rules", split_rules)
register_splitter("rules_unwrap", split_rules_unwrap)
register_splitter("lines", split_lines)
