"""The manifest of one data split: which shards hold it, how big they are, what the images are.

`data_prep` writes one `manifest.json` next to the shards of each split (``OUT/train``,
``OUT/test``); the training loader and ``data-prep verify`` read it back. The JSON keys are exactly
the field names of `Manifest` and `ShardInfo`. Reading validates every field and raises a
`UserError` naming the file and the field, so a hand-edited or half-written manifest fails before
any process starts. No torch here: this module is imported by light tools too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "genpipe-shards/1"
DIGITS_CLASSIFIER = "digits_classifier.safetensors"
"""Beside the shards of `data-prep digits`' train split: the sample-quality classifier
(pipeline/digits_quality.py), trained on that split."""
ENCODINGS = ("png", "jpg", "webp")
CHANNELS = (1, 3)
KEYS = ("index", "source")
KINDS = ("images", "latents")
LATENT_ENCODING = "npy"  # a latent split's samples: fp16 arrays in "<key>.latent.npy" (pipeline/latents.py)


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split, as written."""

    name: str  # file name inside the split directory, e.g. "shard-000000.tar"
    num_samples: int
    num_bytes: int
    sha256: str  # hex digest of the whole file


@dataclass(frozen=True)
class Manifest:
    """A split: its images (size, channels, encoding), its shards and the files left out."""

    split: str  # "train" or "test"
    image_size: int  # every image is image_size x image_size
    channels: int  # 1 ("L") or 3 ("RGB")
    encoding: str  # member extension of the image bytes: "png" | "jpg" | "webp"
    num_samples: int  # sum of the shards' num_samples
    shards: tuple[ShardInfo, ...]
    skipped: tuple[dict, ...]  # {"path": relative path, "reason": short text} per skipped file
    source: str  # where the images came from (a directory, or "sklearn.datasets.load_digits")
    created: str  # ISO 8601 UTC time of writing
    num_classes: int = 0  # labels 0..num_classes-1 stored as "<key>.cls"; 0: no labels
    class_names: tuple[str, ...] = ()  # name of each class 0..num_classes-1 where known (folder names)
    class_counts: tuple[int, ...] = ()  # samples of each class in this split, beside class_names
    keys: str = "index"  # "index": keys are the samples' %09d indices; "source": kept from the source shards
    kind: str = "images"  # "latents": an autoencoder's latents (`data-prep latents`); image_size and
    # channels are then the latent grid's, encoding "npy", and ``latents`` says what made them
    latents: dict = field(default_factory=dict)  # pipeline/latents.py LatentInfo as JSON (kind "latents")
    format: str = FORMAT

    def shard_paths(self, directory: str | os.PathLike) -> list[str]:
        """The shard files of this split, in order, given the directory holding the manifest."""
        return [str(Path(directory) / shard.name) for shard in self.shards]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shards"] = [asdict(shard) for shard in self.shards]
        data["skipped"] = [dict(item) for item in self.skipped]
        if self.kind == "images":
            del data["kind"], data["latents"]  # as before latent splits existed
        if self.keys == "index":
            del data["keys"]  # the default: manifests stay readable by versions without the field
        for name in ("class_names", "class_counts"):
            if data[name]:
                data[name] = list(data[name])
            else:
                del data[name]  # likewise: written only where known
        return data


def find_manifest(directory: str | os.PathLike) -> Path | None:
    """``directory/manifest.json`` if it exists, else None."""
    path = Path(directory) / MANIFEST_NAME
    return path if path.is_file() else None


def find_split_dirs(directory: str | os.PathLike) -> list[Path]:
    """The split directories at `directory`: itself if it holds a manifest, else its
    subdirectories that do (sorted by name). Empty if none."""
    root = Path(directory)
    if find_manifest(root) is not None:
        return [root]
    if not root.is_dir():
        return []
    return sorted(child for child in root.iterdir() if child.is_dir() and find_manifest(child))


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write ``directory/manifest.json`` atomically (temporary name, then rename)."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(path_or_dir: str | os.PathLike) -> Manifest:
    """Read and validate a manifest, given its file or the split directory holding it."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: no such manifest (run `data-prep` to write the split first)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read manifest: {exc}") from None
    return parse_manifest(text, path)


def parse_manifest(text: str | bytes, where: str | os.PathLike) -> Manifest:
    """Validate a manifest's JSON text; `where` (its path or URL) names it in errors."""
    try:
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: cannot read manifest: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                        f"{exc.msg}") from None
    return _manifest_from_dict(data, where)


# --- validation ---------------------------------------------------------------------------------


def _fail(path: Path, field: str, expected: str, value: Any) -> UserError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return UserError(f"{path}: field '{field}' must be {expected}, got {shown}")


def _get(data: dict, key: str, kind: type, path: Path, where: str = "") -> Any:
    field = f"{where}{key}"
    if key not in data:
        raise UserError(f"{path}: missing field '{field}'")
    value = data[key]
    # bool is an int subclass; a count of True samples is a mistake, not a number
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(path, field, "an integer", value)
    if kind is not int and not isinstance(value, kind):
        raise _fail(path, field, f"a {kind.__name__}", value)
    return value


