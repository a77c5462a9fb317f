"""``launch status RUN_DIR [--plot out.png]``: how far a run got, from its run directory alone.

Reads ``metrics.jsonl`` (training and evaluation records), ``config.yaml`` (max_steps), the
checkpoints and, for runs submitted with ``launch slurm``, ``slurm/job.json`` plus what Slurm
says about that job (launch/slurm_queries.py): its state and, while it is pending, why, marking a
job Slurm will never start and the config key to change. Needs neither W&B nor the training
processes. ``--plot`` draws the loss and
bits/dim curves and the newest sample grid into one PNG (matplotlib, the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch import slurm_queries as queries
from pipeline.errors import UserError
from pipeline.rundir import RunDir

LABEL_WIDTH = 13


@dataclass
class RunProgress:
    """What metrics.jsonl says: every record in order, and the training records (with a loss).
    Evaluation values come in their own records or, for FID on its own schedule, in training ones."""

    records: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.train[-1] if self.train else {}

    def last_with(self, key: str) -> dict[str, Any] | None:
        for record in reversed(self.records):
            if key in record:
                return record
        return None

    def with_key(self, key: str) -> list[dict[str, Any]]:
        return [record for record in self.records if key in record]


def read_metrics(run_dir: Path) -> RunProgress:
    progress = RunProgress()
    for record in RunDir(run_dir).metrics():
        progress.records.append(record)
        if "loss" in record:
            progress.train.append(record)
    return progress


def _max_steps(run_dir: Path) -> int | None:
    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        return int(config["train"]["max_steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def last_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest intact checkpoint and its manifest: the one a relaunch resumes from and
    ``launch sample`` loads (every file's size and hash checked; damaged newer ones skipped)."""
    return RunDir(run_dir).latest_checkpoint(warn=lambda message: None)


def latest_samples(run_dir: Path) -> Path | None:
    grids = sorted((Path(run_dir) / "samples").glob("step-*.png"))
    return grids[-1] if grids else None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def eta_seconds(progress: RunProgress, max_steps: int | None) -> float | None:
    """Time to max_steps at the pace of the latest stretch of training (evaluation and
    checkpoint pauses included), from the records' wall-clock times since the last restart."""
    records = progress.train
    if max_steps is None or len(records) < 2:
        return None
    stretch = [records[-1]]
    for record in reversed(records[:-1]):
        if record["step"] >= stretch[-1]["step"] or stretch[-1]["time"] - record["time"] > 3600:
            break  # a relaunch (steps repeat) or a long gap: pace only since then
        stretch.append(record)
    if len(stretch) < 2:
        return None
    steps = stretch[0]["step"] - stretch[-1]["step"]
    seconds = stretch[0]["time"] - stretch[-1]["time"]
    if steps <= 0 or seconds <= 0:
        return None
    return max(max_steps - stretch[0]["step"], 0) * seconds / steps


def digits_quality_summary(record: dict[str, Any]) -> str:
    """The digits sample-quality measures of a metrics record, each beside the held-out real
    digits' value (`pipeline.digits_quality`)."""
    parts = []
    for name, label, decimals in (("fd", "FD", 2), ("is", "IS", 2), ("confidence", "confidence", 3),
                                  ("classes_covered", "classes", 0)):
        value = record.get(f"eval/digits_{name}")
        if value is None:
            continue
        reference = record.get(f"eval/digits_{name}_reference")
        real = f" (real {reference:.{decimals}f})" if reference is not None else ""
        parts.append(f"{label} {value:.{decimals}f}{real}")
    return f"{', '.join(parts)}; {record.get('eval/digits_images')} images, step {record['step']}"


def _line(label: str, value: str) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{value}"


def job_lines(run_dir: Path, job: dict[str, Any], info: dict[str, str]) -> list[str]:
    """The job's lines from job.json and Slurm's fields for it (`slurm_queries.job_state`)."""
    job_id = str(job["job_id"])
    state = info.get("JobState", "unknown (no longer known to Slurm)")
    if info.get("JobState") and info["JobState"] not in queries.ACTIVE_STATES:
        ended = queries.ended_status_text(info)
        state += f", {ended}" if ended else ""
    requeues = queries.read_requeues(run_dir, job_id)
    lines = [_line("job", f"{job_id} ({state}; requeued {requeues}x)")]
    if info.get("JobState") == "PENDING":
        reason = queries.explain_reason(info.get("Reason"), job_id)
        if reason is None:
            lines.append(_line("reason", "none yet (the scheduler has not looked at the job)"))
        else:
            problem = queries.never_starts(info, reason, queries.request_of_run(run_dir))
            lines.append(_line("reason", str(reason) + (" (can never start)" if problem else "")))
            if problem:
                lines.append(_line("fix", f"{problem}; then `launch cancel {run_dir}` and submit again"))
    elif job.get("never_starts") and info.get("JobState") in (None, "CANCELLED"):
        never = job["never_starts"]
        lines.append(_line("reason", f"{never['reason']}, could never start: {never['problem']} "
                                     "(cancelled by `launch slurm`)"))
    if info.get("NodeList") and info["NodeList"] != "(null)":
        lines.append(_line("nodes", info["NodeList"]))
    lines.append(_line("log", job["stdout"]))
    return lines


