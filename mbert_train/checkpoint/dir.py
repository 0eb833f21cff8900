"""Crash-safe checkpoint directories: write to a temp dir, rename, then point `latest` at it.

Layout under a run directory::

    RUN_DIR/checkpoints/step_00000100/meta.json   # written last, before the rename: format, layout,
                                                  # every file, the model config, the run record
    RUN_DIR/checkpoints/step_00000100/.metadata, __0_0.distcp, ...  # the training state, one
                                                  # torch.distributed.checkpoint (`mbert_train.checkpoint.state`)
    RUN_DIR/checkpoints/latest                    # text file: "step_00000100"
    RUN_DIR/checkpoints/set_aside_DATE_TIME/step_00000200  # moved aside by trainer.resume=100

The state is stored in the full (unsharded) form of every tensor, so a checkpoint loads at
any TP x DP x ZeRO stage (`mbert_train.checkpoint.dcp`).

A checkpoint directory is complete once it carries its final name, because `os.rename` of a
directory is atomic on POSIX file systems: a crash leaves either the old set of names or the
new one, never a half-renamed directory. `latest` is replaced (write temp, fsync,
`os.replace`) only after the rename, so at every instant it names a complete checkpoint or
an older one. The save protocol, for all ranks::

    tmp = ckpt.begin(step)      # every rank gets the same path; rank 0 creates it
    barrier()
    ... each rank writes its files into tmp ...
    files = manifest.gather(manifest.describe(tmp, written, rank=rank))  # size + CRC-32 of each
    ckpt.commit(step, layout=..., files=files, record=...)  # rank 0 renames and updates `latest`
    barrier()

`commit` on rank 0, step by step (a kill between any two leaves a state the next start's
`collect_garbage` turns back into complete checkpoints, losing none that was committed):

    1. check that every file of every rank is in the temp dir at the size its rank wrote
       (`mbert_train.manifest`), chmod the files to the umask, fsync them, then write `meta.json`
       atomically: a `.tmp-step_N` holding `meta.json` is complete. `meta.json` records
       `commit`, one more than the largest of the directory, so checkpoints order by when they
       were written, and `files`, what each file should be, which a resume checks first
    2. saving a step that exists: rename `step_N` -> `.tmp-replaced-step_N-PID`
    3. rename `.tmp-step_N` -> `step_N`, fsync the directory, delete the replaced copy
    4. replace `latest`
    5. rotation: rename each checkpoint beyond `keep_last` to `.tmp-deleting-step_M-PID`, fsync
       the directory, then delete it, so a half-deleted checkpoint never carries a final name

`replace` (one process; `mbert-convert upgrade-checkpoint` rewriting a checkpoint of an earlier
format) is steps 1-3 with the old `commit` kept: the checkpoint keeps its place in the order,
and `latest` and the other checkpoints are left as they are.

A kill between 2 and 3 leaves no `step_N` but two complete copies: garbage collection renames
the newer one back to `step_N` (of two with the same `commit`, the `.tmp-step_N`) and deletes
the other. Every other `.tmp-*` is deleted.
That is safe because rank 0 changes the directory (begin, commit, replace, set_aside_after,
collect_garbage) only while its run holds the run dir's lease (`mbert_train.lease`), checked
first each time: a second run on the same run dir never deletes the `.tmp-step_N` a live one
is writing, and a run whose lease was taken over stops before it writes again.
"Newest" means the largest `commit` (the run's own history), not the largest step: a run
restarted from an older checkpoint writes steps below those of its abandoned future, and those
are what rotation keeps and what a missing `latest` falls back to.

Multi-node runs need RUN_DIR on a file system every node sees (NFS, Lustre, GPFS).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mbert_train import manifest
from mbert_train.errors import UserError, as_os_error, describe_os_error
from mbert_train.lease import LEASE_FILE, Lease, holder_problem
from mbert_train.staging import apply_umask, fsync_path, fsync_tree, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "meta.json"
MANIFEST_KEY = "files"
"""`meta.json`'s list of every file of the checkpoint with its size and CRC-32 (`mbert_train.manifest`);
absent in checkpoints written before it existed, which then load unchecked."""
RUN_KEY = "run"
"""`meta.json`'s run record: the W&B run id, the dataset trained on, the redacted config."""
MODEL_KEY = "model"
"""`meta.json`'s model config (`ModelConfig.to_dict()`): what the weights in the state are."""
FORMAT = 3
"""`meta.json` "format": 3 = one torch.distributed.checkpoint of the whole training state plus
`meta.json`. Format 2 held weights as per-TP-rank safetensors, the optimizer state in `optim/`,
`trainer_state.pt`, `rng_rank*.pt` and `run.json` (`mbert_train.checkpoint.upgrade` rewrites it
as format 3); format 1 (no "format" key) one `trainer_rank*.pt` per rank."""
LEGACY_RUN_FILE = "run.json"
"""Format 2's run record (format 3 keeps it in `meta.json`)."""
TMP_PREFIX = ".tmp-"
SET_ASIDE_PREFIX = "set_aside_"
"""Folders under `checkpoints/` holding the checkpoints a `trainer.resume=STEP` start moved aside."""
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_REPLACED_RE = re.compile(rf"^{re.escape(TMP_PREFIX)}replaced-(step_\d{{8,}})-\d+$")


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, unreadable or cannot be written; one actionable line."""


def read_run_record(checkpoint: Path | None) -> dict[str, Any]:
    """The run record of a checkpoint ({} for None or a checkpoint without one): the W&B run
    id, the dataset it trained on, the redacted config."""
    if checkpoint is None or not (Path(checkpoint) / META_FILE).is_file():
        return {}
    record = read_meta(Path(checkpoint)).get(RUN_KEY)
    if isinstance(record, dict):
        return record
    if (Path(checkpoint) / LEGACY_RUN_FILE).is_file():  # format 2
        return read_json(Path(checkpoint) / LEGACY_RUN_FILE)
    return {}


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


@contextmanager
def write_errors(path: Path | str) -> Iterator[None]:
    """Turn a failed write under `path` (disk full, read-only, permissions) into a one-line
    CheckpointError naming the file; anything else propagates unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        os_error = as_os_error(exc)
        if os_error is None:
            raise
        where = getattr(exc, "filename", None) or path
        raise CheckpointError(describe_os_error(os_error, where, "writing checkpoint")) from exc


