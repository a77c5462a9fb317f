"""End to end: real `launch` processes train the tiny DDPM on the session's digits shards.

Every test runs the command-line entry points as subprocesses (tests/conftest.py `run_cli`, or
Popen where the test must signal the launcher), with a U-Net shrunk further than
configs/tiny/ddpm.yaml (8 base channels, two levels, no attention) so that a step takes a fraction
of a second on two shared CPU cores. The W&B offline test reads the run's transaction log with
tests/wandb_reader.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_cli, tiny_overrides
from pipeline import checkpoint, faults
from pipeline import config as config_module

pytestmark = pytest.mark.slow

TINY = "configs/tiny/ddpm.yaml"
SIZE = config_module.load(TINY).data.image_size  # of the grid's tiles
EXIT_PREEMPTED = 75
FAST = {
    "model.base_channels": 8,
    "model.norm_groups": 4,
    "model.channel_mult": "[1,2]",
    "model.attention_resolutions": "[]",
    "model.sample_steps": 5,
    "data.batch_size": 8,
    "data.shuffle_buffer": 64,
    "train.warmup_steps": 2,
    "train.max_steps": 20,
    "train.log_every_steps": 5,
    "checkpoint.every_steps": 10,
    "eval.every_steps": 0,
}
METRIC_FIELDS = ("step", "images_seen", "loss", "lr", "grad_norm", "images_per_s")


def overrides(digits_dir: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(digits_dir, run_dir, **{**FAST, **extra})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def metric_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in read_jsonl(run_dir / "metrics.jsonl") if "loss" in record]


def rank_records(run_dir: Path, rank: int, event: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "ranks" / f"rank-{rank:05d}.jsonl") if r["event"] == event]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in checkpoint.list_checkpoints(run_dir)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"


def assert_strictly_increasing(steps: list[int]) -> None:
    assert steps, "no steps"
    assert all(a < b for a, b in zip(steps, steps[1:])), steps


# --- background launches that the test signals -------------------------------------------------


class Launch:
    """`launch local ...` started with Popen; output goes to files (no pipe can fill up)."""

    def __init__(self, args: list[str], log_dir: Path, name: str, env: dict | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "launch.cli", "local", *args],
                stdout=out, stderr=err, env=full_env, cwd=REPO,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"launcher exited ({self.process.returncode}) before {what}:\n{self.stderr[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.stderr[-6000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launcher did not exit within {timeout}s:\n{self.stderr[-6000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def has_metrics(run_dir: Path):
    def check() -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and any(line.strip().endswith("}") for line in path.read_text().splitlines())

    return check


HOLD_STEP = 3


def stop_and_resume(digits_dir: Path, tmp_path: Path, nproc: int, **extra) -> dict:
    """Start a run, SIGTERM the launcher once a step is logged, check it stopped cleanly, relaunch."""
    run_dir = tmp_path / "run"
    args = [TINY, *overrides(digits_dir, run_dir, **{"train.max_steps": 30, "train.log_every_steps": 1,
                                                       "checkpoint.every_steps": 1000, **extra})]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    # The job holds after step 3 until the signal comes: the stop lands there however fast the
    # machine is (without the hold, a fast machine could finish all 30 steps first).
    first = Launch(args, tmp_path / "logs", "first", env=faults.env(hold_after_step=HOLD_STEP))
    first.wait_for(lambda: (run_dir / "ranks" / "held-rank-00000").exists(), f"the hold after step {HOLD_STEP}")
    first.process.send_signal(signal.SIGTERM)
    code = first.wait()
    stderr = first.stderr
    assert code == EXIT_PREEMPTED, f"exit {code}\n{stderr[-6000:]}"
    match = re.search(r"stop requested \(SIGTERM\): saving at step (\d+)", stderr)
    assert match, stderr[-6000:]
    stop_step = int(match.group(1))
    assert stop_step == HOLD_STEP
    # The checkpoint of the stop step is complete and is what a relaunch will load.
    assert checkpoint_steps(run_dir)[-1] == stop_step
    found = checkpoint.latest_valid(run_dir)
    assert found is not None and found[1]["step"] == stop_step
    assert json.loads((found[0] / "trainer.json").read_text())["step"] == stop_step
    for rank in range(nproc):
        end = rank_records(run_dir, rank, "end")[-1]
        assert end["step"] == stop_step and end["exit_code"] == EXIT_PREEMPTED
    steps_before = metric_steps(run_dir)
    assert steps_before[-1] == stop_step

    second = Launch(args, tmp_path / "logs", "second")
    code = second.wait()
    assert code == 0, f"exit {code}\n{second.stderr[-6000:]}"
    return {
        "run_dir": run_dir,
        "stop_step": stop_step,
        "steps_before": steps_before,
        "first_stderr": stderr,
        "second_stderr": second.stderr,
    }


def check_resumed(outcome: dict, nproc: int) -> None:
    run_dir, stop_step = outcome["run_dir"], outcome["stop_step"]
    assert re.search(rf"resumed from \S*step-{stop_step:09d} \(step {stop_step},", outcome["second_stderr"]), (
        outcome["second_stderr"][-6000:]
    )
    assert f"from step {stop_step} to 30" in outcome["second_stderr"]
    steps = metric_steps(run_dir)
    assert_strictly_increasing(steps)
    assert steps[: len(outcome["steps_before"])] == outcome["steps_before"]
    new = steps[len(outcome["steps_before"]):]
    assert new and new[0] == stop_step + 1 and new[-1] == 30
    assert steps == list(range(1, 31))
    images = [r["images_seen"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert images == [8 * nproc * s for s in steps]  # images_seen carried over, not restarted
    for rank in range(nproc):
        starts = rank_records(run_dir, rank, "start")
        assert [s["step"] for s in starts] == [0, stop_step]
        end = rank_records(run_dir, rank, "end")[-1]
        assert end["step"] == 30 and end["exit_code"] == 0
    assert checkpoint_steps(run_dir)[-1] == 30


# --- (a) one process, start to finish -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory):
    """One finished single-process run (also the run that the sampling tests sample from)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = overrides(digits_dir, run_dir)
    result = run_cli("launch", "local", TINY, *args)
    return run_dir, args, result


