"""Fault injection for tests: one explicit seam, read once when a training process starts.

Tests make failures happen at exact points instead of racing the machine's speed. The plan comes
from one environment variable (it must cross `launch local`, Slurm and torchrun into every
training process), parsed once into a frozen `Faults`; the trainer hands it to the parts that act
on it, and nothing reads the environment inside a step::

    GENPIPE_FAULTS="fail_at_step=5;nan_at_steps=3,4;hold_after_step=7"

- ``fail_at_step=N``: raise inside training when step N is about to run.
- ``nan_at_steps=A,B``: rank 0's loss is NaN at those (1-based) optimizer steps.
- ``pause_in_save=N``: the last rank stops (up to an hour) after writing its files of checkpoint
  N, before the commit, so a test can kill the job in the middle of a checkpoint write.
- ``hold_after_step=N``: after step N (its metrics logged), every rank waits until a stop signal
  arrives, so a test's signal lands at a known step however fast the machine is.
- ``hold_in_grid``: the sample grid waits, inside sampling, until a stop signal arrives.
- ``log_sample_keys``: after each step every rank appends the samples it consumed in that step
  (``shard/key``, in batch order) to ``run_dir/ranks/sample-keys-rank-RRRRR.jsonl``, so a test
  can compare the global batches of two runs (tests/test_elastic_data.py).
- ``compile_backend=NAME``: torch.compile backend (e.g. ``aot_eager``: graphs, no code generation).
- ``stall_rank=R;stall_at_step=N``: rank R stops before step N as a hung rank would (it sleeps,
  up to ``HOLD_LIMIT_S``), so a test sees the hang watchdog (pipeline/watchdog.py) end the job.

A process holding writes ``run_dir/ranks/held-rank-RRRRR`` so the test knows when to signal; a hold
ends with a stop signal or, failing that, after ``HOLD_LIMIT_S`` with an error (never forever). The
hang watchdog does not time a hold after a step (a wait the test asked for); a hold in the grid
is inside the grid's own untimed section, which is what a test of that section needs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import watchdog

log = logging.getLogger(__name__)

ENV = "GENPIPE_FAULTS"
HOLD_LIMIT_S = 600.0


@dataclass(frozen=True)
class Faults:
    fail_at_step: int | None = None
    nan_at_steps: frozenset[int] = field(default_factory=frozenset)
    pause_in_save: int | None = None
    hold_after_step: int | None = None
    hold_in_grid: bool = False
    compile_backend: str | None = None
    log_sample_keys: bool = False
    stall_rank: int | None = None
    stall_at_step: int | None = None
    rank: int = 0
    """This process's rank (from RANK, read once with the plan), for the faults aimed at one rank."""

    @classmethod
    def parse(cls, text: str) -> Faults:
        values: dict = {}
        for item in filter(None, (part.strip() for part in text.split(";"))):
            name, _, value = item.partition("=")
            name = name.strip()
            if name in ("fail_at_step", "pause_in_save", "hold_after_step", "stall_rank", "stall_at_step"):
                values[name] = int(value)
            elif name == "nan_at_steps":
                values[name] = frozenset(int(v) for v in value.split(",") if v.strip())
            elif name in ("hold_in_grid", "log_sample_keys"):
                values[name] = value.strip().lower() not in ("0", "false", "no")
            elif name == "compile_backend":
                values[name] = value.strip()
            else:
                raise ValueError(f"{ENV}: unknown fault {name!r} in {text!r}")
        if ("stall_rank" in values) != ("stall_at_step" in values):
            raise ValueError(f"{ENV}: stall_rank and stall_at_step go together, in {text!r}")
        return cls(**values)

    @classmethod
    def from_environment(cls) -> Faults:
        import dataclasses

        return dataclasses.replace(cls.parse(os.environ.get(ENV, "")), rank=int(os.environ.get("RANK", "0")))

    # -- the points where faults act ------------------------------------------------------------

    def before_step(self, step: int) -> None:
        if self.fail_at_step is not None and step == self.fail_at_step:
            raise RuntimeError(f"{ENV}: fail_at_step={step}: injected failure")
        if self.stall_rank == self.rank and step + 1 == self.stall_at_step:
            log.warning("%s: rank %d stalls before step %d", ENV, self.rank, step + 1)
            time.sleep(HOLD_LIMIT_S)
            raise RuntimeError(f"{ENV}: stalled before step {step + 1} for {HOLD_LIMIT_S:.0f}s "
                               "and nothing ended the job")

    def nan_loss(self, rank: int, step: int) -> bool:
        """Whether rank's loss of optimizer step ``step`` (1-based) is made NaN."""
        return rank == 0 and step in self.nan_at_steps

    def pause_in_checkpoint(self, step: int, rank: int, world_size: int) -> None:
        if self.pause_in_save == step and rank == world_size - 1:
            log.warning("%s: pausing inside the write of checkpoint %d", ENV, step)
            time.sleep(3600)

    def after_step(self, step: int, run_dir: Path, rank: int, stop_requested: Callable[[], bool]) -> None:
        if self.log_sample_keys:
            write_consumed(step, run_dir, rank)
        if self.hold_after_step is not None and step == self.hold_after_step:
            with watchdog.paused(deadline=False):  # a wait the test asked for, not a stall
                hold(f"after step {step}", run_dir, rank, stop_requested)

    def in_grid(self, run_dir: Path, rank: int, stop_requested: Callable[[], bool]) -> None:
        if self.hold_in_grid:
            hold("in the sample grid", run_dir, rank, stop_requested)


# The data loader's side of ``log_sample_keys``: what this process consumed since the last step.
_consumed: list[str] = []


def record_consumed(sample_ids: list[str]) -> None:
    """Called by `pipeline.data.TrainingBatches` for each batch it delivers, when the fault is on."""
    _consumed.extend(sample_ids)


def write_consumed(step: int, run_dir: Path, rank: int) -> None:
    path = Path(run_dir) / "ranks" / f"sample-keys-rank-{rank:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": step, "keys": _consumed}) + "\n")
    _consumed.clear()


def hold(where: str, run_dir: Path, rank: int, stop_requested: Callable[[], bool]) -> None:
    """Wait until a stop signal arrives (announced by a marker file), at most HOLD_LIMIT_S."""
    marker = Path(run_dir) / "ranks" / f"held-rank-{rank:05d}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(where + "\n")
    log.warning("%s: holding %s until a stop signal arrives", ENV, where)
    deadline = time.monotonic() + HOLD_LIMIT_S
    try:
        while not stop_requested():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ENV}: held {where} for {HOLD_LIMIT_S:.0f}s and no stop signal came")
            time.sleep(0.02)
    finally:
        marker.unlink(missing_ok=True)


def env(**faults) -> dict[str, str]:
    """The environment entry that injects ``faults`` (for tests): ``env(nan_at_steps=[3, 4])``."""
    parts = []
    for name, value in faults.items():
        if isinstance(value, (list, tuple, set, frozenset, range)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        parts.append(f"{name}={value}")
    Faults.parse(";".join(parts))  # a typo in a test fails here, not silently
    return {ENV: ";".join(parts)}
