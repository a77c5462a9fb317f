"""What latent diffusion saves at 256×256 (docs/latent.md): FLOPs per training image, and loader
images/s of latent shards against image shards.

``flops CONFIG [CONFIG ...]``: FLOPs of one training forward+backward per image of each config's
model (``pipeline.tracking.flops_per_image``: FlopCounterMode, matmuls, convolutions and
attention, 2 per multiply-add), built on the meta device with batch 1, so nothing is allocated
and no autoencoder run is needed (``model.autoencoder`` is dropped and the latent channels kept:
the first stage is frozen and runs once per image in ``data-prep latents``, not in the step).
An autoencoder config reports its encoder's forward FLOPs per image instead: that one-off cost
of ``data-prep latents``.

``loader``: ``--images`` 256×256 JPEG crops of scikit-learn's sample photos written to shards by
``data-prep images`` (as benchmarks/loader.py makes them), and latent shards of the same samples
with the layout ``data-prep latents`` writes for a f = 8, 4-channel autoencoder (per sample an
fp16 ``[8, 32, 32]`` array of mean and log-variance, ``.cls``, ``.json``; the values are random:
the reader never looks at them). Each is read by ``pipeline.data.TrainingBatches`` as the trainer
builds it (shuffle buffer 1000, prefetch 4; images: random flip and JPEG decode; latents: the
arrays as stored), ``--warmup-batches`` untimed, then the time to receive ``--measure-images``.
Images/s per worker divide by the worker count (by 1 for 0 workers: the main process reads).

    OMP_NUM_THREADS=1 python benchmarks/latent_cost.py flops configs/ldm_256.yaml configs/ddpm_256.yaml
    OMP_NUM_THREADS=1 python benchmarks/latent_cost.py loader --images 512 --workers 0,1
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config as config_module  # noqa: E402
from pipeline import models
from pipeline.errors import UserError  # noqa: E402


def flops(paths: list[str]) -> list[dict]:
    from pipeline.tracking import flops_per_image

    rows = []
    for path in paths:
        config = config_module.load(path)
        model_config, data = config.model, config.data
        if model_config.family == "autoencoder":
            with torch.device("meta"):
                model = models.build(model_config, data.image_size, data.channels)
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model.encode(torch.zeros(1, data.channels, data.image_size, data.image_size, dtype=torch.uint8, device="meta"))
            rows.append({"config": path, "what": "encoder forward per image (data-prep latents, once)",
                         "gflops_per_image": counter.get_total_flops() / 1e9,
                         "parameters": sum(p.numel() for p in model.encoder.parameters())})
            continue
        latent = model_config.family == "diffusion" and (model_config.autoencoder or model_config.latent_channels)
        if latent:
            channels = model_config.latent_channels or 4  # an autoencoder run's channels; 4 in the configs here
            model_config = model_config.model_copy(update={"autoencoder": None, "latent_channels": channels})
        def build(model_config=model_config, data=data):
            return models.build(model_config, data.image_size, data.channels)

        with torch.device("meta"):
            model = build()
            if latent:
                example = torch.zeros(1, 2 * channels, data.image_size, data.image_size, dtype=torch.float16)
            else:
                example = torch.zeros(1, data.channels, data.image_size, data.image_size, dtype=torch.uint8)
        total = flops_per_image(build, example)
        shape = model.image_shape
        rows.append({"config": path, "what": "training forward+backward per image",
                     "input": "x".join(str(s) for s in shape), "gflops_per_image": total / 1e9,
                     "parameters": sum(p.numel() for p in model.parameters())})
    return rows


# ---------------------------------------------------------------------------------------------
# Loader


def write_latent_shards(images_split: Path, out: Path, latent_shape=(4, 32, 32), seed: int = 0) -> None:
    """Latent shards of the samples of an image split, as `data-prep latents` lays them out."""
    from data_prep.writer import _HashingFile, _member
    from pipeline.data import iter_raw_samples
    from pipeline.latents import LATENT_MEMBER, LatentInfo, npy_bytes
    from pipeline.manifest import LATENT_ENCODING, Manifest, ShardInfo, read_manifest, write_manifest

    source = read_manifest(images_split)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    shards = []
    for shard in source.shards:
        with open(out / shard.name, "wb") as handle:
            hashing = _HashingFile(handle)
            count = 0
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, sample in iter_raw_samples(str(images_split / shard.name)):
                    moments = rng.standard_normal((2 * latent_shape[0], *latent_shape[1:])).astype(np.float16)
                    members = {f"{key}.{LATENT_MEMBER}": npy_bytes(moments)}
                    for extension in ("cls", "json"):
                        if extension in sample:
                            members[f"{key}.{extension}"] = sample[extension]
                    for name in sorted(members):
                        tar.addfile(_member(name, members[name]), io.BytesIO(members[name]))
                    count += 1
        shards.append(ShardInfo(shard.name, count, hashing.num_bytes, hashing.sha256.hexdigest()))
    info = LatentInfo("benchmark", "benchmark", "0" * 64, 0, "moments", tuple(latent_shape), 1.0,
                      source.image_size, source.channels)
    write_manifest(Manifest(
        split=source.split, image_size=latent_shape[1], channels=latent_shape[0], encoding=LATENT_ENCODING,
        num_samples=sum(s.num_samples for s in shards), shards=tuple(shards), skipped=(), source=str(images_split),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        num_classes=source.num_classes, kind="latents", latents=info.to_dict()), out)


def loader(args) -> list[dict]:
    from loader import make_image_folder, photographs, write_shards

    from pipeline.data import TrainingBatches, resolve_shards

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        make_image_folder(work / "images", photographs(None), args.images, args.seed, 256)
        samples_per_shard = max(1, args.images // max(max(args.workers), 1) // 2)
        write_shards(work / "images", work / "shards", samples_per_shard, 256)
        write_latent_shards(work / "shards" / "train", work / "latents")
        kinds = {"images 256x256x3 jpg": (work / "shards" / "train", 256, 3, True),
                 "latents 2x4x32x32 fp16": (work / "latents", 32, 3, False)}
        for workers in args.workers:
            for kind, (directory, size, channels, flip) in kinds.items():
                shards = resolve_shards(str(directory), "shards")
                batches = TrainingBatches(shards, seed=0, rank=0, world_size=1, num_workers=workers,
                                          batch_size=args.batch, image_size=size, channels=channels,
                                          shuffle_buffer=1000, random_flip=flip, prefetch_factor=4)
                try:
                    for _ in range(args.warmup_batches * max(workers, 1)):
                        next(batches)
                    timed = -(-args.measure_images // args.batch)
                    started = time.perf_counter()
                    received = sum(next(batches).shape[0] for _ in range(timed))
                    seconds = time.perf_counter() - started
                finally:
                    batches.close()
                rate = received / seconds
                rows.append({"data": kind, "workers": workers, "images_per_s": rate,
                             "images_per_s_per_worker": rate / max(workers, 1),
                             "bytes_per_sample": sum(s.num_bytes for s in shards.manifest.shards) / shards.manifest.num_samples,
                             "load_1min": os.getloadavg()[0]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    counting = commands.add_parser("flops", help="training FLOPs per image of configs")
    counting.add_argument("configs", nargs="+")
    reading = commands.add_parser("loader", help="loader images/s: latent shards against image shards at 256")
    reading.add_argument("--images", type=int, default=512)
    reading.add_argument("--workers", type=lambda text: [int(w) for w in text.split(",")], default=[0, 1])
    reading.add_argument("--batch", type=int, default=32)
    reading.add_argument("--warmup-batches", type=int, default=2)
    reading.add_argument("--measure-images", type=int, default=512)
    reading.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        rows = flops(args.configs) if args.command == "flops" else loader(args)
    except UserError as exc:
        print(f"latent_cost: error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
