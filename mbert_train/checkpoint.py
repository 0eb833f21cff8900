"""Crash-safe checkpoint directories: write to a temp dir, rename, then point `latest` at it.

Layout under a run directory::

    RUN_DIR/checkpoints/step_00000100/meta.json   # written before the rename
    RUN_DIR/checkpoints/step_00000100/...         # model/optimizer/sampler/RNG files
    RUN_DIR/checkpoints/latest                    # text file: "step_00000100"

A checkpoint directory is complete once it carries its final name, because `os.rename` of a
directory is atomic on POSIX file systems: a crash leaves either the old set of names or the
new one, never a half-renamed directory. `latest` is replaced (write temp, fsync,
`os.replace`) only after the rename, so at every instant it names a complete checkpoint or
an older one. The save protocol, for all ranks::

    tmp = ckpt.begin(step)      # every rank gets the same path; rank 0 creates it
    barrier()
    ... each rank writes its files into tmp ...
    barrier()
    ckpt.commit(step, layout=...)  # rank 0 renames and updates `latest`; others no-op
    barrier()

Multi-node runs need RUN_DIR on a file system every node sees (NFS, Lustre, GPFS).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or unreadable; the message is one actionable line."""


def step_tag(step: int) -> str:
    """Directory name of the checkpoint at `step`, zero-padded so names sort by step."""
    if step < 0:
        raise ValueError(f"checkpoint step={step} must be >= 0")
    return f"step_{step:08d}"


def step_of(path: Path | str) -> int:
    """The step encoded in a checkpoint directory name such as `step_00000100`."""
    match = _TAG_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory name like step_00000100")
    return int(match.group(1))


def _fsync_path(path: Path) -> None:
    # Directories must be opened read-only to fsync them; that persists their entries
    # (the names created or renamed inside), which a file fsync alone does not.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The `meta.json` of a complete checkpoint (step, time, world layout)."""
    meta_path = Path(checkpoint) / META_FILE
    try:
        return json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {meta_path} is missing; {_ADVICE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint file {meta_path} is truncated or corrupt; {_ADVICE}") from None


class CheckpointDir:
    """The `checkpoints/` directory of one run: begin/commit saves, find the latest, rotate.

    Every rank constructs one with its own `rank`; only rank 0 touches shared state
    (creating, renaming, deleting directories and writing `latest`).
    """

    def __init__(self, run_dir: Path | str, *, rank: int = 0, keep_last: int | None = 3) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1, or None to keep every checkpoint")
        self.root = Path(run_dir) / CHECKPOINTS_SUBDIR
        self.rank = rank
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        """Final (complete) directory of the checkpoint at `step`."""
        return self.root / step_tag(step)

    def tmp_path(self, step: int) -> Path:
        """Directory that ranks write into before `commit` renames it to `path(step)`."""
        return self.root / (TMP_PREFIX + step_tag(step))

    def begin(self, step: int) -> Path:
        """Start saving `step`; rank 0 creates a fresh temp dir. Barrier before writing into it."""
        tmp = self.tmp_path(step)
        if self.rank == 0:
            # A leftover of a save of this same step that crashed: its files are unusable.
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, *, layout: Mapping[str, Any] | None = None) -> Path:
        """Make the temp dir of `step` the newest complete checkpoint (rank 0; others no-op).

        `layout` records the world the checkpoint was written by (e.g. world_size,
        tensor_parallel, data_parallel, zero_stage) so a resume can check it.
        """
        final = self.path(step)
        if self.rank != 0:
            return final
        tmp = self.tmp_path(step)
        if not tmp.is_dir():
            raise CheckpointError(f"commit({step}) found no {tmp}; call begin({step}) first on rank 0")
        meta = {"step": step, "time": time.time(),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": socket.gethostname(), "layout": dict(layout or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            # Saving the same step twice (e.g. a preemption checkpoint right after a periodic
            # one): move the old copy aside under a temp name, which garbage collection
            # removes if we crash before deleting it ourselves.
            aside = self.root / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, final)
        _fsync_path(self.root)
        _write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
        self._rotate(keep=final)
        return final

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp dirs and foreign names are skipped)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and _TAG_RE.match(p.name) and (p / META_FILE).is_file()]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        """The checkpoint to resume from, or None when there is none.

        Follows `latest`; if it is missing or names a directory that is gone, falls back to
        the newest complete checkpoint and logs a warning. On rank 0 this also deletes
        `.tmp-*` leftovers of crashed saves, so call it before any new save begins.
        """
        if self.rank == 0:
            self.collect_garbage()
        complete = self.list()
        pointer = self.root / LATEST_FILE
        tag = pointer.read_text().strip() if pointer.is_file() else None
        if tag is not None:
            candidate = self.root / tag
            if _TAG_RE.match(tag) and (candidate / META_FILE).is_file():
                return candidate
        if not complete:
            if tag is not None:
                log.warning("%s names %r but no complete checkpoint exists; starting fresh",
                            pointer, tag)
            return None
        newest = complete[-1]
        reason = f"names {tag!r}, which is missing or incomplete" if tag else "is missing"
        log.warning("%s %s; falling back to the newest complete checkpoint %s",
                    pointer, reason, newest)
        return newest

    def collect_garbage(self) -> list[Path]:
        """Delete `.tmp-*` leftovers of crashed saves (rank 0); returns what was removed."""
        if self.rank != 0 or not self.root.is_dir():
            return []
        removed = []
        for leftover in self.root.glob(TMP_PREFIX + "*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
        if removed:
            log.warning("removed %d incomplete checkpoint leftover(s) from a crashed save: %s",
                        len(removed), ", ".join(p.name for p in removed))
        return removed

    def _rotate(self, *, keep: Path) -> None:
        if self.keep_last is None:
            return
        complete = self.list()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old)


_ADVICE = "delete the checkpoint dir or point run.dir elsewhere"


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU, with a one-line error naming a bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; {_ADVICE}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt; {_ADVICE}") from exc


def load_torch(path: Path | str) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; {_ADVICE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            culprit = found.group(1) if found else "a non-tensor object"
            raise CheckpointError(f"checkpoint file {path} holds {culprit}, which weights_only "
                                  "loading refuses; save only tensors and plain Python "
                                  "containers") from exc
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt; {_ADVICE}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt; {_ADVICE}") from exc
