"""The data order is global: which samples form global batch k depends on the seed and k alone.

In-process tests drive `TrainingBatches` directly, one object per rank of a pretended job, over
`make_id_shards` shards whose images say which sample they are: the global batches of every
process count, worker count and gradient accumulation are compared, a job is stopped and resumed
on other process counts through its state dicts, and the partition assignment and the
combinations that cannot work are checked. The end-to-end test runs real `launch local` jobs of a
tiny DDPM (2 processes, stopped, resumed on 1, stopped, resumed on 4; 4 processes share the 2 CI
cores through gloo) that log each rank's consumed sample keys per step (``GENPIPE_FAULTS=
log_sample_keys``), and compares every global step with an uninterrupted 2-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_id_shards, run_cli
from pipeline import faults
from pipeline.data import Layout, TrainingBatches, plan_layout, resolve_shards, resume_problem, saved_stream
from pipeline.errors import UserError
from pipeline.preemption import EXIT_PREEMPTED

NUM_SHARDS, PER_SHARD, SIZE = 8, 6, 8
PARTITIONS = 8
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    return resolve_shards(str(make_id_shards(tmp_path_factory.mktemp("ids") / "train", NUM_SHARDS, PER_SHARD, SIZE)))


def job(shards, world_size: int, num_workers: int, batch_size: int, state: dict | None = None,
        **options) -> list[TrainingBatches]:
    """One `TrainingBatches` per rank of a pretended job."""
    settings = dict(seed=0, image_size=SIZE, channels=1, shuffle_buffer=5, random_flip=True,
                    canonical_partitions=PARTITIONS, prefetch_factor=2)
    settings.update(options)
    return [TrainingBatches(shards, rank=rank, world_size=world_size, num_workers=num_workers,
                            batch_size=batch_size, state=state, **settings) for rank in range(world_size)]


def global_steps(ranks: list[TrainingBatches], steps: int, grad_accum: int = 1) -> list[dict[int, torch.Tensor]]:
    """Each step's samples, all ranks and micro-batches together: {sample id: image}."""
    out = []
    for _ in range(steps):
        step = {}
        for batches in ranks:
            for _ in range(grad_accum):
                images = next(batches)
                for image in images:
                    sample = int(image[0, 0, 0])
                    assert sample not in step, f"sample {sample} twice in one step"
                    step[sample] = image
        out.append(step)
    return out


def stopped(ranks: list[TrainingBatches], steps_done: int, global_batch: int = GLOBAL_BATCH) -> dict:
    """The checkpoint's data state after `steps_done` steps of the global batch."""
    states = [batches.state_dict() for batches in ranks]
    for batches in ranks:
        batches.close()
    return saved_stream(states, steps_done * global_batch, steps_done)


def same_steps(got: list[dict[int, torch.Tensor]], want: list[dict[int, torch.Tensor]]) -> None:
    assert [sorted(step) for step in got] == [sorted(step) for step in want]
    for got_step, want_step in zip(got, want):
        for sample, image in want_step.items():
            assert torch.equal(got_step[sample], image), f"sample {sample} flipped differently"


# --- the order --------------------------------------------------------------------------------


def test_global_batches_are_the_same_whatever_the_processes_workers_and_accumulation(id_shards):
    steps = 14  # 112 samples: past the end of the second epoch of every partition
    reference = global_steps(job(id_shards, 1, 0, 8), steps)
    assert all(len(step) == GLOBAL_BATCH for step in reference)
    # (processes, workers, per-process batch, micro-batches per step): a global batch of 8 each time
    for world_size, num_workers, batch_size, grad_accum in [(2, 2, 4, 1), (4, 0, 2, 1), (8, 0, 1, 1),
                                                             (1, 2, 4, 2), (2, 1, 2, 2), (1, 4, 8, 1)]:
        ranks = job(id_shards, world_size, num_workers, batch_size)
        try:
            same_steps(global_steps(ranks, steps, grad_accum), reference)
        finally:
            for batches in ranks:
                batches.close()


def closed(ranks: list[TrainingBatches]) -> list[TrainingBatches]:
    """The ranks, their data workers shut down (left to garbage collection, each costs 10 s)."""
    for batches in ranks:
        batches.close()
    return ranks


def test_a_job_stopped_and_resumed_on_other_process_counts_reads_the_uninterrupted_batches(id_shards):
    reference_job = job(id_shards, 2, 2, 4)
    reference = global_steps(reference_job, 15)
    closed(reference_job)
    # 2 processes × 2 workers for 4 steps; 1 process (accumulating 2 micro-batches) to step 9;
    # 4 processes to step 15. Each resume gets only the checkpoint's data state.
    first = job(id_shards, 2, 2, 4)
    got = global_steps(first, 4)
    second = job(id_shards, 1, 2, 4, state=stopped(first, 4))
    got += global_steps(second, 5, grad_accum=2)
    third = job(id_shards, 4, 0, 2, state=stopped(second, 9))
    got += global_steps(third, 6)
    closed(third)
    same_steps(got, reference)


