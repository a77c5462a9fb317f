"""A rank that stops making progress is named, not waited for.

A stuck rank (in a collective its peers never join, on a data worker that never answers, in a
deadlock) would otherwise hold the whole job until the collective timeout, or forever. Each
training process runs a `Watchdog` thread that watches the training loop's step counter (the
trainer's `Progress`): when it has not moved for ``distributed.hang_timeout_minutes`` the job ends
with one line naming the rank that stalled, its host and its last step::

    error: rank 1 on host node7 made no progress for 300s after step 17

Only the training loop is measured. Work that is legitimately long and collective (checkpoint
writes, sample grids, held-out evaluation, FID: everything inside `Strategy.whole_model` and
`Checkpointer.save`) runs inside `paused()`, and the clock restarts when it ends; the watchdog is
armed only after the first step of a launch (start-up, a resume's data replay and the first
step's compilation are never timed) and disarmed by the final checkpoint. Paused work has a
deadline of its own, ``distributed.paused_timeout_minutes`` (by default 0.9 of the collective
timeout): a rank stuck inside it (a write that never returns, an evaluation shard that never
arrives) is named before its peers' collectives fail with no word of which rank they waited for.
There every rank is paused, so the rank named is the one that has entered the fewest host-side
collectives (`entering_collective`, counted by `Processes` and `sharding.assemble`): its peers
are waiting for it in the next one.

Which rank to name: every rank publishes a heartbeat file (``run_dir/ranks/heartbeat-RRRRR.json``:
its last step, whether it has entered the next one, when it last moved) from the watchdog thread,
never from the training step. A rank stuck in a collective has entered the step its peer never
reached, so the rank named is the one furthest behind (lowest step, not yet in the next one,
stalled longest). The first watchdog to fire, whichever rank it runs on, names it: it creates
``run_dir/ranks/hang.json`` exclusively (the others then exit quietly), prints the line, runs
the registered hang handlers (the Slurm entry point requeues the job: launch/slurm.py) and ends
its process with `EXIT_HUNG` from the thread: the main thread may be blocked in C, where no
exception can reach it. ``launch local`` then stops the other processes, as for any failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.files import atomic_write

log = logging.getLogger(__name__)

EXIT_HUNG = 76
REPORT_FILE = "hang.json"

_active: Watchdog | None = None
_handlers: list[Callable[[dict], None]] = []


def on_hang(handler: Callable[[dict], None]) -> None:
    """Call ``handler(report)`` in the reporting process before it exits (e.g. to requeue a job)."""
    _handlers.append(handler)


@contextlib.contextmanager
def paused(deadline: bool = True):
    """Legitimately long work (checkpoint, grid, evaluation): not a stall for the hang timeout,
    but bounded by ``distributed.paused_timeout_minutes`` (``deadline=False``: a wait a test asked
    for, timed by nothing)."""
    dog = _active
    if dog is None:
        yield
        return
    dog._pause(+1, deadline)
    try:
        yield
    finally:
        dog._pause(-1, deadline)


def entering_collective() -> None:
    """A host-side collective starts on this rank (`Processes`' collectives, `sharding.assemble`)."""
    dog = _active
    if dog is not None:
        dog.collectives += 1


def entered_step() -> None:
    """The training step has its batch and starts computing (called by the strategies)."""
    dog = _active
    if dog is not None:
        dog._entered_step()


def disarm() -> None:
    """Training is over (the final checkpoint is written): stop measuring."""
    dog = _active
    if dog is not None:
        dog.armed = False
        dog.disarmed = True


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, host: str | None = None,
                 paused_timeout_s: float = 0.0):
        self.timeout_s = timeout_s
        self.paused_timeout_s = paused_timeout_s
        self.collectives = 0  # host-side collectives entered (`entering_collective`)
        self.untimed = 0  # pauses without a deadline (a test's hold)
        self.paused_since: float | None = None  # monotonic start of the outermost timed pause
        self.rank = rank
        self.world_size = world_size
        self.host = host or socket.gethostname()
        shortest = min(t for t in (timeout_s, paused_timeout_s, float("inf")) if t)
        self.poll_s = min(max(shortest / 20, 0.1), 10.0)
        self.progress = None
        self.run_dir: Path | None = None
        self.launch = ""
        self.step = -1
        self.first_step = 0
        self.entered = -1  # the completed-step count when the training loop last entered a step
        self.pauses = 0
        self.armed = False
        self.disarmed = False
        self.last_change = time.monotonic()
        self.last_change_wall = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published: tuple | None = None

    def watch(self, progress, run_dir, processes) -> None:
        """Start watching ``progress.step`` (collective: every rank calls it at the same point)."""
        global _active
        if not self.timeout_s and not self.paused_timeout_s:
            return
        self.progress, self.run_dir = progress, Path(run_dir)
        self.first_step = self.step = progress.step
        # One id per launch, so heartbeats left by an earlier launch are never read as this one's.
        self.launch = processes.broadcast_object(uuid.uuid4().hex if processes.is_main else None)
        if processes.is_main:
            (self.run_dir / "ranks" / REPORT_FILE).unlink(missing_ok=True)
        _active = self
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        global _active
        self._stop.set()
        if _active is self:
            _active = None

    # -- what the training process reports (cheap: attribute writes) -----------------------------

    def _moved(self) -> None:
        self.last_change = time.monotonic()
        self.last_change_wall = time.time()

    def _entered_step(self) -> None:
        # Keyed by the step count, not a flag the thread resets: the loop may enter the next step
        # before this thread has seen the previous one end.
        step = self.progress.step
        if self.entered != step:
            self.entered = step
            self._moved()

    @property
    def in_step(self) -> bool:
        """Whether the loop has entered the step after the one this thread last saw end."""
        return self.entered == self.step

    def _pause(self, delta: int, deadline: bool = True) -> None:
        with self._lock:
            self.pauses += delta
            if not deadline:
                self.untimed += delta
            if self.pauses == 0:
                self.paused_since = None
            elif delta > 0 and self.paused_since is None:
                self.paused_since = time.monotonic()
            self._moved()

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            step = self.progress.step
            if step != self.step:
                self.step = step
                self._moved()
                self.armed = not self.disarmed and step > self.first_step
            self._publish()
            now = time.monotonic()
            idle = now - self.last_change
            if self.timeout_s and self.armed and self.pauses == 0 and idle > self.timeout_s:
                self._report(idle)
            since = self.paused_since
            if (self.paused_timeout_s and not self.disarmed and self.untimed == 0 and since is not None
                    and now - since > self.paused_timeout_s):
                self._report(now - since, paused=True)

    def _heartbeat(self) -> dict:
        return {"launch": self.launch, "rank": self.rank, "host": self.host, "step": self.step,
                "in_step": self.in_step, "paused": self.pauses > 0, "since": self.last_change_wall,
                "collectives": self.collectives}

    def _publish(self) -> None:
        beat = self._heartbeat()
        key = (beat["step"], beat["in_step"], beat["paused"], beat["since"], beat["collectives"])
        if key == self._published:
            return
        try:
            atomic_write(self.run_dir / "ranks" / f"heartbeat-{self.rank:05d}.json", json.dumps(beat))
            self._published = key
        except OSError as exc:  # a full or vanished disk must not kill training from here
            log.warning("hang watchdog: heartbeat not written (%s)", exc)

    def _report(self, idle: float, paused: bool = False) -> None:
        if paused:
            culprit = self.culprit_in_paused_work()
            line = (f"rank {culprit['rank']} on host {culprit['host']} did not finish the untimed work after step "
                    f"{culprit['step']} (a checkpoint, a sample grid or an evaluation) in {idle:.0f}s: its peers "
                    f"wait for it in a collective (distributed.paused_timeout_minutes="
                    f"{self.paused_timeout_s / 60:g}); the job is stopped, relaunch to resume from the last "
                    f"checkpoint")
            stalled = idle
        else:
            culprit = self.culprit()
            stalled = idle if culprit["rank"] == self.rank else max(time.time() - culprit["since"], idle)
            line = (f"rank {culprit['rank']} on host {culprit['host']} made no progress for {stalled:.0f}s "
                    f"after step {culprit['step']} (distributed.hang_timeout_minutes="
                    f"{self.timeout_s / 60:g}); the job is stopped, relaunch to resume from the last checkpoint")
        report = {"line": line, "reported_by": self.rank, **{k: culprit[k] for k in ("rank", "host", "step")},
                  "seconds": round(stalled, 1), "in_paused_work": paused}
        path = self.run_dir / "ranks" / REPORT_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another rank reported first: end quietly
            os._exit(EXIT_HUNG)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(report) + "\n")
        print(f"error: {line}", file=sys.stderr, flush=True)
        for handler in _handlers:
            try:
                handler(report)
            except Exception as exc:  # the exit below must happen whatever a handler does
                print(f"hang handler failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)

    def _beats(self) -> list[dict]:
        """This rank's heartbeat and every other rank's of this launch."""
        beats = [self._heartbeat()]
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                beat = json.loads((self.run_dir / "ranks" / f"heartbeat-{rank:05d}.json").read_text())
            except (OSError, ValueError):
                continue
            if beat.get("launch") == self.launch:
                beats.append(beat)
        return beats

    def culprit(self) -> dict:
        """The heartbeat of the rank furthest behind (this rank's own when it is alone)."""
        beats = [beat for beat in self._beats() if beat["rank"] == self.rank or not beat.get("paused")]
        return min(beats, key=lambda b: (b["step"], b["in_step"], b["since"], b["rank"]))

    def culprit_in_paused_work(self) -> dict:
        """Inside untimed work every rank is paused: the one furthest behind has finished the
        fewest steps, then entered the fewest collectives (its peers wait in the next one)."""
        return min(self._beats(), key=lambda b: (b["step"], b.get("collectives", 0), b["rank"]))
