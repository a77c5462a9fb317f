"""Where metrics go: ``run_dir/metrics.jsonl`` always, Weights & Biases unless disabled.

`MetricsFile` is the run's own record (one JSON object per logged step) and needs nothing but the
file system. `WandbTracker` mirrors it to W&B: online when an API key is configured, otherwise
offline (``wandb sync`` uploads later), or disabled. The W&B run id lives in
``run_dir/wandb_run_id`` so a resumed or requeued job continues the same run; the training step is
the x-axis (``define_metric``), so a relaunched offline run, whose internal ``_step`` restarts at
0, still plots against increasing steps. Only rank 0 tracks.

Also here: what the run config records about the code (`code_version`: git commit), and the
throughput figures (`flops_per_image`, `peak_flops`) behind the logged MFU. docs/monitoring.md
lists every logged key.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write

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
        atomic_write(self.path, "".join(line + "\n" for line in kept))

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
        self.run_dir = run_dir
        self.log_checkpoints = bool(getattr(wandb_config, "log_checkpoints", False))
        self._checkpoints_logged = _committed_checkpoint_steps(run_dir)  # earlier launches' are done
        with _api_key_hidden(mode != "online"):
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
        self._log_new_checkpoints()

    def log_image(self, key: str, path: str | os.PathLike, step: int, caption: str = "") -> None:
        self.run.log({"step": step, key: self._wandb.Image(str(path), caption=caption)})

    def _log_new_checkpoints(self) -> None:
        # Checkpoints are committed by the trainer (or its background writer) with a rename; the
        # tracker notices them at the next log call and at finish, so it never sees a half-written
        # one and never blocks a save.
        if not self.log_checkpoints:
            return
        for step, path in _committed_checkpoints(self.run_dir):
            if step in self._checkpoints_logged:
                continue
            self._checkpoints_logged.add(step)
            manifest = _read_json(path / "manifest.json")
            artifact = self._wandb.Artifact(
                f"checkpoints-{self.run_id}", type="model",
                metadata={"step": step, "images_seen": manifest.get("images_seen"), "path": str(path.resolve())},
            )
            artifact.add_reference(path.resolve().as_uri(), name=path.name, checksum=False)
            self.run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

    def finish(self, exit_code: int = 0) -> None:
        self._log_new_checkpoints()
        self.run.finish(exit_code=exit_code)


def _committed_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints (a manifest is written last, before the rename)."""
    found = []
    for path in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
        if path.is_dir() and (path / "manifest.json").is_file():
            try:
                found.append((int(path.name.split("-", 1)[1]), path))
            except ValueError:
                continue
    return found


def _committed_checkpoint_steps(run_dir: Path) -> set[int]:
    return {step for step, _ in _committed_checkpoints(run_dir)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class _api_key_hidden:
    """Without W&B online, its key has no use: keep it out of wandb's reach (its settings, debug
    logs and the offline run files all live under run_dir). Online, wandb needs it and keeps it
    in memory; nothing of ours writes it anywhere."""

    def __init__(self, hide: bool):
        self.hide = hide
        self.saved: str | None = None

    def __enter__(self):
        if self.hide:
            self.saved = os.environ.pop("WANDB_API_KEY", None)
        return self

    def __exit__(self, *exc_info):
        if self.saved is not None:
            os.environ["WANDB_API_KEY"] = self.saved
        return False


def make_tracker(run_dir, wandb_config, run_config: dict, is_main: bool):
    if not is_main:
        return NullTracker()
    mode = resolve_mode(wandb_config.mode)
    if mode == "disabled":
        return NullTracker()
    return WandbTracker(run_dir, wandb_config, run_config, mode)


# ---------------------------------------------------------------------------------------------
# What the run config records about the code, and the figures behind MFU


def code_version() -> dict[str, Any]:
    """``git_commit`` of the repository this code was imported from (None outside a checkout)
    and ``git_dirty`` (uncommitted changes to tracked files; None when unknown)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    dirty = git("diff", "--quiet", "HEAD", "--")
    return {"git_commit": head.stdout.strip(), "git_dirty": None if dirty is None else dirty.returncode == 1}


# Dense (no sparsity) spec-sheet TFLOP/s per GPU, by autocast dtype; "tf32" is fp32 matmuls on
# tensor cores. The first entry whose name occurs in torch.cuda.get_device_name() applies.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
)


def peak_flops(device, mixed_precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the override, else the spec table entry; None if unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if mixed_precision in ("bf16", "fp16"):
        dtype = mixed_precision
    else:
        dtype = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name:
            return peaks[dtype] * 1e12
    return None


def flops_per_image(build_model, example) -> float:
    """FLOPs of one training forward+backward per image, counted by FlopCounterMode (matmuls,
    convolutions and attention, 2 per multiply-add) on a twin that ``build_model()`` makes on the
    meta device: no memory, no random numbers, and never the training model itself, which a
    strategy may have wrapped into something that cannot be copied or run alone (FSDP2's and
    ZeRO-3's parameters are shards). Attention counts as its matmuls on any device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = build_model()
    twin.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = twin(example.to("meta"))
        loss.backward()
    return counter.get_total_flops() / len(example)
