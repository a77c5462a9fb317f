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
"""

from __future__ import annotations

import io
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import UserError
from pipeline.manifest import Manifest, find_manifest, read_manifest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")


# ---------------------------------------------------------------------------------------------
# Shard lists


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs, with the manifest when the shards came from a prepared directory."""

    urls: tuple[str, ...]
    manifest: Manifest | None = None
    expected_bytes: tuple[int | None, ...] = ()


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def resolve_shards(spec: str | list[str] | tuple[str, ...], key: str = "data.shards") -> ShardSet:
    """The shards named by a config value, checked to exist (pipe: URLs excepted).

    Accepted forms: a directory prepared by ``data-prep`` (its manifest.json lists the shards),
    a brace pattern, a single tar path, a list of any of these, or ``pipe:`` commands.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise UserError(f"{key}: the shard list is empty")
    urls: list[str] = []
    expected: list[int | None] = []
    manifest: Manifest | None = None
    for item in items:
        if item.startswith("pipe:"):
            urls.append(item)
            expected.append(None)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            manifest_path = find_manifest(path)
            if manifest_path is None:
                raise UserError(
                    f"{key}: {path} has no manifest.json; prepare it with `data-prep` "
                    "or list its .tar shards explicitly"
                )
            manifest = read_manifest(manifest_path)
            for shard, shard_path in zip(manifest.shards, manifest.shard_paths(manifest_path.parent)):
                urls.append(str(shard_path))
                expected.append(shard.num_bytes)
            continue
        expanded = _expand_braces(str(path)) if "{" in item else [str(path)]
        urls.extend(expanded)
        expected.extend([None] * len(expanded))
    for url, size in zip(urls, expected):
        if url.startswith("pipe:"):
            continue
        if not os.path.isfile(url):
            raise UserError(f"{key}: shard {url} does not exist")
        if size is not None and os.path.getsize(url) != size:
            raise UserError(
                f"{key}: shard {url} is {os.path.getsize(url)} bytes but its manifest says {size}; "
                "it was truncated or changed (check with `data-prep verify`)"
            )
    if not urls:
        raise UserError(f"{key}: no shards found in {spec!r}")
    return ShardSet(tuple(urls), manifest, tuple(expected))


def check_shards_match(shards: ShardSet, image_size: int, channels: int, key: str) -> None:
    """Fail early when a prepared directory's images differ from what the config declares."""
    manifest = shards.manifest
    if manifest is None:
        return
    if manifest.image_size != image_size or manifest.channels != channels:
        raise UserError(
            f"{key}: the shards hold {manifest.channels}-channel {manifest.image_size}×"
            f"{manifest.image_size} images but the config says data.channels={channels}, "
            f"data.image_size={image_size}"
        )


# ---------------------------------------------------------------------------------------------
# Reading one shard


def _open(url: str):
    if url.startswith("pipe:"):
        import webdataset

        return webdataset.gopen(url, "rb")
    return open(url, "rb", buffering=1 << 20)


class _CountingReader:
    """Passes reads through, counting bytes and keeping the last few KiB for the end check."""

    TAIL = 1 << 15

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.TAIL :]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def _check_archive_end(reader: _CountingReader, end_of_members: int) -> None:
    """A complete tar ends, right after its last member, in zero blocks (at least two).

    Python's tarfile in stream mode takes a header cut short, or a garbled one, after the first
    member for the end of the archive; without this check a damaged shard would lose its
    remaining samples silently.
    """
    reader.drain()
    trailer = reader.total - end_of_members
    if trailer < 1024 or trailer > len(reader.tail) or reader.total % 512:
        raise tarfile.ReadError(
            f"archive ends abnormally after byte {end_of_members} of {reader.total}"
        )
    if reader.tail[len(reader.tail) - trailer :].count(0) != trailer:
        raise tarfile.ReadError(f"unreadable data after byte {end_of_members}")