def test_the_same_process_count_resumes_exactly_mid_round(id_shards):
    # 3 samples per process per step with 8 partitions: after 5 steps (30 samples) the checkpoint
    # falls inside a round.
    reference = job(id_shards, 2, 1, 3)
    want = [[int(i) for i in next(batches)[:, 0, 0, 0]] for _ in range(9) for batches in reference]
    closed(reference)
    first = job(id_shards, 2, 2, 3)
    got = [[int(i) for i in next(batches)[:, 0, 0, 0]] for _ in range(5) for batches in first]
    state = stopped(first, 5, global_batch=6)
    resumed = job(id_shards, 2, 0, 3, state=state)
    got += [[int(i) for i in next(batches)[:, 0, 0, 0]] for _ in range(4) for batches in resumed]
    closed(resumed)
    assert [sorted(batch) for batch in got] == [sorted(batch) for batch in want]
    # ... and refuses another process count, where it could not be exact
    with pytest.raises(UserError) as info:
        job(id_shards, 1, 0, 6, state=state)
    assert "not a whole number of rounds" in str(info.value) and "resume on 2 processes" in str(info.value)


def test_a_checkpoint_from_before_partitions_continues_each_reader_stream(id_shards, caplog):
    # Rank states as pipeline/data.py wrote them before canonical partitions: 2 processes, one
    # reader each, both 8 samples into epoch 0 (2 steps of 4 per process). The first 16 samples of
    # those readers' streams were [30 33 18 32 19 21 31 35 | 22 23 34 26 ...] and
    # [44 42 43 37 36 47 38 41 | 46 40 6 45 ...] (tests/test_data_loading.py).
    legacy = [{"num_readers": 2, "urls_count": NUM_SHARDS, "positions": {str(rank): [0, 8]}, "next_local": 0}
              for rank in (0, 1)]
    with caplog.at_level("WARNING", logger="pipeline.data"):
        [one] = job(id_shards, 1, 0, 8, state=saved_stream(legacy, 16, 2), canonical_partitions=None,
                    random_flip=False)
    assert any("predates canonical partitions" in record.getMessage() for record in caplog.records)
    assert one.layout.partitions == 2
    assert sorted(int(i) for i in next(one)[:, 0, 0, 0]) == sorted([22, 23, 34, 26, 46, 40, 6, 45])
    one.close()


# --- who reads what, and what cannot work ----------------------------------------------------------


def test_partition_assignment():
    layout = Layout(partitions=12, world_size=2, rank=1, readers=3)
    assert layout.per_process == 6
    assert layout.process_partitions() == range(6, 12)
    assert [layout.reader_partitions(r) for r in range(3)] == [[6, 9], [7, 10], [8, 11]]
    # readers: the largest divisor of the partitions per process not above the workers (or batch)
    assert plan_layout(100, 2, 0, 4, 64, configured=12).readers == 3
    assert plan_layout(100, 2, 0, 0, 64, configured=12).readers == 1
    assert plan_layout(100, 2, 0, 8, 2, configured=12).readers == 2
    assert plan_layout(100, 4, 0, 8, 64, configured=12).readers == 3
    # by default one partition per reader of the first start; afterwards the run's own number
    assert plan_layout(100, 2, 0, 3, 64).partitions == 6
    assert plan_layout(100, 3, 0, 2, 64, saved=6).partitions == 6


@pytest.mark.parametrize("arguments, expected", [
    (dict(num_shards=8, world_size=3, configured=8), "8 is not a multiple of the 3 processes"),
    (dict(num_shards=8, world_size=3, saved=8), "resume on a process count that divides 8 (1, 2, 4, 8)"),
    (dict(num_shards=4, world_size=1, configured=8), "4 shard(s) for 8 canonical partitions"),
    (dict(num_shards=4, world_size=2, num_workers=3), "4 shard(s) for 6 readers (2 process(es) × 3 worker(s))"),
    (dict(num_shards=16, world_size=2, configured=16, saved=8), "set 8 or drop the key"),
])
def test_impossible_layouts_are_one_line_errors(arguments, expected):
    arguments = {"rank": 0, "num_workers": 1, "batch_size": 8, **arguments}
    configured, saved = arguments.pop("configured", None), arguments.pop("saved", None)
    with pytest.raises(UserError) as info:
        plan_layout(**arguments, configured=configured, saved=saved)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_resume_problems():
    # (partitions 8, 2 processes, 10 steps of 16 images) on other process counts
    fine = dict(saved_partitions=8, saved_world_size=2, images_seen=160, step=10)
    assert resume_problem(**fine, world_size=4, batch_size=4, grad_accum=1) is None
    assert resume_problem(**fine, world_size=1, batch_size=8, grad_accum=2) is None
    assert resume_problem(**fine, world_size=2, batch_size=1, grad_accum=1) is None  # same count: no check
    message = resume_problem(**fine, world_size=4, batch_size=8, grad_accum=1)
    assert "global batch is 16" in message and "would make it 32" in message
    assert "data.batch_size=4" in message
    message = resume_problem(**fine, world_size=1, batch_size=8, grad_accum=1)
    assert "data.batch_size=16 or train.grad_accum=2" in message
    assert "1, 2, 4, 8" in resume_problem(**fine, world_size=3, batch_size=8, grad_accum=1)
    assert "not a whole number of rounds" in resume_problem(
        saved_partitions=8, saved_world_size=2, images_seen=12, step=2, world_size=1, batch_size=6, grad_accum=1)


