"""Read raw inputs into documents, repairing and counting every kind of bad input.

Local `.txt` (documents separated by blank lines), `.jsonl` and `.parquet` (one document per
record, text in `text_field`) are read here, streaming, so memory stays flat; anything else is
handed to `datasets.load_dataset` (a local directory, a hub name when online) or, for a
directory written by `save_to_disk`, `datasets.load_from_disk`.

Repairs, each counted in `ReadStats`: undecodable bytes become U+FFFD; a line longer than
`max_line_chars` is cut into pieces (a `.txt` line is read at most that many bytes at a time,
so one 10 GB line never sits in memory); a document longer than `max_doc_chars` is cut into
several; a JSON string holding a lone UTF-16 surrogate (`"\\ud800"`, which no UTF-8 writer
accepts) has it replaced by U+FFFD; empty files, empty records, lines that are not JSON (or nest
deeper than the parser's recursion limit) and, inside an input folder, files of other types are
skipped.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import datasets
import pyarrow.parquet as pq

from mbert_train.errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
LOCAL_KINDS = ("txt", "jsonl", "parquet")
# A missing path ending like this is a typo, not a hub dataset name like "user/corpus".
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".gz", ".zst", ".arrow")
_HASH_CHUNK = 1 << 22


@dataclass
class ReadStats:
    """Counts of what reading did; every field ends up in metadata.json's `summary`."""

    files: int = 0
    bytes_read: int = 0
    empty_files: int = 0
    empty_records: int = 0
    records_without_text: int = 0
    bad_json_lines: int = 0
    undecodable_bytes: int = 0
    long_lines_split: int = 0
    long_documents_split: int = 0
    lone_surrogates: int = 0
    unknown_files: int = 0
    """Files in an input folder that are not .txt/.jsonl/.parquet (hidden files aside)."""
    checksums: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "checksums"}


class SourceError(UserError):
    """An input that cannot be read at all; the message names the file and the fix."""


@dataclass(frozen=True)
class Source:
    """One input: a local file of a known kind, or a `datasets` loadable name/directory."""

    path: str
    kind: str  # txt | jsonl | parquet | hf_disk | hf


def _local_kind(path: str) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    return suffix[1:] if suffix in LOCAL_SUFFIXES else None


def resolve_sources(inputs: list[str], text_field: str, stats: ReadStats | None = None
                    ) -> list[Source]:
    """Expand directories of local files, check kinds and text fields; no heavy reading.

    Files of other types in a folder of local files are counted in `stats.unknown_files`.
    """
    stats = stats if stats is not None else ReadStats()
    sources: list[Source] = []
    for item in inputs:
        if os.path.isdir(item):
            if any(os.path.exists(os.path.join(item, f))
                   for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                sources.append(Source(item, "hf_disk"))
                continue
            found = sorted(f for f in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if os.path.isfile(f))
            files = [f for f in found if _local_kind(f)]
            if files:
                sources.extend(Source(f, _local_kind(f)) for f in files)
                stats.unknown_files += len(found) - len(files)
            else:
                sources.append(Source(item, "hf"))
        elif os.path.isfile(item):
            sources.append(Source(item, _local_kind(item) or "hf"))
        elif os.path.exists(item) or item.startswith(("/", ".", "~")) or item.lower().endswith(
                _FILE_SUFFIXES):
            raise SourceError(f"input {item}: not a readable file or directory; check the path")
        else:
            sources.append(Source(item, "hf"))
    for src in sources:
        _check_text_field(src, text_field)
    return sources


def _check_text_field(src: Source, text_field: str) -> None:
    if src.kind == "jsonl":
        with open(src.path, "rb") as f:
            for raw in f:
                if raw.strip():
                    try:
                        record = json.loads(raw.decode("utf-8", errors="replace"))
                    except (ValueError, RecursionError):
                        return  # counted as a bad line when read; later lines may be fine
                    if not isinstance(record, dict) or text_field not in record:
                        fields = ", ".join(record) if isinstance(record, dict) else "not an object"
                        raise SourceError(f"input {src.path}: first record has no field "
                                          f"{text_field!r} ({fields}); pass --text-field NAME")
                    return
    elif src.kind == "parquet":
        try:
            names = pq.read_schema(src.path).names
        except Exception as exc:
            raise SourceError(f"input {src.path}: not a readable parquet file ({exc})")
        if text_field not in names:
            raise SourceError(f"input {src.path}: no column {text_field!r} ({', '.join(names)}); "
                              f"pass --text-field NAME")


def total_local_bytes(sources: list[Source]) -> int:
    return sum(os.path.getsize(s.path) for s in sources if s.kind in LOCAL_KINDS)


_REPLACED = [0]
"""Running count of undecodable bytes; `_Decoder` reads the difference around each call."""


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("mbert-prep-count", _count_and_replace)


class _Decoder:
    """UTF-8 decoding that replaces and counts undecodable bytes, across chunk boundaries."""

    def __init__(self, stats: ReadStats):
        self.stats = stats
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="mbert-prep-count")

    def __call__(self, data: bytes, final: bool = False) -> str:
        before = _REPLACED[0]
        text = self.decoder.decode(data, final)
        self.stats.undecodable_bytes += _REPLACED[0] - before
        return text


