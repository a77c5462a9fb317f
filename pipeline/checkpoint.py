"""Crash-consistent checkpoints: staged, hashed, renamed into place, verified before loading.

Layout of ``run_dir/checkpoints/``::

    step-000001000/              one complete checkpoint
        model.safetensors        weights (rank 0; identical on every rank under DDP); under a
                                 sharding strategy only the buffers, the weights being in
        model.rank-00000.safetensors   each rank's pieces (pipeline/sharding.py), like
        ema[.rank-00000].safetensors   the EMA weights, when EMA is on, and
        optimizer.pt | optimizer.rank-00000.safetensors   the optimizer state (DDP: its
                                 state_dict, loaded with weights_only=True; sharded: AdamW moments)
        shards.json              sharded strategies: which rank holds which piece of what
        trainer.json             step, images seen, loss scaler, world size, strategy, AdamW step
        rank-00000.json          per-rank: Python/NumPy RNG, data-stream position
        rank-00000.safetensors   per-rank: torch CPU/CUDA RNG state
        ...
        manifest.json            written last: step, images seen, every file's size and sha256
    step-000002000.staging/      a checkpoint being written (never loaded; removed on start-up)

All ranks write their own files into the staging directory, rank 0 gathers their sizes and hashes,
writes the manifest, fsyncs and renames the directory; the rename is the commit point. Older
checkpoints are pruned only after that. Loading scans from the newest, verifies the manifest,
sizes and hashes, and falls back to the previous checkpoint (saying why) when one is damaged;
every file read afterwards is checked again against its hash. Nothing loaded is unpickled as
arbitrary objects: tensors come from safetensors or ``torch.load(weights_only=True)``, everything
else from JSON.

`BackgroundWriter` does the same work on a thread (``checkpoint.async_save``): the trainer copies
the state to host memory at a step boundary and training goes on; each rank's thread writes its
files, the threads gather the records over their own gloo group, and rank 0's thread commits.
docs/checkpoints.md says what is guaranteed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "genpipe-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def rank_file(rank: int, extension: str) -> str:
    return f"rank-{rank:05d}.{extension}"


# ---------------------------------------------------------------------------------------------
# Encoding files (in memory, so the hash is computed once, from the bytes written)


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def encode_torch(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def encode_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def snapshot(obj: Any, reuse: Any = None) -> Any:
    """A copy of ``obj`` whose tensors are copies in host memory: training may change the
    originals (in place, on any device) while a background thread encodes the copy.

    ``reuse``, a previous snapshot of the same structure no longer in use, lends its tensors as
    destinations: copying into memory already mapped is several times faster than allocating
    it afresh (page faults), and CUDA sources get pinned buffers.
    """
    if isinstance(obj, torch.Tensor):
        source = obj.detach()
        if (
            isinstance(reuse, torch.Tensor)
            and reuse is not obj
            and reuse.device.type == "cpu"
            and reuse.shape == source.shape
            and reuse.dtype == source.dtype
        ):
            return reuse.copy_(source)
        if source.device.type == "cuda":
            return torch.empty(source.shape, dtype=source.dtype, pin_memory=True).copy_(source)
        return source.to("cpu", copy=True)
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {key: snapshot(value, reuse.get(key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(value, previous) for value, previous in zip(obj, reuse))
    return obj


_ENCODERS = {"tensors": encode_tensors, "torch": encode_torch, "json": encode_json}


def encode_parts(parts: dict[str, tuple[str, Any]]) -> dict[str, bytes]:
    """{file name: (kind, object)} with kind "tensors" | "torch" | "json" -> {file name: bytes}."""
    return {name: _ENCODERS[kind](obj) for name, (kind, obj) in parts.items()}


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def decode_torch(data: bytes) -> Any:
    # weights_only refuses any pickle that would construct objects other than tensors and
    # plain containers: a tampered file cannot execute code here.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def _write_durable(path: Path, data: bytes) -> dict:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Saving


def staging_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{step_dir_name(step)}.staging"


def prepare_staging(run_dir: str | os.PathLike, step: int) -> Path:
    """Rank 0, before the others write: an empty staging directory for this step."""
    staging = staging_path(run_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def write_files(staging: Path, files: dict[str, bytes]) -> dict[str, dict]:
    """Every rank: write its encoded files; returns {name: {bytes, sha256}} for the manifest."""
    return {name: _write_durable(staging / name, data) for name, data in files.items()}


def write_parts(staging: Path, parts: dict[str, tuple[str, Any]]) -> dict[str, dict]:
    """`write_files` of `encode_parts`, one file at a time: only one file's encoded bytes are in
    memory at once (encoding them all first held a second copy of the whole state)."""
    records = {}
    for name, (kind, obj) in parts.items():
        data = _ENCODERS[kind](obj)
        records[name] = _write_durable(staging / name, data)
        del data
    return records


def commit(
    run_dir: str | os.PathLike,
    step: int,
    images_seen: int,
    records: dict[str, dict],
    keep_last: int,
    extra: dict | None = None,
    lost: Callable[[], str | None] | None = None,
) -> Path:
    """Rank 0, after every rank wrote: manifest last, then the atomic rename, then pruning.

    ``lost`` (pipeline/runlock.py's `RunLock.lost`) says whether another job has taken the run
    directory since: then nothing is renamed or pruned, and a `UserError` says so."""
    if lost is not None and (message := lost()):
        raise UserError(message)
    staging = staging_path(run_dir, step)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "images_seen": images_seen,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": dict(sorted(records.items())),
        **(extra or {}),
    }
    _write_durable(staging / "manifest.json", encode_json(manifest))
    _fsync_dir(staging)
    final = checkpoints_dir(run_dir) / step_dir_name(step)
    if final.exists():
        try:
            verify(final)
        except ValueError as exc:
            # A damaged checkpoint of this step (the run resumed from an older one after skipping
            # it, and has come back to the same step): set it aside, never keep it over this one.
            aside = final.with_name(final.name + ".damaged")
            log.warning("replacing damaged checkpoint %s (%s); it is kept as %s", final, exc, aside.name)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        else:
            # A complete checkpoint of this very step is already there: keep it.
            shutil.rmtree(staging)
            return final
    os.replace(staging, final)
    _fsync_dir(final.parent)
    prune(run_dir, keep_last)
    return final


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest keep_last (never an incomplete one's peer)."""
    complete = [step for step, path in list_checkpoints(run_dir) if (path / "manifest.json").exists()]
    for step in complete[:-keep_last]:
        shutil.rmtree(checkpoints_dir(run_dir) / step_dir_name(step), ignore_errors=True)


def remove_staging(run_dir: str | os.PathLike) -> None:
    """Start-up clean-up of checkpoints whose writing was interrupted."""
    directory = checkpoints_dir(run_dir)
    if directory.is_dir():
        for path in directory.glob("*.staging"):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Finding and loading


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every step-directory, oldest first."""
    directory = checkpoints_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; ValueError saying what is wrong otherwise."""
    manifest = read_manifest(path)
    verify_files(path, manifest, manifest.get("files", {}))
    return manifest


def read_manifest(path: Path) -> dict:
    """A checkpoint's manifest, if it is there and of this format (ValueError otherwise)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError("no manifest.json (the write was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest.json is not valid JSON ({exc})") from None
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {manifest.get('format')!r}")
    return manifest


def verify_files(path: Path, manifest: dict, names) -> None:
    """Each of ``names`` is there with the manifest's size and sha256 (ValueError otherwise)."""
    for name in names:
        record = manifest["files"][name]
        file_path = path / name
        if not file_path.is_file():
            raise ValueError(f"{name} is missing")
        size = file_path.stat().st_size
        if size != record["bytes"]:
            raise ValueError(f"{name} is {size} bytes, the manifest says {record['bytes']}")
        digest = hashlib.sha256()
        with open(file_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != record["sha256"]:
            raise ValueError(f"{name} does not match its sha256 in the manifest (corrupted)")


def share_of_files(manifest: dict, rank: int, world_size: int) -> list[str]:
    """The files of a checkpoint that ``rank`` of ``world_size`` verifies on resume: every file is
    someone's, once, the largest first to whoever has the fewest bytes so far (the same answer on
    every rank), so that verifying takes about 1/world_size of hashing them all in one place."""
    load = [0] * world_size
    mine = []
    files = manifest.get("files", {})
    for name in sorted(files, key=lambda n: (-int(files[n]["bytes"]), n)):
        least = min(range(world_size), key=lambda r: (load[r], r))
        load[least] += int(files[name]["bytes"])
        if least == rank:
            mine.append(name)
    return mine


def latest_valid(run_dir: str | os.PathLike, warn: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
    """Newest checkpoint that verifies, reporting each damaged newer one it skips."""
    warn = warn or log.warning
    for _step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, verify(path)
        except ValueError as exc:
            warn(f"checkpoint {path} is unusable: {exc}; trying the previous one")
    return None


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: dict
    bytes_read: int = 0
    """What this process read of the checkpoint (benchmarks/sharding_memory.py reports it)."""
    seconds: float = 0.0
    """Time this process spent inside `timed` sections: reading, verifying, decoding, placing."""
    _timing: int = 0

    @contextlib.contextmanager
    def timed(self):
        """Count the time inside towards `seconds` (nested sections count once)."""
        self._timing += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._timing -= 1
            if self._timing == 0:
                self.seconds += time.perf_counter() - started

    def read(self, name: str) -> bytes:
        """A file's bytes, checked against the manifest's sha256 (the bytes actually decoded are
        the bytes that were verified, whichever rank or node reads them)."""
        record = self.manifest.get("files", {}).get(name)
        if record is None:  # nothing vouches for it: not written by this checkpoint's commit
            raise UserError(f"checkpoint {self.path / name} is not listed in {self.path / 'manifest.json'}; "
                            "refusing to read a file the checkpoint's commit did not record")
        data = (self.path / name).read_bytes()
        self.bytes_read += len(data)
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise UserError(
                f"checkpoint {self.path / name} does not match its sha256 in the manifest "
                "(changed after it was verified, or unreadable from this node)"
            )
        return data

    def has(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return decode_tensors(self.read(name))

    def torch_object(self, name: str) -> Any:
        try:
            return decode_torch(self.read(name))
        except Exception as exc:  # UnpicklingError for anything weights_only refuses
            raise UserError(
                f"checkpoint {self.path / name} holds something other than tensors and plain "
                f"data; refusing to load it ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None

    def json(self, name: str) -> Any:
        return decode_json(self.read(name))


def open_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """A verified checkpoint directory, or a UserError saying why it cannot be used."""
    path = Path(path)
    try:
        return LoadedCheckpoint(path, verify(path))
    except ValueError as exc:
        raise UserError(f"checkpoint {path} is unusable: {exc}") from None


def find_for_run(run_dir: str | os.PathLike) -> LoadedCheckpoint | None:
    found = latest_valid(run_dir)
    return LoadedCheckpoint(*found) if found else None


# ---------------------------------------------------------------------------------------------
# Asynchronous saving


class BackgroundWriter:
    """One rank's checkpoint writes on a thread, at most one in flight.

    Every rank calls `start` at the same step with its snapshot (host copies, see `snapshot`);
    the thread encodes and writes the rank's files, all ranks' threads exchange their file
    records over a gloo group of their own (so the training collectives are never involved), and
    rank 0's thread writes the manifest and renames: a checkpoint is committed only after every
    rank's files are on disk. `wait` blocks until the write in flight is finished and raises its
    error, if it had one, in the training thread. The host copies are kept from one save to the
    next and reused. Construct it on every rank at the same point (creating the process group is
    a collective).
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, keep_last: int,
                 pause: Callable[[int, int, int], None] | None = None,
                 lost: Callable[[], str | None] | None = None,
                 written: Callable[..., None] | None = None):
        self.run_dir = Path(run_dir)
        self.written = written  # called on this rank's thread once a write is done (its costs)
        self.lost = lost  # rank 0: whether another job has taken the run directory (`commit`)
        self.pause = pause  # fault injection (pipeline/faults.py): called between write and commit
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.group = None
        if world_size > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step: int | None = None
        self._buffers: Any = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, step: int, images_seen: int, parts: dict[str, tuple[str, Any]], extra: dict) -> None:
        """Copy ``parts`` (live state, see `encode_parts`) to host memory, then write in the background."""
        self.wait()
        copied = snapshot(parts, self._buffers)
        self._buffers = copied
        self._step = step
        self._thread = threading.Thread(
            target=self._write, args=(step, images_seen, copied, extra),
            name=f"checkpoint-{step}", daemon=True,  # a dying process leaves only a staging dir
        )
        self._thread.start()

    def wait(self) -> float:
        """Seconds spent waiting for the write in flight (0 when none)."""
        if self._thread is None:
            return 0.0
        started = time.perf_counter()
        self._thread.join()
        self._thread = None
        waited = time.perf_counter() - started
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, UserError):
                raise error
            raise RuntimeError(f"asynchronous checkpoint of step {self._step} failed: {error}") from error
        return waited

    def _write(self, step: int, images_seen: int, parts: dict, extra: dict) -> None:
        started = time.perf_counter()
        write_s = None
        try:
            records: dict = write_parts(staging_path(self.run_dir, step), parts)
            write_s = time.perf_counter() - started
            if self.pause is not None:
                self.pause(step, self.rank, self.world_size)
        except BaseException as exc:  # still take part in the exchange, or the others would hang
            records = {"__error__": f"rank {self.rank}: {type(exc).__name__}: {exc}"}
            self._error = exc
        try:
            gathered = [records]
            if self.group is not None:
                import torch.distributed as dist

                gathered = [None] * self.world_size
                dist.all_gather_object(gathered, records, group=self.group)
            errors = [part["__error__"] for part in gathered if "__error__" in part]
            if self.rank == 0 and not errors:
                merged = {name: record for part in gathered for name, record in part.items()}
                path = commit(self.run_dir, step, images_seen, merged, self.keep_last, extra, self.lost)
                log.info("checkpoint %s (written in the background in %.1fs)", path, time.perf_counter() - started)
            elif self.rank == 0 and self._error is None:
                self._error = RuntimeError("; ".join(errors) + " (nothing was committed)")
        except BaseException as exc:
            self._error = self._error or exc
        if self.written is not None and write_s is not None and self._error is None:
            try:
                self.written(step=step, write_s=round(write_s, 3), save_s=round(time.perf_counter() - started, 3),
                             written_bytes=sum(record["bytes"] for record in records.values()))
            except Exception as exc:  # a record is not worth a failed checkpoint
                log.warning("checkpoint of step %d: its cost was not recorded (%s)", step, exc)
