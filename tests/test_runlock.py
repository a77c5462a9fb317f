"""One job per run directory (pipeline/runlock.py): refused while held, taken over when stale,
and a job that lost its run directory stops without writing to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint, faults, runlock
from pipeline.errors import UserError
from tests.runs import REPO, TINY, Launch, checkpoint_steps, error_lines, held, overrides


@pytest.fixture(autouse=True)
def _no_inherited_lock(monkeypatch):
    for variable in (runlock.TOKEN_VARIABLE, "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(variable, raising=False)


def plant(run_dir: Path, age_s: float = 0.0, **holder) -> dict:
    """A lock file as another job would have left it, its heartbeat ``age_s`` old."""
    record = {"host": "node-17", "pid": 4242, "pid_start": None, "slurm_job_id": None, "slurm_restart": 0,
              "since": time.time() - age_s, "token": "someone-else", **holder}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = runlock.lock_path(run_dir)
    path.write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return record


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_is_taken_held_reentrantly_and_removed_by_its_last_release(tmp_path):
    run_dir = tmp_path / "run"
    lock = runlock.acquire(run_dir)
    holder = json.loads(runlock.lock_path(run_dir).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert runlock.acquire(run_dir / ".." / "run") is lock  # the same directory, however spelt
    lock.release()
    assert runlock.lock_path(run_dir).exists() and lock.lost() is None
    lock.release()
    assert not runlock.lock_path(run_dir).exists()


def test_a_live_holder_is_named_and_nothing_is_taken(tmp_path):
    run_dir = tmp_path / "run"
    plant(run_dir, age_s=10)
    with pytest.raises(UserError) as caught:
        runlock.acquire(run_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{run_dir} is in use by process 4242 on node-17" in message and "heartbeat 10 s ago" in message
    assert json.loads(runlock.lock_path(run_dir).read_text())["token"] == "someone-else"
    with pytest.raises(UserError, match="in use by process 4242"):
        runlock.check_free(run_dir)  # what `launch slurm` asks before it writes


@pytest.mark.parametrize("case", ["dead process on this host", "no heartbeat", "requeued Slurm job"])
def test_a_stale_lock_is_taken_over_with_a_line_saying_why(tmp_path, monkeypatch, caplog, case):
    run_dir = tmp_path / "run"
    if case == "dead process on this host":
        plant(run_dir, host=socket.gethostname(), pid=dead_pid())
        why = "its process is gone"
    elif case == "no heartbeat":
        plant(run_dir, age_s=runlock.STALE_S + 60)
        why = "no heartbeat for"
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        plant(run_dir, slurm_job_id="77", slurm_restart=1)
        why = "Slurm requeued job 77 since (restart 1 -> 2)"
    with caplog.at_level("WARNING", logger="pipeline.runlock"):
        lock = runlock.acquire(run_dir)
    try:
        assert "taking over the lock of process" in caplog.text and why in caplog.text
        assert json.loads(runlock.lock_path(run_dir).read_text())["token"] == lock.token
        runlock.check_free(run_dir)  # ours now
    finally:
        lock.release()


def test_the_same_slurm_incarnation_elsewhere_is_not_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant(tmp_path, slurm_job_id="77", slurm_restart=1)
    with pytest.raises(UserError, match=r"Slurm job 77, restart 1"):
        runlock.acquire(tmp_path)


def test_processes_started_under_a_launchers_lock_work_under_it(tmp_path, monkeypatch):
    plant(tmp_path, token="launcher-token")
    monkeypatch.setenv(runlock.TOKEN_VARIABLE, "launcher-token")
    lock = runlock.acquire(tmp_path)
    assert lock.lost() is None
    lock.release()
    assert runlock.lock_path(tmp_path).exists()  # the launcher's to remove


def test_the_holder_beats_and_sees_when_it_was_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = runlock.acquire(tmp_path)
    path = runlock.lock_path(tmp_path)
    long_ago = time.time() - 1000
    os.utime(path, (long_ago, long_ago))
    deadline = time.monotonic() + 30
    while path.stat().st_mtime < time.time() - 100:
        assert time.monotonic() < deadline, "the heartbeat never refreshed the lock"
        time.sleep(0.02)
    plant(tmp_path, host="node-3", pid=99)
    message = lock.lost()
    assert message and "taken over by process 99 on node-3" in message and "\n" not in message
    # A commit after that renames and prunes nothing.
    checkpoint.prepare_staging(tmp_path, 5)
    with pytest.raises(UserError, match="taken over by process 99"):
        checkpoint.commit(tmp_path, 5, 40, {}, keep_last=1, lost=lock.lost)
    assert checkpoint.list_checkpoints(tmp_path) == []
    lock.release()
    assert json.loads(path.read_text())["pid"] == 99  # not ours to remove


@pytest.mark.quick
def test_launch_local_refuses_a_held_run_dir_and_takes_it_once_its_holder_is_gone(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline import runlock; runlock.acquire(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [sys.executable, "-m", "launch.cli", "local", TINY,
                *overrides(digits_dir, run_dir, **{"train.max_steps": 2, "checkpoint.every_steps": 2})]
        refused = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert error_lines(refused.stderr) == [
            line for line in refused.stderr.splitlines() if line.strip()], refused.stderr[-3000:]
        assert f"is in use by process {holder.pid} on {socket.gethostname()}" in refused.stderr
        assert not (run_dir / "config.yaml").exists()  # nothing written
    finally:
        holder.kill()  # a holder killed outright leaves its lock behind
        holder.wait()
    assert runlock.lock_path(run_dir).exists()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"taking over the lock of process {holder.pid}" in done.stderr and "its process is gone" in done.stderr
    assert checkpoint_steps(run_dir) == [2]
    assert not runlock.lock_path(run_dir).exists()  # released at the end


@pytest.mark.quick
def test_a_job_whose_run_dir_was_taken_over_stops_without_writing(digits_dir, tmp_path):
    """Two processes, the launcher holding the lock: another job takes the run directory while the
    job holds after step 2; the stop signal's checkpoint is then refused on every rank alike."""
    run_dir = tmp_path / "run"
    args = [TINY, *overrides(digits_dir, run_dir, **{"train.max_steps": 30, "checkpoint.every_steps": 1000}),
            "--nproc", "2"]
    job = Launch(args, tmp_path / "logs", "zombie", env=faults.env(hold_after_step=2))
    job.wait_for(lambda: held(run_dir), "the hold after step 2")
    plant(run_dir, host="node-9", pid=31337, slurm_job_id="501", slurm_restart=1)
    job.process.send_signal(signal.SIGTERM)
    code = job.wait()
    stderr = job.stderr
    assert code == 2, stderr[-6000:]
    assert "was taken over by process 31337 on node-9 (Slurm job 501, restart 1" in stderr, stderr[-6000:]
    assert "this job stops without writing" in stderr
    assert checkpoint_steps(run_dir) == [] and not list((run_dir / "checkpoints").glob("*.staging"))
    assert json.loads(runlock.lock_path(run_dir).read_text())["pid"] == 31337  # the new holder's, untouched