def _cap_line(line: str, cap: int, stats: ReadStats) -> list[str]:
    if len(line) <= cap:
        return [line]
    stats.long_lines_split += 1
    return [line[i:i + cap] for i in range(0, len(line), cap)]


def _cap_document(lines: list[str], cap: int, stats: ReadStats) -> Iterator[str]:
    """Join capped lines into documents of at most ~`cap` characters."""
    piece: list[str] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > cap:
            stats.long_documents_split += 1
            yield "\n".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line) + 1
    if piece:
        yield "\n".join(piece)


def _read_txt(path: str, stats: ReadStats, max_line: int, max_doc: int,
              progress: Callable[[int], None]) -> Iterator[str]:
    decode = _Decoder(stats)
    digest = hashlib.sha256()
    lines: list[str] = []
    size = 0
    in_long_line = False
    with open(path, "rb") as f:
        while True:
            # readline(cap) bounds memory: a longer line arrives in cap-sized pieces.
            raw = f.readline(max_line)
            if not raw:
                break
            digest.update(raw)
            stats.bytes_read += len(raw)
            progress(len(raw))
            text = decode(raw)
            if f.tell() == len(raw):
                text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark is not text
            continues_long_line = in_long_line
            in_long_line = len(raw) == max_line and not raw.endswith(b"\n")
            if in_long_line and not continues_long_line:
                stats.long_lines_split += 1
            line = text.rstrip("\r\n")
            if line.strip():
                if lines and size + len(line) > max_doc:
                    stats.long_documents_split += 1
                    yield "\n".join(lines)
                    lines, size = [], 0
                lines.append(line)
                size += len(line) + 1
            elif lines and not in_long_line and not continues_long_line:
                yield "\n".join(lines)
                lines, size = [], 0
    tail = decode(b"", final=True)
    if tail.strip():
        lines.append(tail)
    if lines:
        yield "\n".join(lines)
    stats.checksums[path] = digest.hexdigest()


def _split_record(text: str, stats: ReadStats, max_line: int, max_doc: int) -> Iterator[str]:
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        lines.extend(_cap_line(line, max_line, stats))
    yield from _cap_document(lines, max_doc, stats)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _repair_surrogates(text: str, stats: ReadStats) -> str:
    """Lone surrogates (only JSON's \\u escapes make them) -> U+FFFD, counted."""
    fixed, n = _SURROGATE.subn("\ufffd", text)
    stats.lone_surrogates += n
    return fixed


