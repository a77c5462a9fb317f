"""Image batches from WebDataset shards: one global order, split across processes and workers,
resumable on any process count that divides its partitions.

The data order is global. The shard list is read as ``P`` *canonical partitions*
(``data.canonical_partitions``; fixed for the life of a run, by default the number of readers of
its first start, processes × workers). Partition ``p`` is an endless, deterministic stream: in
each of its epochs the shard list is permuted with the run's seed, the partition reads every
``P``-th shard of that permutation and streams their raw bytes through a shuffle buffer seeded by
(seed, epoch, p). Nothing in it depends on which process or worker reads it. Sample ``g`` of the
global sequence is sample ``g // P`` of partition ``g % P``, and optimizer step ``k`` trains on
global samples ``[k·G, (k+1)·G)`` (G the global batch): which samples form a global batch is a
function of the seed and the step alone, whatever the number of processes, as long as P divides G.

Who reads what. Process ``r`` of ``W`` (W must divide P) owns the ``R = P / W`` partitions
``r·R … r·R + R - 1`` and reads them in rounds, one sample from each in turn; its micro-batches
are consecutive runs of ``batch_size`` samples of that process stream, so every step takes G / P
samples from every partition. The process has ``K`` readers (one per DataLoader worker, or one
in the training process; K is the largest divisor of R not above ``num_workers``): reader ``w``
owns every K-th of the process's partitions, starting at the ``w``-th, and delivers, for every
micro-batch, the samples of its partitions that fall in it, decoded; the training process joins
the K pieces (DataLoader takes them from its workers strictly in turn) into one batch. Streams are
endless (epoch after epoch): training is counted in steps, and no reader ever runs dry while the
others wait in a collective.

Resumable position. A partition's position is two numbers, its epoch and the samples of it
delivered; a process's is the number of samples it has consumed. Each batch carries its
readers' positions; the training process records them for the batches it actually consumed. On
resume each partition replays its epoch up to its position, reading raw bytes but decoding
nothing. With the same number of processes the stream resumes exactly at any point (any
worker count). With another number, it resumes exactly when every partition had delivered as
many samples as the others, which holds at every checkpoint when P divides the global batch: a
checkpoint taken with N processes restores the stream for any M dividing P. Checkpoints written
before partitions existed (one stream per reader) resume with each reader's stream as one
partition.

Per-sample randomness. An image stored at another size than ``image_size`` is cut to a square
of it at load time (`pipeline.decode`); the place of a random crop and the horizontal flip are
drawn from (seed, epoch of the sample's partition, the sample's shard file name and key), so they
follow the sample, not the reader: a resumed run, or one with another number of processes or
workers, treats every sample alike.

Latent shards (`data-prep latents`, their manifest's kind "latents") are read the same way; a
sample is then its stored fp16 array (`pipeline.latents`), delivered as it is: no decoding, crop
or flip.

Shard lists are resolved by `pipeline.shards` and shards opened by `pipeline.shard_io` (local
files, ``pipe:`` commands, object stores and web servers); their public names are re-exported
here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import faults
from pipeline.decode import IMAGE_MEMBERS, decode_square
from pipeline.errors import UserError
from pipeline.latents import decode_latent

# Shard lists and shard reading live in their own modules; their names stay importable from here.
from pipeline.shard_io import FetchPolicy, iter_raw_samples, opened_shards
from pipeline.shards import ShardSet, check_shards_match, resolve_shards

__all__ = [
    "Batch", "FetchPolicy", "Layout", "ShardSet", "TrainingBatches", "check_shards_match", "decode_image",
    "eval_batches", "iter_raw_samples", "plan_layout", "resolve_shards", "resume_problem",
    "saved_stream", "shards_for_partition",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = IMAGE_MEMBERS
CROPS = ("center", "random")
STATE_FORMAT = "genpipe-data/2"


# ---------------------------------------------------------------------------------------------
# One sample


def decode_image(
    sample: dict[str, bytes], key: str, url: str, image_size: int, channels: int,
    offset: float = 0.5,
) -> np.ndarray:
    """uint8 [C, H, W] array of a sample's image, a square of `image_size` (resized and cropped
    at `offset` along the longer side when stored at another size); a UserError names the shard
    and key of an image that does not decode."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            data = sample[extension]
            break
    else:
        raise UserError(f"shard {url}: sample {key} has no image (members: {sorted(sample)})")
    try:
        array = decode_square(data, image_size, channels, offset)
    except Exception as exc:
        raise UserError(f"shard {url}: sample {key} is not a decodable image ({exc})") from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def sample_label(sample: dict[str, bytes], key: str, url: str) -> int:
    """The integer class label of a sample's ``.cls`` member; a UserError if it has none."""
    if "cls" not in sample:
        raise UserError(
            f"shard {url}: sample {key} has no .cls label, and labels were asked for "
            f"(members: {', '.join(sorted(sample))}); train an unconditional model on these shards"
        )
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"shard {url}: sample {key} has a .cls label that is not an integer "
                        f"({sample['cls'][:20]!r})") from None


