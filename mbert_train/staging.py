"""Build a directory under a temporary name, fsync it, then rename it into place.

One implementation for every writer that must never leave a half-written result: `mbert-prep`'s
dataset, `mbert-convert`'s output, the run-end Hugging Face export (and the helpers
`fsync_tree` / `write_text_atomic` that checkpoints use). Beside `OUT` it uses::

    .OUT.tmp-PID-HEX    the directory being built; renamed to OUT when complete
    .OUT.old-PID-HEX    the previous OUT, moved aside while the new one takes its name

Protocol of `staged_dir(OUT, replace=...)`:

    1. leftovers of dead writers are cleaned (`clean_leftovers`)
    2. mkdir .OUT.tmp-PID-HEX; the caller writes into it
    3. chmod the files to the umask's permissions, fsync every file and directory in it
    4. if OUT exists: rename OUT -> .OUT.old-PID-HEX
    5. rename .OUT.tmp-PID-HEX -> OUT; fsync the parent
    6. delete .OUT.old-PID-HEX

A kill between 4 and 5 leaves no OUT but a complete `.OUT.old-*`: `clean_leftovers` renames it
back, so the previous result is never lost. Any other `.OUT.tmp-*` / `.OUT.old-*` whose process
is dead is deleted. Names carry the PID so a concurrent live writer's files are left alone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def process_umask() -> int:
    """The process umask, read without changing it (setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync persists the names created in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root`, children before their directory."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(dirpath)


def apply_umask(root: str | os.PathLike) -> None:
    """Give files under `root` the permissions the umask asks for (safetensors and mkstemp
    create 0600 files; shared clusters need group-readable checkpoints and exports)."""
    mode = 0o666 & ~process_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` atomically: temp file beside it, fsync, `os.replace`, fsync dir."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~process_umask())
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _leftover_re(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(out_dir: str | os.PathLike) -> list[Path]:
    """Restore or delete what killed writers left beside `out_dir`; returns what was touched.

    A `.OUT.old-*` with no OUT is the previous result of a writer killed mid-swap: it is
    renamed back to OUT. Other leftovers of dead processes are deleted.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    pattern = _leftover_re(out_dir.name)
    touched = []
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not (out_dir.exists() or out_dir.is_symlink()):
            os.rename(entry, out_dir)
            log.warning("restored %s from %s, left by a writer killed while replacing it", out_dir, entry.name)
        else:
            _remove(entry)
        touched.append(entry)
    return touched


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextmanager
def staged_dir(out_dir: str | os.PathLike, *, replace: bool) -> Iterator[Path]:
    """Yield a fresh directory beside `out_dir`; on success it becomes `out_dir`, on error it is removed.

    `replace=True` allows replacing an existing `out_dir`; the caller decides whether that is
    safe (recognises it as its own earlier output). An empty directory is always replaced.
    """
    out_dir = Path(out_dir)
    clean_leftovers(out_dir)
    exists = out_dir.exists() or out_dir.is_symlink()
    if exists and not replace and not _is_empty_dir(out_dir):
        raise FileExistsError(errno.EEXIST, "refusing to replace an existing directory", str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
        apply_umask(staging)
        fsync_tree(staging)
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.rename(out_dir, old)
            try:
                os.rename(staging, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            fsync_path(out_dir.parent)
            _remove(old)
        else:
            os.rename(staging, out_dir)
            fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
