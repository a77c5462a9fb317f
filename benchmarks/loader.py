"""Images/s of our WebDataset reader against torchvision's ImageFolder, on the same JPEGs.

Data. ``--images`` random crops (side 60–100 % of the photo's shorter side, random position,
seeded) of real photographs, resized to ``--stored-size`` squared (default 256; Lanczos) and
saved as JPEG quality 95 in ten class folders, ``WORKDIR/images/class_NN/NNNNNN.jpg``, the
layout ImageFolder reads. The photographs are scikit-learn's two sample photos (china.jpg,
flower.jpg, 640×427), or every image under ``--src``. The same folder is then written to shards
by the repository's own tool, ``python -m data_prep.cli images WORKDIR/images WORKDIR/shards
--size STORED --format jpg``, which re-encodes each image as JPEG quality 95 (the same encoder
and settings, so both sides decode files of about the same size; each row records the bytes per
image its side reads).

Both sides deliver ``--size`` squared images (default 256). Stored at that size, ours takes its
fast path (decode only); stored larger (``--stored-size 512 --size 256``), ours resizes at load
time: a JPEG at least twice the target is decoded at a reduced scale (``Image.draft``), then the
square is resampled to the target where the reduced decode did not land on it. Per image:

- ``ours``: ``pipeline.data.TrainingBatches`` as the trainer builds it (shuffle buffer 1000,
  random flip, prefetch factor 4, centre crop): stream the tar shard, keep the raw bytes in the
  shuffle buffer, PIL decode to RGB (reduced, resized when stored larger), NumPy array
  transposed to [3, size, size] uint8, flip by a seeded coin, ``np.stack`` into the batch;
- ``torchvision``: ``datasets.ImageFolder`` (PIL open and ``convert("RGB")`` of each file, full
  size) with ``transforms.Compose([Resize(size), CenterCrop(size), RandomHorizontalFlip(),
  PILToTensor()])`` (the resize and crop do nothing to an image already at the size; uint8,
  no float conversion, as ours), in ``DataLoader(batch_size, shuffle=True, drop_last=True,
  persistent_workers=True, prefetch_factor=4)`` and the default collate.

Both use fork for their workers and pin memory only where CUDA is available (as the trainer).
For each worker count in ``--workers``, in turn for each side: a fresh loader, ``--warmup-batches``
batches per reader untimed (worker start, shuffle buffer fill), then the time to receive
``--measure-images`` images (rounded up to whole batches) in the main process. ``img_s_per_worker``
divides by the worker count, by 1 for 0 workers (the main process is then the one reader). Every
reader of ours needs its own shard, so the shards hold at most ``--images`` / (largest worker
count) samples each unless ``--samples-per-shard`` says otherwise. The 1-minute load average is
recorded before each measurement: on a shared machine, figures fall as it rises. The files were
just written, so both sides read from the page cache; on a cold or network file system
ImageFolder's one open per image costs more than ours' sequential tar reads.

Three more rows, in one process: ``ours-tar-read`` (every shard read into raw samples, no
decode), ``ours-decode`` (``pipeline.data.decode_image`` to the training size of
``--measure-images`` samples held in memory) and ``stored-decode``, the yardstick: a plain
full-size PIL decode to an RGB array of the same stored JPEGs (what one core can decode). The
first two add up to about ``ours`` at 0 workers; ``ours`` per worker against ``stored-decode``
says what share of a core's decoding rate the whole reader keeps.

Prints a table and appends one JSON line per (side, worker count) to ``--out`` (default
docs/benchmarks/loader_<hostname>.jsonl)::

    OMP_NUM_THREADS=1 python benchmarks/loader.py --images 2000 --workers 0,1,2 --batch 32
    OMP_NUM_THREADS=1 python benchmarks/loader.py --images 2000 --workers 0,1 --stored-size 512
    OMP_NUM_THREADS=1 python benchmarks/loader.py --images 8000 --workers 1,2,4,8,16 --batch 64

Whether data is the bottleneck of a real GPU run is read from the run itself: ``metrics.jsonl``
has ``data_wait_fraction``, the share of each logging window the training loop spent blocked in
``next(batches)``. Waiting for the GPU happens at synchronisation points, not there, so it is
not counted. Near 0 (below about 0.02), the readers keep ahead and the run is GPU bound; clearly
above, each process needs more than its readers deliver: ``images_per_s / world_size /
(1 - data_wait_fraction)`` is about what one process would consume, to compare with this
benchmark's images/s for the run's ``data.num_workers`` on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision_compat import import_torchvision

from data_prep.sources import find_images
from pipeline.data import TrainingBatches, decode_image, iter_raw_samples, resolve_shards
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CLASSES = 10
JPEG_QUALITY = 95
SHUFFLE_BUFFER = 1000  # the config default (pipeline/config.py)
PREFETCH_FACTOR = 4  # the config default, used for both sides
IMPLS = ("ours", "torchvision")

# ---------------------------------------------------------------------------------------------
# Data


def photographs(src: Path | None) -> list:
    """The photographs to crop: arrays of scikit-learn's sample photos, or the files under src."""
    if src is None:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)
    if not src.is_dir():
        raise UserError(f"--src {src}: not a directory")
    paths = [src / relative for relative in find_images(src)]
    if not paths:
        raise UserError(f"--src {src}: no image files found")
    return paths