def sample_field(sample: dict[str, bytes], field: str, key: str, url: str):
    """A per-sample field: ``txt`` as text, ``json`` parsed, others as bytes; None if absent."""
    data = sample.get(field)
    if data is None:
        return None
    try:
        if field == "txt":
            return data.decode("utf-8")
        if field == "json":
            return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"shard {url}: sample {key} has an unreadable .{field} ({exc})") from None
    return data


def is_latent(shards: ShardSet) -> bool:
    """Whether the shards are latent shards (their manifest's kind), read without decoding."""
    return shards.manifest is not None and shards.manifest.kind == "latents"


# ---------------------------------------------------------------------------------------------
# Canonical partitions: endless, deterministic streams


def _mix(*numbers: int) -> int:
    """A 64-bit seed from several integers (splitmix64 steps); stable across processes."""
    state = 0x9E3779B97F4A7C15
    for number in numbers:
        state = (state ^ (number & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state


def shards_for_partition(
    urls: tuple[str, ...], seed: int, epoch: int, partition: int, partitions: int
) -> list[str]:
    """A partition's shards in one of its epochs: every `partitions`-th of a seeded permutation."""
    order = list(urls)
    random.Random(_mix(seed, epoch, 0x5A)).shuffle(order)
    return order[partition::partitions]


# The trainer's start record lists a process's partitions through this earlier name (with
# `TrainingBatches.readers_per_process` and `num_readers`).
shards_for_reader = shards_for_partition


@dataclass(frozen=True)
class StreamSpec:
    """What every partition stream and reader of a run shares."""

    urls: tuple[str, ...]
    seed: int
    partitions: int
    image_size: int
    channels: int
    batch_size: int
    shuffle_buffer: int
    random_flip: bool
    crop: str = "center"  # "center" or "random": where the square is cut from a non-square image
    labels: bool = False  # deliver each sample's .cls label (an error where one is missing)
    fields: tuple[str, ...] = ()  # other members to deliver per sample ("txt", "json", ...)
    fetch: FetchPolicy = FetchPolicy()
    latents: bool = False  # latent shards (pipeline/latents.py): fp16 arrays as stored, no decoding


class PartitionStream:
    """Endless stream of (epoch, delivered_in_epoch, key, url, sample bytes) of one partition."""

    def __init__(self, spec: StreamSpec, partition: int, start_epoch: int = 0, skip: int = 0):
        self.spec = spec
        self.partition = partition
        self.start_epoch = start_epoch
        self.skip = skip

    def _epoch(self, epoch: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        spec = self.spec
        shards = shards_for_partition(spec.urls, spec.seed, epoch, self.partition, spec.partitions)
        rng = random.Random(_mix(spec.seed, epoch, self.partition, 0xB0F))
        buffer: list[tuple[str, str, dict[str, bytes]]] = []
        for url, downloaded in opened_shards(shards, spec.fetch):
            for key, sample in iter_raw_samples(url, downloaded):
                item = (key, url, sample)
                if len(buffer) < spec.shuffle_buffer:
                    buffer.append(item)
                    continue
                index = rng.randrange(len(buffer))
                buffer[index], item = item, buffer[index]
                yield item
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        epoch, skip = self.start_epoch, self.skip
        while True:
            delivered = 0
            for key, url, sample in self._epoch(epoch):
                delivered += 1
                if delivered <= skip:
                    continue
                yield epoch, delivered, key, url, sample
            if delivered == 0:
                raise UserError(f"data partition {self.partition} found no samples in its shards")
            epoch, skip = epoch + 1, 0


def sample_seed(seed: int, epoch: int, url: str, key: str) -> int:
    """The seed of one sample's randomness (flip, crop) in one epoch of its partition.

    A function of the sample's identity (its shard's file name and its key, so the same wherever
    the shards are stored) and of the epoch, never of which reader or worker reads it: a run
    resumed, or run on another number of processes, crops and flips each sample as the
    uninterrupted run does.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.blake2b(f"{name}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8)
    return _mix(seed, epoch, int.from_bytes(digest.digest(), "little"))


def augment(spec: StreamSpec, epoch: int, url: str, key: str) -> tuple[float, bool]:
    """(crop offset along the longer side, horizontal flip) of a sample in an epoch."""
    if spec.crop == "center" and not spec.random_flip:
        return 0.5, False
    state = sample_seed(spec.seed, epoch, url, key)
    offset = (_mix(state, 0xC0) >> 11) / float(1 << 53) if spec.crop == "random" else 0.5
    return offset, spec.random_flip and _mix(state, 0xF11F) & 1 == 1


# ---------------------------------------------------------------------------------------------
# Who reads which partitions


@dataclass(frozen=True)
class Layout:
    """``partitions`` canonical partitions over ``world_size`` processes, each with ``readers``
    readers (a divisor of the partitions per process); this process is ``rank``."""

    partitions: int
    world_size: int
    rank: int
    readers: int

    @property
    def per_process(self) -> int:
        return self.partitions // self.world_size

    def process_partitions(self) -> range:
        """This process's partitions, in the order its rounds take them."""
        return range(self.rank * self.per_process, (self.rank + 1) * self.per_process)

    def reader_partitions(self, reader: int) -> list[int]:
        """A reader's partitions: every ``readers``-th of its process's, from the ``reader``-th."""
        return list(self.process_partitions())[reader::self.readers]


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _unshared_partitions(saved: int, world_size: int) -> str:
    """Why `world_size` processes cannot resume a run whose stream has `saved` partitions."""
    return (f"this run's data stream has {saved} canonical partitions (fixed when it started), which "
            f"{world_size} processes cannot share evenly; resume on a process count that divides "
            f"{saved} ({', '.join(map(str, _divisors(saved)))}), or train into a new run_dir")


def plan_layout(
    num_shards: int, world_size: int, rank: int, num_workers: int, batch_size: int, *,
    configured: int | None = None, saved: int | None = None,
) -> Layout:
    """The partitions of a run and this process's readers; a one-line UserError where none fit.

    ``saved`` is the run's partition count from its checkpoint (fixed for the life of a run),
    ``configured`` is ``data.canonical_partitions``; with neither, a first start takes one
    partition per reader (world_size × num_workers, the stream earlier versions read).
    """
    wanted = max(num_workers, 1)
    if saved is not None and configured is not None and configured != saved:
        raise UserError(
            f"data.canonical_partitions: {configured}, but this run's data stream has {saved} canonical "
            f"partitions (fixed when it started; they cannot change within a run): set {saved} or drop "
            "the key, or train into a new run_dir"
        )
    partitions = saved or configured or world_size * wanted
    if partitions > num_shards:
        if saved or configured:
            raise UserError(
                f"data.shards: {num_shards} shard(s) for {partitions} canonical partitions "
                f"(data.canonical_partitions{'' if configured else ', fixed when this run started'}); "
                "every partition needs its own shard: write smaller shards (data-prep --samples-per-shard)"
            )
        raise UserError(
            f"data.shards: {num_shards} shard(s) for {partitions} readers ({world_size} process(es) × "
            f"{wanted} worker(s)); every reader needs its own shard: lower data.num_workers or write "
            "smaller shards (data-prep --samples-per-shard)"
        )
    if partitions % world_size:
        if saved:
            raise UserError(f"data.canonical_partitions: {_unshared_partitions(saved, world_size)}")
        raise UserError(
            f"data.canonical_partitions: {partitions} is not a multiple of the {world_size} processes "
            "(each process reads canonical_partitions / processes of them)"
        )
    per_process = partitions // world_size
    readers = max(d for d in _divisors(per_process) if d <= min(wanted, batch_size))
    if num_workers and readers < num_workers and rank == 0:
        log.info("data.num_workers=%d: %d worker(s) read (each needs an equal share of the process's %d "
                 "of %d canonical partitions, and a sample of every batch)", num_workers, readers,
                 per_process, partitions)
    return Layout(partitions, world_size, rank, readers)


# ---------------------------------------------------------------------------------------------
# One reader: its share of every micro-batch of its process


def reader_pieces(spec: StreamSpec, layout: Layout, reader: int,
                  positions: dict[int, tuple[int, int]], start: int):
    """This reader's piece of each micro-batch of its process, from process-stream index `start`.

    The process stream takes its partitions in rounds; sample ``i`` of it comes from the
    partition in slot ``i mod R``, and slot ``s`` belongs to reader ``s mod K``. So this reader's
    samples are ``i = reader + K·j`` (j = 0, 1, ...), the j-th from its partition ``j mod Q`` (Q
    partitions each), and micro-batch ``u`` is ``[start + u·B, start + (u+1)·B)``.

    Each piece is a dict: ``images`` uint8 [n, C, H, W], ``keys``, ``sources`` (shard file
    names), ``positions`` (every partition of this reader after the piece), ``reader``, ``micro``,
    ``place`` (the place of its first sample in the micro-batch; the others follow every K-th
    place) and, when the spec asks, ``labels`` (int64 [n]) and one list per asked field.
    """
    partitions = layout.reader_partitions(reader)
    at = {p: positions.get(p, (0, 0)) for p in partitions}
    streams = [iter(PartitionStream(spec, p, *at[p])) for p in partitions]
    readers, count = layout.readers, len(partitions)
    own = max(0, -(-(start - reader) // readers))  # j of the first own sample at or after start
    end, micro = start, 0
    while True:
        end += spec.batch_size
        images: list[np.ndarray] = []
        keys: list[str] = []
        sources: list[str] = []
        labels: list[int] = []
        fields: dict[str, list] = {name: [] for name in spec.fields}
        place = reader + readers * own - (end - spec.batch_size)  # of the first sample
        while reader + readers * own < end:
            slot = own % count
            epoch, delivered, key, url, sample = next(streams[slot])
            at[partitions[slot]] = (epoch, delivered)
            if spec.latents:
                images.append(decode_latent(sample, key, url))
            else:
                offset, flip = augment(spec, epoch, url, key)
                image = decode_image(sample, key, url, spec.image_size, spec.channels, offset)
                images.append(image[:, :, ::-1] if flip else image)
            keys.append(key)
            sources.append(url.rstrip("/").rsplit("/", 1)[-1])
            if spec.labels:
                labels.append(sample_label(sample, key, url))
            for name in spec.fields:
                fields[name].append(sample_field(sample, name, key, url))
            own += 1
        piece = {"images": torch.from_numpy(np.stack(images)), "keys": keys, "sources": sources,
                 "positions": dict(at), "reader": reader, "micro": micro, "place": place, "fields": fields}
        if spec.labels:
            piece["labels"] = torch.tensor(labels, dtype=torch.int64)
        micro += 1
        yield piece


class ProcessReaders(IterableDataset):
    """The readers of one process, one per DataLoader worker (or one in the process)."""

    def __init__(self, spec: StreamSpec, layout: Layout, positions: dict[int, tuple[int, int]], start: int):
        self.spec = spec
        self.layout = layout
        self.positions = positions
        self.start = start

    def __iter__(self):
        info = get_worker_info()
        reader = info.id if info is not None else 0
        yield from reader_pieces(self.spec, self.layout, reader, self.positions, self.start)


@dataclass
class Batch:
    """One batch with what travels beside its images.

    ``images`` stays the uint8 [B, C, H, W] tensor every model takes; ``labels`` (int64 [B]) is
    there when labels were asked for; ``keys`` are the samples' keys; ``fields`` holds one list of
    B values per asked member (``txt``: str, ``json``: parsed object, others: bytes; None where a
    sample lacks it).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    fields: dict[str, list] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Positions saved by a checkpoint


def saved_stream(rank_states: list[dict], images_seen: int | None = None, step: int | None = None) -> dict:
    """The data state of a whole checkpoint for `TrainingBatches` (``state=``): every rank's
    ``state_dict()``, with the images seen and the step of the checkpoint."""
    return {"format": STATE_FORMAT, "ranks": list(rank_states), "images_seen": images_seen, "step": step}


@dataclass
class _Saved:
    """What a checkpoint says about the data stream, whatever wrote it."""

    partitions: int
    world_size: int
    urls_count: int | None
    positions: dict[int, tuple[int, int]]
    consumed: dict[int, int]  # per saved rank: samples of its process stream consumed
    legacy: bool  # written before canonical partitions: one stream per reader
    images_seen: int | None
    step: int | None

    @classmethod
    def parse(cls, state: dict) -> _Saved | None:
        ranks = state["ranks"] if "ranks" in state else [state]
        ranks = [rank_state for rank_state in ranks if rank_state]
        if not ranks:
            return None
        images_seen, step = state.get("images_seen"), state.get("step")
        positions = {int(p): (int(e), int(d)) for rank_state in ranks
                     for p, (e, d) in rank_state.get("positions", {}).items()}
        counts = {rank_state.get("urls_count") for rank_state in ranks}
        urls_count = counts.pop() if len(counts) == 1 else -1
        if "num_readers" not in ranks[0]:
            return cls(int(ranks[0]["partitions"]), int(ranks[0]["world_size"]), urls_count, positions,
                       {int(s["rank"]): int(s["consumed"]) for s in ranks}, False, images_seen, step)
        # One stream per reader, readers r·K … r·K+K-1 on process r: the streams partitions read
        # (shards_for_partition and PartitionStream keep the readers' formulas); only the samples
        # each process consumed were not recorded: every process consumed images_seen / processes.
        partitions = int(ranks[0]["num_readers"])
        world_size = len(ranks) if "ranks" in state else max(partitions // max(len(positions), 1), 1)
        consumed = {}
        if images_seen is not None and images_seen % world_size == 0:
            per_process = partitions // world_size
            for rank_state in ranks:
                readers = [int(r) for r in rank_state.get("positions", {})]
                if readers:
                    consumed[min(readers) // per_process] = images_seen // world_size
        return cls(partitions, world_size, urls_count, positions, consumed, True, images_seen, step)

    def totals(self) -> dict[int, int] | None:
        """Samples each partition delivered (None when a process's count is unknown)."""
        per_process = self.partitions // self.world_size
        if len(self.consumed) != self.world_size:
            return None
        totals = {}
        for rank, consumed in self.consumed.items():
            for slot in range(per_process):
                totals[rank * per_process + slot] = consumed // per_process + (slot < consumed % per_process)
        return totals


def resume_problem(saved_partitions: int, saved_world_size: int, images_seen: int, step: int, *,
                   world_size: int, batch_size: int, grad_accum: int | None = None,
                   whole_rounds: bool = True) -> str | None:
    """Why a checkpoint's data stream cannot resume exactly on `world_size` processes (None: it can).

    The processes must divide the partitions; the global batch must stay what it was
    (data.batch_size × processes × train.grad_accum; with ``grad_accum`` None, only that
    batch_size × processes divides it); and the checkpoint must sit on a whole round of the
    partitions (``whole_rounds``; a checkpoint from before partitions has no rounds to check).
    """
    if world_size == saved_world_size:
        return None
    if saved_partitions % world_size:
        return _unshared_partitions(saved_partitions, world_size)
    if step and images_seen % step == 0:
        old = images_seen // step
        new = None if grad_accum is None else batch_size * world_size * grad_accum
        if (new is not None and new != old) or old % (batch_size * world_size):
            hints = []
            if grad_accum is not None and old % (world_size * grad_accum) == 0:
                hints.append(f"data.batch_size={old // (world_size * grad_accum)}")
            if grad_accum is not None and old % (batch_size * world_size) == 0:
                hints.append(f"train.grad_accum={old // (batch_size * world_size)}")
            keep = f"; keep it with {' or '.join(hints)}" if hints else ""
            made = (f"would make it {new}" if new is not None else
                    f"cannot make it (data.batch_size × processes = {batch_size * world_size} does not divide it)")
            return (f"this run's global batch is {old} images (data.batch_size × processes × "
                    f"train.grad_accum); {batch_size} × {world_size} processes "
                    f"{'× ' + str(grad_accum) + ' ' if grad_accum is not None else ''}{made}{keep}")
    if whole_rounds and images_seen % saved_partitions:
        return (f"the checkpoint was taken after {images_seen} images, not a whole number of rounds "
                f"of the {saved_partitions} canonical partitions (a run resumes on another process "
                f"count when data.canonical_partitions divides its global batch); resume on "
                f"{saved_world_size} processes")
    return None


# ---------------------------------------------------------------------------------------------
# The training process's batches


class TrainingBatches:
    """Iterator of uint8 batches for one process, with a state_dict of its exact position.

    ``next()`` gives the images tensor; `next_batch` gives a `Batch` with the labels (when built
    with ``labels=True``) and the asked ``fields`` beside it. Both advance the same stream.
    ``state`` is a ``state_dict()`` of this process, or a whole checkpoint's (`saved_stream`).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int,
        image_size: int,
        channels: int,
        shuffle_buffer: int,
        random_flip: bool,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        state: dict | None = None,
        crop: str = "center",
        labels: bool = False,
        fields: tuple[str, ...] | list[str] = (),
        fetch: FetchPolicy | None = None,
        canonical_partitions: int | None = None,
    ):
        if crop not in CROPS:
            raise UserError(f"data.crop: {crop!r} is not one of {', '.join(CROPS)}")
        latents = is_latent(shards)
        if latents and (random_flip or crop != "center"):
            raise UserError("data.random_flip / data.crop: latent shards are read as stored (a flipped or "
                            "cropped latent is not the latent of the flipped image); set "
                            "data.random_flip=false and data.crop=center")
        saved = _Saved.parse(state) if state is not None else None
        self.layout = plan_layout(len(shards.urls), world_size, rank, num_workers, batch_size,
                                  configured=canonical_partitions, saved=saved.partitions if saved else None)
        self.rank = rank
        self.spec = StreamSpec(
            urls=shards.urls,
            seed=seed,
            partitions=self.layout.partitions,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            random_flip=random_flip,
            crop=crop,
            labels=labels,
            fields=tuple(name.lower().lstrip(".") for name in fields),
            fetch=fetch or FetchPolicy(),
            latents=latents,
        )
        self.positions, self.consumed = self._resume_point(saved)
        readers = self.layout.readers
        # One reader: the DataLoader pins its batches as before. Several: their pieces are
        # interleaved here, straight into pinned memory.
        self.pin_memory = pin_memory and readers > 1
        self.loader = DataLoader(
            ProcessReaders(self.spec, self.layout, dict(self.positions), self.consumed),
            batch_size=None,
            num_workers=readers if num_workers else 0,
            pin_memory=pin_memory and readers == 1,
            # as many samples ahead per worker as prefetch_factor whole batches
            prefetch_factor=prefetch_factor * readers if num_workers else None,
            persistent_workers=False,
            multiprocessing_context="fork" if num_workers and os.name == "posix" else None,
            # Its own generator: otherwise each iter() draws the workers' base seed from the global
            # torch RNG, and a resumed run's RNG would be one draw ahead of the uninterrupted one.
            generator=torch.Generator().manual_seed(_mix(seed, rank, 0xD1)),
        )
        self._iterator = None
        self._pending: dict | None = None
        # GENPIPE_FAULTS=log_sample_keys: the keys each step consumed go to run_dir/ranks/.
        self._record_keys = faults.Faults.from_environment().log_sample_keys

    @classmethod
    def from_config(
        cls,
        shards: ShardSet,
        data,
        *,
        seed: int,
        rank: int,
        world_size: int,
        pin_memory: bool = False,
        state: dict | None = None,
        labels: bool = False,
        fields: tuple[str, ...] = (),
    ) -> TrainingBatches:
        """The batches a `pipeline.config.DataConfig` describes (every data.* field read here)."""
        return cls(
            shards,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=data.num_workers,
            batch_size=data.batch_size,
            image_size=data.image_size,
            channels=data.channels,
            shuffle_buffer=data.shuffle_buffer,
            random_flip=data.random_flip,
            prefetch_factor=data.prefetch_factor,
            pin_memory=pin_memory,
            state=state,
            crop=data.crop,
            labels=labels,
            fields=fields,
            fetch=FetchPolicy(prefetch=data.shard_prefetch, attempts=data.shard_attempts),
            canonical_partitions=data.canonical_partitions,
        )

    # The trainer's start record lists this process's canonical partitions as its readers.
    @property
    def num_readers(self) -> int:
        return self.layout.partitions

    @property
    def readers_per_process(self) -> int:
        return self.layout.per_process

    def _resume_point(self, saved: _Saved | None) -> tuple[dict[int, tuple[int, int]], int]:
        """(position of each of this process's partitions, process-stream index) to start from."""
        layout, own = self.layout, self.layout.process_partitions()
        if saved is None:
            return {p: (0, 0) for p in own}, 0
        if saved.urls_count != len(self.spec.urls):
            furthest = max((epoch for epoch, _ in saved.positions.values()), default=-1)
            if self.rank == 0:
                log.warning(
                    "the data stream cannot resume exactly: the checkpoint was written over %s shards, "
                    "this run has %d; every partition starts epoch %d from its beginning",
                    saved.urls_count if saved.urls_count != -1 else "other", len(self.spec.urls), furthest + 1,
                )
            return {p: (furthest + 1, 0) for p in own}, 0
        if saved.legacy and self.rank == 0:
            log.warning("the checkpoint's data stream predates canonical partitions: each of its %d reader "
                        "streams continues where it stopped, as one partition", saved.partitions)
        positions = {p: saved.positions.get(p, (0, 0)) for p in own}
        if saved.world_size == layout.world_size and self.rank in saved.consumed:
            return positions, saved.consumed[self.rank]  # the same process count: exact at any point
        if not saved.legacy:
            problem = resume_problem(saved.partitions, saved.world_size, saved.images_seen or 0,
                                     saved.step or 0, world_size=layout.world_size,
                                     batch_size=self.spec.batch_size)
            missing = [p for p in own if p not in saved.positions]
            if problem is None and missing:
                problem = f"its data state lacks canonical partitions {missing[:8]} (a partial save)"
            if problem is not None:
                raise UserError(f"data: cannot resume exactly on {layout.world_size} processes: {problem}")
        totals = saved.totals()
        if totals is None or len(set(totals.values())) > 1:
            if not saved.legacy:
                raise UserError(f"data: cannot resume exactly on {layout.world_size} processes: the "
                                "checkpoint's partitions had not all delivered the same number of samples")
            return positions, min(totals[p] for p in own) * layout.per_process if totals else 0
        if self.rank == 0:
            log.info("data stream restored exactly: a %d-process checkpoint read by %d processes (%d "
                     "canonical partitions, %d per process)", saved.world_size, layout.world_size,
                     layout.partitions, layout.per_process)
        return positions, next(iter(totals.values())) * layout.per_process

    def state_dict(self) -> dict:
        """This process's position after the last batch it consumed (plain JSON)."""
        return {
            "format": STATE_FORMAT,
            "partitions": self.layout.partitions,
            "world_size": self.layout.world_size,
            "rank": self.rank,
            "readers": self.layout.readers,
            "urls_count": len(self.spec.urls),
            "consumed": self.consumed,
            "positions": {str(p): list(self.positions[p]) for p in sorted(self.positions)},
        }

    def __iter__(self):
        return self

    def peek(self) -> torch.Tensor:
        """The next batch, without consuming it (the next ``next()`` returns it again)."""
        return self.peek_batch().images

    def peek_batch(self) -> Batch:
        """`peek`, as a `Batch`."""
        if self._pending is None:
            self._pending = self._fetch()
        return _as_batch(self._pending)

    def _fetch(self) -> dict:
        """The next micro-batch: one piece from each reader (DataLoader takes them in turn),
        interleaved back into the order of the process stream, whatever the number of readers."""
        if self._iterator is None:
            self._iterator = iter(self.loader)
        pieces = [next(self._iterator) for _ in range(self.layout.readers)]
        if len(pieces) == 1:
            return pieces[0]
        micro = pieces[0]["micro"]
        assert [(p["reader"], p["micro"]) for p in pieces] == [(r, micro) for r in range(len(pieces))], \
            "DataLoader did not take the readers' pieces in turn"
        places = [range(p["place"], self.spec.batch_size, len(pieces)) for p in pieces]
        batch = {"images": _interleaved([p["images"] for p in pieces], places, self.pin_memory),
                 "keys": _interleaved_lists([p["keys"] for p in pieces], places),
                 "sources": _interleaved_lists([p["sources"] for p in pieces], places),
                 "positions": {k: v for p in pieces for k, v in p["positions"].items()},
                 "fields": {name: _interleaved_lists([p["fields"][name] for p in pieces], places)
                            for name in self.spec.fields}}
        if self.spec.labels:
            batch["labels"] = _interleaved([p["labels"] for p in pieces], places, self.pin_memory)
        return batch

    def __next__(self) -> torch.Tensor:
        return self.next_batch().images

    def next_batch(self) -> Batch:
        """The next batch with its labels and fields; advances the stream as ``next()`` does."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._fetch()
        self.positions.update({int(p): (int(e), int(d)) for p, (e, d) in batch["positions"].items()})
        self.consumed += len(batch["keys"])
        if self._record_keys:
            faults.record_consumed([f"{source}/{key}" for source, key in zip(batch["sources"], batch["keys"])])
        return _as_batch(batch)

    def close(self) -> None:
        """Shut the data workers down now, while their queues are intact.

        Left to garbage collection after a worker's error (the exception's traceback holds the
        iterator in a reference cycle), the queues can be finalised before the iterator, the
        workers never receive their stop message, and each is waited for 5 s, then killed.
        """
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


def _interleaved(tensors: list[torch.Tensor], places: list[range], pin: bool) -> torch.Tensor:
    """One tensor whose rows ``places[k]`` are ``tensors[k]`` (in pinned memory when asked)."""
    out = torch.empty((sum(len(p) for p in places), *tensors[0].shape[1:]), dtype=tensors[0].dtype,
                      pin_memory=pin)
    for tensor, place in zip(tensors, places):
        out[place.start::place.step] = tensor
    return out


def _interleaved_lists(lists: list[list], places: list[range]) -> list:
    out: list = [None] * sum(len(p) for p in places)
    for values, place in zip(lists, places):
        out[place.start::place.step] = values
    return out


def _as_batch(batch: dict) -> Batch:
    return Batch(images=batch["images"], labels=batch.get("labels"), keys=batch["keys"],
                 fields=batch["fields"] if batch["fields"] else {})


# ---------------------------------------------------------------------------------------------
# Held-out data: one finite pass


class EvalShards(IterableDataset):
    """One pass over this process's share of the held-out shards, in order, unshuffled."""

    def __init__(self, urls: list[str], image_size: int, channels: int, batch_size: int,
                 limit: int | None, labels: bool = False, fetch: FetchPolicy | None = None,
                 latents: bool = False):
        self.latents = latents
        self.urls = urls
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.limit = limit
        self.labels = labels
        self.fetch = fetch or FetchPolicy()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers]
        limit = None if self.limit is None else self.limit // workers + (worker < self.limit % workers)
        images: list[np.ndarray] = []
        labels: list[int] = []
        count = 0
        if limit == 0:
            return
        shards = opened_shards(urls, self.fetch)
        try:
            for url, downloaded in shards:
                for key, sample in iter_raw_samples(url, downloaded):
                    images.append(decode_latent(sample, key, url) if self.latents
                                  else decode_image(sample, key, url, self.image_size, self.channels))
                    if self.labels:
                        labels.append(sample_label(sample, key, url))
                    count += 1
                    if len(images) == self.batch_size:
                        yield self._batch(images, labels)
                        images, labels = [], []
                    if limit is not None and count >= limit:
                        break
                if limit is not None and count >= limit:
                    break
        finally:
            shards.close()
        if images:
            yield self._batch(images, labels)

    def _batch(self, images: list[np.ndarray], labels: list[int]):
        tensor = torch.from_numpy(np.stack(images))
        if not self.labels:
            return tensor
        return Batch(images=tensor, labels=torch.tensor(labels, dtype=torch.int64))


def eval_batches(
    shards: ShardSet,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    image_size: int,
    channels: int,
    max_images: int | None = None,
    labels: bool = False,
    fetch: FetchPolicy | None = None,
) -> DataLoader:
    """A finite loader over this process's share of held-out shards (shards split by rank).

    It yields uint8 [B, C, H, W] tensors (images centre-cropped to `image_size` where stored at
    another size; latent shards: their fp16 arrays), or `Batch` objects with their labels when
    ``labels`` is true.
    """
    urls = list(shards.urls[rank::world_size])
    limit = None
    if max_images is not None:
        limit = max_images // world_size + (rank < max_images % world_size)
    workers = min(num_workers, len(urls))
    return DataLoader(
        EvalShards(urls, image_size, channels, batch_size, limit, labels, fetch, is_latent(shards)),
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
    )
