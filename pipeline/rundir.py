"""The run directory: the one place that knows its layout, and how files in it are written.

A run directory is the whole state of a run (docs/architecture.md)::

    config.yaml          the resolved config (overrides applied)
    metrics.jsonl        one JSON object per logged step (training, evaluation)
    checkpoints/         step-NNNNNNNNN/ (pipeline/checkpoint.py has the format)
    samples/             step-NNNNNNNNN.png grids
    eval/                launch eval results
    ranks/               rank-RRRRR.jsonl: each process's start/end records
    wandb_run_id         the W&B run this directory continues
    run.lock             the job training into it now (pipeline/runlock.py)

Files other processes or a later launch read are written atomically (`atomic_write`: a temporary
name in the same directory, fsync, rename), so a reader sees the old file or the new one, never
half of one. "The latest checkpoint" is the newest one that verifies (every file's size and hash
against its manifest), the same for training, `launch status`, `sample`, `eval` and `export`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import checkpoint
from pipeline.files import atomic_write

__all__ = ["RunDir", "atomic_write", "read_json_lines"]


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON object of a JSON-lines file; a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # -- layout ----------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return checkpoint.checkpoints_dir(self.path)

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def ranks(self) -> Path:
        return self.path / "ranks"

    def sample_path(self, step: int) -> Path:
        return self.samples / f"step-{step:09d}.png"

    # -- config ----------------------------------------------------------------------------------

    def write_config(self, config) -> Path:
        """``config.yaml``: the config this run actually uses (rewritten only when it changed)."""
        from pipeline import config as config_module

        text = config_module.dump_yaml(config)
        path = self.config_path
        if not path.exists() or path.read_text() != text:
            atomic_write(path, text)
        return path

    # -- checkpoints ------------------------------------------------------------------------------

    def latest_checkpoint(self, warn: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
        """(path, manifest) of the newest checkpoint that verifies; damaged newer ones are reported."""
        return checkpoint.latest_valid(self.path, warn)

    def newest_checkpoint_name(self) -> str:
        """The newest checkpoint directory's path for messages (unverified), or 'none yet'."""
        kept = checkpoint.list_checkpoints(self.path)
        return str(kept[-1][1]) if kept else "none yet"

    # -- records ----------------------------------------------------------------------------------

    def metrics(self) -> list[dict[str, Any]]:
        return read_json_lines(self.metrics_path)

    def rank_record(self, rank: int, event: str, **fields: Any) -> None:
        """Append one JSON record to ``ranks/rank-RRRRR.jsonl`` (start/end of each process)."""
        self.ranks.mkdir(parents=True, exist_ok=True)
        record = {"event": event, "rank": rank, "time": time.time(), **fields}
        with open(self.ranks / f"rank-{rank:05d}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def rank_records(self, rank: int) -> list[dict[str, Any]]:
        return read_json_lines(self.ranks / f"rank-{rank:05d}.jsonl")
