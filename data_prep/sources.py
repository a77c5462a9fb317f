"""Where images come from: the embedded digits set, and a directory tree of image files.

Everything here is a pure function of its inputs and the seed, so that the same source and the
same arguments give the same samples in the same order. `decode_file` runs in worker processes:
it takes plain arguments, never raises for a bad file, and returns the encoded image or a short
reason why the file was skipped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from data_prep.writer import Sample, encode_image
from pipeline.decode import reduce_on_decode, resize_crop, to_8bit

DIGITS_SOURCE = "sklearn.datasets.load_digits"


def digits_source(size: int, test_fraction: float, seed: int) -> str:
    """The manifests' ``source`` of `data-prep digits`: the data set and the options that decide
    every byte of its splits (what lets a second run into the same directory cost nothing)."""
    return f"{DIGITS_SOURCE} (size={size}, test_fraction={test_fraction:g}, seed={seed})"
PREP_RESAMPLE = Image.Resampling.LANCZOS  # shards are written once: the sharpest filter

# Extensions Pillow reads without extra packages; GIF and APNG give their first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp",
                    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi")
# Extensions readable only where Pillow has the codec or a plugin: (Pillow feature or plugin
# module, what to install).
_OPTIONAL_EXTENSIONS = {
    ".avif": ("avif", "a Pillow built with AVIF: pip install -U pillow"),
    ".heic": ("pillow_heif", "pillow-heif: pip install pillow-heif"),
    ".heif": ("pillow_heif", "pillow-heif: pip install pillow-heif"),
}


# --- digits -------------------------------------------------------------------------------------


def digits_splits(size: int, test_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """sklearn's 1797 8x8 digits as `size`x`size` PNG samples with labels, split by the seed.

    Values 0..16 are scaled to 0..255 and upscaled bicubically in float, then rounded and clipped,
    so the interpolation's overshoot never wraps around. Each split is in the seeded permutation's
    order, which mixes the classes across shards.
    """
    from sklearn.datasets import load_digits  # heavy import, only for this command

    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)
    labels = digits.target.astype(int)
    order = np.random.default_rng(seed).permutation(len(images))
    num_test = int(round(len(images) * test_fraction))
    chosen = {"test": order[:num_test], "train": order[num_test:]}
    splits: dict[str, list[Sample]] = {}
    for split, indices in chosen.items():
        if split == "test" and test_fraction <= 0:
            continue
        splits[split] = [
            Sample(image=encode_image(_upscale_gray(images[i], size), "png"),
                   source=f"sklearn.digits/{int(i)}", label=int(labels[i]))
            for i in indices
        ]
    return splits


def _upscale_gray(values: np.ndarray, size: int) -> Image.Image:
    resized = Image.fromarray(values.astype(np.float32)).resize((size, size),
                                                                Image.Resampling.BICUBIC)
    pixels = np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


# --- image trees --------------------------------------------------------------------------------


def find_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the image files under `root`, recursively, sorted.

    Files are recognised by extension (case-insensitive, `image_extensions`); whether they really
    are images is found out when they are decoded. Hidden directories are not entered.
    """
    return scan_tree(root)[0]


