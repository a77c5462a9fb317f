"""Check written splits against their manifests: files, sizes, hashes, sample counts, images.

`verify_split` returns one line per problem (an empty list means the split is sound). Problems
with the data are reported, never raised; only a missing or invalid manifest is a `UserError`,
since then there is nothing to check against.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

from PIL import Image

from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_NAME, Manifest, find_split_dirs, read_manifest

_MEMBER = re.compile(r"^(\d{9})\.([a-z]+)$")
# a key kept from source shards (reshard): any name without a dot in its last part
_SOURCE_MEMBER = re.compile(r"^((?:[^/]+/)*[^./]+)\.([A-Za-z0-9_.-]+)$")
_MODES = {1: "L", 3: "RGB"}


def verify(out: str | os.PathLike, decode: bool = True) -> tuple[list[Path], list[str]]:
    """(split directories checked, problems) for OUT or a single split directory."""
    split_dirs = find_split_dirs(out)
    if not split_dirs:
        raise UserError(f"{out}: no {MANIFEST_NAME} here or in its subdirectories "
                        f"(is this a data-prep output directory?)")
    problems: list[str] = []
    for directory in split_dirs:
        problems.extend(verify_split(directory, decode=decode))
    return split_dirs, problems


def verify_split(directory: str | os.PathLike, decode: bool = True) -> list[str]:
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems: list[str] = []
    next_key = 0
    for shard in manifest.shards:
        path = directory / shard.name
        if not path.is_file():
            problems.append(f"{path}: missing shard")
            next_key += shard.num_samples
            continue
        num_bytes = path.stat().st_size
        if num_bytes != shard.num_bytes:
            problems.append(f"{path}: size {num_bytes} bytes, manifest says {shard.num_bytes}")
        digest = _sha256(path)
        if digest != shard.sha256:
            problems.append(f"{path}: sha256 {digest[:12]}..., "
                            f"manifest says {shard.sha256[:12]}...")
        problems.extend(_check_contents(path, manifest, shard.num_samples, next_key, decode))
        next_key += shard.num_samples
    listed = {shard.name for shard in manifest.shards}
    for extra in sorted(directory.glob("shard-*.tar*")):
        if extra.name not in listed:
            problems.append(f"{extra}: not listed in the manifest (left by another run?)")
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_contents(path: Path, manifest: Manifest, expected: int, first_key: int,
                    decode: bool) -> list[str]:
    """Problems in the samples of one shard: member names, counts, keys and images."""
    problems: list[str] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    pattern = _MEMBER if manifest.keys == "index" else _SOURCE_MEMBER
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                match = pattern.match(member.name)
                if not member.isfile() or match is None:
                    problems.append(f"{path}: unexpected member {member.name!r}")
                    continue
                key, ext = match.groups()
                ext = ext.lower()
                if not samples or samples[-1][0] != key:
                    if key in seen:
                        problems.append(f"{path}: members of sample {key} are not consecutive")
                    seen.add(key)
                    samples.append((key, {}))
                samples[-1][1][ext] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{path}: unreadable tar after {len(samples)} samples: {exc}")
        return problems
    if len(samples) != expected:
        problems.append(f"{path}: {len(samples)} samples, manifest says {expected}")
    for index, (key, _members) in enumerate(samples):
        if manifest.keys == "index" and int(key) != first_key + index:
            problems.append(f"{path}: sample key {key}, expected {first_key + index:09d}")
            break  # one out-of-order key shifts all that follow; one line is enough
    for key, members in samples:
        where = f"{path}: sample {key}"
        if manifest.encoding not in members:
            problems.append(f"{where}: no .{manifest.encoding} image")
            continue
        if manifest.num_classes and "cls" not in members:
            problems.append(f"{where}: no .cls label")
        if decode:
            problems.extend(_check_image(where, members[manifest.encoding], manifest))
    return problems


def _check_image(where: str, data: bytes, manifest: Manifest) -> list[str]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size, mode = image.size, image.mode
    except Exception as exc:  # any decoding failure is a problem to report, not a crash
        return [f"{where}: image does not decode: {exc}"]
    expected_mode = _MODES[manifest.channels]
    problems = []
    if size != (manifest.image_size, manifest.image_size):
        problems.append(f"{where}: image {size[0]}x{size[1]}, manifest says "
                        f"{manifest.image_size}x{manifest.image_size}")
    if mode != expected_mode:
        problems.append(f"{where}: image mode {mode}, manifest says {expected_mode}")
    return problems
