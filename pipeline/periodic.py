"""The trainer's periodic components: each decides when it acts and holds its own state.

Every component answers ``due(step)`` (or ``due(record)``) and does its one job when asked:

- `MetricsSink`: a logged record to ``metrics.jsonl``, W&B and the progress bar (rank 0).
- `Throughput`: MFU and peak GPU memory fields of each training record.
- `SampleGrid`: a grid of samples with a fixed seed (rank 0; a stop signal abandons it); a
  class-conditional model's grid has one row per class.
- `HeldOutEval`: held-out bits/dim on ``data.eval_shards`` (every process its share).
- `FidEval`: FID/KID of generated images against the held-out shards.
- `StopSignal`: whether any process received a stop signal, agreed by all.

Components that run the model get whole weights from the strategy (`Strategy.whole_model`), so
they never depend on how the training model is split.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from pipeline import images, preemption
from pipeline.errors import UserError

log = logging.getLogger("pipeline.trainer")

SUMMARY_KEYS = ("step", "loss", "grad_norm", "images_per_s", "mfu", "eval/bits_per_dim", "eval/fid", "eval/kid",
                "eval/digits_fd", "eval/digits_is", "eval/psnr", "eval/kl")


class MetricsSink:
    """Rank 0 writes each record to metrics.jsonl and the tracker and shows it on the progress bar."""

    def __init__(self, run_dir, tracker, processes, progress_bar=None, metrics_file=None):
        self.run_dir = run_dir
        self.tracker = tracker
        self.is_main = processes.is_main
        self.progress_bar = progress_bar
        self.metrics_file = metrics_file

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"time": time.time(), **record}
        self.metrics_file.write(record)
        self.tracker.log({tracked_name(k): v for k, v in record.items() if k not in ("step", "time")}, record["step"])
        bar = self.progress_bar
        if bar is not None and "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if bar is not None and not sys.stderr.isatty():
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.items() if k in SUMMARY_KEYS))

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()


def tracked_name(key: str) -> str:
    return key if "/" in key else f"train/{key}"


class Throughput:
    """MFU where the device's peak is known (pipeline/tracking.py) and the window's peak GPU memory.
    FLOPs per image are counted once, on rank 0, at the first logged step."""

    def __init__(self, config, strategy, processes, build_model):
        self.config = config
        self.strategy = strategy
        self.processes = processes
        self.build_model = build_model
        self.peak = None
        self.flops_per_image = None
        self.counted = False

    def fields(self, images_per_s: float) -> dict[str, float]:
        from pipeline import tracking

        device = self.processes.device
        if not self.counted:
            self.counted = True
            self.peak = tracking.peak_flops(device, self.config.train.mixed_precision, self.config.wandb.peak_tflops)
            if self.peak is not None and self.processes.is_main:
                data = self.config.data
                example = torch.zeros((2, data.channels, data.image_size, data.image_size), dtype=torch.uint8,
                                      device="meta")
                self.flops_per_image = tracking.flops_per_image(self.build_model, example)
                log.info("%.4g training FLOPs per image (forward+backward); peak %.4g FLOP/s per device",
                         self.flops_per_image, self.peak)
        fields = {}
        if self.flops_per_image:
            fields["mfu"] = images_per_s * self.flops_per_image / (self.peak * self.processes.world_size)
        if device.type == "cuda":
            fields["gpu_mem_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        return fields


class SampleGrid:
    """A grid of ``sample.n`` images every ``sample.every_steps`` and (``sample.at_end``) at the end."""

    def __init__(self, config, run_dir, processes, strategy, ema, tracker, faults):
        self.sample = config.sample
        self.run_dir = run_dir
        self.processes = processes
        self.strategy = strategy
        self.ema = ema
        self.tracker = tracker
        self.faults = faults
        self.last_step = None

    def due(self, step: int) -> bool:
        return bool(self.sample.every_steps) and step % self.sample.every_steps == 0

    def layout(self, model) -> tuple[int, dict, int | None]:
        """(images, the labels argument, columns): ``sample.n`` images in a square for an
        unconditional model; for a conditional one a row per class (`images.grid_classes`)."""
        if getattr(model, "num_classes", None) is None:
            return self.sample.n, {}, None
        classes, per_class = images.grid_classes(model.num_classes, self.sample.n)
        labels = images.class_rows(classes, per_class)
        return len(labels), {"labels": labels}, per_class

    def due_at_end(self, step: int) -> bool:
        return self.sample.at_end and self.last_step != step

    @torch.no_grad()
    def write(self, step: int) -> bool:
        """Rank 0 samples, the others wait. False when a stop signal abandoned the grid."""
        sample = self.sample
        written = True
        with self.strategy.whole_model(self.ema, sample.use_ema, main_only=True) as model:
            if self.processes.is_main:
                was_training = model.training
                model.eval()
                try:
                    with preemption.interruptible():
                        self.faults.in_grid(self.run_dir.path, self.processes.rank, preemption.stop_requested)
                        generator = torch.Generator().manual_seed(sample.seed)
                        count, labels, columns = self.layout(model)
                        with self.strategy.autocast():
                            grid = model.sample(count, generator, **labels, **sample.options)
                    path = images.save_png(grid, self.run_dir.sample_path(step), columns)
                    self.tracker.log_image("samples", path, step, caption=f"step {step}")
                except preemption.StopRequested as stop:
                    log.info("stop requested (%s): the sample grid of step %d is skipped", stop, step)
                    written = False
                finally:
                    model.train(was_training)
            self.processes.barrier()
        self.last_step = step
        return written


class HeldOutEval:
    """Held-out bits/dim every ``eval.every_steps`` (the same computation as ``launch eval``)."""

    def __init__(self, config, processes, strategy, ema, eval_shards):
        self.config = config
        self.processes = processes
        self.strategy = strategy
        self.ema = ema
        self.eval_shards = eval_shards

    def due(self, step: int) -> bool:
        every = self.config.eval.every_steps
        return self.eval_shards is not None and bool(every) and step % every == 0

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        from pipeline.evaluate import held_out_evaluation

        evaluation, data = self.config.eval, self.config.data
        with self.strategy.whole_model(self.ema, evaluation.use_ema) as model:
            result = held_out_evaluation(
                model, self.eval_shards, image_size=data.image_size, channels=data.channels,
                batch_size=evaluation.batch_size or data.batch_size, device=self.processes.device,
                rank=self.processes.rank, world_size=self.processes.world_size,
                num_workers=min(data.num_workers, 2), max_images=evaluation.max_images,
                autocast_dtype=self.strategy.autocast_dtype,
            )
        record = {"eval/bits_per_dim": result.bits_per_dim, "eval/images": result.images}
        if result.stderr is not None:
            record["eval/bits_per_dim_stderr"] = result.stderr
        record.update({f"eval/{name}": value for name, value in result.metrics.items()})
        return record


class FidEval:
    """FID/KID of ``eval.fid_images`` samples: on the evaluation record (``eval.fid_every_steps`` 0),
    or on the first training record at or after each multiple of ``eval.fid_every_steps``."""

    def __init__(self, config, processes, strategy, ema, eval_shards):
        self.config = config
        self.processes = processes
        self.strategy = strategy
        self.ema = ema
        self.eval_shards = eval_shards
        self.extractor = None
        self.last_period = None

    @staticmethod
    def check_config(config) -> None:
        """At start-up: a missing weights file fails now, not at the first evaluation."""
        evaluation = config.eval
        if not evaluation.fid_images:
            return
        if config.data.eval_shards is None:
            raise UserError("eval.fid_images is set but data.eval_shards (the reference images) is not")
        if evaluation.fid_feature_network == "inception":
            from pipeline import fid

            fid.check_inception_weights(evaluation.inception_weights)

    def due(self, record: dict) -> bool:
        evaluation = self.config.eval
        if not evaluation.fid_images or self.eval_shards is None:
            return False
        if not evaluation.fid_every_steps:
            return "eval/bits_per_dim" in record
        if "loss" not in record:
            return False
        period = record["step"] // evaluation.fid_every_steps
        if self.last_period is None:
            self.last_period = (record["step"] - 1) // evaluation.fid_every_steps
        if period <= self.last_period:
            return False
        self.last_period = period
        return True

    def run(self) -> dict[str, float]:
        from pipeline import fid

        evaluation, data, processes = self.config.eval, self.config.data, self.processes
        if self.extractor is None:
            self.extractor = fid.build_extractor(evaluation, processes.device)
        started = time.perf_counter()
        try:
            with self.strategy.whole_model(self.ema, evaluation.use_ema) as model:
                result = fid.fid_and_kid(
                    model, self.extractor, self.eval_shards,
                    num_images=evaluation.fid_images, image_size=data.image_size, channels=data.channels,
                    batch_size=evaluation.batch_size or data.batch_size, rank=processes.rank,
                    world_size=processes.world_size, reference_images=evaluation.fid_reference_images,
                    seed=self.config.sample.seed, kid_subsets=evaluation.kid_subsets,
                    kid_subset_size=evaluation.kid_subset_size, autocast=self.strategy.autocast,
                    **self.config.sample.options,
                )
        except ValueError as exc:  # rank 0 only, after the last collective: the others carry on
            log.warning("FID/KID skipped: %s", exc)
            return {}
        if result is None:
            return {}
        return {
            "eval/fid": result["fid"], "eval/kid": result["kid"], "eval/kid_std": result["kid_std"],
            "eval/fid_images": int(result["fid_images"]), "eval/fid_seconds": time.perf_counter() - started,
        }


class StopSignal:
    """Whether any process received a stop signal, checked every ``train.signal_check_every_steps``
    and agreed by all processes (each then reports the same signal)."""

    def __init__(self, config, processes):
        self.every = config.train.signal_check_every_steps
        self.max_steps = config.train.max_steps
        self.processes = processes

    def due(self, step: int) -> bool:
        return step % self.every == 0 and step < self.max_steps

    def agreed(self) -> bool:
        agreed = self.processes.any_flag(preemption.received_signal() or 0)
        if agreed:
            preemption.adopt(agreed)
        return agreed != 0

    @staticmethod
    def name() -> str:
        return preemption.received_signal_name() or "a signal on another process"