def test_single_process_run_writes_its_run_directory(trained_run):
    run_dir, args, result = trained_run
    assert_ok(result)

    resolved = config_module.load(run_dir / "config.yaml")
    assert resolved == config_module.load(REPO / TINY, args)

    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    for record in records:
        for field in METRIC_FIELDS:
            assert isinstance(record[field], (int, float)), (field, record)
    steps = [r["step"] for r in records]
    assert_strictly_increasing(steps)
    assert steps == [5, 10, 15, 20]
    assert [r["images_seen"] for r in records] == [8 * s for s in steps]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]

    assert checkpoint_steps(run_dir) == [10, 20]
    newest = run_dir / "checkpoints" / "step-000000020"
    manifest = checkpoint.verify(newest)
    assert manifest["step"] == 20 and manifest["images_seen"] == 160
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "trainer.json"} <= set(manifest["files"])

    samples = sorted((run_dir / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step-000000020.png"]
    with Image.open(samples[0]) as image:
        image.load()
        assert image.mode == "L" and image.size[0] > SIZE

    end = rank_records(run_dir, 0, "end")[-1]
    assert end["step"] == 20 and end["exit_code"] == 0
    assert "Traceback" not in result.stderr


def test_relaunching_a_finished_run_does_nothing_new(trained_run):
    run_dir, args, first = trained_run
    assert_ok(first)
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_cli("launch", "local", TINY, *args)
    assert_ok(result)
    assert "resumed from" in result.stderr and "(step 20," in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert checkpoint_steps(run_dir) == [10, 20]


# --- (f) launch sample ------------------------------------------------------------------------------


def test_sample_is_reproducible_per_seed(trained_run, tmp_path):
    run_dir, _, result = trained_run
    assert_ok(result)
    outputs = {}
    for name, extra in [("a", ["--seed", "0"]), ("b", ["--seed", "0"]), ("c", ["--seed", "1"]),
                        ("raw", ["--seed", "0", "--no-ema"])]:
        out = tmp_path / f"{name}.png"
        sampled = run_cli("launch", "sample", str(run_dir), "--n", "16", "--out", str(out), *extra)
        assert_ok(sampled)
        assert sampled.stdout.strip() == str(out)
        outputs[name] = out.read_bytes()
        with Image.open(out) as image:
            image.load()
            # 16 images of 32 px in a 4 × 4 grid with 2 px padding
            assert image.size == (4 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2)
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]
    assert outputs["raw"] != outputs["a"]  # the EMA weights differ from the raw ones


def test_sample_missing_run_dir(tmp_path):
    missing = tmp_path / "no-such-run"
    result = run_cli("launch", "sample", str(missing), "--n", "4", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "run directory" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_sample_run_dir_without_checkpoint(tmp_path, digits_dir):
    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    config = config_module.load(REPO / TINY, overrides(digits_dir, run_dir))
    (run_dir / "config.yaml").write_text(config_module.dump_yaml(config))
    result = run_cli("launch", "sample", str(run_dir), "--n", "4", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "checkpoint" in result.stderr


# --- (b) two processes ------------------------------------------------------------------------------


def test_two_process_run(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir, **{"train.max_steps": 10}),
                     "--nproc", "2")
    assert_ok(result)
    starts = [rank_records(run_dir, rank, "start")[-1] for rank in (0, 1)]
    ends = [rank_records(run_dir, rank, "end")[-1] for rank in (0, 1)]
    assert [s["world_size"] for s in starts] == [2, 2]
    assert [s["rank"] for s in starts] == [0, 1]
    shards = [set(s["epoch0_shards"]) for s in starts]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    all_shards = {str(p) for p in (digits_dir / "train").glob("shard-*.tar")}
    assert shards[0] | shards[1] == all_shards
    assert [e["step"] for e in ends] == [10, 10]
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]

    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [5, 10]
    assert records[-1]["images_seen"] == 10 * 8 * 2  # global batch = per-process batch × 2
    manifest = checkpoint.verify(run_dir / "checkpoints" / "step-000000010")
    assert manifest["world_size"] == 2
    assert {"rank-00000.json", "rank-00001.json", "rank-00000.safetensors", "rank-00001.safetensors"} <= set(
        manifest["files"]
    )


# --- (c) stop with SIGTERM and resume -----------------------------------------------------------------


def test_sigterm_stops_with_checkpoint_and_relaunch_resumes_exactly(digits_dir, tmp_path):
    # One DataLoader worker: the data stream's position is carried through a worker process too.
    outcome = stop_and_resume(digits_dir, tmp_path, nproc=1, **{"data.num_workers": 1})
    check_resumed(outcome, nproc=1)

    # On CPU the resumed run is bit-identical to one that was never interrupted: weights,
    # optimizer, RNG and data position all came back.
    reference_dir = tmp_path / "reference"
    reference = run_cli("launch", "local", TINY, *overrides(
        digits_dir, reference_dir, **{"train.max_steps": 30, "train.log_every_steps": 1,
                                      "checkpoint.every_steps": 1000, "data.num_workers": 1}))
    assert_ok(reference)
    losses = [r["loss"] for r in read_jsonl(outcome["run_dir"] / "metrics.jsonl") if "loss" in r]
    reference_losses = [r["loss"] for r in read_jsonl(reference_dir / "metrics.jsonl") if "loss" in r]
    assert losses == reference_losses
    assert (rank_records(outcome["run_dir"], 0, "end")[-1]["weights_sha256"]
            == rank_records(reference_dir, 0, "end")[-1]["weights_sha256"])


def test_sigterm_stops_and_resumes_two_processes(digits_dir, tmp_path):
    outcome = stop_and_resume(digits_dir, tmp_path, nproc=2)
    check_resumed(outcome, nproc=2)
    run_dir = outcome["run_dir"]
    ends = [rank_records(run_dir, rank, "end")[-1] for rank in (0, 1)]
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]


