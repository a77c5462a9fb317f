"""The run bank: tiny DDPM runs that many tests read, each trained once per test session.

A real `launch local` costs a few seconds of process start-up before its first step, more than
the steps of a test run; so runs that tests only read are session fixtures (tests/conftest.py),
and a test that changes a run copies it first. This module holds what makes and reads them:
the shrunk tiny DDPM (`FAST`), `Launch` (a launch the test signals), `stop_and_resume` (a run
stopped by SIGTERM at a deterministic step and relaunched) and readers of a run directory.
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

from pipeline import checkpoint, faults
from pipeline import config as config_module

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(digits_dir: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides that make configs/tiny/*.yaml train for seconds on the test's digits."""
    values = {
        "run_dir": str(run_dir),
        "data.shards": str(digits_dir / "train"),
        "data.eval_shards": str(digits_dir / "test"),
        "data.num_workers": 0,
        "wandb.mode": "disabled",
        "sample.n": 4,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


TINY = "configs/tiny/ddpm.yaml"
SIZE = config_module.load(REPO / TINY).data.image_size  # of the grid's tiles
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


def wandb_logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


# --- the stopped-and-resumed run (conftest.py's `resumed_run`) -----------------------------------

FAKE_API_KEY = "f4k3" + "0123456789abcdef" * 2 + "cafe"  # 40 characters, like a real W&B key
RESUMED = {
    "data.num_workers": 1,  # the data stream's position is carried through a worker process too
    "wandb.mode": "offline",
    "wandb.peak_tflops": 0.05,
    "wandb.log_checkpoints": "true",
    "model.timesteps": 100,  # a cheaper variational bound for `launch eval`
    "eval.every_steps": 10,
    "eval.max_images": 8,
    "eval.fid_images": 40,
    "eval.fid_every_steps": 10,
    "eval.fid_feature_network": "random_conv",
    "sample.every_steps": 10,
    "checkpoint.every_steps": 10,
}
"""What the bank's resumed run turns on beside `FAST`: a data worker, W&B offline with MFU against
a stated peak and checkpoint artifacts, sample grids, held-out bits/dim and FID (stand-in
features) during training: all that a GPU run logs, none of which may change what it trains."""


# --- jobs of two processes that a test kills, signals or holds (tests/test_resume_exact.py) ------

MAX_STEPS = 24
EVERY = 3
SHRUNK = {
    "data.num_workers": 2,
    "data.batch_size": 8,
    "model.base_channels": 8,
    "model.norm_groups": 4,
    "model.channel_mult": "[1,2]",
    "model.attention_resolutions": "[16]",
    "data.image_size": 32,  # (the config trains at 8: attention at 16 needs 32)
    "model.sample_steps": 2,
    "train.max_steps": MAX_STEPS,
    "train.warmup_steps": 4,
    "train.log_every_steps": 1,  # metrics.jsonl then shows each step: the test's clock
    "train.deterministic": "true",
    "checkpoint.every_steps": EVERY,
    "checkpoint.keep_last": 2,
    "sample.every_steps": 0,
    "sample.n": 2,
    "eval.every_steps": 0,
    "wandb.mode": "disabled",
}
LAUNCH_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------
# Jobs


class Job:
    """One `launch local` of the run directory, in its own session."""

    def __init__(self, digits_dir: Path, run_dir: Path, nproc: int = 2, env: dict | None = None, **extra):
        values = {
            "run_dir": run_dir,
            "data.shards": digits_dir / "train",
            "data.eval_shards": digits_dir / "test",
            **SHRUNK,
            **extra,
        }
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = (
            run_dir.parent / f"{run_dir.name}-launch-{len(list(run_dir.parent.glob(run_dir.name + '-launch-*')))}.log"
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("GENPIPE_")}
        full_env = {**base, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "local", "configs/tiny/ddpm.yaml",
             *(f"{key}={value}" for key, value in values.items()), "--nproc", str(nproc)],
            cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.started = time.monotonic()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def fail(self, message: str):
        self.kill()
        pytest.fail(f"{message}\n--- {self.log_path} ---\n{self.output()[-6000:]}")

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"launch did not finish within {timeout}s")

    def logged_step(self) -> int:
        return last_logged_step(self.run_dir)

    def wait_until(self, condition, what: str, timeout: float = LAUNCH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self.fail(f"the job exited ({self.process.returncode}) before {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to every process of the job at once, as a cluster does; waits until all are gone."""
        if self.process.poll() is not None and not _descendants(self.process.pid):
            return
        pids = _descendants(self.process.pid)
        for group in [self.process.pid, *pids]:
            # The launcher and each trainer lead a session; a trainer's data workers are in its group.
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, f"processes {pids} survived SIGKILL"
            time.sleep(0.05)
        self.log.close()

    def terminate(self) -> None:
        """SIGTERM to the launcher's process group, as Slurm's preemption or `scancel` sends it."""
        os.killpg(self.process.pid, signal.SIGTERM)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) from /proc (no psutil)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> list[int]:
    table = _process_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state) in table.items():
            if ppid == parent and state != "Z":
                found.append(child)
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    state = _process_table().get(pid)
    return state is not None and state[1] != "Z"


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


def finish(digits_dir: Path, run_dir: Path, **kwargs) -> Job:
    job = Job(digits_dir, run_dir, **kwargs)
    code = job.wait()
    if code != 0:
        job.fail(f"the final launch exited with {code}")
    return job


def held(run_dir: Path) -> bool:
    """Whether rank 0 is holding at a fault point (pipeline/faults.py), waiting for a signal."""
    return (run_dir / "ranks" / "held-rank-00000").exists()


# --- the sharded strategies' comparison (conftest.py's `ddp_reference`) ---------------------------

SHARDED = {"train.max_steps": 6, "train.grad_accum": 2, "checkpoint.keep_last": 5, "sample.at_end": "false",
           "wandb.peak_tflops": 0.05}
"""Six steps of `SHRUNK` with two micro-batches each, MFU logged (a GPU's peak is known): what every
strategy trains to compare with DDP."""
NAN_AT_4 = faults.env(nan_at_steps=[4])
"""Rank 0's loss is NaN at step 4: every strategy must skip that step and agree on the rest."""

