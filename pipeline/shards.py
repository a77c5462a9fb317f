"""Which shards a config value names, checked before any process starts.

Accepted, alone or in a list: a directory prepared by ``data-prep`` (its manifest.json lists the
shards, their sizes and sample counts); any other directory of ``*.tar`` shards (WebDataset
shards written by img2dataset or anything else: its ``*.tar`` files in name order); a brace
pattern (``data/{00000..00127}.tar``) or a glob (``data/*.tar``); a single tar; a ``pipe:``
command; and the same forms as URLs of an object store or web server (``s3://``, ``gs://``,
``http(s)://``: any fsspec URL), read by `pipeline.shard_io`.

Sample counts. A prepared directory's manifest has them. In a bare local directory they come
from img2dataset's ``<shard>_stats.json`` ("successes") where present, else the shards' tar
headers are counted once and cached: in ``.genpipe-counts.json`` beside the shards when that
directory is writable, else under ``$GENPIPE_CACHE_DIR`` (default ``~/.cache/genpipe``) in a
file named by a hash of the shard list. The cache remembers each shard's size and modification
time, so a changed shard is counted again. Remote shards get no count (None): nothing is
downloaded at start-up but listings.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_NAME, Manifest, find_manifest, parse_manifest, read_manifest
from pipeline.shard_io import count_samples, filesystem, is_http, is_remote, local_path, open_remote, sample_key

log = logging.getLogger(__name__)

COUNTS_NAME = ".genpipe-counts.json"
COUNTS_FORMAT = "genpipe-counts/1"
STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard statistics


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs, with the manifest when the shards came from a prepared directory."""

    urls: tuple[str, ...]
    manifest: Manifest | None = None
    expected_bytes: tuple[int | None, ...] = ()
    counts: tuple[int | None, ...] = ()  # samples in each shard, None where unknown

    @property
    def num_samples(self) -> int | None:
        """Samples in all the shards, or None when any shard's count is unknown."""
        if len(self.counts) != len(self.urls) or any(c is None for c in self.counts):
            return None
        return sum(self.counts)


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def resolve_shards(spec: str | list[str] | tuple[str, ...], key: str = "data.shards") -> ShardSet:
    """The shards named by a config value, checked to exist (pipe: URLs excepted)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise UserError(f"{key}: the shard list is empty")
    urls: list[str] = []
    expected: list[int | None] = []
    counts: list[int | None] = []
    manifest: Manifest | None = None
    for item in items:
        if item.startswith("pipe:"):
            found = ([item], [None], [None], None)
        elif is_remote(item):
            found = _remote(item, key)
        else:
            found = _local(item, key)
        urls.extend(found[0])
        expected.extend(found[1])
        counts.extend(found[2])
        manifest = found[3] if found[3] is not None else manifest
    if not urls:
        raise UserError(f"{key}: no shards found in {spec!r}")
    return ShardSet(tuple(urls), manifest, tuple(expected), tuple(counts))


def _local(item: str, key: str):
    path = Path(local_path(item)).expanduser()
    if path.is_dir():
        manifest_path = find_manifest(path)
        if manifest_path is not None:
            manifest = read_manifest(manifest_path)
            urls = manifest.shard_paths(manifest_path.parent)
            _check_local(urls, [s.num_bytes for s in manifest.shards], key)
            return urls, [s.num_bytes for s in manifest.shards], [s.num_samples for s in manifest.shards], manifest
        shards = sorted(p for p in path.iterdir()
                        if p.name.endswith(".tar") and not p.name.startswith(".") and p.is_file())
        if not shards:
            raise UserError(f"{key}: {path} has neither a manifest.json nor .tar shards; "
                            "prepare images with `data-prep images` or name the shards")
        return [str(p) for p in shards], [None] * len(shards), shard_counts(shards), None
    if "{" in item:
        urls = _expand_braces(str(path))
    elif any(c in item for c in "*?["):
        urls = sorted(glob.glob(str(path)))
        if not urls:
            raise UserError(f"{key}: no file matches {item}")
    else:
        urls = [str(path)]
    _check_local(urls, [None] * len(urls), key)
    return urls, [None] * len(urls), [None] * len(urls), None


def _check_local(urls: list[str], sizes: list[int | None], key: str) -> None:
    for url, size in zip(urls, sizes):
        if not os.path.isfile(url):
            raise UserError(f"{key}: shard {url} does not exist")
        if size is not None and os.path.getsize(url) != size:
            raise UserError(
                f"{key}: shard {url} is {os.path.getsize(url)} bytes but its manifest says {size}; "
                "it was truncated or changed (check with `data-prep verify`)"
            )


# ---------------------------------------------------------------------------------------------
# Remote shards: listings only, nothing downloaded


def _remote(item: str, key: str):
    listable = not is_http(item)  # a web server has no listing to rely on
    fs, path = filesystem(item, key) if listable else (None, item)
    if "{" in item:
        urls = _expand_braces(item)
    elif any(c in path for c in "*?[") and listable:
        urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
        if not urls:
            raise UserError(f"{key}: no shard matches {item}")
    elif item.endswith(".tar"):
        urls = [item]
    else:
        return _remote_directory(item, fs, path, listable, key)
    sizes = [None] * len(urls)
    if listable:
        _check_remote(fs, urls, sizes, key)
    return urls, sizes, [None] * len(urls), None


def _remote_directory(item: str, fs, path: str, listable: bool, key: str):
    base = item.rstrip("/")
    manifest_url = f"{base}/{MANIFEST_NAME}"
    try:
        with open_remote(manifest_url, key) as handle:
            text = handle.read()
    except FileNotFoundError:
        text = None
    except Exception as exc:  # no such bucket, no permission, server down: say which URL
        raise UserError(f"{key}: cannot read {manifest_url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if text is not None:
        manifest = parse_manifest(text, manifest_url)
        urls = [f"{base}/{shard.name}" for shard in manifest.shards]
        sizes = [shard.num_bytes for shard in manifest.shards]
        if listable:
            _check_remote(fs, urls, sizes, key)
        return urls, sizes, [s.num_samples for s in manifest.shards], manifest
    if not listable:
        raise UserError(f"{key}: {item} has no {MANIFEST_NAME} and a web server cannot be listed; "
                        "name its shards with a brace pattern (.../{00000..00099}.tar)")
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise UserError(f"{key}: {item} does not exist") from None
    urls = sorted(fs.unstrip_protocol(e["name"]) for e in entries
                  if e.get("type") == "file" and e["name"].endswith(".tar")
                  and not e["name"].rsplit("/", 1)[-1].startswith("."))
    if not urls:
        raise UserError(f"{key}: {item} has neither a {MANIFEST_NAME} nor .tar shards")
    return urls, [None] * len(urls), [None] * len(urls), None


def _check_remote(fs, urls: list[str], sizes: list[int | None], key: str) -> None:
    """Each shard exists (one listing per parent directory), with its manifest size if given."""
    listings: dict[str, dict[str, int]] = {}
    for url, size in zip(urls, sizes):
        parent = url.rsplit("/", 1)[0]
        if parent not in listings:
            _, parent_path = filesystem(parent, key)
            try:
                entries = fs.ls(parent_path, detail=True, refresh=True)
            except FileNotFoundError:
                entries = []
            listings[parent] = {fs.unstrip_protocol(e["name"]): e.get("size") for e in entries}
        if url not in listings[parent]:
            raise UserError(f"{key}: shard {url} does not exist")
        found = listings[parent][url]
        if size is not None and found is not None and found != size:
            raise UserError(f"{key}: shard {url} is {found} bytes but its manifest says {size}; "
                            "it was truncated or changed")


# ---------------------------------------------------------------------------------------------
# Sample counts of bare local directories


def shard_counts(shards: list[Path]) -> list[int | None]:
    """Samples in each local shard: img2dataset's stats, else a cached count, else counted
    (None for a shard too damaged to count)."""
    counts: list[int | None] = [_stats_count(p) for p in shards]
    missing = [i for i, c in enumerate(counts) if c is None]
    if not missing:
        return counts
    cache_file = _cache_file(shards)
    cached = _read_counts(cache_file)
    changed = False
    for index in missing:
        shard = shards[index]
        stat = shard.stat()
        entry = cached.get(str(shard.resolve()))
        if entry and entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            counts[index] = int(entry["samples"])
            continue
        try:
            counts[index] = count_samples(str(shard))
        except UserError:
            continue  # a damaged shard: count unknown, the reader that reads it says so
        cached[str(shard.resolve())] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                        "samples": counts[index]}
        changed = True
    if changed:
        _write_counts(cache_file, cached)
    return counts


def _stats_count(shard: Path) -> int | None:
    stats = shard.with_name(shard.name[: -len(".tar")] + STATS_SUFFIX)
    try:
        value = json.loads(stats.read_text())["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def cache_dir() -> Path:
    """Where genpipe keeps caches that cannot live beside the data."""
    configured = os.environ.get("GENPIPE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genpipe"


def _cache_file(shards: list[Path]) -> Path:
    directories = {p.parent for p in shards}
    if len(directories) == 1:
        directory = next(iter(directories))
        if os.access(directory, os.W_OK):
            return directory / COUNTS_NAME
    digest = hashlib.sha256("\n".join(str(p.resolve()) for p in shards).encode()).hexdigest()[:16]
    return cache_dir() / f"shard-counts-{digest}.json"


def _read_counts(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != COUNTS_FORMAT:
        return {}
    shards = data.get("shards")
    return shards if isinstance(shards, dict) else {}


def _write_counts(path: Path, shards: dict) -> None:
    """Write atomically; a cache that cannot be written is only a slower next start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": COUNTS_FORMAT, "shards": shards}, indent=1))
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("could not cache shard sample counts in %s (%s)", path, exc)