# --- (d) W&B offline ------------------------------------------------------------------------------------


def wandb_logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_run_holds_metrics_and_keeps_its_id_on_resume(digits_dir, tmp_path):
    from wandb_reader import read_run

    outcome = stop_and_resume(digits_dir, tmp_path, nproc=1, **{"wandb.mode": "offline"})
    run_dir, stop_step = outcome["run_dir"], outcome["stop_step"]

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    logs = wandb_logs(run_dir)
    assert len(logs) == 2, logs  # one offline run directory per launch
    assert all(path.name == f"run-{run_id}.wandb" for path in logs)

    runs = [read_run(path) for path in logs]
    for run in runs:
        assert run.run_id == run_id
        assert {"name": "*", "step_metric": "step"} in run.metric_definitions
    steps_per_launch = []
    for run in runs:
        rows = [row for row in run.history if "train/loss" in row]
        for row in rows:
            assert isinstance(row["train/loss"], float) and isinstance(row["step"], int)
            for field in ("images_seen", "lr", "grad_norm", "images_per_s"):
                assert f"train/{field}" in row
        steps_per_launch.append([row["step"] for row in rows])
    first, second = steps_per_launch
    assert first == list(range(1, stop_step + 1))
    assert second == list(range(stop_step + 1, 31))
    assert_strictly_increasing(first + second)

    # The W&B history holds the same losses as metrics.jsonl.
    metrics = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    for run in runs:
        for row in run.history:
            if "train/loss" in row:
                assert row["train/loss"] == pytest.approx(metrics[row["step"]])
    # The sample grid written at the end is logged against the last step.
    images = [row for row in runs[1].history if "samples/path" in row]
    assert images and images[-1]["step"] == 30


