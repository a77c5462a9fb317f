"""One optimizer step, and the window of metrics it feeds.

`TrainStep` is the whole of one optimizer step: the learning rate for the step, ``grad_accum``
micro-batches through the strategy (gradient sync only on the last; for a class-conditional
model each micro-batch's labels travel with its images), the optimizer step (clip, skip when
non-finite), the EMA update and the device-side health counters. The trainer calls it
once per step, and benchmarks/train_step.py times this very object.

`MetricWindow` keeps the step's metrics as running sums on the device and reduces them across
processes only at log boundaries, so the step itself never waits for the host. It also holds the
training health: a step whose gradient norm is not finite was skipped by the strategy (weights,
moments and step counts untouched); the consecutive count is read at log boundaries and before
checkpoints, and ``train.max_bad_steps`` in a row stop the run (`TrainingDiverged`) without saving.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.errors import UserError

EXIT_DIVERGED = 3


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: stop, keep the last checkpoint as it is."""

    exit_code = EXIT_DIVERGED


def learning_rate(train, step: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    Stateless by design: resuming restores the schedule from the step number alone.
    """
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    span = max(train.max_steps - train.warmup_steps, 1)
    progress = min(max(step - train.warmup_steps, 0) / span, 1.0)
    floor = train.min_lr_ratio * train.lr
    return floor + (train.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Progress:
    """How far training has come: optimizer steps taken and images seen (all processes)."""

    step: int = 0
    images_seen: int = 0


class MetricWindow:
    """Per-step metrics summed on the device between log boundaries, and the health counters."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bad_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_total = torch.zeros((), dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.data_wait_s = 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput counts training only: periodic work (grids, checkpoints) restarts the clock."""
        self.started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor], grad_norm: torch.Tensor, bad: torch.Tensor,
            data_wait_s: float = 0.0) -> None:
        """One step's metrics (device tensors; no host sync). A skipped step's values stay out of
        the means; ``good_steps`` counts the others."""
        for name, value in values.items():
            self._add(name, torch.where(bad, 0.0, value))
        self._add("grad_norm", torch.where(bad, 0.0, grad_norm.detach().float()))
        self._add("good_steps", (~bad).float())
        self.bad_streak = (self.bad_streak + 1) * bad
        self.bad_total = self.bad_total + bad
        self.steps += 1
        self.data_wait_s += data_wait_s

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def reduce(self, processes) -> dict[str, float]:
        """Means over the window's good steps and over processes, plus the skip counters and
        the window's throughput fields; starts a new window. Collective (one all-reduce)."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[name] for name in names]
                              + [self.bad_streak.float(), self.bad_total.float()]).to(self.device)
        values = processes.mean(stacked).tolist()
        totals = dict(zip(names, values[: len(names)]))
        good = totals.pop("good_steps")
        means = {name: (value / good if good else float("nan")) for name, value in totals.items()}
        means["bad_steps"] = self.steps - round(good)
        means["bad_steps_total"] = round(values[-1])
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        means["steps_in_window"] = self.steps
        means["seconds"] = elapsed
        means["data_wait_fraction"] = self.data_wait_s / elapsed
        self.reset()
        return means

    def check_health(self, limit: int, step: int, last_checkpoint: str) -> None:
        """Raise TrainingDiverged when the last ``limit`` steps were all skipped (reads the device)."""
        streak = int(self.bad_streak.item())
        if streak < limit:
            return
        raise TrainingDiverged(
            f"training stopped at step {step}: the last {streak} steps had a non-finite loss "
            f"or gradient (train.max_bad_steps={limit}); nothing was saved after them, the last "
            f"checkpoint is {last_checkpoint}; lower train.lr, tighten train.grad_clip or check the data, "
            "then relaunch to resume from it"
        )

    def state_dict(self) -> dict[str, int]:
        return {"bad_steps_total": int(self.bad_total.item())}

    def load_state_dict(self, state: dict) -> None:
        self.bad_total.fill_(int(state.get("bad_steps_total", 0)))


class TrainStep:
    """One optimizer step: LR, micro-batches, optimizer step, EMA, metrics (module docstring).

    ``batches`` gives uint8 image tensors (``next``); with ``labels`` (a class-conditional model)
    it must be a `pipeline.data.TrainingBatches` built with labels, whose ``next_batch`` gives
    each batch's labels too."""

    def __init__(self, strategy, batches: Iterator[torch.Tensor], train, global_batch: int,
                 ema=None, faults=None, rank: int = 0, labels: bool = False):
        self.strategy = strategy
        self.batches = batches
        self.labels = labels
        self.train = train
        self.global_batch = global_batch
        self.ema = ema
        self.faults = faults
        self.rank = rank
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format

    def __call__(self, progress: Progress, window: MetricWindow) -> dict[str, torch.Tensor]:
        """Take one step; returns its metrics (device tensors, also added to ``window``)."""
        strategy, accum = self.strategy, self.train.grad_accum
        strategy.set_learning_rate(learning_rate(self.train, progress.step))
        make_nan = self.faults is not None and self.faults.nan_loss(self.rank, progress.step + 1)
        values: dict[str, torch.Tensor] = {}
        waited = 0.0
        for micro in range(accum):
            before = time.perf_counter()
            if self.labels:
                fetched = self.batches.next_batch()
                batch, labels = fetched.images, fetched.labels.to(strategy.device, non_blocking=True)
            else:
                batch, labels = next(self.batches), None
            waited += time.perf_counter() - before
            batch = batch.to(strategy.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            # Labels go only to a conditional model's step (DDP and DeepSpeed take them).
            extra = {} if labels is None else {"labels": labels}
            loss, metrics = strategy.forward_backward(batch, micro == accum - 1, make_nan, **extra)
            for name, value in {"loss": loss, **metrics}.items():
                value = value.detach().float() / accum
                values[name] = values[name] + value if name in values else value
        grad_norm, bad = strategy.optimizer_step()
        progress.step += 1
        progress.images_seen += self.global_batch
        if self.ema is not None:
            strategy.update_ema(self.ema, self.global_batch, progress.images_seen)
        window.add(values, grad_norm, bad, waited)
        return values
