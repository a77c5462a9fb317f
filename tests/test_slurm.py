"""`launch slurm` against a real two-node Slurm cluster (scripts/slurm_cluster.sh).

The cluster runs on this machine: two slurmd daemons (n1, n2, one CPU each) under one
slurmctld. A session fixture starts it when it is not up; when it cannot be started the Slurm
tests are skipped, or fail when the environment variable CI is set. Every job is a real sbatch
job submitted by the real `launch` command; nothing of Slurm or submitit is mocked.

The first tests need no cluster: the sbatch script of `--dry-run` and the Slurm-to-torchrun
environment mapping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slurm as slurm_launch

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
TINY = REPO / "configs" / "tiny" / "ddpm.yaml"

slurm_only = [pytest.mark.slurm, pytest.mark.slow]


# --- no cluster needed -------------------------------------------------------------------------


def run_launch(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_dry_run_renders_the_sbatch_script_without_submitting(tmp_path):
    run_dir = tmp_path / "ddpm_256"
    result = run_launch(
        "slurm", str(REPO / "configs" / "ddpm_256.yaml"), f"run_dir={run_dir}",
        "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.partition=gpu",
        "slurm.setup=[module load cuda]", "slurm.extra_sbatch={mail-type: END}", "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
        "#SBATCH --mail-type=END",
        f"#SBATCH --output={run_dir}/slurm/%j_0_log.out",
        "module load cuda",
    ):
        assert line in script.splitlines(), line
    assert any(line.startswith("#SBATCH --signal=USR2@") for line in script.splitlines())
    assert "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    assert not run_dir.exists(), "--dry-run must not write anything"


def test_gpu_jobs_run_one_task_per_gpu(tmp_path):
    result = run_launch(
        "slurm", str(REPO / "configs" / "ddpm_256.yaml"), f"run_dir={tmp_path}/r",
        "slurm.gpus_per_node=8", "slurm.tasks_per_node=2", "--dry-run",
    )
    assert result.returncode == 2
    assert "tasks_per_node" in result.stderr and "Traceback" not in result.stderr


def test_slurm_environment_becomes_torchrun_environment():
    environ = {
        "SLURM_JOB_ID": "12345", "SLURM_NTASKS": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_NODELIST": "gpu[007-009]",
    }
    env = slurm_launch.distributed_env(environ)
    assert env == {
        "RANK": "4", "WORLD_SIZE": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(slurm_launch.rendezvous_port(12345)),
    }
    assert slurm_launch._tasks_on_node("2(x2),1", 1) == 2


# --- the cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster():
    if subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0:
        return
    problem = None
    if os.geteuid() != 0:
        problem = "starting the test cluster needs root"
    else:
        try:
            started = subprocess.run(
                [str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900
            )
            if started.returncode != 0:
                problem = f"{CLUSTER_SCRIPT} start failed:\n{started.stderr[-3000:]}"
        except subprocess.TimeoutExpired:
            problem = f"{CLUSTER_SCRIPT} start timed out"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is required in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-digits")
    subprocess.run(["data-prep", "digits", str(root)], check=True, capture_output=True, timeout=300)
    return root / "train"


def tiny(run_dir: Path, shards: Path, max_steps: int, *extra: str) -> list[str]:
    """A config small enough that two 1-CPU 'nodes' take ~0.5 s per step."""
    return [
        str(TINY), f"run_dir={run_dir}", f"data.shards={shards}", "data.eval_shards=null",
        "data.num_workers=0", "data.batch_size=8", "model.base_channels=8", "model.sample_steps=5",
        f"train.max_steps={max_steps}", "train.log_every_steps=1", "checkpoint.every_steps=1000",
        "sample.every_steps=0", "sample.n=4", "wandb.mode=offline",
        "slurm.nodes=2", "slurm.cpus_per_task=1", "slurm.time_minutes=10", *extra,
    ]


def job_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm" / "job.json").read_text())["job_id"]


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip() and "loss" in json.loads(line)]


def rank_records(run_dir: Path, rank: int, event: str) -> list[dict]:
    path = run_dir / "ranks" / f"rank-{rank:05d}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "slurm").glob("*_log.*")))


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_train_on_disjoint_data_to_equal_weights(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 12
    result = run_launch("slurm", *tiny(run_dir, digits, max_steps), "--wait", "--poll-s=1", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr + logs(run_dir)
    job_id = job_id_of(run_dir)
    assert f"submitted job {job_id}" in result.stdout and "COMPLETED" in result.stdout

    starts = [rank_records(run_dir, rank, "start")[0] for rank in (0, 1)]
    assert [s["world_size"] for s in starts] == [2, 2]
    shards = [set(s["epoch0_shards"]) for s in starts]
    assert shards[0] and shards[1] and not shards[0] & shards[1], "ranks must read disjoint shards"
    ends = [rank_records(run_dir, rank, "end")[-1] for rank in (0, 1)]
    assert ends[0]["step"] == ends[1]["step"] == max_steps
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"], "gradients were not averaged"
    assert logged_steps(run_dir) == list(range(1, max_steps + 1))

    status = run_launch("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert f"{job_id} (COMPLETED" in status.stdout and f"step:        {max_steps}" in status.stdout
    assert "checkpoint:  " in status.stdout and "step-" in status.stdout


def _job_fields(job_id: str) -> dict[str, str]:
    return slurm_launch.job_state(job_id)


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_requeues_and_resumes_every_step_once(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    max_steps, preempt_after = 24, 4
    submitted = run_launch("slurm", *tiny(run_dir, digits, max_steps), timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_of(run_dir)

    deadline = time.monotonic() + 150
    while not (run_dir / "metrics.jsonl").exists() or len(logged_steps(run_dir)) < preempt_after:
        assert time.monotonic() < deadline, "no training progress\n" + logs(run_dir)
        assert _job_fields(job_id).get("JobState") in slurm_launch.ACTIVE_STATES, logs(run_dir)
        time.sleep(0.3)
    signalled_at = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    # A requeued job waits ~2 minutes for its begin time; let it start now.
    deadline = time.monotonic() + 90
    while True:
        fields = _job_fields(job_id)
        if fields.get("JobState") == "PENDING" and fields.get("Restarts", "0") != "0":
            pending_seen_at = time.time()
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            break
        assert fields.get("JobState") in slurm_launch.ACTIVE_STATES, f"{fields}\n{logs(run_dir)}"
        assert time.monotonic() < deadline, f"not requeued: {fields}\n{logs(run_dir)}"
        time.sleep(0.2)

    code = slurm_launch.wait(run_dir, job_id, poll_s=1, out=sys.stderr)
    assert code == 0, logs(run_dir)
    assert _job_fields(job_id)["Restarts"] == "1"

    steps = logged_steps(run_dir)
    assert steps == list(range(1, max_steps + 1)), "every step logged exactly once, in order"
    stopped = [e for e in events(run_dir) if e["event"] == "stopped"]
    requeued = [e for e in events(run_dir) if e["event"] == "requeued"]
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert [e["signal"] for e in stopped] == ["SIGUSR2"] and len(requeued) == 1
    assert [e["restart"] for e in starts] == [0, 1]
    stop_step = rank_records(run_dir, 0, "end")[0]["step"]
    assert preempt_after <= stop_step < max_steps
    assert rank_records(run_dir, 0, "start")[1]["step"] == stop_step, "resumed from the saved step"

    # The timeline for docs/slurm.md: signal -> checkpoint saved -> requeued -> first resumed step.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_resumed = next(m for m in metrics if m["step"] == stop_step + 1)
    timeline = {
        "saved_and_stopped": stopped[0]["time"] - signalled_at,
        "requeued": requeued[0]["time"] - signalled_at,
        "pending_again (test sets StartTime=now)": pending_seen_at - signalled_at,
        "job_restarted": starts[1]["time"] - signalled_at,
        "first_resumed_step": first_resumed["time"] - signalled_at,
    }
    print("preempt timeline (s after scancel --signal=USR2):",
          json.dumps({k: round(v, 1) for k, v in timeline.items()}), file=sys.stderr)
    (run_dir / "slurm" / "timeline.json").write_text(json.dumps(timeline, indent=1))

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    wandb_runs = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("*run-*")
                  if p.is_dir() and not p.is_symlink()}  # not latest-run
    assert wandb_runs == {run_id}, "one W&B run across the requeue"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_crash_fails_the_job_and_is_not_requeued(slurm_cluster, digits, tmp_path):
    run_dir = tmp_path / "run"
    result = run_launch(
        "slurm", *tiny(run_dir, digits, 20), "--wait", "--poll-s=1",
        env={"GENPIPE_FAIL_AT_STEP": "3"}, timeout=240,
    )
    assert result.returncode not in (0, 75), result.stdout
    job_id = job_id_of(run_dir)
    assert "FAILED" in result.stdout
    time.sleep(3)  # long enough for a requeue to show
    fields = _job_fields(job_id)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", fields
    assert not [e for e in events(run_dir) if e["event"] in ("requeued", "stopped")]
    assert not (run_dir / "slurm" / "requeues.json").exists()
    assert "injected failure" in logs(run_dir)