# --- end to end: launch local, 2 → 1 → 4 processes --------------------------------------------------

STEPS = 12
TINY = {
    "data.batch_size": 4, "data.num_workers": 1, "data.canonical_partitions": 4, "data.shuffle_buffer": 16,
    "data.random_flip": "true", "model.base_channels": 8, "model.norm_groups": 4,
    "model.channel_mult": "[1,2]", "model.attention_resolutions": "[]", "model.sample_steps": 2,
    "train.max_steps": STEPS, "train.warmup_steps": 2, "train.log_every_steps": 1,
    "checkpoint.every_steps": 100, "sample.every_steps": 0, "sample.at_end": "false",
    "eval.every_steps": 0, "wandb.mode": "disabled",
}
LAUNCH_TIMEOUT_S = 300


def launch_args(digits_dir: Path, run_dir: Path, nproc: int, **extra) -> list[str]:
    values = {"run_dir": run_dir, "data.shards": digits_dir / "train", "data.eval_shards": digits_dir / "test",
              **TINY, **extra}
    return ["launch", "local", "configs/tiny/ddpm.yaml", *(f"{k}={v}" for k, v in values.items()),
            "--nproc", str(nproc)]


def launch_env(**fault_plan) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENPIPE_")}
    return {**base, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            **faults.env(log_sample_keys=True, **fault_plan)}


def run_until_held(digits_dir: Path, run_dir: Path, nproc: int, step: int, **extra) -> str:
    """Launch, wait for the hold after `step`, stop it with SIGTERM; the job's output."""
    log_path = run_dir.parent / f"launch-{nproc}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *launch_args(digits_dir, run_dir, nproc, **extra)[1:]],
            cwd=REPO, env=launch_env(hold_after_step=step), stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            marker = run_dir / "ranks" / "held-rank-00000"
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while not marker.exists():
                assert process.poll() is None, f"exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"no hold after step {step}:\n{log_path.read_text()[-4000:]}"
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGTERM)  # the launcher forwards it to its processes
            code = process.wait(timeout=LAUNCH_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    output = log_path.read_text()
    assert code == EXIT_PREEMPTED, output[-4000:]
    return output


def consumed_keys(run_dir: Path) -> dict[int, list[str]]:
    """Every step's sample keys, all ranks together (sorted), from the ranks' key logs."""
    steps: dict[int, list[str]] = {}
    for path in sorted((run_dir / "ranks").glob("sample-keys-rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in sorted(steps.items())}


@pytest.mark.slow
def test_launch_local_2_then_1_then_4_processes_reads_the_uninterrupted_samples(digits_dir, tmp_path):
    reference = tmp_path / "reference" / "run"
    reference.parent.mkdir()
    done = run_cli(*launch_args(digits_dir, reference, 2), env=launch_env())
    assert done.returncode == 0, done.stderr[-4000:]
    want = consumed_keys(reference)
    assert list(want) == list(range(1, STEPS + 1))
    assert all(len(keys) == 8 == len(set(keys)) for keys in want.values())

    run_dir = tmp_path / "elastic" / "run"
    run_dir.parent.mkdir()
    run_until_held(digits_dir, run_dir, 2, 4)
    # One process: the same global batch of 8 as 4 images × 2 accumulated micro-batches, read by
    # 2 workers that share the 4 partitions.
    output = run_until_held(digits_dir, run_dir, 1, 8, **{"train.grad_accum": 2, "data.num_workers": 2})
    assert "resuming a 2-process checkpoint with 1 processes" in output
    assert "data stream restored exactly" in output and "data stream restarts" not in output
    # Four processes of 2 images: another global batch is refused before anything starts...
    refused = run_cli(*launch_args(digits_dir, run_dir, 4), env=launch_env())
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "global batch is 8" in refused.stderr and "data.batch_size=2" in refused.stderr
    # ... and so is a process count that does not divide the partitions
    refused = run_cli(*launch_args(digits_dir, run_dir, 3, **{"data.batch_size": 8}), env=launch_env())
    assert refused.returncode == 2 and "process count that divides 4 (1, 2, 4)" in refused.stderr, refused.stderr
    done = run_cli(*launch_args(digits_dir, run_dir, 4, **{"data.batch_size": 2}), env=launch_env())
    assert done.returncode == 0, done.stderr[-4000:]
    assert "data stream restored exactly" in done.stderr

    got = consumed_keys(run_dir)
    assert list(got) == list(range(1, STEPS + 1))
    different = [step for step in want if got[step] != want[step]]
    assert not different, f"steps whose samples differ from the uninterrupted run: {different}"
    final = json.loads((run_dir / "checkpoints" / f"step-{STEPS:09d}" / "trainer.json").read_text())
    assert final["world_size"] == 4 and final["images_seen"] == STEPS * 8