def open_photograph(photo) -> Image.Image:
    if isinstance(photo, np.ndarray):
        return Image.fromarray(photo)
    try:
        with Image.open(photo) as image:
            return image.convert("RGB")
    except Exception as exc:
        raise UserError(f"--src: {photo} is not a readable image ({exc})") from None


def make_image_folder(root: Path, photos: list, count: int, seed: int, stored: int) -> None:
    """count stored×stored JPEG crops of the photos (crop i from photo i mod len(photos))."""
    rng = np.random.default_rng(seed)
    for class_index in range(CLASSES):
        (root / f"class_{class_index:02d}").mkdir(parents=True)
    for photo_index, photo in enumerate(photos):
        indices = range(photo_index, count, len(photos))
        if not indices:
            break
        image = open_photograph(photo)
        width, height = image.size
        for index in indices:
            side = max(1, round(min(width, height) * rng.uniform(0.6, 1.0)))
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            crop = image.crop((left, top, left + side, top + side))
            crop = crop.resize((stored, stored), Image.Resampling.LANCZOS)
            crop.save(root / f"class_{index % CLASSES:02d}" / f"{index:06d}.jpg", quality=JPEG_QUALITY)


def write_shards(images: Path, out: Path, samples_per_shard: int, side: int) -> None:
    command = [
        sys.executable, "-m", "data_prep.cli", "images", str(images), str(out),
        "--size", str(side), "--format", "jpg", "--samples-per-shard", str(samples_per_shard),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"data-prep images failed (exit {done.returncode}): {lines[-1]}")


# ---------------------------------------------------------------------------------------------
# Loaders


def our_batches(shards, workers: int, batch: int, seed: int, size: int):
    batches = TrainingBatches(
        shards, seed=seed, rank=0, world_size=1, num_workers=workers, batch_size=batch,
        image_size=size, channels=3, shuffle_buffer=SHUFFLE_BUFFER, random_flip=True,
        prefetch_factor=PREFETCH_FACTOR, pin_memory=torch.cuda.is_available(),
    )
    try:
        yield from batches
    finally:
        batches.close()


