"""`launch status` (launch/status.py) on run directories written here: the fields it reports,
the ETA across a relaunch, the Slurm job lines (from job records Slurm 22.05 printed; jobs on the
real test cluster are in tests/test_slurm.py), `--plot`, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from launch import slurm_queries, status
from pipeline import checkpoint, images
from pipeline import config as config_module
from pipeline.errors import UserError

START = 1_700_000_000.0


def make_run(run_dir: Path, steps=range(10, 51, 10), max_steps: int = 100, relaunched: bool = False) -> Path:
    """A run directory as the trainer leaves it: config, metrics (1 s per 10 steps), a checkpoint
    and a sample grid."""
    config = config_module.load(REPO / "configs/tiny/ddpm.yaml", [f"run_dir={run_dir}", f"train.max_steps={max_steps}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_module.dump_yaml(config))
    records = []
    for step in steps:
        records.append({"time": START + step / 10, "step": step, "images_seen": step * 32, "loss": 1.0 / step,
                        "images_per_s": 320.0, "mfu": 0.25})
        if step % 20 == 0:
            records.append({"time": START + step / 10, "step": step, "images_seen": step * 32,
                            "eval/bits_per_dim": 3.0 - step / 100, "eval/fid": 40.0 - step / 10,
                            "eval/kid": 0.01, "eval/fid_images": 64})
    if relaunched:  # a relaunch from step 30, an hour later, at half the pace
        for step in (40, 50, 60):
            records.append({"time": START + 3600 + (step - 30) / 5, "step": step, "images_seen": step * 32,
                            "loss": 0.5 / step, "images_per_s": 160.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"time": 1')
    for step in (30, 40, 45):
        staging = checkpoint.prepare_staging(run_dir, step)
        records_ = checkpoint.write_files(staging, {"trainer.json": checkpoint.encode_json({"step": step})})
        checkpoint.commit(run_dir, step, step * 32, records_, keep_last=10)
    # Damaged after its commit: `launch sample` would refuse it, so status must not report it.
    (run_dir / "checkpoints" / "step-000000045" / "trainer.json").write_text("{}")
    (run_dir / "checkpoints" / "step-000000050.staging").mkdir()  # incomplete: not reported
    images.save_png(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), run_dir / "samples" / "step-000000040.png")
    return run_dir


def field(lines: list[str], label: str) -> str:
    found = [line for line in lines if line.startswith(f"{label}:")]
    assert len(found) == 1, (label, lines)
    return found[0].split(":", 1)[1].strip()


def test_status_reports_progress_quality_eta_and_checkpoint(tmp_path):
    run_dir = make_run(tmp_path / "run")
    lines = status.status_lines(run_dir, now=START + 65)
    assert field(lines, "step") == "50 of 100 (50%)"
    assert field(lines, "images seen") == "1600"
    assert field(lines, "loss") == "0.0200"
    assert field(lines, "bits/dim") == "2.6000 (held-out, step 40)"
    assert field(lines, "FID").startswith("36.000, KID 0.0100 (64 images, step 40)")
    assert field(lines, "throughput") == "320.0 images/s, MFU 25.0%"
    assert field(lines, "ETA") == "5s at the recent pace"  # 50 steps at 10 steps/s
    assert field(lines, "updated") == "1m00s ago"
    assert field(lines, "checkpoint").startswith(str(run_dir / "checkpoints" / "step-000000040"))
    assert field(lines, "samples").endswith("step-000000040.png")
    assert field(lines, "job") == "none submitted with `launch slurm`"


def test_eta_uses_the_pace_since_the_last_relaunch(tmp_path):
    run_dir = make_run(tmp_path / "run", relaunched=True)
    lines = status.status_lines(run_dir, now=START + 4000)
    assert field(lines, "step") == "60 of 100 (60%)"
    assert field(lines, "ETA") == "8s at the recent pace"  # 40 steps at 5 steps/s


COMPLETED_RECORD = (
    "JobId=4242 JobName=run UserId=root(0) GroupId=root(0) Priority=4294901742 Nice=0 Account=(null) "
    "QOS=(null) JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "ExitCode=0:0 RunTime=00:00:01 TimeLimit=UNLIMITED Partition=debug NodeList=n[1-2] BatchHost=n1 NumNodes=2"
)


def test_finished_run_and_slurm_job_state(tmp_path):
    run_dir = make_run(tmp_path / "run", steps=range(10, 101, 10))
    lines = status.status_lines(run_dir)
    assert field(lines, "ETA") == "done"
    job = {"job_id": "4242", "stdout": "/logs/4242.out"}
    lines = status.job_lines(run_dir, job, slurm_queries.parse_record(COMPLETED_RECORD))
    assert lines == ["job:         4242 (COMPLETED, exit status 0; requeued 0x)",
                     "nodes:       n[1-2]", "log:         /logs/4242.out"]


def test_a_pending_job_says_why(tmp_path):
    run_dir = make_run(tmp_path / "run")
    job = {"job_id": "4242", "stdout": "/logs/4242.out"}
    held = COMPLETED_RECORD.replace("JobState=COMPLETED Reason=None", "JobState=PENDING Reason=JobHeldUser")
    lines = status.job_lines(run_dir, job, slurm_queries.parse_record(held.replace("NodeList=n[1-2]", "NodeList=")))
    assert lines == ["job:         4242 (PENDING; requeued 0x)",
                     "reason:      JobHeldUser: held; `scontrol release 4242` lets it start",
                     "log:         /logs/4242.out"]
    unseen = held.replace("Reason=JobHeldUser", "Reason=None")
    assert field(status.job_lines(run_dir, job, slurm_queries.parse_record(unseen)), "reason") == \
        "none yet (the scheduler has not looked at the job)"


def test_a_job_launch_cancelled_says_why(tmp_path):
    run_dir = make_run(tmp_path / "run")
    job = {"job_id": "4242", "stdout": "/logs/4242.out",
           "never_starts": {"reason": "PartitionConfig", "problem": "slurm.cpus_per_task=8 but ..."}}
    cancelled = COMPLETED_RECORD.replace("JobState=COMPLETED Reason=None", "JobState=CANCELLED Reason=PartitionConfig")
    lines = status.job_lines(run_dir, job, slurm_queries.parse_record(cancelled))
    assert field(lines, "reason") == ("PartitionConfig, could never start: slurm.cpus_per_task=8 but ... "
                                      "(cancelled by `launch slurm`)")
    assert field(lines, "job") == "4242 (CANCELLED; requeued 0x)"  # it never ran: no exit status
    signalled = cancelled.replace("ExitCode=0:0", "ExitCode=0:15")
    assert "ExitCode=0:15" in signalled
    assert field(status.job_lines(run_dir, job, slurm_queries.parse_record(signalled)), "job") == \
        "4242 (CANCELLED, exit status 143; requeued 0x)"
    assert field(status.job_lines(run_dir, job, {}), "job") == "4242 (unknown (no longer known to Slurm); requeued 0x)"


def test_a_run_without_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {max_steps: 10}\n")
    lines = status.status_lines(run_dir)
    assert field(lines, "step") == "no metrics yet" and field(lines, "checkpoint") == "none yet"
    with pytest.raises(UserError, match="no training metrics"):
        status.plot(run_dir, tmp_path / "x.png")


def test_not_a_run_directory_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        status.status_lines(tmp_path)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    run_dir = make_run(tmp_path / "run")
    out = status.plot(run_dir, tmp_path / "plots" / "status.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 200


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        status.plot(run_dir, tmp_path / "x.png")


@pytest.mark.slow
def test_launch_status_command_line(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "status.png"
    result = run_cli("launch", "status", str(run_dir), "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert "step:        50 of 100 (50%)" in result.stdout and f"plot:        {out}" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = run_cli("launch", "status", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
