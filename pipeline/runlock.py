"""One job per run directory: ``run_dir/run.lock``, its holder, its heartbeat, and taking it over.

Two jobs writing one run directory (a second `launch local` by mistake, a Slurm incarnation
left running on a node the controller lost after the job was requeued) delete each other's
staging directories, prune each other's checkpoints and interleave their metrics. So whatever
starts a training job holds the run directory's lock first:

- `launch local` holds it for the whole job (its processes see the launcher's token in
  ``GENPIPE_RUN_LOCK`` and work under it); any other start (the Slurm entry point, ``python -m
  pipeline.trainer`` under torchrun) takes it in `Trainer` on rank 0, before anything is written;
- ``run.lock`` is JSON (host, pid and its start time, Slurm job id and restart count, when, a
  random token), created atomically (written aside, then hard-linked into place: it appears whole
  or not at all); its modification time is the heartbeat, refreshed every `HEARTBEAT_S` by the
  holder's thread;
- a lock held by a live holder is an error naming it; a stale one is taken over with a line
  saying why: its process is gone (same host), it has not beaten for `STALE_S`, or it belongs to an
  earlier incarnation of this very Slurm job (Slurm requeues a job only once it believes the job
  ended);
- before it stages, commits or prunes a checkpoint, rank 0 checks that the lock is still its own
  (`RunLock.lost`): a holder that was taken over stops without writing, in one line, instead of
  destroying the new holder's work;
- the holder removes the lock when it ends; a killed one leaves it behind, stale as above.

Reading a run (`launch status`, `sample`, `eval`, `export`) takes no lock.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 20.0
"""How often the holder refreshes the lock's modification time."""
STALE_S = 300.0
"""A lock whose heartbeat is older than this is stale (its holder is dead or cut off)."""
TOKEN_VARIABLE = "GENPIPE_RUN_LOCK"
"""Set by a launcher that holds the lock for the processes it starts."""

_held: dict[Path, RunLock] = {}
_held_guard = threading.Lock()


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_NAME


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _me(token: str) -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "since": time.time(), "token": token,
    }


def describe(holder: dict) -> str:
    text = f"process {holder.get('pid')} on {holder.get('host')}"
    if holder.get("slurm_job_id"):
        text += f" (Slurm job {holder['slurm_job_id']}, restart {holder.get('slurm_restart', 0)})"
    since = holder.get("since")
    if isinstance(since, (int, float)):
        text += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    return text


def read_holder(run_dir: str | os.PathLike) -> tuple[dict, float] | None:
    """(the holder's record, seconds since its last heartbeat), or None when nobody holds it."""
    path = lock_path(run_dir)
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    if not isinstance(holder, dict):
        holder = {"host": "?", "pid": "?", "token": None}
    return holder, max(0.0, age)


def stale_reason(holder: dict, age: float) -> str | None:
    """Why a holder no longer holds the run directory, or None when it may still be working."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _alive(holder["pid"], holder.get("pid_start")):
            return "its process is gone"
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_S:.0f} s)"
    job = os.environ.get("SLURM_JOB_ID")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if job and holder.get("slurm_job_id") == job and int(holder.get("slurm_restart") or 0) < restart:
        return f"Slurm requeued job {job} since (restart {holder.get('slurm_restart') or 0} -> {restart})"
    return None


def in_use_error(run_dir: str | os.PathLike, holder: dict, age: float) -> UserError:
    return UserError(
        f"run_dir: {run_dir} is in use by {describe(holder)}, heartbeat {age:.0f} s ago "
        f"({lock_path(run_dir)}); stop that job first, or train into another run_dir"
    )


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise if a live holder has the run directory (for `launch slurm`, before it writes)."""
    found = read_holder(run_dir)
    if found is None:
        return
    ours = {lock.token for lock in _held.values()} | {os.environ.get(TOKEN_VARIABLE)} - {None}
    if found[0].get("token") not in ours and stale_reason(*found) is None:
        raise in_use_error(run_dir, *found)


class RunLock:
    """This process's hold on a run directory (`acquire` makes one)."""

    def __init__(self, run_dir: Path, token: str, beats: bool):
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self.token = token
        self.count = 1
        self._stop = threading.Event()
        self._thread = None
        if beats:
            self._thread = threading.Thread(target=self._beat, name=f"run-lock {run_dir}", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            found = read_holder(self.run_dir)
            if found is None or found[0].get("token") != self.token:
                return  # taken over (or removed): `lost` says so where it matters
            try:
                os.utime(self.path)
            except OSError:
                pass

    def lost(self) -> str | None:
        """None while this job holds the run directory; else one line saying who took it."""
        found = read_holder(self.run_dir)
        if found is not None and found[0].get("token") == self.token:
            return None
        who = describe(found[0]) if found is not None else "nobody (the lock file was removed)"
        return (f"run_dir: {self.run_dir} was taken over by {who}; this job stops without writing "
                f"to it (its checkpoints so far are kept)")

    def release(self) -> None:
        """Let go (the last holder in this process removes the file if it is still its own)."""
        with _held_guard:
            self.count -= 1
            if self.count > 0:
                return
            _held.pop(self.run_dir, None)
        self._stop.set()
        if self._thread is not None:
            found = read_holder(self.run_dir)
            if found is not None and found[0].get("token") == self.token:
                self.path.unlink(missing_ok=True)


def _create(path: Path, record: dict) -> bool:
    """Create ``path`` with ``record`` atomically; False if it exists."""
    aside = path.with_name(f".{path.name}.{record['token']}")
    aside.write_text(json.dumps(record))
    try:
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        aside.unlink(missing_ok=True)


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Hold ``run_dir`` for this job, or raise a `UserError` naming who holds it.

    Re-entrant within a process; a process started under a launcher's lock (its token in
    ``GENPIPE_RUN_LOCK``) works under that lock."""
    run_dir = Path(os.path.abspath(run_dir))
    with _held_guard:
        if run_dir in _held:
            _held[run_dir].count += 1
            return _held[run_dir]
    path = lock_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return _acquire(run_dir, path)
    except OSError as exc:
        raise UserError(f"run_dir: cannot take {path}: {exc.strerror or exc}") from exc


def _acquire(run_dir: Path, path: Path) -> RunLock:
    inherited = os.environ.get(TOKEN_VARIABLE)
    token = secrets.token_hex(8)
    for _ in range(3):
        record = _me(token)
        if _create(path, record):
            lock = RunLock(run_dir, token, beats=True)
            break
        found = read_holder(run_dir)
        if found is None:
            continue  # released meanwhile: try again
        holder, age = found
        if inherited and holder.get("token") == inherited:
            lock = RunLock(run_dir, inherited, beats=False)
            break
        reason = stale_reason(holder, age)
        if reason is None:
            raise in_use_error(run_dir, holder, age)
        log.warning("run_dir: %s: taking over the lock of %s: %s", run_dir, describe(holder), reason)
        aside = path.with_name(f".{path.name}.{token}")
        aside.write_text(json.dumps(record))
        os.replace(aside, path)
        found = read_holder(run_dir)
        if found is not None and found[0].get("token") == token:
            lock = RunLock(run_dir, token, beats=True)
            break
    else:
        raise UserError(f"run_dir: {run_dir}: could not take {path} (other jobs keep taking it); "
                        f"stop them first")
    with _held_guard:
        _held[run_dir] = lock
    return lock
