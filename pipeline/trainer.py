"""The one trainer for every model family.

`run(config)` is the entry point of each training process, whatever started it (``launch local``,
a Slurm task, a test). It reads its place in the job from the torchrun-style environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; absent means one process), lets Accelerate set
up the process group, wraps the model (DDP through Accelerate, or a DeepSpeed ZeRO engine through
DeepSpeed's own API, see pipeline/deepspeed_engine.py), and trains until ``train.max_steps`` or a
stop signal. The model is reached only through ``loss`` (its ``forward``), ``sample`` and
``bits_per_dim``; nothing here knows which family it trains.

One optimizer step: ``grad_accum`` micro-batches (gradient sync only on the last), unscale (fp16),
clip the global norm, AdamW step, learning rate from the step number (warm-up, then constant or
cosine), EMA update. Metrics stay on the device as running sums and are reduced across processes
only every ``train.log_every_steps``, so the step itself never waits for the host.

Training health: a step whose gradient norm is not finite (a NaN/inf loss makes it so) is skipped,
on GPUs without a host sync (fused AdamW's ``found_inf``, the mechanism GradScaler uses; on CPU
a plain check; DeepSpeed skips it itself) and counted on the device; the consecutive count is read at log boundaries and before
checkpoints, and ``train.max_bad_steps`` in a row stop the run without saving.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint, config as config_module, deepspeed_engine, images, models, optim, preemption
from pipeline.config import RunConfig
from pipeline.data import TrainingBatches, check_shards_match, resolve_shards, shards_for_reader
from pipeline.ema import EMA
from pipeline.evaluate import held_out_bits_per_dim
from pipeline.errors import UserError
from pipeline.tracking import MetricsFile, make_tracker

log = logging.getLogger("pipeline.trainer")

FAIL_AT_STEP_ENV = "GENPIPE_FAIL_AT_STEP"  # test hook: raise inside training at this step
NAN_AT_STEPS_ENV = "GENPIPE_NAN_AT_STEPS"  # test hook: "3,4" makes rank 0's loss NaN at those steps
COMPILE_BACKEND_ENV = "GENPIPE_COMPILE_BACKEND"  # test hook: e.g. "aot_eager" (graphs, no codegen)
EXIT_DIVERGED = 3


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: stop, keep the last checkpoint as it is."""

    exit_code = EXIT_DIVERGED


# ---------------------------------------------------------------------------------------------
# Small pieces


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