def iter_raw_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, in file order.

    Members are grouped by the part of their name before the first dot of the basename, the
    WebDataset convention. A damaged tar is a UserError naming the shard.
    """
    stream = _CountingReader(_open(url))
    current_key: str | None = None
    current: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if key != current_key:
                    if current_key is not None:
                        yield current_key, current
                    current_key, current = key, {}
                current[extension.lower()] = data
            end_of_members = tar.offset
        _check_archive_end(stream, end_of_members)
        if current_key is not None:
            yield current_key, current
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UserError(
            f"shard {url} is damaged or unreadable ({exc}); check it with `data-prep verify`"
        ) from None
    finally:
        try:
            stream.close()
        except Exception as exc:  # a failing pipe: command reports its status on close
            raise UserError(f"shard {url}: {exc}") from None


def decode_image(
    sample: dict[str, bytes], key: str, url: str, image_size: int, channels: int
) -> np.ndarray:
    """uint8 [C, H, W] array of a sample's image; a UserError names the shard and key otherwise."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            data = sample[extension]
            break
    else:
        raise UserError(f"shard {url}: sample {key} has no image (members: {sorted(sample)})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = "L" if channels == 1 else "RGB"
            if image.mode != mode:
                image = image.convert(mode)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as exc:
        raise UserError(f"shard {url}: sample {key} is not a decodable image ({exc})") from None
    if array.shape[0] != image_size or array.shape[1] != image_size:
        raise UserError(
            f"shard {url}: sample {key} is {array.shape[1]}×{array.shape[0]}, "
            f"expected {image_size}×{image_size} (data.image_size)"
        )
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


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
        for url in shards:
            for key, sample in iter_raw_samples(url):
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


def _flip(spec: ReaderSpec, epoch: int, reader: int, index: int) -> bool:
    return spec.random_flip and _mix(spec.seed, epoch, reader, index, 0xF11F) & 1 == 1


def reader_batches(spec: ReaderSpec, reader: int, start_epoch: int, skip: int):
    """Decoded uint8 batches with the reader's position after each batch."""
    images: list[np.ndarray] = []
    for epoch, delivered, key, url, sample in ReaderStream(spec, reader, start_epoch, skip):
        image = decode_image(sample, key, url, spec.image_size, spec.channels)
        if _flip(spec, epoch, reader, delivered):
            image = image[:, :, ::-1]
        images.append(image)
        if len(images) == spec.batch_size:
            batch = torch.from_numpy(np.stack(images))
            images = []
            yield {"images": batch, "reader": reader, "epoch": epoch, "delivered": delivered}


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
    """Iterator of uint8 batches for one process, with a state_dict of its exact position."""

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
    ):
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
        if self._pending is None:
            self._pending = self._fetch()
        return self._pending["images"]

    def _fetch(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return next(self._iterator)

    def __next__(self) -> torch.Tensor:
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._fetch()
        reader = int(batch["reader"])
        self.positions[reader] = (int(batch["epoch"]), int(batch["delivered"]))
        self.next_local = (reader - self.rank * self.readers_per_process + 1) % self.readers_per_process
        return batch["images"]

    def close(self) -> None:
        # Shut the workers down now rather than at garbage collection.
        self._iterator = None


# ---------------------------------------------------------------------------------------------
# Held-out data: one finite pass


class EvalShards(IterableDataset):
    """One pass over this process's share of the held-out shards, in order, unshuffled."""

    def __init__(self, urls: list[str], image_size: int, channels: int, batch_size: int, limit: int | None):
        self.urls = urls
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.limit = limit

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers]
        limit = None if self.limit is None else self.limit // workers + (worker < self.limit % workers)
        images: list[np.ndarray] = []
        count = 0
        for url in urls:
            for key, sample in iter_raw_samples(url):
                if limit is not None and count >= limit:
                    break
                images.append(decode_image(sample, key, url, self.image_size, self.channels))
                count += 1
                if len(images) == self.batch_size:
                    yield torch.from_numpy(np.stack(images))
                    images = []
        if images:
            yield torch.from_numpy(np.stack(images))


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
) -> DataLoader:
    """A finite loader over this process's share of held-out shards (shards split by rank)."""
    urls = list(shards.urls[rank::world_size])
    limit = None
    if max_images is not None:
        limit = max_images // world_size + (rank < max_images % world_size)
    workers = min(num_workers, len(urls))
    return DataLoader(
        EvalShards(urls, image_size, channels, batch_size, limit),
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
    )
