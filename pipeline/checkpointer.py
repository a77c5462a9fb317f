"""The trainer's checkpoints: what is saved, when, and how a run picks up from one.

A checkpoint composes the training state's named parts (pipeline/checkpoint.py has the on-disk
format: staged, hashed, renamed into place)::

    model.*, ema.*, optimizer.*      the strategy's part (`Strategy.checkpoint_parts`): whole files
                                     from rank 0 (DDP), or every rank's own pieces (ZeRO, FSDP2;
                                     pipeline/sharding.py), written by all ranks in parallel
    trainer.json                     progress (step, images seen), world size, family, strategy,
                                     skipped-step total, and the strategy's fields (loss scale...)
    rank-RRRRR.json / .safetensors   each process's random streams and data-stream position

`Checkpointer.find` picks the newest intact checkpoint once (rank 0 verifies every hash; the others
take its choice) and returns a `Resume`, which hands each part back in the order the trainer
builds things (docs/architecture.md, "Starting a process"); the strategy restores its own part.
`Checkpointer.save` is collective. Each rank appends what a save and a resume cost it (seconds,
bytes, the training state it holds) to its ``ranks/rank-RRRRR.jsonl`` record.
"""

from __future__ import annotations

import hashlib
import logging
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, watchdog
from pipeline.checkpoint import LoadedCheckpoint
from pipeline.data import saved_stream
from pipeline.errors import UserError

log = logging.getLogger("pipeline.trainer")


# ---------------------------------------------------------------------------------------------
# The process's random streams


def seed_from(*numbers: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(numbers).encode()).digest()[:4], "little")