def _seed_from(*numbers: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(numbers).encode()).digest()[:4], "little")


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    numpy_state = np.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state_dict bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"[rank {rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)
    for noisy in ("accelerate", "wandb", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, config: RunConfig):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        from datetime import timedelta

        self.config = config
        self.run_dir = Path(config.run_dir)
        train = config.train
        self.strategy = config.distributed.strategy
        self.zero_stage = config.deepspeed.resolved_stage() if self.strategy == "deepspeed" else None
        if self.strategy == "deepspeed":
            deepspeed_engine.prepare_environment()
        use_cpu = not torch.cuda.is_available()
        backend = None if config.distributed.backend == "auto" else config.distributed.backend
        self.accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision="no",  # autocast and loss scaling are done here, the same on CPU and GPU
            kwargs_handlers=[
                InitProcessGroupKwargs(
                    backend=backend, timeout=timedelta(minutes=config.distributed.timeout_minutes)
                ),
            ],
        )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        _configure_logging(self.rank)
        if self.strategy == "deepspeed":
            deepspeed_engine.init_distributed("gloo" if use_cpu else (backend or "nccl"))
        if train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.control_group = None
        if self.world_size > 1 and dist.get_backend() != "gloo":
            # Stop-flag agreement over gloo on the host never waits for the GPU stream.
            self.control_group = dist.new_group(backend="gloo")

        # The same initial weights on every rank; then per-rank randomness for noise/timesteps.
        torch.manual_seed(config.seed)
        self.raw_model = models.build(config.model, config.data.image_size, config.data.channels)
        self.raw_model.to(self.device)
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        if train.channels_last:
            self.raw_model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda" and not train.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        self.parameters = list(self.raw_model.parameters())
        self.parameter_count = sum(p.numel() for p in self.parameters)
        self.ema = (
            EMA(self.raw_model, train.ema_halflife_images, train.ema_rampup_ratio)
            if train.ema_halflife_images
            else None
        )
        self._seed_process(config.seed, self.rank)

        if self.strategy == "deepspeed":
            self.optimizer = deepspeed_engine.make_optimizer(
                config, self.raw_model.parameters(), learning_rate(train, 0), self.device.type
            )
        else:
            self.optimizer = optim.make_adamw(
                self.raw_model.parameters(), train, learning_rate(train, 0), self.device.type
            )
        self.autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[train.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.mixed_precision == "fp16")

        self.step = 0
        self.images_seen = 0
        self.last_saved_step = -1
        self.checkpoint_writer = (
            checkpoint.BackgroundWriter(self.run_dir, self.rank, self.world_size, config.checkpoint.keep_last)
            if config.checkpoint.async_save
            else None
        )
        self.bad_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_total = torch.zeros((), dtype=torch.int64, device=self.device)
        self._pending_engine_state = None
        self._last_loss_scale = None
        data_state = self._restore()

        data = config.data
        self.global_batch = data.batch_size * self.world_size * train.grad_accum
        self.train_shards = resolve_shards(data.shards, "data.shards")
        check_shards_match(self.train_shards, data.image_size, data.channels, "data.shards")
        self.batches = TrainingBatches(
            self.train_shards,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=data.num_workers,
            batch_size=data.batch_size,
            image_size=data.image_size,
            channels=data.channels,
            shuffle_buffer=data.shuffle_buffer,
            random_flip=data.random_flip,
            prefetch_factor=data.prefetch_factor,
            pin_memory=self.device.type == "cuda",
            state=data_state,
        )
        if self.raw_model.data_dependent_init and self.step == 0:
            self._data_dependent_init()
        if self.strategy == "deepspeed":
            self.model, self.optimizer = deepspeed_engine.wrap(
                config, self.raw_model, self.optimizer, self.world_size, self.device.type
            )
            if self._pending_engine_state is not None:
                deepspeed_engine.load_full_state(self.model, self.optimizer, *self._pending_engine_state)
                self._pending_engine_state = None
        else:
            # DDP (one process: the model itself), then compile around it: DDP's graph is split
            # at its gradient buckets so the all-reduce overlaps the backward (DDPOptimizer).
            self.ddp_model = self.accelerator.prepare_model(self.raw_model)
            self.model = self.ddp_model
            if train.compile:
                backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
                self.model = torch.compile(
                    self.ddp_model,
                    fullgraph=self.world_size == 1,
                    backend=backend,
                    mode=train.compile_mode if backend == "inductor" else None,
                )

        self.eval_shards = None
        if data.eval_shards is not None:
            self.eval_shards = resolve_shards(data.eval_shards, "data.eval_shards")
            check_shards_match(self.eval_shards, data.image_size, data.channels, "data.eval_shards")

        self._write_rank_record(
            "start",
            step=self.step,
            world_size=self.world_size,
            host=socket.gethostname(),
            pid=os.getpid(),
            readers=list(range(self.rank * self.batches.readers_per_process, (self.rank + 1) * self.batches.readers_per_process)),
            epoch0_shards=[
                shard
                for reader in range(self.rank * self.batches.readers_per_process, (self.rank + 1) * self.batches.readers_per_process)
                for shard in shards_for_reader(self.train_shards.urls, config.seed, 0, reader, self.batches.num_readers)
            ],
        )
        self.metrics_file = MetricsFile(self.run_dir, self.step) if self.is_main else None
        self.tracker = make_tracker(
            self.run_dir, config.wandb, self._tracked_config(), self.is_main
        )
        fail_at = os.environ.get(FAIL_AT_STEP_ENV)
        self.fail_at_step = int(fail_at) if fail_at else None
        nan_at = os.environ.get(NAN_AT_STEPS_ENV, "")
        self.nan_at_steps = {int(part) for part in nan_at.split(",") if part.strip()}

    # -- set-up helpers -----------------------------------------------------------------------

    def _seed_process(self, seed: int, rank: int) -> None:
        process_seed = _seed_from(seed, rank)
        random.seed(process_seed)
        np.random.seed(process_seed)
        torch.manual_seed(process_seed)

    def _tracked_config(self) -> dict:
        tracked = config_module.to_dict(self.config)
        tracked["world_size"] = self.world_size
        tracked["global_batch"] = self.config.data.batch_size * self.world_size * self.config.train.grad_accum
        tracked["parameters"] = self.parameter_count
        for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_NUM_NODES"):
            if variable in os.environ:
                tracked[variable.lower()] = os.environ[variable]
        from pipeline import tracking

        tracked.update(tracking.code_version())
        _check_fid_config(self.config)  # here, at start-up: a missing weights file fails now
        return tracked

    def _write_rank_record(self, event: str, **fields) -> None:
        directory = self.run_dir / "ranks"
        directory.mkdir(parents=True, exist_ok=True)
        record = {"event": event, "rank": self.rank, "time": time.time(), **fields}
        with open(directory / f"rank-{self.rank:05d}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def _data_dependent_init(self) -> None:
        """Run the first batch through the model once so data-initialised layers set themselves;
        DDP then broadcasts rank 0's weights, and the EMA starts from them."""
        batch = self.batches.peek().to(self.device)
        with self._autocast():
            self.raw_model.loss(batch)
        if self.ema is not None:
            self.ema.model.load_state_dict(self.raw_model.state_dict())

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _strategy_name(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}" if self.strategy == "deepspeed" else "ddp"

    def _full_parameters(self, needed: bool = True):
        """Whole parameters of the training model inside (ZeRO-3 gathers; collective)."""
        if needed and self.zero_stage == 3:
            return deepspeed_engine.full_parameters(self.raw_model, 3)
        return contextlib.nullcontext()

    # -- checkpoints --------------------------------------------------------------------------

    def _restore(self) -> dict | None:
        """Load the newest intact checkpoint of the run directory, if any; returns the data state."""
        if self.is_main:
            checkpoint.remove_staging(self.run_dir)
        # Rank 0 chooses (verifying every hash once); the others take its choice and manifest, and
        # every file any rank reads is checked against the manifest as it is read.
        choice = [None]
        if self.is_main:
            found = checkpoint.latest_valid(self.run_dir)
            choice = [(str(found[0]), found[1]) if found else None]
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        loaded = checkpoint.LoadedCheckpoint(Path(choice[0][0]), choice[0][1])
        state = loaded.json("trainer.json")
        saved = (state.get("strategy", "ddp"), state.get("zero_stage"))
        if saved != (self.strategy, self.zero_stage):
            def describe(strategy, stage):
                return f"deepspeed ZeRO-{stage}" if strategy == "deepspeed" else strategy
            raise UserError(
                f"checkpoint {loaded.path} was written under {describe(*saved)}, this config "
                f"trains under {describe(self.strategy, self.zero_stage)}; resume with the same "
                "distributed.strategy and deepspeed.zero_stage, or start a new run_dir from its "
                "weights (launch export)"
            )
        try:
            self.raw_model.load_state_dict(loaded.tensors("model.safetensors"))
            if self.ema is not None:
                if loaded.has("ema.safetensors"):
                    self.ema.load_state_dict(loaded.tensors("ema.safetensors"))
                else:
                    self.ema.model.load_state_dict(self.raw_model.state_dict())
        except RuntimeError as exc:
            raise UserError(
                f"checkpoint {loaded.path} does not fit the model of this config "
                f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}); "
                "use a new run_dir for a different architecture"
            ) from None
        if self.strategy == "deepspeed":
            # Applied once the engine exists (see __init__): fp32 masters, moments, AdamW step.
            self._pending_engine_state = (
                loaded.tensors("model.safetensors"),
                loaded.tensors("optimizer.safetensors"),
                int(state["optimizer_step"]),
                state.get("loss_scaler"),
            )
        else:
            self.optimizer.load_state_dict(loaded.torch_object("optimizer.pt"))
        self.step = int(state["step"])
        self.bad_total.fill_(int(state.get("bad_steps_total", 0)))
        self.images_seen = int(state["images_seen"])
        self.last_saved_step = self.step
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        saved_world = int(state["world_size"])
        rank_json = checkpoint.rank_file(self.rank, "json")
        data_state = None
        if saved_world == self.world_size and loaded.has(rank_json):
            rank_state = loaded.json(rank_json)
            _set_rng_state(rank_state["rng"], loaded.tensors(checkpoint.rank_file(self.rank, "safetensors")))
            data_state = rank_state["data"]
        else:
            # Different process count: weights, optimizer and step carry over; randomness is
            # reseeded from the step, and every data reader starts the epoch after the furthest
            # one any reader of the saved run had reached (pipeline/data.py warns).
            self._seed_process(self.config.seed + self.step, self.rank)
            positions = {}
            for saved_rank in range(saved_world):
                name = checkpoint.rank_file(saved_rank, "json")
                if loaded.has(name):
                    positions.update(loaded.json(name)["data"]["positions"])
            data_state = {"num_readers": None, "positions": positions}
            if self.is_main:
                log.warning(
                    "resuming a %d-process checkpoint with %d processes: weights, optimizer and "
                    "step are restored; random streams are reseeded and the data stream restarts "
                    "(not the stream an uninterrupted run would have read)", saved_world, self.world_size
                )
        if self.is_main:
            log.info("resumed from %s (step %d, %d images seen)", loaded.path, self.step, self.images_seen)
        return data_state

    def save_checkpoint(self, final: bool = False) -> None:
        """All ranks together: stage, write, hash, commit, prune (pipeline/checkpoint.py).

        With ``checkpoint.async_save`` the state is copied to host memory here and a background
        thread writes it; the next save waits for that write first, and a ``final`` save (the end
        of training, a stop signal) returns only when its checkpoint is committed.
        """
        writer = self.checkpoint_writer
        if writer is not None:
            writer.wait()
        if self.step == self.last_saved_step:
            return
        self._check_health()
        started = time.perf_counter()
        engine_weights = engine_moments = None
        if self.strategy == "deepspeed":
            # Collective: every rank gathers each parameter's fp32 master and AdamW moments.
            engine_weights, engine_moments = deepspeed_engine.full_state(self.model)
        if self.is_main:
            checkpoint.prepare_staging(self.run_dir, self.step)
        self._barrier()
        staging = checkpoint.staging_path(self.run_dir, self.step)
        rng_plain, rng_tensors = _rng_state()
        parts = {
            checkpoint.rank_file(self.rank, "json"): ("json", {"rng": rng_plain, "data": self.batches.state_dict()}),
            checkpoint.rank_file(self.rank, "safetensors"): ("tensors", rng_tensors),
        }
        if self.is_main:
            trainer_state = {
                "step": self.step,
                "images_seen": self.images_seen,
                "world_size": self.world_size,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "family": self.config.model.family,
                "strategy": self.strategy,
                "zero_stage": self.zero_stage,
                "bad_steps_total": int(self.bad_total.item()),
            }
            if self.strategy == "deepspeed":
                parts["model.safetensors"] = ("tensors", engine_weights)
                parts["optimizer.safetensors"] = ("tensors", engine_moments)
                trainer_state["optimizer_step"] = deepspeed_engine.optimizer_step_count(self.optimizer)
                trainer_state["loss_scaler"] = deepspeed_engine.loss_scaler_state(self.optimizer)
            else:
                parts["model.safetensors"] = ("tensors", self.raw_model.state_dict())
                parts["optimizer.pt"] = ("torch", self.optimizer.state_dict())
            if self.ema is not None:
                parts["ema.safetensors"] = ("tensors", self.ema.state_dict())
            parts["trainer.json"] = ("json", trainer_state)
        extra = {
            "world_size": self.world_size,
            "family": self.config.model.family,
            "strategy": self.strategy,
            "zero_stage": self.zero_stage,
        }
        self.last_saved_step = self.step
        if writer is not None:
            writer.start(self.step, self.images_seen, parts, extra)
            if self.is_main:
                log.info("checkpoint of step %d: state copied in %.2fs, writing in the background",
                         self.step, time.perf_counter() - started)
            if final:
                writer.wait()
            return
        records = checkpoint.write_files(staging, checkpoint.encode_parts(parts))
        checkpoint.pause_for_tests(self.step, self.rank, self.world_size)
        gathered = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(gathered, records)
        else:
            gathered = [records]
        if self.is_main:
            merged = {name: record for part in gathered for name, record in part.items()}
            path = checkpoint.commit(
                self.run_dir, self.step, self.images_seen, merged, self.config.checkpoint.keep_last, extra
            )
            log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - started)
        self._barrier()

    # -- the training step --------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, sums: dict[str, torch.Tensor]) -> float:
        """One optimizer step; adds its metrics to the running sums. Returns data-wait seconds."""
        train = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(train, self.step)
        inject_nan = self.rank == 0 and (self.step + 1) in self.nan_at_steps
        step_values: dict[str, torch.Tensor] = {}
        waited = 0.0
        for micro in range(train.grad_accum):
            before = time.perf_counter()
            batch = next(self.batches)
            waited += time.perf_counter() - before
            batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            last = micro == train.grad_accum - 1
            if self.strategy == "deepspeed":
                with self._autocast():
                    loss, metrics = self.model(batch)
                if inject_nan:
                    loss = loss * float("nan")
                # The engine divides by grad_accum, reduces at the boundary and steps only there.
                self.model.backward(loss)
                self.model.step()
            else:
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.ddp_model)
                with sync:
                    with self._autocast():
                        loss, metrics = self.model(batch)
                    if inject_nan:
                        loss = loss * float("nan")
                    self.scaler.scale(loss / train.grad_accum).backward()
            _add(step_values, "loss", loss.detach().float() / train.grad_accum)
            for name, value in metrics.items():
                _add(step_values, name, value.detach().float() / train.grad_accum)
        if self.strategy == "deepspeed":
            grad_norm, bad = self._engine_step_outcome()
        else:
            grad_norm, bad = self._ddp_optimizer_step()
        self.step += 1
        self.images_seen += self.global_batch
        if self.ema is not None:
            with self._full_parameters():
                self.ema.update(self.raw_model, self.global_batch, self.images_seen)
        add_step_metrics(sums, step_values, grad_norm, bad)
        self.bad_streak = (self.bad_streak + 1) * bad
        self.bad_total = self.bad_total + bad
        return waited

    def _ddp_optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, step unless the gradient is non-finite; (grad_norm, bad) on the device."""
        return optim.clip_and_step(self.optimizer, self.parameters, self.config.train.grad_clip, self.scaler)

    def _engine_step_outcome(self) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed already skipped a non-finite step (its overflow check); read what it did."""
        applied = self.model.was_step_applied()
        norm = self.model.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=self.device)
        scale = deepspeed_engine.loss_scale(self.optimizer)
        if scale is not None and scale != self._last_loss_scale:
            if self._last_loss_scale is not None and self.is_main:
                log.info("loss scale %g -> %g at step %d", self._last_loss_scale, scale, self.step + 1)
            self._last_loss_scale = scale
        return grad_norm, torch.tensor(not applied, device=self.device)

    def _check_health(self) -> None:
        """Stop when the last train.max_bad_steps steps were all skipped (host sync: call rarely)."""
        limit = self.config.train.max_bad_steps
        streak = int(self.bad_streak.item())
        if streak < limit:
            return
        kept = checkpoint.list_checkpoints(self.run_dir)
        last = str(kept[-1][1]) if kept else "none yet"
        raise TrainingDiverged(
            f"training stopped at step {self.step}: the last {streak} steps had a non-finite loss "
            f"or gradient (train.max_bad_steps={limit}); nothing was saved after them, the last "
            f"checkpoint is {last}; lower train.lr, tighten train.grad_clip or check the data, "
            "then relaunch to resume from it"
        )

    # -- periodic work ------------------------------------------------------------------------

    def _reduce_means(self, sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        """Means over the window's good (not skipped) steps and over processes, plus counters."""
        names = sorted(sums)
        stacked = torch.stack([sums[name] for name in names] + [self.bad_streak.float(), self.bad_total.float()]).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        values = stacked.tolist()
        totals = dict(zip(names, values[: len(names)]))
        good = totals.pop("good_steps")
        means = {name: (value / good if good else float("nan")) for name, value in totals.items()}
        means["bad_steps"] = steps - round(good)
        means["bad_steps_total"] = round(values[-1])
        return means

    def _stop_agreed(self) -> bool:
        """Whether any process received a stop signal; all processes adopt the same signal."""
        local = preemption.received_signal() or 0
        if self.world_size == 1:
            return local != 0
        flag = torch.tensor([int(local)], dtype=torch.int64)
        if self.control_group is None:
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        agreed = int(flag.item())
        if agreed:
            preemption.adopt(agreed)
        return agreed != 0

    def sampling_model(self, use_ema: bool) -> torch.nn.Module:
        return self.ema.model if (use_ema and self.ema is not None) else self.raw_model

    @torch.no_grad()
    def write_samples(self) -> None:
        """Rank 0 samples a grid with a fixed seed; the others wait."""
        sample = self.config.sample
        model = self.sampling_model(sample.use_ema)
        with self._full_parameters(model is self.raw_model):
            if self.is_main:
                was_training = model.training
                model.eval()
                generator = torch.Generator().manual_seed(sample.seed)
                with self._autocast():
                    grid = model.sample(sample.n, generator, **sample.options)
                model.train(was_training)
                path = images.save_png(grid, self.run_dir / "samples" / f"step-{self.step:09d}.png")
                self.tracker.log_image("samples", path, self.step, caption=f"step {self.step}")
            self._barrier()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean held-out bits/dim over all processes (the same computation as ``launch eval``)."""
        evaluation = self.config.eval
        data = self.config.data
        model = self.sampling_model(evaluation.use_ema)
        with self._full_parameters(model is self.raw_model):
            bits_per_dim, count = held_out_bits_per_dim(
                model,
                self.eval_shards,
                image_size=data.image_size,
                channels=data.channels,
                batch_size=evaluation.batch_size or data.batch_size,
                device=self.device,
                rank=self.rank,
                world_size=self.world_size,
                num_workers=min(data.num_workers, 2),
                max_images=evaluation.max_images,
                autocast_dtype=self.autocast_dtype,
            )
        return {"eval/bits_per_dim": bits_per_dim, "eval/images": count}

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> int:
        config = self.config
        train = config.train
        if self.step >= train.max_steps:
            # Relaunching a finished run: nothing to train, sample or save again.
            if self.is_main:
                log.info("the run already reached train.max_steps=%d; nothing to do", train.max_steps)
            self.batches.close()
            if self.metrics_file is not None:
                self.metrics_file.close()
            self.tracker.finish(exit_code=0)
            return 0
        if self.is_main:
            log.info(
                "training %s: %d parameters, %d process(es) (%s), global batch %d, from step %d to %d",
                config.model.family,
                self.parameter_count,
                self.world_size,
                self._strategy_name(),
                self.global_batch,
                self.step,
                train.max_steps,
            )
        progress = None
        if self.is_main:
            from tqdm import tqdm

            progress = tqdm(
                total=train.max_steps,
                initial=self.step,
                desc="train",
                dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                file=sys.stderr,
            )
        self.raw_model.train()
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_wait = 0, 0.0
        window_start = time.perf_counter()
        exit_code = 0
        try:
            while self.step < train.max_steps:
                if self.fail_at_step is not None and self.step == self.fail_at_step:
                    raise RuntimeError(f"{FAIL_AT_STEP_ENV}={self.fail_at_step}: injected failure")
                window_wait += self.train_step(sums)
                window_steps += 1
                if progress is not None:
                    progress.update(1)
                step = self.step
                if step % train.log_every_steps == 0 or step == train.max_steps:
                    means = self._reduce_means(sums, window_steps)
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "images_seen": self.images_seen,
                        "loss": means.pop("loss"),
                        "lr": learning_rate(train, step - 1),
                        "grad_norm": means.pop("grad_norm"),
                        "images_per_s": window_steps * self.global_batch / max(elapsed, 1e-9),
                        "data_wait_fraction": window_wait / max(elapsed, 1e-9),
                        **means,
                    }
                    if self.scaler.is_enabled():
                        record["loss_scale"] = self.scaler.get_scale()
                    elif self._last_loss_scale is not None:
                        record["loss_scale"] = self._last_loss_scale
                    if self.scaler.is_enabled() and self.is_main:
                        if self._last_loss_scale is not None and record["loss_scale"] != self._last_loss_scale:
                            log.info("loss scale %g -> %g by step %d", self._last_loss_scale, record["loss_scale"], step)
                        self._last_loss_scale = record["loss_scale"]
                    if record["bad_steps"] and self.is_main:
                        log.warning(
                            "skipped %d step(s) with a non-finite loss or gradient in the last %d "
                            "(%d in this run)", record["bad_steps"], window_steps, record["bad_steps_total"]
                        )
                    record.update(_performance_fields(self, record["images_per_s"]))
                    self._log(record, progress)
                    self._check_health()
                    sums, window_steps, window_wait = {}, 0, 0.0
                    window_start = time.perf_counter()
                if config.eval.every_steps and step % config.eval.every_steps == 0:
                    self._log({"step": step, "images_seen": self.images_seen, **self.evaluate()}, progress)
                    window_start = time.perf_counter()
                if config.sample.every_steps and step % config.sample.every_steps == 0:
                    self.write_samples()
                    window_start = time.perf_counter()
                if step % config.checkpoint.every_steps == 0 or step == train.max_steps:
                    self.save_checkpoint()
                    window_start = time.perf_counter()
                if step % train.signal_check_every_steps == 0 and step < train.max_steps and self._stop_agreed():
                    name = preemption.received_signal_name() or "a signal on another process"
                    log.info("stop requested (%s): saving at step %d", name, step)
                    self.save_checkpoint(final=True)
                    exit_code = preemption.EXIT_PREEMPTED
                    break
            if exit_code == 0:
                if config.sample.every_steps == 0 or self.step % config.sample.every_steps != 0:
                    self.write_samples()
                self.save_checkpoint(final=True)
        finally:
            if progress is not None:
                progress.close()
            self.batches.close()
        with self._full_parameters():
            digest = weights_digest(self.raw_model)
        self._write_rank_record(
            "end",
            step=self.step,
            exit_code=exit_code,
            weights_sha256=digest,
            **_peak_memory(self.device),
        )
        if self.metrics_file is not None:
            self.metrics_file.close()
        self.tracker.finish(exit_code=0)
        return exit_code

    def _log(self, record: dict, progress) -> None:
        if _fid_due(self, record):  # collective: every rank logs the same records
            record = {**record, **_fid_metrics(self)}
        if not self.is_main:
            return
        record = {"time": time.time(), **record}
        self.metrics_file.write(record)
        step = record["step"]
        self.tracker.log({_tracked_name(k): v for k, v in record.items() if k not in ("step", "time")}, step)
        if progress is not None and "loss" in record:
            progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if progress is not None and not sys.stderr.isatty():
            summary = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if k in ("step", "loss", "grad_norm", "images_per_s", "mfu", "eval/bits_per_dim", "eval/fid", "eval/kid")
            )
            log.info(summary)


def _peak_memory(device: torch.device) -> dict:
    """Peak host RSS and, on GPUs, peak allocated device memory of this process (for benchmarks)."""
    import resource

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peak


def _tracked_name(key: str) -> str:
    return key if "/" in key else f"train/{key}"


def _performance_fields(trainer: Trainer, images_per_s: float) -> dict[str, float]:
    """MFU where the device's peak is known (pipeline/tracking.py), and the window's peak GPU
    memory of this process. FLOPs per image are counted once, at the first logged step."""
    from pipeline import tracking

    state = trainer.__dict__.setdefault("_performance", {})
    if "flops_per_image" not in state:
        config = trainer.config
        state["peak"] = tracking.peak_flops(trainer.device, config.train.mixed_precision, config.wandb.peak_tflops)
        state["flops_per_image"] = None
        if state["peak"] is not None and trainer.is_main:
            example = torch.randint(0, 256, (2, config.data.channels, config.data.image_size, config.data.image_size),
                                    dtype=torch.uint8, device=trainer.device)
            state["flops_per_image"] = tracking.flops_per_image(trainer.raw_model, example, trainer._autocast())
            log.info("%.4g training FLOPs per image (forward+backward); peak %.4g FLOP/s per device",
                     state["flops_per_image"], state["peak"])
    fields = {}
    if state["flops_per_image"]:
        fields["mfu"] = images_per_s * state["flops_per_image"] / (state["peak"] * trainer.world_size)
    if trainer.device.type == "cuda":
        fields["gpu_mem_max_allocated_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        torch.cuda.reset_peak_memory_stats(trainer.device)
    return fields


def _check_fid_config(config: RunConfig) -> None:
    evaluation = config.eval
    if not evaluation.fid_images:
        return
    if config.data.eval_shards is None:
        raise UserError("eval.fid_images is set but data.eval_shards (the reference images) is not")
    if evaluation.fid_feature_network == "inception":
        from pipeline import fid

        fid.check_inception_weights(evaluation.inception_weights)


def _fid_due(trainer: Trainer, record: dict) -> bool:
    """FID rides on the evaluation record (``eval.fid_every_steps`` 0), or on the first training
    record at or after each multiple of ``eval.fid_every_steps``."""
    evaluation = trainer.config.eval
    if not evaluation.fid_images or trainer.eval_shards is None:
        return False
    if not evaluation.fid_every_steps:
        return "eval/bits_per_dim" in record
    if "loss" not in record:
        return False
    state = trainer.__dict__.setdefault("_fid", {})
    period = record["step"] // evaluation.fid_every_steps
    last = state.setdefault("last_period", (record["step"] - 1) // evaluation.fid_every_steps)
    if period <= last:
        return False
    state["last_period"] = period
    return True


def _fid_metrics(trainer: Trainer) -> dict[str, float]:
    """FID/KID of ``eval.fid_images`` samples, generated and featurised by all processes."""
    from pipeline import fid

    evaluation, data = trainer.config.eval, trainer.config.data
    state = trainer.__dict__.setdefault("_fid", {})
    if "extractor" not in state:
        state["extractor"] = fid.build_extractor(evaluation, trainer.device)
    started = time.perf_counter()
    try:
        result = fid.fid_and_kid(
            trainer.sampling_model(evaluation.use_ema), state["extractor"], trainer.eval_shards,
            num_images=evaluation.fid_images, image_size=data.image_size, channels=data.channels,
            batch_size=evaluation.batch_size or data.batch_size, rank=trainer.rank, world_size=trainer.world_size,
            reference_images=evaluation.fid_reference_images, seed=trainer.config.sample.seed,
            kid_subsets=evaluation.kid_subsets, kid_subset_size=evaluation.kid_subset_size,
            autocast=trainer._autocast, **trainer.config.sample.options,
        )
    except ValueError as exc:  # rank 0 only, after the last collective: the others carry on
        log.warning("FID/KID skipped: %s", exc)
        return {}
    if result is None:
        return {}
    return {
        "eval/fid": result["fid"],
        "eval/kid": result["kid"],
        "eval/kid_std": result["kid_std"],
        "eval/fid_images": int(result["fid_images"]),
        "eval/fid_seconds": time.perf_counter() - started,
    }


def add_step_metrics(sums: dict[str, torch.Tensor], step_values: dict[str, torch.Tensor],
                     grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
    """Add one step's metrics to the window's running sums, on the device (no host sync); a
    skipped step's values stay out of the logged means, and ``good_steps`` counts the others."""
    for name, value in step_values.items():
        _add(sums, name, torch.where(bad, 0.0, value))
    _add(sums, "grad_norm", torch.where(bad, 0.0, grad_norm.detach().float()))
    _add(sums, "good_steps", (~bad).float())


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name] = sums[name] + value
    else:
        sums[name] = value


# ---------------------------------------------------------------------------------------------
# Entry points


def write_resolved_config(config: RunConfig) -> Path:
    """``run_dir/config.yaml``: the config this run actually uses, overrides applied."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = config_module.dump_yaml(config)
    if not path.exists() or path.read_text() != text:
        temporary = path.with_name("config.yaml.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
    return path


def run(config: RunConfig) -> int:
    """Train in this process (one of WORLD_SIZE); 0 when finished, EXIT_PREEMPTED when stopped."""
    preemption.install()
    if int(os.environ.get("RANK", "0")) == 0:
        write_resolved_config(config)
    trainer = Trainer(config)
    try:
        return trainer.fit()
    except BaseException:
        trainer.tracker.finish(exit_code=1)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.trainer CONFIG [overrides]``: one training process."""
    from pipeline.errors import one_line, rank_tag

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m pipeline.trainer CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        config = config_module.load(args[0], args[1:])
        return run(config)
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
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


if __name__ == "__main__":
    sys.exit(main())
