"""A run holds its run dir for its whole life: one lease record, refreshed by a heartbeat.

Without it a second `mbert-train` on the same run dir (a second submission, a job restarted
over a live one) would run its start-up clean-up, delete the `.tmp-step_N` the first run is
writing, and the first would then commit a checkpoint holding only `meta.json` and `optim/`.

    RUN_DIR/.mbert-train-lease     # JSON: id, host, pid, start time, command, job, heartbeat

Rank 0 takes the lease before it writes anything into the run dir and releases it on every exit
(the end, a one-line error, a stop signal). Protocol, built only from operations that are
atomic on NFS, Lustre and GPFS too (no `flock`):

    take:     write the record to a temp file, hard-link it to the lease name: the link fails
              if the name exists, so one run wins, and a reader never sees half a record (file
              systems without hard links: `O_CREAT|O_EXCL`)
    beat:     every HEARTBEAT_S, the holder re-reads the record; while it is its own, it writes
              the next one (temp + rename, `write_text_atomic`); if it finds another run's record
              it has lost the lease and its next checkpoint stops the run (`problem`)
    refuse:   a holder alive on this machine, or one elsewhere whose record changes while the
              new run looks, stops the new run before it touches anything, in one line naming
              the holder (host, pid, since when) and the fix
    take over a holder that is gone: on this machine (same host, boot and pid namespace) when its
              pid is dead or belongs to another process now, at once; elsewhere when its record
              has not changed for the holder's `timeout_s` (TIMEOUT_S, 12 beats), measured
              on this machine's clock so that clock skew between nodes does not matter. The stale
              record is renamed aside (one waiter wins), checked to be the one judged stale, then
              the new record is linked in as above. The start line says so.
    release:  the holder stops beating and deletes the record if it is still its own.

A restart of the same job (torchrun `--max-restarts`, an elastic restart, a SLURM requeue) starts
after the previous ranks are dead: a clean exit released the lease, a killed rank 0 on the same
host is gone at once, and one on another host is taken over after `timeout_s` of silence. The
new run waits that long rather than fail (it prints that it waits). A holder that stalls for
longer (a hung file system) may be taken over while alive: it finds another run's record at its
next beat or checkpoint and stops before it renames or deletes anything.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from mbert_train.errors import UserError
from mbert_train.staging import fsync_path, write_text_atomic

log = logging.getLogger(__name__)

LEASE_FILE = ".mbert-train-lease"
HEARTBEAT_S = 5.0
"""How often the holder refreshes its record: a run started on another host sees a live holder's
beat, and is refused, within this long."""
TIMEOUT_S = 60.0
"""A record unchanged this long (on the waiter's clock) belongs to a holder that is gone. Twelve
beats: a rank 0 whose heartbeat thread waits for the GIL (a long write of a large model shard)
or for a slow shared file system must not be taken over while it is alive."""
_POLL_S = 0.5
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class RunDirHeld(UserError):
    """Another run holds the run dir; one line naming it (host, pid, since when) and the fix."""


def is_lease_file(name: str) -> bool:
    """The lease record and its temp files (they belong to a run dir like its marker)."""
    return name.lstrip(".").startswith(LEASE_FILE.lstrip("."))


def _proc_start(pid: int) -> int | None:
    """Start time of process `pid` (clock ticks since boot; -1 without /proc), None if there is
    no such process or only its zombie."""
    if Path("/proc/self/stat").exists():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return None
        return None if fields[0] in ("Z", "X") else int(fields[19])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return -1


def _machine() -> dict[str, str | None]:
    """What makes a pid meaningful: host name, boot and pid namespace (containers that share a
    host name but not their pids differ in the last)."""
    def read(reader: Callable[[], str]) -> str | None:
        try:
            return reader().strip()
        except OSError:
            return None
    return {"host": socket.gethostname(),
            "boot_id": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text()),
            "pid_ns": read(lambda: os.readlink("/proc/self/ns/pid"))}


def _job() -> str | None:
    for name, label in (("SLURM_JOB_ID", "SLURM job"), ("TORCHELASTIC_RUN_ID", "torchrun run")):
        if os.environ.get(name):
            return f"{label} {os.environ[name]}"
    return None


def describe(holder: dict) -> str:
    """`host h pid p (SLURM job 7) since 2024-05-01 12:00:03`, from a lease record."""
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    job = f" ({holder['job']})" if holder.get("job") else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job} since {when}"


def _parse(raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _local_verdict(holder: dict) -> str | None:
    """"alive" or "gone" for a holder on this machine; None for one elsewhere (or unknown)."""
    here = _machine()
    if any(holder.get(key) != value for key, value in here.items()) or type(holder.get("pid")) is not int:
        return None
    start = _proc_start(holder["pid"])
    if start is None or start not in (-1, holder.get("proc_start")):
        return "gone"  # dead, or its pid now names another process
    return "alive"


def _timeout(holder: dict) -> float:
    """The holder's own promise (a record without one, or a nonsensical one: TIMEOUT_S)."""
    value = holder.get("timeout_s")
    return float(value) if isinstance(value, (int, float)) and 0 < value <= 3600 else TIMEOUT_S


def _refusal(run_dir: Path, holder: dict, why: str) -> RunDirHeld:
    who = describe(holder) if holder else "a run whose lease record is unreadable"
    return RunDirHeld(f"run.dir={run_dir} is in use by another mbert-train run ({who}; {why}); let it finish or "
                      f"stop it, or point run.dir at another folder")


def _create(path: Path, text: str) -> bool:
    """Create `path` holding `text`, unless it exists (False)."""
    tmp = path.with_name(f"{path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            # NFS over a lossy network may retry a link that succeeded: then it is ours.
            return os.stat(tmp).st_nlink == 2
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True


def _take_over(path: Path, stale: bytes) -> bool:
    """Remove the record judged stale; False if it changed meanwhile (restored when possible)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # released, or another waiter moved it first
    try:
        if _read(aside) == stale:
            return True
        try:  # a beat (or another waiter's record) arrived in between: put it back
            os.link(aside, path)
        except OSError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


def holder_problem(run_dir: Path | str) -> str | None:
    """For a writer that holds no lease: one line if `run_dir` has a lease record whose holder
    is not known to be gone (it may be writing its checkpoints), else None."""
    raw = _read(Path(run_dir) / LEASE_FILE)
    if raw is None:
        return None
    holder = _parse(raw)
    if _local_verdict(holder) == "gone":
        return None
    return str(_refusal(Path(run_dir), holder, "it may be writing there"))


class Lease:
    """Rank 0's hold on a run dir; `acquire` it, check `problem()` before writing, `release()`."""

    def __init__(self, run_dir: Path, record: dict, note: str) -> None:
        self.path = Path(run_dir) / LEASE_FILE
        self.record = record
        self.note = note
        """`took over the lease of ...` when a stale holder was replaced, else ''."""
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name="mbert-lease-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, run_dir: Path | str, *, command: str, max_wait_s: float = 300.0,
                say: Callable[[str], None] = print) -> Lease:
        """Hold `run_dir` (it must exist), or raise RunDirHeld naming the live holder. A holder
        that looks gone is taken over after its timeout, waiting at most `max_wait_s`."""
        run_dir = Path(run_dir)
        path = run_dir / LEASE_FILE
        interval = HEARTBEAT_S
        record = {"id": uuid.uuid4().hex, **_machine(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                  "started": time.time(), "command": command, "job": _job(), "beat": 0, "heartbeat": time.time(),
                  "interval_s": interval, "timeout_s": TIMEOUT_S}
        note, seen, began = "", None, time.monotonic()
        while True:
            if _create(path, json.dumps(record, indent=2) + "\n"):
                return cls(run_dir, record, note)
            raw = _read(path)
            if raw is None:
                continue  # released meanwhile
            holder = _parse(raw)
            verdict = _local_verdict(holder)
            if verdict == "alive":
                raise _refusal(run_dir, holder, "its process is alive on this host")
            if verdict is None:
                now = time.monotonic()
                if seen is not None and raw != seen[0]:
                    raise _refusal(run_dir, holder, "its heartbeat goes on")
                if seen is None:
                    seen = (raw, now)
                    say(f"run.dir={run_dir} is held by {describe(holder)}, on another host or container; waiting up "
                        f"to {_timeout(holder):.0f} s for its heartbeat before taking it over")
                silent = now - seen[1]
                if silent < _timeout(holder):
                    if now - began >= max_wait_s:
                        raise _refusal(run_dir, holder, f"no heartbeat seen in {silent:.0f} s, but it is taken over "
                                       f"only after {_timeout(holder):.0f} s")
                    time.sleep(min(_POLL_S, _timeout(holder) - silent))
                    continue
                why = f"no heartbeat for {silent:.0f} s"
            else:
                why = "its process is gone"
            if _take_over(path, raw):
                note = f"took over the lease of {describe(holder)}: {why}"
            seen = None

    def problem(self) -> str | None:
        """None while this run holds the lease; else one line saying who took it over."""
        with self._lock:
            if self._lost is None:
                self._verify()
            return self._lost

    def release(self) -> None:
        """Stop the heartbeat; delete the record if it is still ours (not in a forked child)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if os.getpid() != self.record["pid"]:
            return
        with self._lock:
            raw = _read(self.path)
            if raw is not None and _parse(raw).get("id") == self.record["id"]:
                self.path.unlink(missing_ok=True)

    def _verify(self) -> bool:
        """Whether the record is still ours (re-created if it vanished); sets `_lost` if not."""
        raw = _read(self.path)
        if raw is None and _create(self.path, json.dumps(self.record, indent=2) + "\n"):
            return True
        holder = _parse(raw or _read(self.path) or b"")
        if holder.get("id") == self.record["id"]:
            return True
        self._lost = (f"run.dir={self.path.parent} was taken over by {describe(holder)} while this run held it "
                      f"(its heartbeat stalled for over {TIMEOUT_S:.0f} s); this run stops without writing further: "
                      f"make sure only one run uses the folder, then resume it")
        return False

    def _beat_forever(self) -> None:
        failing = False
        while not self._stop.wait(self.record["interval_s"]):
            try:
                with self._lock:
                    if self._lost is not None or not self._verify():
                        log.error("%s", self._lost)
                        return
                    self.record = {**self.record, "beat": self.record["beat"] + 1, "heartbeat": time.time()}
                    write_text_atomic(self.path, json.dumps(self.record, indent=2) + "\n")
                failing = False
            except OSError as exc:
                if not failing:  # the run's own writes report a lasting problem
                    log.warning("lease heartbeat %s failed: %s", self.path, exc)
                failing = True