def read_json(path: Path | str) -> dict[str, Any]:
    """A checkpoint's JSON object file (`meta.json`, `run.json`), with one-line errors naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; {CHECKPOINT_ADVICE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc}); {CHECKPOINT_ADVICE}") from None
    if not text.strip():
        raise CheckpointError(f"checkpoint file {path} is empty; {CHECKPOINT_ADVICE}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt; {CHECKPOINT_ADVICE}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint file {path} holds a JSON {type(value).__name__}, not an object; "
                              f"{CHECKPOINT_ADVICE}")
    return value


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The `meta.json` of a complete checkpoint (step, commit number, time, world layout)."""
    return read_json(Path(checkpoint) / META_FILE)


def commit_number(checkpoint: Path) -> int:
    """Position of `checkpoint` in the order checkpoints were written (0: unknown or unreadable)."""
    try:
        number = read_meta(checkpoint).get("commit", 0)
    except CheckpointError:
        return 0
    return number if type(number) is int else 0


def _write_order(checkpoint: Path) -> tuple[int, int]:
    # Checkpoints written before commit numbers existed (0) sort by step, before all others.
    return commit_number(checkpoint), step_of(checkpoint)


def find_latest(run_dir: Path | str) -> tuple[Path | None, str | None]:
    """(checkpoint `latest` names, or None; a warning why it could not be used, or None).

    Read-only: never deletes or repairs anything, so `mbert-convert` can call it on a run it
    does not own. `latest` must name a `step_XXXXXXXX` directory inside `checkpoints/` holding
    a `meta.json`; anything else (a path such as `../../x`, a missing directory) is not followed,
    and the most recently written complete checkpoint is returned instead, with a warning.
    """
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    pointer = root / LATEST_FILE
    try:
        tag = pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        tag = "<unreadable>"
    if tag is not None and _TAG_RE.match(tag) and (root / tag / META_FILE).is_file():
        return root / tag, None
    complete = CheckpointDir(run_dir).list()
    if not complete:
        if tag is None:
            return None, None
        return None, f"{pointer} names {tag!r} but no complete checkpoint exists"
    reason = f"names {tag!r}, which is not a complete checkpoint of this run" if tag else "is missing"
    return complete[-1], f"{pointer} {reason}; falling back to the newest complete checkpoint {complete[-1]}"


