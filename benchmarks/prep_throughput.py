"""Images/s per core of `data-prep images` and `data-prep reshard` against img2dataset.

Data. ``--images`` JPEGs (quality 95) of random crops of real photographs (scikit-learn's two
sample photos, or every image under ``--src``), each resized (Lanczos) to its own width and
height drawn from ``--min-side``..``--max-side`` (default 320..1024, so aspect ratios up to
3.2), written to ``WORKDIR/images/NNNNNN.jpg``. The same files, byte for byte, are packed into
WebDataset shards in img2dataset's layout (``WORKDIR/source/00000.tar`` with ``.jpg``, ``.txt``
and ``.json`` members) as the source of ``reshard``.

Three jobs turn them into 256×256 (``--size``) JPEG quality 95 shards, centre crops of the
shorter side, each as a subprocess:

- ``images``: ``python -m data_prep.cli images WORKDIR/images OUT --size 256 --workers 1``;
- ``reshard``: ``python -m data_prep.cli reshard WORKDIR/source OUT --size 256 --workers 1``;
- ``img2dataset``: ``img2dataset --url_list urls.txt --input_format txt --output_format
  webdataset --image_size 256 --resize_mode center_crop --encode_quality 95 --processes_count 1
  --thread_count 16 --extract_exif False --compute_hash None`` (its per-image EXIF extraction and
  hashing off, which ours do not do), reading the same files through a loopback HTTP server
  (``http.server`` in a thread of this process). img2dataset decodes with OpenCV at full size
  and resizes with INTER_AREA; ours decodes JPEGs at a reduced scale where they are at least
  twice the target (``Image.draft``) and resamples only the kept square (Lanczos).

``images/s per core`` is images written per CPU-second of the job's processes (user + system
time of the subprocess and its children, from ``getrusage``), so threads (img2dataset's
downloads, OpenCV) count for what they cost and waits for a busy machine's cores do not; the
HTTP server's CPU is this process's and is not counted. Each job is also run once on a single
image first: its CPU time there (``startup_cpu_s``: interpreter, imports, pools) is recorded, and
``img_s_per_core_after_startup`` divides by the CPU time less it. ``images/s`` is wall-clock.
img2dataset is run from ``--img2dataset``
(default: ``img2dataset`` on PATH); it pins webdataset < 1, so install it in its own virtual
environment (``python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset``). Rows are
printed and appended to ``--out`` (default docs/benchmarks/prep_throughput_<hostname>.jsonl)::

    OMP_NUM_THREADS=1 python benchmarks/prep_throughput.py --images 1000 --img2dataset /tmp/i2d/bin/img2dataset
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.errors import UserError  # noqa: E402

JOBS = ("images", "reshard", "img2dataset")


def photographs(src: Path | None) -> list[Image.Image]:
    if src is None:
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(array) for array in load_sample_images().images]
    from data_prep.sources import find_images

    paths = [src / relative for relative in find_images(src)] if src.is_dir() else []
    if not paths:
        raise UserError(f"--src {src}: no image files found")
    return [Image.open(path).convert("RGB") for path in paths]


def make_images(directory: Path, photos: list[Image.Image], count: int, seed: int,
                min_side: int, max_side: int) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        scale = min(photo.width / width, photo.height / height) * rng.uniform(0.5, 1.0)
        crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        image = photo.crop((left, top, left + crop_w, top + crop_h))
        image.resize((width, height), Image.Resampling.LANCZOS).save(
            directory / f"{index:06d}.jpg", quality=95)


def pack_shards(images: Path, out: Path, per_shard: int) -> None:
    """The files as img2dataset-layout shards: NNNNN.tar of key.jpg/.txt/.json, bytes kept."""
    out.mkdir(parents=True)
    files = sorted(images.glob("*.jpg"))
    for shard, start in enumerate(range(0, len(files), per_shard)):
        with tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for path in files[start : start + per_shard]:
                key = f"{int(path.stem):09d}"
                for ext, data in (("jpg", path.read_bytes()), ("txt", b"a photograph"),
                                  ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def timed(command: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child and its descendants, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"{command[0]} {command[1] if len(command) > 1 else ''} failed "
                        f"(exit {done.returncode}): {lines[-1]}")
    return wall, cpu, done


def written(out: Path) -> int:
    """Images in the shards under out (ours: manifest; img2dataset: its _stats.json files)."""
    manifest = out / "train" / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["num_samples"]
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def commands_for(args, work: Path, images: Path, source: Path, urls_base: str | None) -> dict:
    python = [sys.executable, "-m", "data_prep.cli"]
    common = ["--size", str(args.size), "--format", "jpg", "--quality", "95", "--workers", "1",
              "--samples-per-shard", str(args.samples_per_shard)]
    commands = {
        "images": python + ["images", str(images), str(work / "out-images")] + common,
        "reshard": python + ["reshard", str(source), str(work / "out-reshard")] + common,
    }
    if urls_base is not None:
        urls = work / "urls.txt"
        urls.write_text("".join(f"{urls_base}/{p.relative_to(images.parent).as_posix()}\n"
                                for p in sorted(images.glob("*.jpg"))))
        commands["img2dataset"] = [
            args.img2dataset_path, "--url_list", str(urls), "--input_format", "txt",
            "--output_format", "webdataset", "--output_folder", str(work / "out-img2dataset"),
            "--image_size", str(args.size), "--resize_mode", "center_crop", "--encode_quality",
            "95", "--processes_count", "1", "--thread_count", "16", "--extract_exif", "False",
            "--compute_hash", "None", "--number_sample_per_shard", str(args.samples_per_shard),
            "--timeout", "30", "--retries", "0", "--enable_wandb", "False",
        ]
    return commands


def run(args, work: Path) -> list[dict]:
    images, source = work / "images", work / "source"
    started = time.perf_counter()
    make_images(images, photographs(args.src), args.images, args.seed, args.min_side, args.max_side)
    pack_shards(images, source, args.samples_per_shard)
    one = work / "startup"  # one image, to measure what a job costs before its first image
    (one / "images").mkdir(parents=True)
    shutil.copy(sorted(images.glob("*.jpg"))[0], one / "images")
    pack_shards(one / "images", one / "source", args.samples_per_shard)
    megapixels = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in images.glob("*.jpg")) / 1e6
    print(f"{args.images} JPEGs ({megapixels / args.images:.2f} Mpx each on average) made in "
          f"{time.perf_counter() - started:.1f} s ({work})")
    server = None
    urls_base = None
    if "img2dataset" in args.jobs:
        server = serve(work)
        urls_base = f"http://127.0.0.1:{server.server_address[1]}"
    commands = commands_for(args, work, images, source, urls_base)
    startup = commands_for(args, one, one / "images", one / "source",
                           urls_base and f"{urls_base}/startup")
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname() or "cpu", "cpus": len(os.sched_getaffinity(0)),
            "source_images": args.images, "min_side": args.min_side, "max_side": args.max_side,
            "mean_megapixels": round(megapixels / args.images, 3), "size": args.size}
    rows = []
    print(f"{'job':<12} {'images':>6} {'wall s':>7} {'cpu s':>7} {'start s':>7} {'img/s':>7} "
          f"{'img/s/core':>10} {'(-start)':>8} {'load1':>5}")
    try:
        for job in args.jobs:
            _, startup_cpu, _ = timed(startup[job])
            load_1min = os.getloadavg()[0]
            wall, cpu, _ = timed(commands[job])
            count = written(work / f"out-{job}")
            row = {"job": job, "images": count, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                   "startup_cpu_s": round(startup_cpu, 2), "img_s": round(count / wall, 1),
                   "img_s_per_core": round(count / cpu, 1),
                   "img_s_per_core_after_startup": round(count / max(cpu - startup_cpu, 1e-9), 1),
                   "load_1min": round(load_1min, 2), "command": " ".join(commands[job]), **info}
            rows.append(row)
            print(f"{job:<12} {count:>6} {wall:>7.1f} {cpu:>7.1f} {startup_cpu:>7.1f} "
                  f"{row['img_s']:>7.1f} {row['img_s_per_core']:>10.1f} "
                  f"{row['img_s_per_core_after_startup']:>8.1f} {load_1min:>5.2f}", flush=True)
    finally:
        if server is not None:
            server.shutdown()
    return rows


def parse_jobs(text: str) -> list[str]:
    jobs = text.split(",")
    if set(jobs) - set(JOBS) or len(set(jobs)) != len(jobs):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct names from {', '.join(JOBS)}")
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="source JPEGs to make (default 1000)")
    parser.add_argument("--src", type=Path, help="crop these photographs instead of scikit-learn's two")
    parser.add_argument("--min-side", type=int, default=320)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--size", type=int, default=256, help="side of the written images (default 256)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--jobs", type=parse_jobs, default=list(JOBS), help="images,reshard,img2dataset")
    parser.add_argument("--img2dataset", help="the img2dataset executable (default: on PATH)")
    parser.add_argument("--workdir", type=Path, help="kept here (must be empty or absent); "
                        "default: a temporary directory, removed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON lines appended here "
                        "(default docs/benchmarks/prep_throughput_<hostname>.jsonl)")
    args = parser.parse_args(argv)
    for name in ("images", "min_side", "max_side", "size", "samples_per_shard"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_side > args.max_side:
        parser.error("--min-side is more than --max-side")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    args.img2dataset_path = args.img2dataset or shutil.which("img2dataset")
    if "img2dataset" in args.jobs and (args.img2dataset_path is None
                                       or not Path(args.img2dataset_path).exists()):
        print("prep_throughput.py: error: img2dataset not found: install it in its own environment "
              "(python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset) and pass "
              "--img2dataset /tmp/i2d/bin/img2dataset, or leave it out with --jobs images,reshard",
              file=sys.stderr)
        return UserError.exit_code
    out = args.out or REPO / "docs" / "benchmarks" / f"prep_throughput_{socket.gethostname() or 'cpu'}.jsonl"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as temporary:
            work = args.workdir or Path(temporary)
            work.mkdir(parents=True, exist_ok=True)
            rows = run(args, work)
    except UserError as exc:
        print(f"prep_throughput.py: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