def _record_text(record: object, text_field: str, stats: ReadStats) -> str | None:
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        stats.records_without_text += 1
        return None
    if not value.strip():
        stats.empty_records += 1
        return None
    return value


def _read_jsonl(path: str, text_field: str, stats: ReadStats, max_line: int, max_doc: int,
                progress: Callable[[int], None]) -> Iterator[str]:
    decode = _Decoder(stats)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for raw in f:
            digest.update(raw)
            stats.bytes_read += len(raw)
            progress(len(raw))
            if not raw.strip():
                continue
            try:
                record = json.loads(decode(raw, final=True))
            except (ValueError, RecursionError):
                # Not JSON, a number too long for int(), or nested past the recursion limit.
                stats.bad_json_lines += 1
                continue
            text = _record_text(record, text_field, stats)
            if text is not None:
                if b"\\u" in raw:
                    text = _repair_surrogates(text, stats)
                yield from _split_record(text, stats, max_line, max_doc)
    stats.checksums[path] = digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_parquet(path: str, text_field: str, stats: ReadStats, max_line: int, max_doc: int,
                  progress: Callable[[int], None]) -> Iterator[str]:
    stats.checksums[path] = _file_sha256(path)
    pf = pq.ParquetFile(path)
    size = os.path.getsize(path)
    rows = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        progress(size * batch.num_rows // rows)
        stats.bytes_read += size * batch.num_rows // rows
        for value in batch.column(0).to_pylist():
            text = _record_text({text_field: value}, text_field, stats)
            if text is not None:
                yield from _split_record(text, stats, max_line, max_doc)


def _read_hf(src: Source, text_field: str, hf_split: str, hf_config: str | None, cache_dir: str,
             stats: ReadStats, max_line: int, max_doc: int) -> Iterator[str]:
    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[hf_split]
        else:
            ds = datasets.load_dataset(src.path, hf_config, split=hf_split, cache_dir=cache_dir)
    except Exception as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"input {src.path}: datasets cannot load it ({first_line}); check the "
                          f"name, --hf-config, --hf-split, and that you are online for hub names")
    if text_field not in ds.column_names:
        raise SourceError(f"input {src.path}: no column {text_field!r} "
                          f"({', '.join(ds.column_names)}); pass --text-field NAME")
    stats.checksums[src.path] = f"datasets-fingerprint:{ds._fingerprint}"
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for value in batch[text_field]:
            text = _record_text({text_field: value}, text_field, stats)
            if text is not None:
                stats.bytes_read += len(text.encode("utf-8", errors="replace"))
                yield from _split_record(text, stats, max_line, max_doc)


def read_documents(sources: list[Source], *, text_field: str, hf_split: str,
                   hf_config: str | None, cache_dir: str,
                   stats: ReadStats, max_line_chars: int, max_doc_chars: int,
                   progress: Callable[[int], None]) -> Iterator[str]:
    """Every document of every source, in order, as text with one paragraph per line."""
    for src in sources:
        stats.files += 1
        if src.kind == "txt":
            docs = _read_txt(src.path, stats, max_line_chars, max_doc_chars, progress)
        elif src.kind == "jsonl":
            docs = _read_jsonl(src.path, text_field, stats, max_line_chars, max_doc_chars,
                               progress)
        elif src.kind == "parquet":
            docs = _read_parquet(src.path, text_field, stats, max_line_chars, max_doc_chars,
                                 progress)
        else:
            docs = _read_hf(src, text_field, hf_split, hf_config, cache_dir, stats,
                            max_line_chars, max_doc_chars)
        skipped_before = stats.empty_records + stats.records_without_text + stats.bad_json_lines
        produced = 0
        for doc in docs:
            produced += 1
            yield doc
        skipped = stats.empty_records + stats.records_without_text + stats.bad_json_lines
        if produced == 0 and skipped == skipped_before and src.kind in LOCAL_KINDS:
            stats.empty_files += 1