def torchvision_batches(torchvision, root: Path, workers: int, batch: int, seed: int, size: int):
    transforms = torchvision.transforms
    dataset = torchvision.datasets.ImageFolder(
        str(root), transform=transforms.Compose([
            transforms.Resize(size), transforms.CenterCrop(size), transforms.RandomHorizontalFlip(),
            transforms.PILToTensor()]),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, prefetch_factor=PREFETCH_FACTOR if workers else None,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        for images, _ in loader:
            yield images


def our_parts(shards, measure_images: int, size: int) -> dict[str, tuple[int, float]]:
    """(images, seconds) of the parts of our per-image work and of the yardstick, one process.

    ``ours-tar-read``: every shard's samples read as raw bytes (tar parsing, no decode);
    ``ours-decode``: ``decode_image`` (PIL decode, RGB, reduced and resized to `size` when
    stored larger, [3, H, W] uint8) of measure_images of those samples held in memory;
    ``stored-decode``: a plain full-size PIL decode to an RGB array of the same samples.
    """
    started = time.perf_counter()
    samples = [(key, url, sample) for url in shards.urls for key, sample in iter_raw_samples(url)]
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(measure_images):
        key, url, sample = samples[index % len(samples)]
        decode_image(sample, key, url, size, 3)
    decode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(measure_images):
        with Image.open(io.BytesIO(samples[index % len(samples)][2]["jpg"])) as image:
            np.asarray(image.convert("RGB"))
    return {"ours-tar-read": (len(samples), read_seconds),
            "ours-decode": (measure_images, decode_seconds),
            "stored-decode": (measure_images, time.perf_counter() - started)}


def measure(batches, warmup_batches: int, timed_batches: int, batch: int, size: int) -> tuple[int, float]:
    """(images received, seconds) over timed_batches after warmup_batches untimed ones."""
    try:
        for _ in range(warmup_batches):
            first = next(batches)
        assert first.shape == (batch, 3, size, size) and first.dtype == torch.uint8
        started = time.perf_counter()
        images = sum(next(batches).shape[0] for _ in range(timed_batches))
        return images, time.perf_counter() - started
    finally:
        batches.close()


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    cpu_model = platform.processor() or None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    return {
        "host": socket.gethostname() or "cpu",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_model": cpu_model,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
    }


def parse_workers(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(count < 0 for count in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts must be distinct and ≥ 0")
    return counts


def parse_impls(text: str) -> list[str]:
    impls = text.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or len(set(impls)) != len(impls):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct names from {', '.join(IMPLS)}")
    return impls


def run(args, torchvision, work: Path, samples_per_shard: int, info: dict) -> list[dict]:
    images_dir, shards_dir = work / "images", work / "shards"
    started = time.perf_counter()
    make_image_folder(images_dir, photographs(args.src), args.images, args.seed, args.stored_size)
    made = time.perf_counter()
    write_shards(images_dir, shards_dir, samples_per_shard, args.stored_size)
    shards = resolve_shards(str(shards_dir / "train"))
    print(f"{args.images} JPEGs made in {made - started:.1f} s, {len(shards.urls)} shards in "
          f"{time.perf_counter() - made:.1f} s ({work})")
    bytes_per_image = {
        "ours": sum(os.path.getsize(url) for url in shards.urls) / args.images,
        "torchvision": sum(p.stat().st_size for p in images_dir.rglob("*.jpg")) / args.images,
    }
    timed_batches = math.ceil(args.measure_images / args.batch)
    common = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset_images": args.images,
        "stored_size": args.stored_size,
        "image_size": args.size,
        "source": str(args.src) if args.src else "sklearn sample photos",
        "shards": len(shards.urls),
        **info,
    }
    print(f"{'impl':<14} {'workers':>7} {'batch':>5} {'images':>6} {'seconds':>7} {'img/s':>7} "
          f"{'img/s/worker':>12} {'load1':>5}")
    rows = []

    def add_row(impl: str, workers: int, images: int, seconds: float, load_1min: float, warmup: int) -> None:
        row = {
            "impl": impl, "workers": workers, "batch": args.batch, "images": images,
            "seconds": round(seconds, 3), "img_s": round(images / seconds, 1),
            "img_s_per_worker": round(images / seconds / max(workers, 1), 1),
            "warmup_batches": warmup,
            "bytes_per_image": round(bytes_per_image["torchvision" if impl == "torchvision" else "ours"]),
            "load_1min": round(load_1min, 2), **common,
        }
        rows.append(row)
        print(f"{impl:<14} {workers:>7} {args.batch:>5} {images:>6} {seconds:>7.2f} "
              f"{row['img_s']:>7.1f} {row['img_s_per_worker']:>12.1f} {load_1min:>5.2f}", flush=True)

    if "ours" in args.impl:
        load_1min = os.getloadavg()[0]
        for impl, (images, seconds) in our_parts(shards, args.measure_images, args.size).items():
            add_row(impl, 0, images, seconds, load_1min, 0)
    for workers in args.workers:
        for impl in args.impl:
            load_1min = os.getloadavg()[0]
            if impl == "ours":
                batches = our_batches(shards, workers, args.batch, args.seed, args.size)
            else:
                batches = torchvision_batches(torchvision, images_dir, workers, args.batch, args.seed, args.size)
            warmup = args.warmup_batches * max(workers, 1)
            images, seconds = measure(batches, warmup, timed_batches, args.batch, args.size)
            add_row(impl, workers, images, seconds, load_1min, warmup)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to make (default 2000)")
    parser.add_argument("--src", type=Path, help="crop these photographs instead of scikit-learn's two")
    parser.add_argument("--stored-size", type=int, default=256,
                        help="side of the stored JPEGs (default 256)")
    parser.add_argument("--size", type=int, default=256, help="side of the delivered images (default 256)")
    parser.add_argument("--workdir", type=Path, help="where images and shards go, kept (must be empty or "
                        "absent; default: a temporary directory, removed)")
    parser.add_argument("--workers", type=parse_workers, default=[0, 1, 2], help="worker counts (default 0,1,2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--impl", type=parse_impls, default=list(IMPLS), help="ours,torchvision (default both)")
    parser.add_argument("--samples-per-shard", type=int,
                        help="default: --images / largest worker count, at most 1000")
    parser.add_argument("--warmup-batches", type=int, default=2, help="untimed batches per reader (default 2)")
    parser.add_argument("--measure-images", type=int, default=1024, help="timed images (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON lines appended here "
                        "(default docs/benchmarks/loader_<hostname>.jsonl)")
    args = parser.parse_args(argv)

    readers = max(max(args.workers), 1)
    samples_per_shard = args.samples_per_shard or max(1, min(1000, args.images // readers))
    for name in ("images", "batch", "samples_per_shard", "warmup_batches", "measure_images", "size",
                 "stored_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch > args.images:
        parser.error(f"--batch {args.batch} is more than --images {args.images}")
    if math.ceil(args.images / samples_per_shard) < readers:
        parser.error(f"{args.images} images at {samples_per_shard} per shard make fewer shards than "
                     f"{readers} workers, and every worker needs its own: lower --samples-per-shard")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")

    try:
        torchvision = import_torchvision() if "torchvision" in args.impl else None
        info = {**machine(), "torchvision": torchvision.__version__ if torchvision else None}
        out = args.out or REPO / "docs" / "benchmarks" / f"loader_{info['host']}.jsonl"
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as temporary:
            work = args.workdir or Path(temporary)
            rows = run(args, torchvision, work, samples_per_shard, info)
    except UserError as exc:
        print(f"loader.py: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
