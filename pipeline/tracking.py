"""Where metrics go: ``run_dir/metrics.jsonl`` always, Weights & Biases unless disabled.

`MetricsFile` is the run's own record (one JSON object per logged step) and needs nothing but the
file system. `WandbTracker` mirrors it to W&B: online when an API key is configured, otherwise
offline (``wandb sync`` uploads later), or disabled. The W&B run id lives in
``run_dir/wandb_run_id`` so a resumed or requeued job continues the same run; the training step is
the x-axis (``define_metric``), so a relaunched offline run, whose internal ``_step`` restarts at
0, still plots against increasing steps. Only rank 0 tracks.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


class MetricsFile:
    """Append-only JSON lines of logged metrics, truncated to the resumed step on restart."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._drop_after(resume_step)
        self._handle = open(self.path, "a", buffering=1)

    def _drop_after(self, step: int) -> None:
        # Steps logged after the checkpoint we resume from will be trained again; keeping their
        # old lines would make the file's steps go backwards.
        if not self.path.exists():
            return
        kept = []
        with open(self.path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= step:
                    kept.append(json.dumps(record))
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._handle.close()


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str | None) -> str:
    if mode is not None:
        return mode
    return "online" if api_key_configured() else "offline"


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_image(self, key: str, path: str | os.PathLike, step: int, caption: str = "") -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _new_run_id() -> str:
    # W&B run ids: 8 lowercase letters/digits, the same shape wandb generates.
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbTracker:
    """A W&B run bound to the run directory (same id on every launch into it)."""

    def __init__(self, run_dir: str | os.PathLike, wandb_config, run_config: dict, mode: str):
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = _new_run_id()
            id_file.write_text(run_id + "\n")
        self.run_id = run_id
        self.run = wandb.init(
            project=wandb_config.project,
            entity=wandb_config.entity,
            name=wandb_config.name or run_dir.resolve().name,
            tags=list(wandb_config.tags),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=run_config,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({"step": step, **metrics})

    def log_image(self, key: str, path: str | os.PathLike, step: int, caption: str = "") -> None:
        self.run.log({"step": step, key: self._wandb.Image(str(path), caption=caption)})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(run_dir, wandb_config, run_config: dict, is_main: bool):
    if not is_main:
        return NullTracker()
    mode = resolve_mode(wandb_config.mode)
    if mode == "disabled":
        return NullTracker()
    return WandbTracker(run_dir, wandb_config, run_config, mode)
