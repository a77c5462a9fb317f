"""The training step, the learning-rate schedule, the metric window and the health check, in process.

`TrainStep` runs through the real DDP strategy on one process (no process group needed) with a
small deterministic model that implements the family interface, so gradients can be compared
exactly: accumulating two micro-batches equals one batch twice the size, a NaN step leaves the
weights, moments and step count alone, and the EMA follows the weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline import config as config_module
from pipeline.distributed import Processes
from pipeline.ema import EMA
from pipeline.faults import Faults
from pipeline.strategies.ddp import DDPStrategy
from pipeline.train_step import MetricWindow, Progress, TrainingDiverged, TrainStep, learning_rate


def _config(**changes):
    overrides = {"train.max_steps": 100, "train.lr": 1e-2, "train.warmup_steps": 10, "train.lr_schedule": "cosine",
                 "train.min_lr_ratio": 0.1, "train.grad_clip": "null", **changes}
    return config_module.load("configs/tiny/ddpm.yaml", [f"{k}={v}" for k, v in overrides.items()])


class Quadratic(nn.Module):
    """loss = mean over the batch of ‖W·x/255 − 1‖²: deterministic, with a metric."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(4, 16) * 0.1)

    def forward(self, x):
        residual = self.weight @ (x.float().flatten(1).T / 255.0) - 1.0
        loss = residual.square().mean()
        return loss, {"residual": residual.abs().mean().detach()}


def _step(config, batches, faults=None, ema=False):
    model = Quadratic()
    strategy = DDPStrategy(config)
    strategy.processes = Processes(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy.wrap(model, build_model=Quadratic, faults=faults or Faults())
    average = EMA(model, 100.0) if ema else None
    step = TrainStep(strategy, iter(batches), config.train, global_batch=8, ema=average, faults=faults)
    return model, strategy, step, average


def _batches(count, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, 1, 4, 4), dtype=torch.uint8, generator=generator) for _ in range(count)]


# --- the learning rate ------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_follows_the_cosine_to_its_floor():
    train = _config().train
    assert learning_rate(train, 0) == pytest.approx(1e-3)  # (0+1)/10 of the peak
    assert learning_rate(train, 9) == pytest.approx(1e-2)
    assert learning_rate(train, 10) == pytest.approx(1e-2)
    middle = 10 + 45
    assert learning_rate(train, middle) == pytest.approx(1e-3 + (1e-2 - 1e-3) * 0.5)
    assert learning_rate(train, 100) == pytest.approx(1e-3)
    assert learning_rate(train, 1000) == pytest.approx(1e-3)  # past the end: the floor


def test_constant_schedule_after_warm_up():
    train = _config(**{"train.lr_schedule": "constant"}).train
    assert [learning_rate(train, s) for s in (10, 50, 99)] == [1e-2] * 3


# --- the step -----------------------------------------------------------------------------------


def test_a_step_moves_the_weights_and_counts_progress():
    config = _config()
    model, strategy, step, _ = _step(config, _batches(1))
    before = model.weight.detach().clone()
    progress, window = Progress(), MetricWindow(torch.device("cpu"))
    values = step(progress, window)
    assert (progress.step, progress.images_seen) == (1, 8)
    assert not torch.equal(model.weight, before)
    assert set(values) == {"loss", "residual"}
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(config.train, 0))


def test_two_micro_batches_equal_one_batch_of_twice_the_size():
    big = _batches(1, size=16)[0]
    whole, _, whole_step, _ = _step(_config(), [big])
    whole_step(Progress(), MetricWindow(torch.device("cpu")))
    halves, _, halves_step, _ = _step(_config(**{"train.grad_accum": 2}), [big[:8], big[8:]])
    halves_step(Progress(), MetricWindow(torch.device("cpu")))
    torch.testing.assert_close(halves.weight, whole.weight, rtol=0, atol=1e-7)


def test_a_nan_step_is_skipped_and_counted():
    config = _config()
    model, strategy, step, _ = _step(config, _batches(3), faults=Faults(nan_at_steps=frozenset({2})), ema=True)
    progress, window = Progress(), MetricWindow(torch.device("cpu"))
    step(progress, window)
    weights, moments = model.weight.detach().clone(), strategy.optimizer.state[model.weight]["exp_avg"].clone()
    step(progress, window)  # step 2: NaN loss
    assert torch.equal(model.weight, weights)
    assert torch.equal(strategy.optimizer.state[model.weight]["exp_avg"], moments)
    assert int(strategy.optimizer.state[model.weight]["step"]) == 1
    assert progress.step == 2  # the schedule stays a function of the step
    assert int(window.bad_streak) == 1 and int(window.bad_total) == 1
    step(progress, window)
    assert int(window.bad_streak) == 0 and int(window.bad_total) == 1


# --- the metric window and the health check ---------------------------------------------------------


class OneProcess:
    def mean(self, values):
        return values


def _add(window, loss, bad):
    window.add({"loss": torch.tensor(loss)}, torch.tensor(2.0), torch.tensor(bad))


def test_window_means_leave_out_skipped_steps():
    window = MetricWindow(torch.device("cpu"))
    for loss, bad in ((1.0, False), (float("nan"), True), (3.0, False)):
        _add(window, loss, bad)
    means = window.reduce(OneProcess())
    assert means["loss"] == pytest.approx(2.0) and means["grad_norm"] == pytest.approx(2.0)
    assert (means["bad_steps"], means["bad_steps_total"], means["steps_in_window"]) == (1, 1, 3)
    assert window.steps == 0 and window.sums == {}  # a new window
    _add(window, float("nan"), True)
    means = window.reduce(OneProcess())
    assert math.isnan(means["loss"]) and means["bad_steps_total"] == 2


def test_health_check_stops_after_max_bad_steps_in_a_row():
    window = MetricWindow(torch.device("cpu"))
    for _ in range(3):
        _add(window, float("nan"), True)
        window.check_health(limit=4, step=1, last_checkpoint="x")
    _add(window, float("nan"), True)
    with pytest.raises(TrainingDiverged, match=r"the last 4 steps .* the last checkpoint is runs/x/step-1"):
        window.check_health(limit=4, step=9, last_checkpoint="runs/x/step-1")


def test_health_counters_survive_a_checkpoint():
    window = MetricWindow(torch.device("cpu"))
    _add(window, float("nan"), True)
    restored = MetricWindow(torch.device("cpu"))
    restored.load_state_dict(window.state_dict())
    assert int(restored.bad_total) == 1
