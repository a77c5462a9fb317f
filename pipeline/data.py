"""Image batches from WebDataset shards: split across processes and workers, shuffled, resumable.

Every process runs ``num_workers`` *readers* (one per DataLoader worker, or one in-process reader
when ``num_workers`` is 0); across the job there are ``world_size × num_workers`` readers. For each
epoch, the shard list is permuted with the run's seed and reader ``r`` takes every
``num_readers``-th shard of that permutation, so processes and workers never read the same shard
in the same epoch. Each reader streams its shards' raw bytes through a seeded shuffle buffer,
decodes the survivors into uint8 ``[C, H, W]`` arrays and yields whole batches. Streams are
endless (epoch after epoch): training is counted in steps, and no reader ever runs dry while the
others wait in a collective.

Resumable position. Everything a reader does is a deterministic function of (seed, epoch, reader
index), so its position is two numbers: the epoch and how many samples of it were delivered.
Each batch carries its reader's position after the batch; the training process records the
position of the last batch it actually consumed from each reader, and which reader comes next
(PyTorch's DataLoader takes batches from its workers strictly in turn). On resume each reader
replays its epoch from the start up to that position, reading raw bytes but decoding nothing,
and the DataLoader's workers are rotated so that the reader due next delivers first: the stream
after resume is the stream the uninterrupted run would have read.

When the number of readers changes between runs (other process count or worker count), exact
positions cannot be carried over; the stream then restarts at the beginning of the epoch after
the furthest one any reader had reached, with a warning.

Per-sample randomness. An image stored at another size than ``image_size`` is cut to a square
of it at load time (`pipeline.decode`); the place of a random crop and the horizontal flip are
drawn from (seed, epoch, the sample's shard file name and key), so they follow the sample, not
the reader: a resumed run, or one with another number of readers, treats every sample alike.

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
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.decode import IMAGE_MEMBERS, decode_square
from pipeline.errors import UserError
# Shard lists and shard reading live in their own modules; their names stay importable from here.
from pipeline.shard_io import FetchPolicy, iter_raw_samples, opened_shards
from pipeline.shards import ShardSet, check_shards_match, resolve_shards

__all__ = [
    "Batch", "FetchPolicy", "ShardSet", "TrainingBatches", "check_shards_match", "decode_image",
    "eval_batches", "iter_raw_samples", "reader_batches", "resolve_shards", "shards_for_reader",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = IMAGE_MEMBERS
CROPS = ("center", "random")


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


# ---------------------------------------------------------------------------------------------
# One reader's endless, deterministic stream


def _mix(*numbers: int) -> int:
    """A 64-bit seed from several integers (splitmix64 steps); stable across processes."""
    state = 0x9E3779B97F4A7C15
    for number in numbers:
        state = (state ^ (number & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state


def shards_for_reader(
    urls: tuple[str, ...], seed: int, epoch: int, reader: int, num_readers: int
) -> list[str]:
    """This reader's shards in this epoch: every num_readers-th of a seeded permutation."""
    order = list(urls)
    random.Random(_mix(seed, epoch, 0x5A)).shuffle(order)
    return order[reader::num_readers]


@dataclass(frozen=True)
class ReaderSpec:
    urls: tuple[str, ...]
    seed: int
    num_readers: int
    image_size: int
    channels: int
    batch_size: int
    shuffle_buffer: int
    random_flip: bool
    crop: str = "center"  # "center" or "random": where the square is cut from a non-square image
    labels: bool = False  # deliver each sample's .cls label (an error where one is missing)
    fields: tuple[str, ...] = ()  # other members to deliver per sample ("txt", "json", ...)
    fetch: FetchPolicy = FetchPolicy()

    @property
    def rich(self) -> bool:
        """Whether batches carry more than images."""
        return self.labels or bool(self.fields)


