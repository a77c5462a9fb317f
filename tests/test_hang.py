"""A hung rank ends the job with one line naming it (pipeline/watchdog.py), instead of a wait.

In-process: which rank a watchdog names from the heartbeats (the one furthest behind, heartbeats
of an earlier launch and paused ranks left out), and when it fires: a stalled step counter past the
timeout does, paused work and a disarmed watchdog do not (``_report`` replaced, so the test
process is not ended). Jobs (slow): two processes, rank 1 stalling before step 3 with the fault
seam, end within the short timeout with exit status 76 and the line naming rank 1, its host and
step 2; so does a rank stuck inside a checkpoint write past ``distributed.paused_timeout_minutes``;
a hold inside the sample grid, far longer than the timeout, is not taken for a hang; on
the test Slurm cluster a hung job is requeued (and, past ``slurm.max_requeues``, fails).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import faults, watchdog
from pipeline.preemption import EXIT_PREEMPTED
from pipeline.watchdog import EXIT_HUNG, Watchdog
from runs import Job, held

HOST = socket.gethostname()


# ---------------------------------------------------------------------------------------------
# In-process


def _beat(run_dir: Path, rank: int, step: int, in_step: bool, since: float, launch="L", paused=False) -> None:
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"heartbeat-{rank:05d}.json").write_text(json.dumps(
        {"launch": launch, "rank": rank, "host": f"h{rank}", "step": step, "in_step": in_step,
         "paused": paused, "since": since}))


def _dog(run_dir: Path, rank: int, world_size: int, step: int, in_step: bool) -> Watchdog:
    dog = Watchdog(60, rank, world_size, host=f"h{rank}")
    dog.run_dir, dog.launch, dog.step, dog.entered = run_dir, "L", step, step if in_step else step - 1
    dog.last_change_wall = 1000.0
    return dog


def test_the_rank_furthest_behind_is_named(tmp_path):
    # Rank 0 waits in step 3's collective; rank 1 never started step 3; rank 2 also waits.
    _beat(tmp_path, 1, 2, False, 990.0)
    _beat(tmp_path, 2, 2, True, 995.0)
    assert _dog(tmp_path, 0, 3, 2, True).culprit()["rank"] == 1
    # Whoever reports, the same rank is named.
    _beat(tmp_path, 0, 2, True, 1000.0)
    assert _dog(tmp_path, 2, 3, 2, True).culprit()["rank"] == 1
    # All in the same place: the one that has waited longest.
    _beat(tmp_path, 1, 2, True, 990.0)
    assert _dog(tmp_path, 0, 3, 2, True).culprit()["rank"] == 1


def test_a_step_entered_before_the_thread_saw_the_last_one_end_counts_as_entered(tmp_path):
    # The loop ends step 2 and enters step 3 between two polls of the watchdog's thread (a busy
    # machine): the heartbeat must still say "in a step", or a rank waiting in step 3's collective
    # looks like the stalled one (seen in CI: the wrong rank named).
    dog = Watchdog(60, 0, 1)
    dog.progress, dog.step = SimpleNamespace(step=1), 1
    dog.progress.step = 2
    dog._entered_step()  # the loop, before the thread polls
    assert not dog.in_step  # the thread still believes step 2 is running
    dog.step = dog.progress.step  # what the thread's poll records
    assert dog.in_step and dog._heartbeat()["in_step"]


def test_heartbeats_of_another_launch_and_paused_ranks_are_left_out(tmp_path):
    _beat(tmp_path, 1, 0, False, 10.0, launch="earlier")
    assert _dog(tmp_path, 0, 2, 5, True).culprit()["rank"] == 0
    _beat(tmp_path, 1, 4, False, 10.0, paused=True)
    assert _dog(tmp_path, 0, 2, 5, True).culprit()["rank"] == 0


def _watch(tmp_path, monkeypatch, timeout_s: float):
    reports = []
    monkeypatch.setattr(Watchdog, "_report", lambda self, idle: (reports.append(idle), self._stop.set()))
    progress = SimpleNamespace(step=0)
    dog = Watchdog(timeout_s, 0, 1)
    dog.watch(progress, tmp_path, SimpleNamespace(is_main=True, broadcast_object=lambda value: value))
    return dog, progress, reports


def _wait_for(condition, limit_s: float = 30.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_stalled_loop_is_reported_and_paused_work_is_not(tmp_path, monkeypatch):
    dog, progress, reports = _watch(tmp_path, monkeypatch, timeout_s=0.5)
    try:
        # Not armed before the first step of the launch (start-up, compilation): nothing fires.
        time.sleep(1.0)
        assert not reports
        progress.step = 1
        assert _wait_for(lambda: dog.armed)
        with watchdog.paused():  # a checkpoint, a grid: as long as it takes
            time.sleep(1.5)
            assert not reports
        assert _wait_for(lambda: reports)  # then the loop stalls
        assert reports[0] > 0.5
        assert json.loads((tmp_path / "ranks" / "heartbeat-00000.json").read_text())["step"] == 1
    finally:
        dog.stop()


def test_inside_paused_work_the_rank_that_has_entered_fewest_collectives_is_named(tmp_path):
    # Rank 2 is still writing its checkpoint files; ranks 0 and 1 wait in the gather after them.
    for rank, collectives in ((1, 8), (2, 7)):
        _beat(tmp_path, rank, 4, False, 990.0, paused=True)
        beat = json.loads((tmp_path / "ranks" / f"heartbeat-{rank:05d}.json").read_text())
        (tmp_path / "ranks" / f"heartbeat-{rank:05d}.json").write_text(json.dumps({**beat, "collectives": collectives}))
    dog = _dog(tmp_path, 0, 3, 4, False)
    dog.collectives, dog.pauses = 8, 1
    assert dog.culprit_in_paused_work()["rank"] == 2
    dog.collectives = 6  # rank 0 itself has not reached the gather
    assert dog.culprit_in_paused_work()["rank"] == 0


def test_paused_work_has_a_deadline_of_its_own_and_a_tests_hold_has_none(tmp_path, monkeypatch):
    reports = []
    monkeypatch.setattr(Watchdog, "_report",
                        lambda self, idle, paused=False: (reports.append((idle, paused)), self._stop.set()))
    progress = SimpleNamespace(step=0)
    dog = Watchdog(60, 0, 1, paused_timeout_s=0.5)
    dog.watch(progress, tmp_path, SimpleNamespace(is_main=True, broadcast_object=lambda value: value))
    try:
        with watchdog.paused(deadline=False):  # a hold a test asked for: timed by nothing
            time.sleep(1.2)
        assert not reports
        with watchdog.paused():  # a checkpoint write that never returns
            assert _wait_for(lambda: reports)
        assert reports[0][1] is True and reports[0][0] > 0.5
    finally:
        dog.stop()


def test_a_disarmed_watchdog_stays_quiet(tmp_path, monkeypatch):
    dog, progress, reports = _watch(tmp_path, monkeypatch, timeout_s=0.3)
    try:
        progress.step = 1
        assert _wait_for(lambda: dog.armed)
        watchdog.disarm()  # the final checkpoint was written
        time.sleep(1.0)
        assert not reports
    finally:
        dog.stop()


def test_a_hang_timeout_at_or_above_the_collective_timeout_is_refused():
    from pipeline.config import DistributedConfig

    with pytest.raises(ValueError, match=r"hang_timeout_minutes \(30\) must be below timeout_minutes \(30\)"):
        DistributedConfig(hang_timeout_minutes=30)
    assert DistributedConfig().resolved_hang_timeout_minutes() == 10
    assert DistributedConfig(timeout_minutes=6).resolved_hang_timeout_minutes() == 2
    with pytest.raises(ValueError, match=r"paused_timeout_minutes \(40\) must be below timeout_minutes \(30\)"):
        DistributedConfig(paused_timeout_minutes=40)
    assert DistributedConfig().resolved_paused_timeout_minutes() == 27


# ---------------------------------------------------------------------------------------------
# Jobs

HANG = {"distributed.hang_timeout_minutes": 0.1, "train.max_steps": 8, "checkpoint.every_steps": 2}


@pytest.mark.slow
@pytest.mark.quick
def test_a_stalled_rank_ends_the_job_with_its_name(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = Job(digits_dir, run_dir, env=faults.env(stall_rank=1, stall_at_step=3), **HANG)
    line, report, output = _ended_as_hung(job, "made no progress")
    assert line.startswith(f"error: rank 1 on host {HOST} made no progress for ")
    assert "s after step 2 (distributed.hang_timeout_minutes=0.1)" in line
    assert (report["rank"], report["step"], report["host"]) == (1, 2, HOST)
    assert "Traceback" not in output


def _ended_as_hung(job: Job, words: str) -> tuple[str, dict, str]:
    """(the one line with ``words``, hang.json, the output) of a job that must end with EXIT_HUNG."""
    code = job.wait(timeout=300)  # the assertion is that it ends, and how; never on speed
    output = job.output()
    if code != EXIT_HUNG:
        job.fail(f"expected exit status {EXIT_HUNG}, got {code}")
    lines = [line for line in output.splitlines() if words in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0], json.loads((job.run_dir / "ranks" / "hang.json").read_text()), output


@pytest.mark.slow
def test_a_rank_stuck_inside_a_checkpoint_write_is_named_before_the_collective_timeout(digits_dir, tmp_path):
    # The last rank stops after writing its files of checkpoint 2 (fault seam), inside the save
    # the hang timeout does not time; rank 0 waits for it in the gather of the file records.
    run_dir = tmp_path / "run"
    job = Job(digits_dir, run_dir, env=faults.env(pause_in_save=2),
              **{**HANG, "distributed.paused_timeout_minutes": 0.1})
    line, report, _ = _ended_as_hung(job, "did not finish the untimed work")
    assert line.startswith(f"error: rank 1 on host {HOST} did not finish the untimed work after step 2 ")
    assert "(distributed.paused_timeout_minutes=0.1)" in line
    assert (report["rank"], report["step"], report["in_paused_work"]) == (1, 2, True)
    assert not (run_dir / "checkpoints" / "step-000000002").exists()  # never committed


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    {},
    # ZeRO-1 samples from its live module when the EMA is not used: that too is paused work.
    {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 1, "sample.use_ema": "false"},
], ids=["ddp", "zero1-live-weights"])
def test_a_long_sample_grid_is_not_a_hang(digits_dir, tmp_path, strategy):
    # The grid holds (fault seam) until a stop signal, far longer than the hang timeout; the
    # watchdog must let it, and the job ends by the signal as usual.
    run_dir = tmp_path / "run"
    job = Job(digits_dir, run_dir, env=faults.env(hold_in_grid=True), **{**HANG, "sample.every_steps": 2, **strategy})
    job.wait_until(lambda: held(run_dir), "the hold inside the grid of step 2")
    timeout_s = HANG["distributed.hang_timeout_minutes"] * 60
    time.sleep(3 * timeout_s)
    if job.process.poll() is not None:
        job.fail("the job ended during the grid")
    job.terminate()
    code = job.wait()
    if code != EXIT_PREEMPTED:
        job.fail(f"a stop signal should end the job with {EXIT_PREEMPTED}, got {code}")
    assert "made no progress" not in job.output()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_hung_slurm_job_is_requeued(digits_dir, tmp_path):
    import subprocess

    from launch import slurm as slurm_launch
    from tests.test_slurm import CLUSTER_SCRIPT, events, job_id_of, logs, run_launch, start_requeued_job, tiny

    if subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode != 0:
        pytest.skip("the test Slurm cluster is not up (scripts/slurm_cluster.sh start)")
    run_dir = tmp_path / "run"
    submitted = run_launch("slurm", *tiny(run_dir, digits_dir / "train", 8, "distributed.hang_timeout_minutes=0.1",
                                           "slurm.max_requeues=1"),
                           env=faults.env(stall_rank=1, stall_at_step=3), timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_of(run_dir)
    deadline = time.monotonic() + 240
    while True:  # a requeued job waits for its begin time; let it start (two seconds on)
        fields = slurm_launch.job_state(job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Restarts", "0") != "0":
            start_requeued_job(job_id)
            break
        assert time.monotonic() < deadline, f"not requeued: {fields}\n{logs(run_dir)}"
        time.sleep(0.3)
    code = slurm_launch.wait(run_dir, job_id, poll_s=1)
    assert code != 0, logs(run_dir)  # it hangs again, past slurm.max_requeues=1
    kinds = [event["event"] for event in events(run_dir)]
    assert kinds.count("hung") == 2 and kinds.count("requeued") == 1 and "not_requeued" in kinds, kinds
    hung = [event for event in events(run_dir) if event["event"] == "hung"]
    assert [(event["rank"], event["step"]) for event in hung] == [(1, 2), (1, 2)]
    assert "rank 1 on host" in logs(run_dir) and "made no progress" in logs(run_dir)
