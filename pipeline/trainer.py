"""The one trainer for every model family.

`run(config)` is the entry point of each training process, whatever started it (``launch local``,
a Slurm task, a test). The trainer holds one model and one distribution strategy
(pipeline/strategies/: DDP, DeepSpeed ZeRO) and never asks which; it reaches the model only
through ``loss`` (its ``forward``), ``sample`` and ``bits_per_dim``, so it never knows which family
it trains. Its parts, each in its own module:

- `TrainStep` (pipeline/train_step.py): one optimizer step; `MetricWindow`: the step's metrics
  summed on the device, reduced at log boundaries, and the training health.
- `Checkpointer` (pipeline/checkpointer.py): saves the named parts of the state; `Resume` hands
  a checkpoint back part by part.
- Periodic components (pipeline/periodic.py): sample grid, held-out evaluation, FID, stop signal,
  metrics sink; each decides when it acts.

Starting a process is the one place where order matters, and `Trainer.__init__` reads in that
order: rank 0 takes the run directory's lock (pipeline/runlock.py) before it writes anything
there; the checkpoint to resume from is chosen next; the data loader starts at its position;
the weights are loaded (or initialised from data) into the plain model before the strategy wraps
it, because a ZeRO engine takes ownership of them; the optimizer's state follows the wrapping.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import socket
import sys

import torch

from pipeline import conditioning, models, preemption, runlock, strategies
from pipeline import config as config_module
from pipeline.checkpointer import Checkpointer, seed_process
from pipeline.config import RunConfig
from pipeline.data import TrainingBatches, is_latent, resolve_shards, shards_for_reader
from pipeline.digits_quality import SampleQualityEval
from pipeline.errors import UserError
from pipeline.faults import Faults
from pipeline.latents import check_latent_data
from pipeline.periodic import FidEval, HeldOutEval, MetricsSink, SampleGrid, StopSignal, Throughput
from pipeline.rundir import RunDir
from pipeline.tracking import MetricsFile, code_version, make_tracker
from pipeline.train_step import EXIT_DIVERGED, MetricWindow, Progress, TrainingDiverged, TrainStep, learning_rate

log = logging.getLogger("pipeline.trainer")

__all__ = ["EXIT_DIVERGED", "Trainer", "TrainingDiverged", "learning_rate", "run", "main", "weights_digest"]


class Trainer:
    def __init__(self, config: RunConfig, faults: Faults | None = None):
        self.config = config
        self.faults = faults if faults is not None else Faults.from_environment()
        self.run_dir = RunDir(config.run_dir)
        self.strategy = strategy = strategies.build(config)
        self.processes = strategy.start()
        # 0. The run directory is this job's alone (pipeline/runlock.py): rank 0 holds its lock
        #    before anything in it is written or removed; every rank stops alike if it is taken.
        self.lock, refused = None, None
        if self.processes.is_main:
            try:
                self.lock = runlock.acquire(config.run_dir)
            except UserError as exc:
                refused = str(exc)
        refused = self.processes.broadcast_object(refused)
        if refused:
            raise UserError(refused)
        try:
            self._build()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the run directory (rank 0; the end of `run`, or a failed start)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self) -> None:
        config, train, data, strategy, processes = (self.config, self.config.train, self.config.data,
                                                     self.strategy, self.processes)
        if processes.is_main:
            self.run_dir.write_config(config)
        device = processes.device
        if train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        FidEval.check_config(config)

        # 1. The checkpoint to resume from, if any (rank 0 chooses for all).
        self.checkpointer = Checkpointer(self.run_dir, config, processes, self.faults, self.lock)
        resume = self.checkpointer.find()
        if resume is not None:
            strategy.check_compatible(resume.trainer_state, resume.path)
        # 2. The same initial weights on every rank; then per-rank randomness (noise, timesteps).
        torch.manual_seed(config.seed)
        self.model = model = self.build_model().to(device)
        if train.channels_last:
            model.to(memory_format=torch.channels_last)
        seed_process(config.seed, processes.rank)
        # 3. The data stream, from the checkpoint's position (its random streams restored too).
        self.train_shards = resolve_shards(data.shards, "data.shards")
        # A class-conditional model (model.num_classes) reads each batch's labels beside it.
        self.conditional = model.num_classes is not None
        conditioning.check_shards(self.train_shards, data.image_size, data.channels, "data.shards", config.model)
        # Latent shards need a latent model of the same autoencoder; a fresh start takes their scale.
        check_latent_data(model, self.train_shards, "data.shards", set_scale=resume is None)
        if is_latent(self.train_shards) and (config.eval.fid_images or config.eval.sample_quality_images):
            raise UserError("eval.fid_images / eval.sample_quality_images: not measured during latent training "
                            "yet; set them to 0 and measure a checkpoint with `launch eval RUN_DIR --fid N` or "
                            "`--sample-quality N` (they compare decoded samples with the source images)")
        self.batches = self._batches(resume.restore_randomness_and_data() if resume else None)
        # 4. Weights into the plain model: the checkpoint's, or initialised from the first batch.
        if resume is not None:
            strategy.load_weights(model, resume.loaded)
        elif model.data_dependent_init:
            self._data_dependent_init()
        # 5. Wrapped for distribution, with its optimizer, and the EMA of the weights as wrapped
        #    (whole, or this rank's pieces of them); then the rest of the checkpoint and progress.
        strategy.wrap(model, self.build_model, self.faults)
        self.ema = None
        if train.ema_halflife_images:
            self.ema = strategy.make_ema(train.ema_halflife_images, train.ema_rampup_ratio)
        self.progress, self.window = Progress(), MetricWindow(device)
        if resume is not None:
            strategy.load_state(resume.loaded, resume.trainer_state, self.ema)
            resume.restore_progress(self.progress, self.window)

        self.global_batch = data.batch_size * processes.world_size * train.grad_accum
        self.train_step = TrainStep(strategy, self.batches, train, self.global_batch, self.ema, self.faults,
                                    processes.rank, labels=self.conditional)
        self.eval_shards = None
        if data.eval_shards is not None:
            self.eval_shards = resolve_shards(data.eval_shards, "data.eval_shards")
            conditioning.check_shards(self.eval_shards, data.image_size, data.channels, "data.eval_shards",
                                      config.model)
            check_latent_data(model, self.eval_shards, "data.eval_shards", set_scale=False)
        self.tracker = make_tracker(self.run_dir.path, config.wandb, self._tracked_config(), processes.is_main)
        self.checkpointer.attach(self.progress, strategy, self.ema, self.window, self.batches)
        processes.watch(self.progress, self.run_dir.path)  # a stalled training loop ends the job
        self.grid = SampleGrid(config, self.run_dir, processes, strategy, self.ema, self.tracker, self.faults)
        self.evaluation = HeldOutEval(config, processes, strategy, self.ema, self.eval_shards)
        self.fid = FidEval(config, processes, strategy, self.ema, self.eval_shards)
        self.sample_quality = SampleQualityEval(config, processes, strategy, self.ema)
        self.stop = StopSignal(config, processes)
        self.throughput = Throughput(config, strategy, processes, self.build_model)
        metrics_file = MetricsFile(self.run_dir.path, self.progress.step) if processes.is_main else None
        self.sink = MetricsSink(self.run_dir, self.tracker, processes, metrics_file=metrics_file)
        self._record_start()

    def build_model(self) -> models.GenerativeModel:
        return models.build(self.config.model, self.config.data.image_size, self.config.data.channels)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``train.max_steps``; 0 when finished, EXIT_PREEMPTED when stopped by a signal."""
        train, progress, faults = self.config.train, self.progress, self.faults
        if progress.step >= train.max_steps:
            log.info("the run already reached train.max_steps=%d; nothing to do", train.max_steps)
            return self._finish(0, trained=False)
        log.info("training %s: %d parameters, %d process(es) (%s), global batch %d, from step %d to %d",
                 self.config.model.family, sum(p.numel() for p in self.model.parameters()),
                 self.processes.world_size, self.strategy.name, self.global_batch, progress.step, train.max_steps)
        self.sink.progress_bar = bar = self._progress_bar()
        self.model.train()
        exit_code = 0
        try:
            while progress.step < train.max_steps:
                faults.before_step(progress.step)
                self.train_step(progress, self.window)
                if bar is not None:
                    bar.update(1)
                step = progress.step
                if step % train.log_every_steps == 0 or step == train.max_steps:
                    self._log_training(step)
                self._periodic_work(step)
                faults.after_step(step, self.run_dir.path, self.processes.rank, preemption.stop_requested)
                if self.stop.due(step) and self.stop.agreed():
                    log.info("stop requested (%s): saving at step %d", self.stop.name(), step)
                    self.checkpointer.save(final=True)
                    exit_code = preemption.EXIT_PREEMPTED
                    break
            if exit_code == 0:
                self.checkpointer.save(final=True)
                if self.grid.due_at_end(progress.step) and not self._aside(self.grid.write, progress.step):
                    exit_code = preemption.EXIT_PREEMPTED
        finally:
            if bar is not None:
                bar.close()
            self.batches.close()
        return self._finish(exit_code)

    def _periodic_work(self, step: int) -> None:
        """Evaluation, grid and checkpoint when due; the throughput clock skips their time."""
        busy = False
        if self.evaluation.due(step):
            self._log({"step": step, "images_seen": self.progress.images_seen, **self._aside(self.evaluation.run)})
            busy = True
        if self.grid.due(step):
            self._aside(self.grid.write, step)
            busy = True
        if self.checkpointer.due(step):
            self.checkpointer.save()
            busy = True
        if busy:
            self.window.restart_clock()

    def _aside(self, work, *args):
        """``work(*args)`` with the training's random number stream left as it was: evaluations,
        grids, FID and the FLOP count draw numbers too (a DataLoader iterator takes a seed from the
        global generator, layers initialise), and a resumed run, which does them at other points
        of its stream, would otherwise not train as the uninterrupted run did."""
        device = self.processes.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return work(*args)

    def _log_training(self, step: int) -> None:
        means = self.window.reduce(self.processes)
        steps, seconds = means.pop("steps_in_window"), means.pop("seconds")
        record = {
            "step": step, "images_seen": self.progress.images_seen, "loss": means.pop("loss"),
            "lr": learning_rate(self.config.train, step - 1), "grad_norm": means.pop("grad_norm"),
            "images_per_s": steps * self.global_batch / seconds, **means,
        }
        scale = self.strategy.loss_scale()
        if scale is not None:
            if getattr(self, "_loss_scale", None) not in (None, scale):
                log.info("loss scale %g -> %g by step %d", self._loss_scale, scale, step)
            record["loss_scale"] = self._loss_scale = scale
        if record["bad_steps"]:
            log.warning("skipped %d step(s) with a non-finite loss or gradient in the last %d (%d in this run)",
                        record["bad_steps"], steps, record["bad_steps_total"])
        record.update(self._aside(self.throughput.fields, record["images_per_s"]))
        self._log(record)
        self.window.check_health(self.config.train.max_bad_steps, step, self.run_dir.newest_checkpoint_name())

    def _log(self, record: dict) -> None:
        if self.fid.due(record):  # collective: every rank logs the same records
            record = {**record, **self._aside(self.fid.run)}
        if self.sample_quality.due(record):  # collective, as FID
            record = {**record, **self._aside(self.sample_quality.run)}
        self.sink.log(record)

    # -- set-up and tear-down -------------------------------------------------------------------

    def _batches(self, data_state: dict | None) -> TrainingBatches:
        return TrainingBatches.from_config(
            self.train_shards, self.config.data, seed=self.config.seed, rank=self.processes.rank,
            world_size=self.processes.world_size, pin_memory=self.processes.device.type == "cuda", state=data_state,
            labels=self.conditional,
        )

    @torch.no_grad()
    def _data_dependent_init(self) -> None:
        """The first batch through the model once, so data-initialised layers (Glow's ActNorm) set
        themselves, each rank from its own batch; then rank 0's weights go to every rank (under
        any strategy: FSDP2 would otherwise shard each rank's rows of its own weights), and the
        EMA starts from them."""
        batch = self.batches.peek_batch()
        labels = batch.labels.to(self.processes.device) if self.conditional else None
        with self.strategy.autocast():
            self.model.loss(batch.images.to(self.processes.device), labels)
        self.processes.broadcast_module(self.model)

    def _tracked_config(self) -> dict:
        tracked = config_module.to_dict(self.config)
        tracked.update(world_size=self.processes.world_size, global_batch=self.global_batch,
                       parameters=sum(p.numel() for p in self.model.parameters()), **code_version())
        for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_NUM_NODES"):
            if variable in os.environ:
                tracked[variable.lower()] = os.environ[variable]
        return tracked

    def _record_start(self) -> None:
        batches, rank = self.batches, self.processes.rank
        readers = list(range(rank * batches.readers_per_process, (rank + 1) * batches.readers_per_process))
        self.run_dir.rank_record(
            rank, "start", step=self.progress.step, world_size=self.processes.world_size,
            host=socket.gethostname(), pid=os.getpid(), readers=readers,
            epoch0_shards=[shard for reader in readers for shard in
                           shards_for_reader(self.train_shards.urls, self.config.seed, 0, reader, batches.num_readers)],
        )

    def _progress_bar(self):
        if not self.processes.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=self.progress.step, desc="train", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)

    def _finish(self, exit_code: int, trained: bool = True) -> int:
        if trained:
            with self.strategy.whole_model(None, use_ema=False) as model:
                digest = weights_digest(model)
            self.run_dir.rank_record(self.processes.rank, "end", step=self.progress.step, exit_code=exit_code,
                                     weights_sha256=digest, **peak_memory(self.processes.device))
        else:
            self.batches.close()
        self.checkpointer.close()
        self.sink.close()
        self.tracker.finish(exit_code=0)
        return exit_code


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state_dict bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peak_memory(device: torch.device) -> dict:
    """Peak host RSS and, on GPUs, peak allocated device memory of this process (for benchmarks)."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peak


# ---------------------------------------------------------------------------------------------
# Entry points


def write_resolved_config(config: RunConfig):
    """``run_dir/config.yaml``: the config this run actually uses, overrides applied."""
    return RunDir(config.run_dir).write_config(config)


def run(config: RunConfig) -> int:
    """Train in this process (one of WORLD_SIZE); 0 when finished, EXIT_PREEMPTED when stopped."""
    preemption.install()
    trainer = Trainer(config)  # holds run_dir and writes its config.yaml (rank 0)
    try:
        return trainer.fit()
    except BaseException:
        trainer.tracker.finish(exit_code=1)
        raise
    finally:
        trainer.processes.shutdown()
        trainer.release()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.trainer CONFIG [overrides]``: one training process."""
    from pipeline.errors import one_line, rank_tag

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m pipeline.trainer CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        return run(config_module.load(args[0], args[1:]))
    except UserError as exc:
        print(f"error: {rank_tag()}{one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if not _peer_failed(exc):
            raise
        # Another process died (and told its own story); this one only lost its connection.
        print(f"error: {rank_tag()}stopped: another process of the job failed", file=sys.stderr)
        return 1


def _peer_failed(exc: BaseException) -> bool:
    """A collective failed because a peer process went away, not because of this process."""
    import torch.distributed as dist

    if os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


if __name__ == "__main__":
    from pipeline.distributed import leave

    leave(main())