# --- (e) bad inputs through the command line -------------------------------------------------------


def test_config_typo_exits_2_with_one_line_and_writes_nothing(digits_dir, tmp_path):
    text = (REPO / TINY).read_text().replace("  batch_size: 32\n", "  batch_sise: 32\n")
    assert "batch_sise" in text
    config_path = tmp_path / "typo.yaml"
    config_path.write_text(text)
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", str(config_path), *overrides(digits_dir, run_dir))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config_path) in lines[0] and "data.batch_sise" in lines[0] and "batch_size" in lines[0]
    assert not run_dir.exists()


def test_typo_in_override_exits_2(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir), "train.max_step=3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_step" in lines[0] and TINY in lines[0], result.stderr
    assert not run_dir.exists()


def test_corrupt_shard_exits_2_before_training(digits_dir, tmp_path):
    import shutil

    shards = Path(shutil.copytree(digits_dir / "train", tmp_path / "train"))
    victim = shards / "shard-000004.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir, **{"data.shards": str(shards)}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(victim) in lines[0]
    assert not run_dir.exists()  # nothing trained, nothing written


def _shards_with_a_garbage_image(directory: Path) -> tuple[Path, str]:
    import io

    import numpy as np

    from data_prep.writer import Sample, write_split

    directory.mkdir(parents=True)
    samples = []
    for index in range(8):
        buffer = io.BytesIO()
        Image.fromarray(np.full((32, 32), index * 20, dtype=np.uint8), mode="L").save(buffer, format="PNG")
        samples.append(Sample(image=buffer.getvalue(), source=f"synthetic/{index}"))
    samples[5] = Sample(image=b"this is not an image at all", source="synthetic/5")
    write_split(samples, directory, split="train", image_size=32, channels=1, encoding="png",
                samples_per_shard=4, source="synthetic")
    return directory / "shard-000001.tar", "000000005"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_non_image_sample_exits_2_naming_shard_and_key(digits_dir, tmp_path, num_workers):
    shard, key = _shards_with_a_garbage_image(tmp_path / "train")
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY,
        *overrides(digits_dir, run_dir, **{"data.shards": str(shard.parent), "data.num_workers": num_workers,
                                            "data.batch_size": 4, "data.shuffle_buffer": 1}),
    )
    assert result.returncode == 2, result.stderr[-6000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-6000:]
    assert str(shard) in lines[0] and key in lines[0] and "not a decodable image" in lines[0]
    assert "Traceback" not in result.stderr
    assert not checkpoint_steps(run_dir)


def test_too_few_shards_for_readers_exits_2(digits_dir, tmp_path):
    shard, _ = _shards_with_a_garbage_image(tmp_path / "train")  # 2 shards
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY,
        *overrides(digits_dir, run_dir, **{"data.shards": str(shard.parent), "data.num_workers": 3}),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 shard(s) for 3 readers" in lines[0], result.stderr
    assert not run_dir.exists()


def test_non_image_sample_with_two_processes_gives_one_clear_error(digits_dir, tmp_path):
    shard, key = _shards_with_a_garbage_image(tmp_path / "train")
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY,
        *overrides(digits_dir, run_dir, **{"data.shards": str(shard.parent), "data.batch_size": 4,
                                            "data.shuffle_buffer": 1}),
        "--nproc", "2",
    )
    assert result.returncode == 2, result.stderr[-6000:]
    lines = error_lines(result.stderr)
    assert any(str(shard) in line and key in line for line in lines), result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