def _check_keys(data: dict, allowed: set[str], path: Path, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown field '{where}{unknown[0]}' "
                        f"(expected one of {sorted(allowed)})")


def _shard_from_dict(data: Any, path: Path, index: int) -> ShardInfo:
    where = f"shards[{index}]."
    if not isinstance(data, dict):
        raise _fail(path, f"shards[{index}]", "an object", data)
    _check_keys(data, {f.name for f in fields(ShardInfo)}, path, where)
    name = _get(data, "name", str, path, where)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise _fail(path, where + "name", "a plain file name", name)
    num_samples = _get(data, "num_samples", int, path, where)
    num_bytes = _get(data, "num_bytes", int, path, where)
    sha256 = _get(data, "sha256", str, path, where)
    if num_samples < 0:
        raise _fail(path, where + "num_samples", "non-negative", num_samples)
    if num_bytes < 0:
        raise _fail(path, where + "num_bytes", "non-negative", num_bytes)
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise _fail(path, where + "sha256", "64 lowercase hex digits", sha256)
    return ShardInfo(name=name, num_samples=num_samples, num_bytes=num_bytes, sha256=sha256)


def _manifest_from_dict(data: Any, path: Path) -> Manifest:
    if not isinstance(data, dict):
        raise UserError(f"{path}: manifest must be a JSON object, got {type(data).__name__}")
    _check_keys(data, {f.name for f in fields(Manifest)}, path, "")
    fmt = data.get("format", FORMAT)
    if fmt != FORMAT:
        raise _fail(path, "format", f"'{FORMAT}' (written by a different data-prep version?)", fmt)
    split = _get(data, "split", str, path)
    image_size = _get(data, "image_size", int, path)
    if image_size < 1:
        raise _fail(path, "image_size", "positive", image_size)
    kind = data.get("kind", "images")
    if kind not in KINDS:
        raise _fail(path, "kind", " or ".join(repr(k) for k in KINDS), kind)
    latents = data.get("latents", {})
    if not isinstance(latents, dict) or (kind == "latents") != bool(latents):
        raise _fail(path, "latents", "an object exactly when kind is 'latents'", latents)
    channels = _get(data, "channels", int, path)
    if kind == "images" and channels not in CHANNELS:
        raise _fail(path, "channels", "1 or 3", channels)
    if channels < 1:
        raise _fail(path, "channels", "positive", channels)
    encoding = _get(data, "encoding", str, path)
    encodings = ENCODINGS if kind == "images" else (LATENT_ENCODING,)
    if encoding not in encodings:
        raise _fail(path, "encoding", " or ".join(encodings), encoding)
    num_samples = _get(data, "num_samples", int, path)
    raw_shards = _get(data, "shards", list, path)
    shards = tuple(_shard_from_dict(item, path, i) for i, item in enumerate(raw_shards))
    if len({s.name for s in shards}) != len(shards):
        raise _fail(path, "shards", "distinct file names", [s.name for s in shards])
    if sum(s.num_samples for s in shards) != num_samples:
        raise _fail(path, "num_samples", f"the sum of the shards' num_samples "
                    f"({sum(s.num_samples for s in shards)})", num_samples)
    raw_skipped = _get(data, "skipped", list, path)
    for i, item in enumerate(raw_skipped):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise _fail(path, f"skipped[{i}]", 'an object with a "path" string', item)
    source = _get(data, "source", str, path)
    created = _get(data, "created", str, path)
    num_classes = data.get("num_classes", 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise _fail(path, "num_classes", "a non-negative integer", num_classes)
    keys = data.get("keys", "index")
    if keys not in KEYS:
        raise _fail(path, "keys", " or ".join(repr(k) for k in KEYS), keys)
    class_names = data.get("class_names", [])
    if (not isinstance(class_names, list) or any(not isinstance(name, str) for name in class_names)
            or (class_names and len(class_names) != num_classes)):
        raise _fail(path, "class_names", f"a list of {num_classes} names (one per class)", class_names)
    class_counts = data.get("class_counts", [])
    if (not isinstance(class_counts, list)
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in class_counts)
            or (class_counts and len(class_counts) != num_classes)):
        raise _fail(path, "class_counts", f"a list of {num_classes} non-negative counts", class_counts)
    return Manifest(
        split=split,
        image_size=image_size,
        channels=channels,
        encoding=encoding,
        num_samples=num_samples,
        shards=shards,
        skipped=tuple(dict(item) for item in raw_skipped),
        source=source,
        created=created,
        num_classes=num_classes,
        class_names=tuple(class_names),
        class_counts=tuple(class_counts),
        keys=keys,
        kind=kind,
        latents=dict(latents),
        format=fmt,
    )
