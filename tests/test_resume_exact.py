"""Kill a run at any moment, relaunch it, and the final weights are bit-for-bit the uninterrupted run's.

Real `launch local --nproc 2` jobs (2 data workers per process) of a shrunk tiny DDPM. A SIGKILL
here is what a cluster does when a job is cancelled or a node dies: every process of the job (the
launcher, the trainers it started in their own sessions, their data workers) dies at once. The
"random" moments come from a fixed `random.Random`, so a failure can be replayed; they are printed.
The jobs (`Job`, the shrunk config `SHRUNK`) are tests/runs.py's.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint, faults
from pipeline.preemption import EXIT_PREEMPTED
from runs import EVERY, MAX_STEPS, Job, finish, held

pytestmark = pytest.mark.slow


def final_state(run_dir: Path) -> tuple[dict, dict, dict]:
    found = checkpoint.latest_valid(run_dir)
    assert found is not None, f"no valid checkpoint in {run_dir}"
    path, manifest = found
    assert manifest["step"] == MAX_STEPS, f"newest checkpoint of {run_dir} is step {manifest['step']}"
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)["state"]
    adam = {f"{index}.{key}": value for index, state in optimizer.items() for key, value in state.items()}
    return load_file(path / "model.safetensors"), load_file(path / "ema.safetensors"), adam


def assert_bit_identical(run_dir: Path, reference: Path) -> None:
    for got, want, what in zip(final_state(run_dir), final_state(reference), ("model", "ema", "optimizer")):
        assert got.keys() == want.keys()
        different = [name for name in want if not torch.equal(got[name], want[name])]
        assert not different, f"{what} tensors differ from the uninterrupted run: {different[:5]}"


def no_staging_or_partial(run_dir: Path) -> None:
    for path in checkpoint.checkpoints_dir(run_dir).iterdir():
        assert not path.name.endswith(".staging"), f"{path} left behind"
        if path.name.startswith("step-"):
            checkpoint.verify(path)


@pytest.fixture(scope="module")
def digits(digits_dir) -> Path:
    return digits_dir


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> Path:
    """The uninterrupted run (keeping all its checkpoints: keep_last does not affect training)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(digits, run_dir, **{"checkpoint.keep_last": 100})
    return run_dir


# ---------------------------------------------------------------------------------------------
# Tests