# ---------------------------------------------------------------------------------------------
# What the shards hold against what the config asks


def check_shards_match(shards: ShardSet, image_size: int, channels: int, key: str, *,
                       labels: bool = False) -> None:
    """Fail early where the shards cannot give what is asked; say what load time will change.

    Images of another size than `image_size` are resized and cropped at load time, and other
    channel counts converted, so neither is an error. Labels asked for (a class-conditional
    model) must be in the shards: a prepared directory says so in its manifest, other shards
    are checked on their first sample where they are local files.
    """
    manifest = shards.manifest
    if manifest is not None and manifest.image_size != image_size:
        verb = "reduced" if manifest.image_size > image_size else "enlarged"
        log.info("%s: %d×%d images are %s to %d×%d at load time", key, manifest.image_size,
                 manifest.image_size, verb, image_size, image_size)
    if not labels:
        return
    if manifest is not None and len(shards.urls) == len(manifest.shards):
        if manifest.num_classes == 0:
            raise UserError(f"{key}: labels were asked for but the shards carry none (their "
                            "manifest says num_classes 0): prepare labelled shards or train an "
                            "unconditional model")
        return
    first = shards.urls[0]
    if first.startswith("pipe:") or is_remote(first):
        return  # checked when read
    members = first_sample_members(first)
    if members is not None and "cls" not in members:
        raise UserError(f"{key}: labels were asked for but shard {first} has no .cls label in "
                        f"its first sample (members: {', '.join(sorted(members))})")


def first_sample_members(url: str) -> set[str] | None:
    """The member extensions of a local shard's first sample (None for an empty shard)."""
    key = None
    extensions: set[str] = set()
    try:
        with tarfile.open(local_path(url), mode="r:") as tar:
            for member in tar:
                named = sample_key(member.name) if member.isfile() else None
                if named is None:
                    continue
                if key is not None and named[0] != key:
                    break
                key = named[0]
                extensions.add(named[1])
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"shard {url} is damaged or unreadable ({exc}); check it with "
                        "`data-prep verify`") from None
    return extensions if key is not None else None