class CheckpointDir:
    """The `checkpoints/` directory of one run: begin/commit saves, find the latest, rotate.

    Every rank constructs one with its own `rank`; only rank 0 touches shared state
    (creating, renaming, deleting directories and writing `latest`), and only while `lease`
    (rank 0's hold on the run dir) is its own; without one, only while no lease record of
    another run that may be alive is there.
    """

    def __init__(self, run_dir: Path | str, *, rank: int = 0, keep_last: int | None = 3,
                 lease: Lease | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1, or None to keep every checkpoint")
        self.root = Path(run_dir) / CHECKPOINTS_SUBDIR
        self.rank = rank
        self.keep_last = keep_last
        self._run_dir_existed = Path(run_dir).is_dir()  # a run dir that then vanishes is never recreated
        self.lease = lease

    def _require_lease(self) -> None:
        with write_errors(self.root.parent / LEASE_FILE):
            problem = self.lease.problem() if self.lease is not None else holder_problem(self.root.parent)
        if problem is not None:
            raise CheckpointError(problem)

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
            run_dir = self.root.parent
            if self._run_dir_existed and not run_dir.is_dir():  # what was saved before went with it
                raise CheckpointError(f"run dir {run_dir} is gone (deleted or unmounted while the run was training); "
                                      f"the checkpoint of step {step} is not written: start again with a new run.dir")
            self._require_lease()
            with write_errors(tmp):
                # A leftover of a save of this same step that crashed: its files are unusable.
                if tmp.exists():
                    shutil.rmtree(tmp)
                if not self.root.is_dir():
                    self.root.mkdir(parents=not self._run_dir_existed, exist_ok=True)
                tmp.mkdir()
        return tmp

    def commit(self, step: int, *, layout: Mapping[str, Any] | None = None,
               files: manifest.Manifest | None = None, record: Mapping[str, Any] | None = None) -> Path:
        """Make the temp dir of `step` the newest complete checkpoint (rank 0; others no-op).

        `layout` records the world the checkpoint was written by (e.g. world_size,
        tensor_parallel, data_parallel, zero_stage) so a resume can check it; `files`, every
        rank's files (`manifest.gather`), which must all be in the temp dir at their size;
        `record`, more entries of `meta.json` (the model config, the run record).
        """
        final = self.path(step)
        if self.rank != 0:
            return final
        tmp = self._committable(step)
        with write_errors(tmp):
            commit = max(map(commit_number, self.list()), default=0) + 1
            self._finish(tmp, step, commit, layout, files, record)
            self._swap_in(tmp, final)
            write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
            self._rotate(keep=final)
        return final

    def replace(self, step: int, *, layout: Mapping[str, Any], files: manifest.Manifest,
                record: Mapping[str, Any]) -> Path:
        """Put the temp dir of `step` in place of the complete checkpoint `step` it rewrites
        (one process), keeping that one's `commit`: its place in the order, `latest` and every
        other checkpoint stay as they were."""
        final = self.path(step)
        tmp = self._committable(step)
        commit = commit_number(final)
        with write_errors(tmp):
            self._finish(tmp, step, commit, layout, files, record)
            self._swap_in(tmp, final)
        return final

    def _committable(self, step: int) -> Path:
        tmp = self.tmp_path(step)
        if not tmp.is_dir():
            raise CheckpointError(f"commit({step}) found no {tmp}; call begin({step}) first on rank 0")
        self._require_lease()
        return tmp

    def _swap_in(self, tmp: Path, final: Path) -> None:
        if final.exists():
            # Saving the same step twice (e.g. after resuming from an older checkpoint): move
            # the old copy aside; if we are killed before the next rename, garbage collection
            # renames the newer complete copy back (see the module docstring).
            aside = self.root / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
            os.rename(final, aside)
            os.rename(tmp, final)
            fsync_path(self.root)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, final)
            fsync_path(self.root)

    def _finish(self, tmp: Path, step: int, commit: int, layout: Mapping[str, Any] | None,
                files: manifest.Manifest | None, record: Mapping[str, Any] | None) -> None:
        absent = manifest.first_absent(tmp, files or {})
        if absent is not None:
            raise CheckpointError(f"{absent}; the checkpoint of step {step} is not committed (the previous one stays): "
                                  f"run.dir must be one folder every node sees (NFS, Lustre, GPFS)")
        apply_umask(tmp)
        fsync_tree(tmp)
        meta = {**dict(record or {}), "format": FORMAT, "step": step, "commit": commit,
                "time": time.time(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": socket.gethostname(), "layout": dict(layout or {})}
        if files is not None:
            meta[MANIFEST_KEY] = dict(sorted(files.items()))
        # Last, and atomically: a temp dir holding meta.json is complete (collect_garbage relies on it).
        write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first in the order they were written (temp dirs and foreign
        names are skipped); checkpoints without a commit number come first, by step."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and _TAG_RE.match(p.name) and (p / META_FILE).is_file()]
        return sorted(found, key=_write_order)

    def before(self, checkpoint: Path) -> Path | None:
        """The complete checkpoint written just before `checkpoint`, or None."""
        complete = self.list()
        at = complete.index(checkpoint) if checkpoint in complete else 0
        return complete[at - 1] if at > 0 else None

    def verify(self, checkpoint: Path, meta: Mapping[str, Any]) -> None:
        """Collective: every file of `checkpoint` as its manifest (`meta`'s "files") records it,
        else the same one line on every rank. A checkpoint without a manifest is not checked.

        A damaged checkpoint never falls back to the one before by itself: that would retrain
        the steps since and replace this one at their next save, where putting back a misplaced
        file loses nothing. The line names both ways."""
        files = meta.get(MANIFEST_KEY)
        if files is not None and not manifest.well_formed(files):
            raise CheckpointError(f"checkpoint file {checkpoint / META_FILE} has a malformed {MANIFEST_KEY!r} list; "
                                  f"{CHECKPOINT_ADVICE}")
        found = manifest.verify(checkpoint, files)
        if found is None:
            return
        earlier = self.before(checkpoint)
        fix = (f"put the original back, or continue from the checkpoint before it with trainer.resume="
               f"{step_of(earlier)} (later checkpoints are set aside, not deleted)" if earlier else
               "put the original back, or start over in a new run.dir (no earlier checkpoint exists)")
        raise CheckpointError(f"{found}; {fix}")

    def latest(self) -> Path | None:
        """The checkpoint to resume from, or None when there is none.

        Follows `latest`; if it is missing or names a directory that is gone, falls back to
        the newest complete checkpoint and logs a warning. On rank 0 this first repairs an
        interrupted re-commit and deletes `.tmp-*` leftovers of crashed saves, so call it
        before any new save begins.
        """
        if self.rank == 0:
            self.collect_garbage()
        found, warning = find_latest(self.root.parent)
        if warning:
            log.warning("%s", warning + ("; starting fresh" if found is None else ""))
        return found

    def set_aside_after(self, step: int) -> Path | None:
        """Make `step` the checkpoint to continue from (rank 0): every complete checkpoint of a
        later step is moved, whole and by rename, into a new `set_aside_DATE_TIME/` beside them
        (nothing is deleted), then `latest` names `step`. Returns the folder, or None when no
        later checkpoint existed."""
        self._require_lease()
        later = [p for p in self.list() if step_of(p) > step]
        aside = None
        with write_errors(self.root):
            if later:
                stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
                aside = self.root / f"{SET_ASIDE_PREFIX}{stamp}"
                n = 1
                while aside.exists():
                    n += 1
                    aside = self.root / f"{SET_ASIDE_PREFIX}{stamp}-{n}"
                aside.mkdir()
                for checkpoint in later:
                    os.rename(checkpoint, aside / checkpoint.name)
                fsync_path(aside)
                fsync_path(self.root)
            write_text_atomic(self.root / LATEST_FILE, step_tag(step) + "\n")
        return aside

    def collect_garbage(self) -> list[Path]:
        """Restore an interrupted re-commit, then delete leftovers of crashed saves (rank 0);
        returns what was removed."""
        if self.rank != 0 or not self.root.is_dir():
            return []
        self._require_lease()
        with write_errors(self.root):
            self._restore_replaced()
            removed = []
            for leftover in sorted(self.root.iterdir()):
                if not (leftover.name.startswith(TMP_PREFIX) or leftover.name.startswith(f".{LATEST_FILE}.tmp-")):
                    continue
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
        if removed:
            log.warning("removed %d incomplete checkpoint leftover(s) from a crashed save: %s",
                        len(removed), ", ".join(p.name for p in removed))
        return removed

    def _restore_replaced(self) -> None:
        """A save of an existing step killed between its two renames left no `step_N` but the
        old copy (`.tmp-replaced-step_N-PID`) and perhaps a complete new one (`.tmp-step_N`
        with meta.json): rename the newer complete one back to `step_N`."""
        copies: dict[str, list[Path]] = {}
        for entry in self.root.iterdir():
            match = _REPLACED_RE.match(entry.name)
            if match and (entry / META_FILE).is_file():
                copies.setdefault(match.group(1), []).append(entry)
        for tag, asides in sorted(copies.items()):
            final = self.root / tag
            if final.exists():
                continue  # the re-commit got through both renames: the asides are garbage
            fresh = self.root / (TMP_PREFIX + tag)
            candidates = [*asides, *([fresh] if (fresh / META_FILE).is_file() else [])]
            newest = max(candidates, key=lambda p: (commit_number(p), p == fresh))
            os.rename(newest, final)
            fsync_path(self.root)
            log.warning("restored %s from %s, left by a save killed while replacing it", final, newest.name)

    def _rotate(self, *, keep: Path) -> None:
        if self.keep_last is None:
            return
        complete = self.list()
        doomed = []
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:  # what `latest` names, and the newest: never rotated out
                # Renamed first (atomic), so a kill while deleting never leaves a partial
                # directory under a final name; garbage collection removes the rest.
                doomed.append(self.root / f"{TMP_PREFIX}deleting-{old.name}-{os.getpid()}")
                os.rename(old, doomed[-1])
        if doomed:
            fsync_path(self.root)
        for path in doomed:
            shutil.rmtree(path)


CHECKPOINT_ADVICE = "delete the checkpoint dir or point run.dir elsewhere"