def seed_process(seed: int, rank: int) -> None:
    """Per-process randomness (noise, timesteps, dropout) from the run seed and the rank."""
    process_seed = seed_from(seed, rank)
    random.seed(process_seed)
    np.random.seed(process_seed)
    torch.manual_seed(process_seed)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    plain = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [
            numpy_state[0],
            numpy_state[1].tolist(),
            int(numpy_state[2]),
            int(numpy_state[3]),
            float(numpy_state[4]),
        ],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def peak_memory_so_far(device: torch.device) -> dict[str, float]:
    """Peak host RSS (and GPU memory) of this process until now: at a checkpoint, the training's
    own peak, before anything at the end of the run (a final whole-weights digest) adds to it."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# ---------------------------------------------------------------------------------------------
# Resuming


class Resume:
    """A chosen checkpoint, handed back part by part as the trainer builds each owner."""

    def __init__(self, loaded: LoadedCheckpoint, processes, seed: int, run_dir=None):
        self.loaded = loaded
        self.run_dir = run_dir
        self.path = loaded.path
        self.processes = processes
        self.seed = seed
        self.trainer_state = loaded.json("trainer.json")
        self.step = int(self.trainer_state["step"])
        self.saved_world_size = int(self.trainer_state["world_size"])

    def restore_randomness_and_data(self) -> dict:
        """Set this process's random streams; return the data stream's state.

        Same process count: each rank's own random streams. Another count: the random streams
        (noise, timesteps, dropout) are reseeded from the step. Either way the data state is every
        rank's position together (rank 0 reads them, all receive them), from which the loader
        resumes exactly on any process count the run's canonical partitions allow
        (pipeline/data.py). Collective.
        """
        rank, world_size = self.processes.rank, self.processes.world_size
        rank_json = checkpoint.rank_file(rank, "json")
        if self.saved_world_size == world_size and self.loaded.has(rank_json):
            with self.loaded.timed():
                rank_state = self.loaded.json(rank_json)
                set_rng_state(rank_state["rng"], self.loaded.tensors(checkpoint.rank_file(rank, "safetensors")))
        else:
            seed_process(self.seed + self.step, rank)
            if self.processes.is_main:
                log.warning(
                    "resuming a %d-process checkpoint with %d processes: weights, optimizer, step and "
                    "the data stream are restored; the random streams (noise, timesteps, dropout) are "
                    "reseeded from the step", self.saved_world_size, world_size
                )
        states = None
        if self.processes.is_main:
            names = [checkpoint.rank_file(r, "json") for r in range(self.saved_world_size)]
            states = [self.loaded.json(name)["data"] for name in names if self.loaded.has(name)]
        states = self.processes.broadcast_object(states)
        return saved_stream(states, int(self.trainer_state["images_seen"]), self.step)

    def restore_progress(self, progress, window) -> None:
        progress.step = self.step
        progress.images_seen = int(self.trainer_state["images_seen"])
        window.load_state_dict(self.trainer_state)
        if self.run_dir is not None:
            self.run_dir.rank_record(
                self.processes.rank, "resumed", step=self.step, from_world_size=self.saved_world_size,
                world_size=self.processes.world_size, load_s=round(self.loaded.seconds, 3),
                read_bytes=self.loaded.bytes_read,
            )
        if self.processes.is_main:
            log.info("resumed from %s (step %d, %d images seen)", self.path, progress.step, progress.images_seen)


# ---------------------------------------------------------------------------------------------
# Saving


class Checkpointer:
    """Writes the training state every ``checkpoint.every_steps``, at the end and on a stop."""

    def __init__(self, run_dir, config, processes, faults, lock=None):
        self.run_dir = run_dir
        self.lock = lock  # rank 0's hold on run_dir (pipeline/runlock.py); None on the other ranks
        self.config = config
        self.processes = processes
        self.faults = faults
        self.every = config.checkpoint.every_steps
        self.max_steps = config.train.max_steps
        self.last_saved_step = -1
        self.state = None
        self.writer = None

    def find(self) -> Resume | None:
        """The newest intact checkpoint of the run (collective). Every rank verifies its share of
        each candidate's files (`checkpoint.share_of_files`: sizes and sha256, in parallel, so a
        terabyte is not hashed by rank 0 alone while the others wait) and the verdicts are
        gathered: the newest that every rank passed is chosen, and a damaged newer one is named
        and skipped. Every file any rank reads later is checked against the manifest again as read."""
        processes = self.processes
        candidates = None
        if processes.is_main:
            checkpoint.remove_staging(self.run_dir.path)
            candidates = [str(path) for _, path in reversed(checkpoint.list_checkpoints(self.run_dir.path))]
        candidates = processes.broadcast_object(candidates)
        choice = None
        for candidate in candidates:
            path, manifest, problem = Path(candidate), None, None
            try:
                manifest = checkpoint.read_manifest(path)
                checkpoint.verify_files(path, manifest,
                                        checkpoint.share_of_files(manifest, processes.rank, processes.world_size))
            except (ValueError, KeyError, OSError) as exc:
                problem = str(exc)
            problems = [p for p in processes.all_gather_objects(problem) if p]
            if not problems:
                choice = (candidate, manifest)
                break
            if processes.is_main:
                log.warning("checkpoint %s is unusable: %s; trying the previous one", path, problems[0])
        if choice is None:
            return None
        resume = Resume(LoadedCheckpoint(Path(choice[0]), choice[1]), processes, self.config.seed, self.run_dir)
        self.last_saved_step = resume.step
        return resume

    def attach(self, progress, strategy, ema, window, batches) -> None:
        """The owners of the state to save (all present once the trainer is built)."""
        self.state = (progress, strategy, ema, window, batches)
        if self.config.checkpoint.async_save:
            self.writer = checkpoint.BackgroundWriter(
                self.run_dir.path, self.processes.rank, self.processes.world_size,
                self.config.checkpoint.keep_last, pause=self.faults.pause_in_checkpoint, lost=self.lost,
                written=lambda **costs: self.run_dir.rank_record(self.processes.rank, "checkpoint_written", **costs),
            )

    def lost(self) -> str | None:
        """Rank 0: why this job may no longer write to run_dir (another job took it), or None."""
        return self.lock.lost() if self.lock is not None else None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def save(self, final: bool = False) -> None:
        """All ranks together: stage, write, hash, commit, prune (pipeline/checkpoint.py).

        With ``checkpoint.async_save`` the state is copied to host memory here and a background
        thread writes it; the next save waits for that write first, and a ``final`` save (the end
        of training, a stop signal) returns only when its checkpoint is committed. A save is long
        work, never a stall (pipeline/watchdog.py); the final one ends the watchdog's watch.
        """
        with watchdog.paused():
            self._save(final)
        if final:
            watchdog.disarm()

    def _save(self, final: bool) -> None:
        progress, strategy, ema, window, batches = self.state
        processes, run_dir = self.processes, self.run_dir.path
        waited = self.writer.wait() if self.writer is not None else 0.0
        if progress.step == self.last_saved_step:
            return
        window.check_health(self.config.train.max_bad_steps, progress.step, self.run_dir.newest_checkpoint_name())
        started = time.perf_counter()
        parts, fields = strategy.checkpoint_parts(ema)  # this rank's files; collective for sharded strategies
        lost = None
        if processes.is_main:
            lost = self.lost()
            if lost is None:
                checkpoint.prepare_staging(run_dir, progress.step)
        lost = processes.broadcast_object(lost)  # every rank stops alike if another job took run_dir
        if lost:
            raise UserError(lost)
        rng_plain, rng_tensors = rng_state()
        parts[checkpoint.rank_file(processes.rank, "json")] = (
            "json", {"rng": rng_plain, "data": batches.state_dict()})
        parts[checkpoint.rank_file(processes.rank, "safetensors")] = ("tensors", rng_tensors)
        identity = {"family": self.config.model.family, **strategy.identity}
        if processes.is_main:
            parts["trainer.json"] = ("json", {
                "step": progress.step, "images_seen": progress.images_seen,
                "world_size": processes.world_size, **identity, **window.state_dict(), **fields,
            })
        extra = {"world_size": processes.world_size, **identity}
        self.last_saved_step = progress.step
        if self.writer is not None:
            self.writer.start(progress.step, progress.images_seen, parts, extra)
            stall = time.perf_counter() - started
            if processes.is_main:
                log.info("checkpoint of step %d: state copied in %.2fs, writing in the background",
                         progress.step, stall)
            # What training waited for: the previous write (if still running) and the copy.
            self.run_dir.rank_record(
                processes.rank, "checkpoint", step=progress.step, async_save=True,
                stall_s=round(waited + stall, 3), waited_s=round(waited, 3), **strategy.held_bytes(ema),
                **peak_memory_so_far(processes.device))
            if final:
                self.writer.wait()
            return
        records = checkpoint.write_parts(checkpoint.staging_path(run_dir, progress.step), parts)
        written = time.perf_counter() - started
        self.faults.pause_in_checkpoint(progress.step, processes.rank, processes.world_size)
        gathered = processes.all_gather_objects(records)
        lost = None
        if processes.is_main:
            merged = {name: record for part in gathered for name, record in part.items()}
            try:
                path = checkpoint.commit(run_dir, progress.step, progress.images_seen, merged,
                                         self.config.checkpoint.keep_last, extra, self.lost)
                log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - started)
            except UserError as exc:
                lost = str(exc)
        lost = processes.broadcast_object(lost)  # also the barrier: committed before anyone goes on
        if lost:
            raise UserError(lost)
        saved = time.perf_counter() - started
        self.run_dir.rank_record(
            processes.rank, "checkpoint", step=progress.step, write_s=round(written, 3),
            save_s=round(saved, 3), stall_s=round(saved, 3),
            written_bytes=sum(record["bytes"] for record in records.values()), **strategy.held_bytes(ema),
            **peak_memory_so_far(processes.device),
        )

    def close(self) -> None:
        if self.writer is not None:
            with watchdog.paused():
                self.writer.wait()
