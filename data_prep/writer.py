"""Deterministic WebDataset shards and the staging of a whole split.

A shard is a POSIX (ustar) tar whose members are ``<key>.<ext>``: ``key`` is the sample's
zero-padded index within the split (``%09d``), or the key it had in the source shards when
``data-prep reshard`` keeps them, ``ext`` one of ``png``/``jpg``/``webp`` (image bytes), ``cls``
(label as ASCII digits, only when there is one), ``json`` (``{"source": ...}``, or the source
sample's own metadata) and any other member a resharded sample carried (``txt`` captions, ...).
The members of one sample are consecutive and sorted by name.

Same input, same arguments, same bytes: every tar header carries mtime 0, uid/gid 0, empty
user/group names and mode 0644, and nothing else varies. Each shard is written under a temporary
name, hashed while written, and renamed when complete. A whole split is built in a staging
directory next to its destination and moved into place only when every shard and the manifest
are complete, so a failed or interrupted run never leaves a half-written split behind.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, write_manifest

SHARD_PATTERN = "shard-{:06d}.tar"
KEY_FORMAT = "{:09d}"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One encoded image on its way into a shard; the writer gives it its key unless it has one."""

    image: bytes
    source: str  # relative path, "sklearn.digits/<index>", or "<source shard>/<key>"
    label: int | None = None
    key: str | None = None  # kept from the source shards (reshard); None: the sample's index
    extra: tuple[tuple[str, bytes], ...] = ()  # other members written as they are: (ext, bytes)


def encode_image(image: Image.Image, encoding: str, quality: int = 95) -> bytes:
    """Encode an 8-bit "L" or "RGB" image without metadata (so bytes depend on pixels only)."""
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif encoding == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    elif encoding == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return buffer.getvalue()


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, handle):
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self._handle.write(data)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.num_bytes


def _member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Writes samples into ``shard-NNNNNN.tar`` files of at most `samples_per_shard` samples."""

    def __init__(self, directory: str | os.PathLike, samples_per_shard: int, encoding: str):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.directory = Path(directory)
        self.samples_per_shard = samples_per_shard
        self.encoding = encoding
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self.label_counts: dict[int, int] = {}  # samples written per label
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._hashing: _HashingFile | None = None
        self._in_shard = 0

    def write(self, sample: Sample) -> None:
        if self._tar is None:
            self._open()
        key = sample.key if sample.key is not None else KEY_FORMAT.format(self.num_samples)
        members = {f"{key}.{extension}": data for extension, data in sample.extra}
        members[f"{key}.{self.encoding}"] = sample.image
        members.setdefault(f"{key}.json", json.dumps({"source": sample.source}).encode("ascii"))
        if sample.label is not None:
            members.setdefault(f"{key}.cls", str(int(sample.label)).encode("ascii"))
            self.label_counts[int(sample.label)] = self.label_counts.get(int(sample.label), 0) + 1
        for name in sorted(members):
            self._tar.addfile(_member(name, members[name]), io.BytesIO(members[name]))
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish()

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file)."""
        if self._tar is not None:
            self._file.close()
            os.unlink(self._tmp_path)
            self._tar = None

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._final_path = self.directory / name
        self._tmp_path = self.directory / (name + ".tmp")
        self._file = open(self._tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self._final_path)
        self.shards.append(ShardInfo(name=self._final_path.name, num_samples=self._in_shard,
                                     num_bytes=self._hashing.num_bytes,
                                     sha256=self._hashing.sha256.hexdigest()))
        self._tar = None
        self._in_shard = 0


def write_split(samples: Iterable[Sample], directory: str | os.PathLike, *, split: str,
                image_size: int, channels: int, encoding: str, samples_per_shard: int,
                source: str, skipped: Iterable[dict] = (), num_classes: int = 0,
                class_names: tuple[str, ...] = ()) -> Manifest:
    """Write `samples` as shards into `directory` (which must exist), then its manifest (with the
    classes' names and this split's count of each, when `class_names` are given)."""
    writer = ShardWriter(directory, samples_per_shard, encoding)
    try:
        for sample in samples:
            writer.write(sample)
    except BaseException:
        writer.abort()
        raise
    return finish_split(writer, split=split, image_size=image_size, channels=channels,
                        source=source, skipped=skipped, num_classes=num_classes,
                        class_names=class_names)


def finish_split(writer: ShardWriter, *, split: str, image_size: int, channels: int, source: str,
                 skipped: Iterable[dict] = (), num_classes: int = 0, keys: str = "index",
                 class_names: tuple[str, ...] = ()) -> Manifest:
    """Close `writer`'s last shard and write the manifest of what it wrote."""
    shards = writer.close()
    class_counts = tuple(writer.label_counts.get(label, 0) for label in range(num_classes)) if class_names else ()
    manifest = Manifest(
        split=split, image_size=image_size, channels=channels, encoding=writer.encoding,
        num_samples=writer.num_samples, shards=tuple(shards), skipped=tuple(skipped),
        source=source, num_classes=num_classes, keys=keys,
        class_names=tuple(class_names), class_counts=class_counts,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    write_manifest(manifest, writer.directory)
    return manifest


class StagedOutput:
    """The split directories of one run, built in staging and committed together.

    ``OUT/<split>`` that exists and is not empty is refused unless `overwrite`; with
    `overwrite`, it is replaced only at `commit`, after everything new is complete. A stale split
    of an earlier run that this run does not write (a ``test`` split when there is no holdout
    now) is removed at commit too when `overwrite`, so OUT never mixes two runs.
    """

    def __init__(self, out: str | os.PathLike, splits: Iterable[str], overwrite: bool):
        self.out = Path(out)
        self.splits = list(splits)
        self.overwrite = overwrite
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: output exists and is not a directory")
        for split in SPLITS:
            final = self.out / split
            if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
                raise UserError(f"{final}: output split already exists and is not empty "
                                f"(pass --overwrite to replace it)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging: dict[str, Path] = {}
        try:
            for split in self.splits:
                path = self.out / f".{split}.staging"
                if path.exists():  # left by an interrupted run
                    shutil.rmtree(path)
                path.mkdir()
                self.staging[split] = path
        except BaseException:
            self.discard()
            raise

    def path(self, split: str) -> Path:
        return self.staging[split]

    def commit(self) -> dict[str, Path]:
        finals = {}
        for split in SPLITS:
            final = self.out / split
            if split in self.staging:
                if final.is_dir():
                    shutil.rmtree(final)
                elif final.exists():
                    final.unlink()
                os.replace(self.staging[split], final)
                finals[split] = final
            elif self.overwrite and (final / MANIFEST_NAME).is_file():
                shutil.rmtree(final)
        self.staging = {}
        return finals

    def discard(self) -> None:
        for path in self.staging.values():
            shutil.rmtree(path, ignore_errors=True)
        self.staging = {}