def scan_tree(root: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """(image files, files passed over with the reason) under `root`, both sorted by path.

    Every file is accounted for: one with an extension no reader here handles, hidden files
    and each hidden directory (``.git``, a staging directory), not entered, appear in the
    second list as ``{"path": relative path, "reason": short text}``.
    """
    root = Path(root)
    readable = image_extensions()
    found: list[str] = []
    passed_over: list[dict] = []
    for directory, subdirs, files in os.walk(root):
        for name in sorted(d for d in subdirs if d.startswith(".")):
            relative = (Path(directory) / name).relative_to(root).as_posix()
            passed_over.append({"path": relative + "/", "reason": "hidden directory, not read"})
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            relative = (Path(directory) / name).relative_to(root).as_posix()
            extension = os.path.splitext(name)[1].lower()
            if name.startswith("."):
                passed_over.append({"path": relative, "reason": "hidden file, not read"})
            elif extension in readable:
                found.append(relative)
            else:
                passed_over.append({"path": relative, "reason": unsupported_reason(extension)})
    return sorted(found), sorted(passed_over, key=lambda item: item["path"])


@functools.cache
def image_extensions() -> frozenset[str]:
    """The file extensions this installation reads (registering pillow-heif when installed)."""
    from PIL import features

    readable = set(IMAGE_EXTENSIONS)
    for extension, (needs, _) in _OPTIONAL_EXTENSIONS.items():
        if needs == "pillow_heif":
            if register_heif():
                readable.add(extension)
        elif features.check(needs):
            readable.add(extension)
    return frozenset(readable)


def register_heif() -> bool:
    """Let Pillow open HEIC/HEIF files when pillow-heif is installed; whether it is."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


NOT_READ = ("unsupported extension", "no file extension", "hidden ")  # reasons given by name alone


def unsupported_reason(extension: str) -> str:
    if not extension:
        return "no file extension"
    if extension in _OPTIONAL_EXTENSIONS:
        return f"unsupported extension {extension} (needs {_OPTIONAL_EXTENSIONS[extension][1]})"
    return f"unsupported extension {extension}"


def folder_classes(paths: list[str]) -> tuple[list[str], dict[str, int]]:
    """(class names, label of each path) by the first folder under the source directory, as
    torchvision's ImageFolder: classes are the folder names in sorted order, labelled 0, 1, ...
    Paths directly in the source directory belong to no class and get no label."""
    names = sorted({path.split("/", 1)[0] for path in paths if "/" in path})
    index = {name: label for label, name in enumerate(names)}
    return names, {path: index[path.split("/", 1)[0]] for path in paths if "/" in path}


NO_CLASS_FOLDER = "not inside a class folder (--labels folders)"


def assign_split(relative_path: str, holdout: float, seed: int) -> str:
    """"test" for a stable fraction `holdout` of paths, "train" for the rest.

    A hash of (seed, path) decides for each file alone, so adding or removing files never moves
    another file from one split to the other.
    """
    if holdout <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}\0{relative_path}".encode("utf-8", "surrogateescape")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < holdout else "train"


def shuffled(paths: list[str], seed: int) -> list[str]:
    """`paths` in a seeded order, so that shards mix folders (and so classes)."""
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    return order


def decode_file(root: str, relative_path: str, size: int, mode: str, encoding: str,
                quality: int) -> tuple[str, bytes | None, str | None]:
    """(relative_path, encoded bytes, None) for a good image, (relative_path, None, reason) else."""
    encoded, reason = convert(os.path.join(root, relative_path), size, mode, encoding, quality)
    return relative_path, encoded, reason


_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # --format: Pillow's name of it


def convert(source, size: int, mode: str, encoding: str, quality: int,
            keep_if_ready: bytes | None = None) -> tuple[bytes | None, str | None]:
    """(encoded `size`×`size` image, None), or (None, why it was skipped); never raises.

    `source` is a path or a binary file. With `keep_if_ready` (the source's bytes), an image
    already in the asked encoding, size and mode, upright, is decoded (to prove it is sound)
    and kept byte for byte: no second lossy encoding.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never padded with grey
    image_extensions()  # registers the HEIF plugin in this worker process, where installed
    try:
        with warnings.catch_warnings():
            # over MAX_IMAGE_PIXELS warns, over twice that PIL raises DecompressionBombError
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if (keep_if_ready is not None and image.format == _FORMATS[encoding]
                        and image.size == (size, size) and image.mode == mode
                        and "transparency" not in image.info
                        and image.getexif().get(0x0112, 1) == 1):
                    image.load()
                    return keep_if_ready, None
                reduce_on_decode(image, size, mode)  # JPEG: decode at 1/2..1/8, still >= size
                image.load()
                converted = to_8bit(ImageOps.exif_transpose(image), mode)
        square = resize_crop(converted, size, 0.5, PREP_RESAMPLE, reducing_gap=None)
        return encode_image(square, encoding, quality), None
    except UnidentifiedImageError:
        return None, "not a recognised image file"
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {_first_line(exc)}"
    except Exception as exc:  # PIL raises many types for corrupt files; none may stop the run
        message = _first_line(exc)
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            return None, f"truncated image: {message}"
        return None, f"{type(exc).__name__}: {message}"


def convert_samples(chunk: list[tuple[str, bytes]], size: int, mode: str, encoding: str,
                    quality: int) -> list[tuple[bytes | None, str | None]]:
    """`convert` of each (key, image bytes) of a chunk of shard samples (reshard's workers)."""
    return [convert(io.BytesIO(data), size, mode, encoding, quality, keep_if_ready=data)
            for _, data in chunk]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."