def status_lines(run_dir: Path, now: float | None = None) -> list[str]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / queries.SUBMITIT_FOLDER).is_dir():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    now = time.time() if now is None else now
    lines = [_line("run dir", str(run_dir))]
    job = queries.read_job(run_dir)
    if job is None:
        lines.append(_line("job", "none submitted with `launch slurm`"))
    else:
        lines += job_lines(run_dir, job, queries.job_state(job["job_id"]))

    progress = read_metrics(run_dir)
    max_steps = _max_steps(run_dir)
    last = progress.last
    if last:
        of = f" of {max_steps} ({100 * last['step'] / max_steps:.0f}%)" if max_steps else ""
        lines.append(_line("step", f"{last['step']}{of}"))
        lines.append(_line("images seen", str(last.get("images_seen"))))
        lines.append(_line("loss", f"{last['loss']:.4f}"))
    else:
        lines.append(_line("step", "no metrics yet"))
    evaluation = progress.last_with("eval/bits_per_dim")
    if evaluation is not None:
        lines.append(_line("bits/dim", f"{evaluation['eval/bits_per_dim']:.4f} (held-out, step {evaluation['step']})"))
    quality = progress.last_with("eval/fid")
    if quality is not None:
        lines.append(_line("FID", f"{quality['eval/fid']:.3f}, KID {quality.get('eval/kid', float('nan')):.4f} "
                                  f"({quality.get('eval/fid_images')} images, step {quality['step']})"))
    digits = progress.last_with("eval/digits_fd")
    if digits is not None:
        lines.append(_line("digits", digits_quality_summary(digits)))
    if last.get("images_per_s") is not None:
        extra = f", MFU {100 * last['mfu']:.1f}%" if last.get("mfu") is not None else ""
        lines.append(_line("throughput", f"{last['images_per_s']:.1f} images/s{extra}"))
    if last:
        eta = eta_seconds(progress, max_steps)
        if max_steps is not None and last["step"] >= max_steps:
            lines.append(_line("ETA", "done"))
        elif eta is not None:
            lines.append(_line("ETA", f"{_duration(eta)} at the recent pace"))
        lines.append(_line("updated", f"{_duration(max(now - last['time'], 0))} ago"))
    found = last_checkpoint(run_dir)
    if found:
        path, manifest = found
        lines.append(_line("checkpoint", f"{path} (step {manifest.get('step')}, {manifest.get('images_seen')} images)"))
    else:
        lines.append(_line("checkpoint", "none yet"))
    grid = latest_samples(run_dir)
    if grid is not None:
        lines.append(_line("samples", str(grid)))
    return lines


def plot(run_dir: Path, out: str | Path) -> Path:
    """Loss and held-out bits/dim against step, and the newest sample grid, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the project's dev extra)") from None
    from PIL import Image

    run_dir = Path(run_dir)
    progress = read_metrics(run_dir)
    if not progress.train:
        raise UserError(f"{run_dir}: no training metrics to plot yet (metrics.jsonl)")
    grid = latest_samples(run_dir)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    loss_axis, bits_axis, image_axis = axes

    steps = [r["step"] for r in progress.train]
    loss_axis.plot(steps, [r["loss"] for r in progress.train], color="tab:blue", linewidth=1.2)
    loss_axis.set(title="training loss", xlabel="step", ylabel="loss")
    if min(r["loss"] for r in progress.train) > 0:
        loss_axis.set_yscale("log")
    loss_axis.grid(alpha=0.3)

    evaluations = progress.with_key("eval/bits_per_dim")
    if evaluations:
        bits_axis.plot([r["step"] for r in evaluations], [r["eval/bits_per_dim"] for r in evaluations],
                       marker="o", color="tab:orange")
        bits_axis.set(title="held-out bits/dim", xlabel="step", ylabel="bits/dim")
        bits_axis.grid(alpha=0.3)
    else:
        bits_axis.text(0.5, 0.5, "no evaluation yet\n(eval.every_steps)", ha="center", va="center")
        bits_axis.set(title="held-out bits/dim", xticks=[], yticks=[])

    if grid is not None:
        image = Image.open(grid)
        image_axis.imshow(image, cmap="gray" if image.mode == "L" else None, interpolation="nearest")
        image_axis.set_title(f"samples, {grid.stem}")
    else:
        image_axis.text(0.5, 0.5, "no samples yet", ha="center", va="center")
    image_axis.axis("off")

    last = progress.last
    figure.suptitle(f"{run_dir.name}: step {last['step']}, {last.get('images_seen')} images, "
                    f"loss {last['loss']:.4f}")
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def add_command(subparsers: argparse._SubParsersAction) -> None:
    status = subparsers.add_parser(
        "status", help="progress of a run directory: step, loss, bits/dim, ETA, checkpoint, Slurm job")
    status.add_argument("run_dir")
    status.add_argument("--plot", metavar="OUT.png", default=None,
                        help="also draw loss and bits/dim curves and the newest samples into this PNG")
    status.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    for line in status_lines(Path(args.run_dir)):
        print(line)
    if args.plot:
        print(_line("plot", str(plot(Path(args.run_dir), args.plot))))
    return 0