class ReaderStream:
    """Endless stream of (epoch, delivered_in_epoch, key, url, sample bytes) for one reader."""

    def __init__(self, spec: ReaderSpec, reader: int, start_epoch: int = 0, skip: int = 0):
        self.spec = spec
        self.reader = reader
        self.start_epoch = start_epoch
        self.skip = skip

    def _epoch(self, epoch: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        spec = self.spec
        shards = shards_for_reader(spec.urls, spec.seed, epoch, self.reader, spec.num_readers)
        rng = random.Random(_mix(spec.seed, epoch, self.reader, 0xB0F))
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
                raise UserError(f"data reader {self.reader} found no samples in its shards")
            epoch, skip = epoch + 1, 0


def sample_seed(seed: int, epoch: int, url: str, key: str) -> int:
    """The seed of one sample's randomness (flip, crop) in one epoch.

    A function of the sample's identity (its shard's file name and its key, so the same wherever
    the shards are stored) and of the epoch, never of which reader or worker reads it: a run
    resumed, or run on another number of processes, crops and flips each sample as the
    uninterrupted run does.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.blake2b(f"{name}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8)
    return _mix(seed, epoch, int.from_bytes(digest.digest(), "little"))


def augment(spec: ReaderSpec, epoch: int, url: str, key: str) -> tuple[float, bool]:
    """(crop offset along the longer side, horizontal flip) of a sample in an epoch."""
    if spec.crop == "center" and not spec.random_flip:
        return 0.5, False
    state = sample_seed(spec.seed, epoch, url, key)
    offset = (_mix(state, 0xC0) >> 11) / float(1 << 53) if spec.crop == "random" else 0.5
    return offset, spec.random_flip and _mix(state, 0xF11F) & 1 == 1


def reader_batches(spec: ReaderSpec, reader: int, start_epoch: int, skip: int):
    """Decoded uint8 batches with the reader's position after each batch.

    Each batch is a dict: ``images`` uint8 [B, C, H, W], the position (``reader``, ``epoch``,
    ``delivered``) and, when the spec asks for them, ``labels`` (int64 [B]), ``keys`` and one
    list per asked field.
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    fields: dict[str, list] = {name: [] for name in spec.fields}
    for epoch, delivered, key, url, sample in ReaderStream(spec, reader, start_epoch, skip):
        offset, flip = augment(spec, epoch, url, key)
        image = decode_image(sample, key, url, spec.image_size, spec.channels, offset)
        images.append(image[:, :, ::-1] if flip else image)
        if spec.rich:
            keys.append(key)
            if spec.labels:
                labels.append(sample_label(sample, key, url))
            for name in spec.fields:
                fields[name].append(sample_field(sample, name, key, url))
        if len(images) == spec.batch_size:
            batch = {"images": torch.from_numpy(np.stack(images)), "reader": reader,
                     "epoch": epoch, "delivered": delivered}
            if spec.rich:
                batch["keys"], batch["fields"] = keys, fields
                if spec.labels:
                    batch["labels"] = torch.tensor(labels, dtype=torch.int64)
                labels, keys, fields = [], [], {name: [] for name in spec.fields}
            images = []
            yield batch


@dataclass
class Batch:
    """One batch with what travels beside its images.

    ``images`` stays the uint8 [B, C, H, W] tensor every model takes; ``labels`` (int64 [B]) is
    there when labels were asked for; ``fields`` holds one list of B values per asked member
    (``txt``: str, ``json``: parsed object, others: bytes; None where a sample lacks it).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    fields: dict[str, list] = field(default_factory=dict)


class TrainingShards(IterableDataset):
    """The readers of one process, one per DataLoader worker (rotated for exact resume)."""

    def __init__(
        self,
        spec: ReaderSpec,
        rank: int,
        readers_per_process: int,
        positions: dict[int, tuple[int, int]],
        rotation: int,
    ):
        self.spec = spec
        self.rank = rank
        self.readers_per_process = readers_per_process
        self.positions = positions
        self.rotation = rotation

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.rotation) % self.readers_per_process
        reader = self.rank * self.readers_per_process + local
        epoch, skip = self.positions.get(reader, (0, 0))
        yield from reader_batches(self.spec, reader, epoch, skip)


class TrainingBatches:
    """Iterator of uint8 batches for one process, with a state_dict of its exact position.

    ``next()`` gives the images tensor; `next_batch` gives a `Batch` with the labels (when built
    with ``labels=True``) and the asked ``fields`` beside it. Both advance the same stream.
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
    ):
        if crop not in CROPS:
            raise UserError(f"data.crop: {crop!r} is not one of {', '.join(CROPS)}")
        self.readers_per_process = max(num_workers, 1)
        num_readers = world_size * self.readers_per_process
        if len(shards.urls) < num_readers:
            raise UserError(
                f"data.shards: {len(shards.urls)} shard(s) for {num_readers} readers "
                f"({world_size} process(es) × {self.readers_per_process} worker(s)); every reader "
                "needs its own shard: lower data.num_workers or write smaller shards "
                "(data-prep --samples-per-shard)"
            )
        self.rank = rank
        self.num_readers = num_readers
        self.spec = ReaderSpec(
            urls=shards.urls,
            seed=seed,
            num_readers=num_readers,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            random_flip=random_flip,
            crop=crop,
            labels=labels,
            fields=tuple(name.lower().lstrip(".") for name in fields),
            fetch=fetch or FetchPolicy(),
        )
        self.positions: dict[int, tuple[int, int]] = {}
        self.next_local = 0
        if state is not None:
            self._restore(state)
        dataset = TrainingShards(
            self.spec, rank, self.readers_per_process, dict(self.positions), self.next_local
        )
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=False,
            multiprocessing_context="fork" if num_workers and os.name == "posix" else None,
            # Its own generator: otherwise each iter() draws the workers' base seed from the global
            # torch RNG, and a resumed run's RNG would be one draw ahead of the uninterrupted one.
            generator=torch.Generator().manual_seed(_mix(seed, rank, 0xD1)),
        )
        self._iterator = None
        self._pending: dict | None = None

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
    ) -> "TrainingBatches":
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
        )

    def _restore(self, state: dict) -> None:
        if state.get("num_readers") != self.num_readers or state.get("urls_count") != len(self.spec.urls):
            furthest = max((p[0] for p in state.get("positions", {}).values()), default=-1)
            self.positions = {
                r: (furthest + 1, 0)
                for r in range(self.rank * self.readers_per_process, (self.rank + 1) * self.readers_per_process)
            }
            self.next_local = 0
            if self.rank == 0:
                log.warning(
                    "the data stream cannot resume exactly: the checkpoint was written with %s "
                    "readers over %s shards, this run has %d readers over %d shards; every reader "
                    "starts epoch %d from its beginning",
                    state.get("num_readers"), state.get("urls_count"), self.num_readers,
                    len(self.spec.urls), furthest + 1,
                )
            return
        self.positions = {int(r): (int(e), int(d)) for r, (e, d) in state["positions"].items()}
        self.next_local = int(state["next_local"])

    def state_dict(self) -> dict:
        """Position of this process's readers after the last batch it consumed."""
        return {
            "num_readers": self.num_readers,
            "urls_count": len(self.spec.urls),
            "positions": {str(r): list(p) for r, p in self.positions.items()},
            "next_local": self.next_local,
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
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return next(self._iterator)

    def __next__(self) -> torch.Tensor:
        return self.next_batch().images

    def next_batch(self) -> Batch:
        """The next batch with its labels and fields; advances the stream as ``next()`` does."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._fetch()
        reader = int(batch["reader"])
        self.positions[reader] = (int(batch["epoch"]), int(batch["delivered"]))
        self.next_local = (reader - self.rank * self.readers_per_process + 1) % self.readers_per_process
        return _as_batch(batch)

    def close(self) -> None:
        # Shut the workers down now rather than at garbage collection.
        self._iterator = None


def _as_batch(batch: dict) -> Batch:
    return Batch(images=batch["images"], labels=batch.get("labels"), keys=batch.get("keys", []),
                 fields=batch.get("fields", {}))


# ---------------------------------------------------------------------------------------------
# Held-out data: one finite pass


class EvalShards(IterableDataset):
    """One pass over this process's share of the held-out shards, in order, unshuffled."""

    def __init__(self, urls: list[str], image_size: int, channels: int, batch_size: int,
                 limit: int | None, labels: bool = False, fetch: FetchPolicy | None = None):
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
                    images.append(decode_image(sample, key, url, self.image_size, self.channels))
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
    another size), or `Batch` objects with their labels when ``labels`` is true.
    """
    urls = list(shards.urls[rank::world_size])
    limit = None
    if max_images is not None:
        limit = max_images // world_size + (rank < max_images % world_size)
    workers = min(num_workers, len(urls))
    return DataLoader(
        EvalShards(urls, image_size, channels, batch_size, limit, labels, fetch),
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
    )