def test_sigkill_at_random_moments_resumes_bit_exact(digits, reference, tmp_path):
    # Each job holds after the step following its target, so a kill at a random moment after the
    # target step was logged always lands before that hold: inside a step or a checkpoint, never
    # after a job that a fast machine already finished.
    rng = random.Random(5)
    run_dir = tmp_path / "run"
    # 1: anywhere in a step, before or after the first checkpoints.
    target = rng.randint(2, 8)
    delay = round(rng.uniform(0.0, 0.5), 2)
    job = Job(digits, run_dir, env=faults.env(hold_after_step=target + 1))
    job.wait_until(lambda: job.logged_step() >= target, f"step {target}")
    time.sleep(delay)
    job.kill()
    print(f"SIGKILL 1: {delay}s after step {target} was logged (logged: {job.logged_step()})")

    # 2: in the middle of a checkpoint write: the last rank has written its files and pauses
    # before the commit; rank 0 waits for it.
    pause = EVERY * rng.randint(job.logged_step() // EVERY + 1, 5)
    job = Job(digits, run_dir, env=faults.env(pause_in_save=pause))
    staging = checkpoint.staging_path(run_dir, pause)
    job.wait_until(lambda: (staging / checkpoint.rank_file(1, "safetensors")).exists(), f"the write of step {pause}")
    time.sleep(0.3)
    job.kill()
    print(f"SIGKILL 2: inside the write of checkpoint {pause}")
    assert staging.is_dir() and not (staging / "manifest.json").exists()
    assert not (checkpoint.checkpoints_dir(run_dir) / checkpoint.step_dir_name(pause)).exists()

    # 3: later, anywhere.
    target = max(rng.randint(pause + 2, MAX_STEPS - 3), job.logged_step() + 1)
    delay = round(rng.uniform(0.0, 0.5), 2)
    job = Job(digits, run_dir, env=faults.env(hold_after_step=target + 1))
    job.wait_until(lambda: job.logged_step() >= target, f"step {target}")
    time.sleep(delay)
    job.kill()
    print(f"SIGKILL 3: {delay}s after step {target} was logged (logged: {job.logged_step()})")

    job = finish(digits, run_dir)
    assert "resumed from" in job.output()
    no_staging_or_partial(run_dir)
    assert_bit_identical(run_dir, reference)


def test_sigterm_at_random_moments_resumes_bit_exact(digits, reference, tmp_path):
    # The signal comes at a random moment after the target step was logged; the job holds after
    # the next step until it arrives, so the stop lands at the target step or the one after, and
    # never after a job that a fast machine already finished.
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    low = 2
    for stop in (1, 2):
        target = rng.randint(low, low + 8)
        delay = round(rng.uniform(0.0, 0.5), 2)
        job = Job(digits, run_dir, env=faults.env(hold_after_step=target + 1))
        job.wait_until(lambda job=job, target=target: job.logged_step() >= target, f"step {target}")
        time.sleep(delay)
        job.terminate()
        code = job.wait()
        saved = checkpoint.latest_valid(run_dir)[1]["step"]
        print(f"SIGTERM {stop}: {delay}s after step {target} was logged; stopped with {code} at step {saved}")
        if code != EXIT_PREEMPTED:
            job.fail(f"a stop signal should end the job with {EXIT_PREEMPTED}, got {code}")
        assert saved == job.logged_step(), "the stop checkpoint is not at the last trained step"
        assert saved in (target, target + 1)
        low = saved + 2
    finish(digits, run_dir)
    no_staging_or_partial(run_dir)
    assert_bit_identical(run_dir, reference)


def test_async_save_is_atomic_and_resumes_bit_exact(digits, reference, tmp_path):
    rng = random.Random(11)
    run_dir = tmp_path / "run"
    # SIGKILL while a background write is in flight: the last rank's thread has written its files
    # and pauses; training goes on meanwhile (proving the save does not block it).
    pause = EVERY * rng.randint(1, 3)
    job = Job(digits, run_dir, env=faults.env(pause_in_save=pause), **{"checkpoint.async_save": "true"})
    staging = checkpoint.staging_path(run_dir, pause)
    job.wait_until(
        lambda: (staging / checkpoint.rank_file(1, "safetensors")).exists() and job.logged_step() >= pause + 2,
        f"training past step {pause} with its checkpoint in flight",
    )
    job.kill()
    print(f"SIGKILL: during the background write of checkpoint {pause}, at step {job.logged_step()}")
    assert not (checkpoint.checkpoints_dir(run_dir) / checkpoint.step_dir_name(pause)).exists()
    assert not (staging / "manifest.json").exists()

    # SIGTERM with async saves on: the stop checkpoint is committed before the job exits.
    target = rng.randint(pause + 3, MAX_STEPS - 4)
    job = Job(digits, run_dir, env=faults.env(hold_after_step=target), **{"checkpoint.async_save": "true"})
    job.wait_until(lambda: held(run_dir), f"the hold after step {target}")
    job.terminate()
    code = job.wait()
    saved = checkpoint.latest_valid(run_dir)[1]["step"]
    print(f"SIGTERM: held after step {target}; stopped with {code} at step {saved}")
    if code != EXIT_PREEMPTED:
        job.fail(f"a stop signal should end the job with {EXIT_PREEMPTED}, got {code}")
    assert saved == job.logged_step() == target

    job = finish(digits, run_dir, **{"checkpoint.async_save": "true"})
    assert "writing in the background" in job.output()
    no_staging_or_partial(run_dir)
    assert_bit_identical(run_dir, reference)


@pytest.mark.quick
def test_changing_the_process_count_resumes_the_data_exactly(digits, reference, tmp_path):
    # A 2-process run stopped at step 9: the reference run's directory without its later checkpoints.
    stopped = 9
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step, path in checkpoint.list_checkpoints(run_dir):
        if step > stopped:
            shutil.rmtree(path)

    # One process keeps the global batch of 16 by accumulating two micro-batches of 8.
    job = finish(digits, run_dir, nproc=1, **{"train.grad_accum": 2})
    output = job.output()
    assert "resuming a 2-process checkpoint with 1 processes" in output
    assert "data stream restored exactly" in output
    assert "cannot resume exactly" not in output and "data stream restarts" not in output
    assert f"resumed from {checkpoint.checkpoints_dir(run_dir) / checkpoint.step_dir_name(stopped)}" in output
    path, manifest = checkpoint.latest_valid(run_dir)
    assert manifest["step"] == MAX_STEPS and manifest["world_size"] == 1
    trainer_state = json.loads((path / "trainer.json").read_text())
    assert trainer_state["images_seen"] == MAX_STEPS * 16
    # Every canonical partition is where the uninterrupted 2-process run left it: the resumed
    # process read exactly the samples the two would have read. (The weights differ: the noise
    # and timesteps are drawn from streams reseeded from the step; tests/test_elastic_data.py
    # compares the samples of every step.)
    want_path, _ = checkpoint.latest_valid(reference)
    want = {}
    for rank in (0, 1):
        want.update(json.loads((want_path / checkpoint.rank_file(rank, "json")).read_text())["data"]["positions"])
    got = json.loads((path / checkpoint.rank_file(0, "json")).read_text())["data"]["positions"]
    assert got == want and len(got) == 4
