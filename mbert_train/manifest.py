"""What each file of a checkpoint should be, recorded when it is written and checked before it
is read, so that a missing, truncated or foreign piece of a checkpoint never loads.

At save, every rank lists the files it wrote with their size and CRC-32 (`describe`: read back
in 1 MiB blocks, from the page cache); `gather` brings the lists to rank 0, and
`CheckpointDir.commit` renames the checkpoint into place only once every listed file is in the
temp dir at its size as rank 0 sees it (`first_absent`). The list is recorded in `meta.json`,
the record written last::

    "files": {"__0_0.distcp": {"crc32": "5a1c09e2", "rank": 0, "size": 1577312}, ...}

At resume, `verify` checks every listed file before anything is loaded: the files are dealt
round-robin to the ranks, each reads its share once, and all ranks agree on the first problem
(a file missing, of another size, of another checksum), which every rank then raises as the
same line. A checkpoint written before the manifest existed (no "files") loads unchecked.

CRC-32 finds a truncated, corrupted or swapped-in file (a copy from another step, another run);
it is not a defence against a file forged to match. zlib's CRC-32 streams at 1-2 GB/s, about
5x blake2b; the cost is one read of each rank's files at save (from the page cache) and one of
the checkpoint at resume, spread over the ranks: ~0.75 s per 420 MiB (measured 2026-11-29 on the
optimizer state of BERT-base; docs/performance.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch.distributed as dist

BLOCK = 1 << 20
"""Bytes read at a time when a checksum streams a file."""

Manifest = dict[str, dict]
"""File name inside the checkpoint (POSIX, e.g. `__0_0.distcp`) -> {"size", "crc32", "rank"}."""


def checksum(path: Path) -> str:
    """CRC-32 of the file's bytes, streamed, as 8 hex digits."""
    crc, buffer = 0, bytearray(BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def describe(root: Path, paths: Iterable[Path], *, rank: int) -> Manifest:
    """The manifest entries of the files at `paths` (under `root`) that rank `rank` wrote."""
    return {path.relative_to(root).as_posix(): {"size": path.stat().st_size, "crc32": checksum(path), "rank": rank}
            for path in paths}


def gather(entries: Manifest) -> Manifest | None:
    """Collective: every rank's entries, merged, on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return entries
    every: list[Manifest | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, entries)
    if dist.get_rank() != 0:
        return None
    return {name: entry for part in every for name, entry in (part or {}).items()}


def well_formed(files: object) -> bool:
    """`files` is a manifest as `gather` makes them (a hand-edited meta.json may hold anything)."""
    return isinstance(files, dict) and all(
        isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("crc32"), str)
        for entry in files.values())


def first_absent(root: Path, files: Mapping[str, Mapping]) -> str | None:
    """Why a listed file is not in `root` as its rank wrote it (missing, other size), or None."""
    for name, entry in sorted(files.items()):
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"checkpoint file {path} that rank {entry['rank']} wrote is missing as rank 0 sees it"
        if size != entry["size"]:
            return (f"checkpoint file {path} holds {size:,} bytes as rank 0 sees it where rank {entry['rank']} wrote "
                    f"{entry['size']:,}")
    return None


def problem(root: Path, name: str, entry: Mapping) -> str | None:
    """What is wrong with the file `name` of the checkpoint `root` against its entry, or None."""
    path = root / name
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return (f"checkpoint file {path} holds {size:,} bytes where {entry['size']:,} were saved "
                    f"({'truncated' if size < entry['size'] else 'replaced'})")
        found = checksum(path)
    except FileNotFoundError:
        return f"checkpoint file {path} is missing"
    except OSError as exc:
        return f"checkpoint file {path} cannot be read ({exc.strerror or exc})"
    if found != entry["crc32"]:
        return (f"checkpoint file {path} is not the file saved there (CRC-32 {found}, saved {entry['crc32']}): "
                f"copied from another checkpoint, or corrupted")
    return None


def verify(root: Path, files: Mapping[str, Mapping] | None) -> str | None:
    """Collective: the first problem of any listed file of the checkpoint `root`, the same on
    every rank, or None (also for a checkpoint without a manifest, which is not checked)."""
    if not files:
        return None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    names = sorted(files)
    found = None
    for i in range(rank, len(names), world):
        reason = problem(root, names[i], files[names[i]])
        if reason is not None:
            found = (i, reason)
            break
    if world == 1:
        return found[1] if found else None
    every: list[tuple[int, str] | None] = [None] * world
    dist.all_gather_object(every, found)
    first = min((f for f in every if f is not None), default=None)
    return first[1] if first else None
