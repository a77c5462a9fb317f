"""`data-prep latents AE_RUN SHARDS OUT`: image shards encoded into latent shards.

Every split of SHARDS (a `data-prep` output directory, or one split directory) is encoded by the
autoencoder of the run directory AE_RUN (its newest intact checkpoint, EMA weights where kept):
each input shard becomes an output shard of the same name, each sample ``<key>.latent.npy``, an
fp16 array of the posterior's mean and log-variance stacked ``[2c, h, w]`` (``--store moments``,
the default: the diffusion model draws a fresh z = μ + σ·ε each time it reads the sample) or of
the mean alone ``[c, h, w]`` (``--store mean``), with the sample's ``.cls`` and ``.json`` carried
through unchanged. Shards are encoded in parallel, one shard per task (``--workers``).

Each split's manifest (`pipeline.manifest`, ``kind: "latents"``) names the autoencoder run, its
checkpoint and that checkpoint's hash, the latent shape and the scale factor: 1/std of the
latents z over every element of the train split (from the moments: Var z = E[μ² + σ²] − E[μ]²,
exact, no draw; with ``--store mean``, of μ), so that the diffusion model sees roughly unit variance (LDM sec. 4.3.2).
"""

from __future__ import annotations

import argparse
import datetime
import io
import multiprocessing
import os
import tarfile
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

STORE = ("moments", "mean")
_worker: dict = {}


def add_parser(commands) -> None:
    latents = commands.add_parser("latents", help="image shards encoded by an autoencoder run into latent shards")
    latents.add_argument("autoencoder", metavar="AE_RUN", help="run directory of an autoencoder (model.family autoencoder)")
    latents.add_argument("shards", metavar="SHARDS", help="a data-prep output directory, or one split of it")
    latents.add_argument("out", metavar="OUT", help="output directory (OUT/<split>/shard-*.tar + manifest.json)")
    latents.add_argument("--store", choices=STORE, default="moments",
                         help="moments: mean and log-variance, z drawn per read (default); mean: μ only")
    latents.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    latents.add_argument("--workers", type=int, default=1, help="encoding processes, one shard each at a time (default 1)")
    latents.add_argument("--overwrite", action="store_true", help="replace existing splits in OUT")


def run(args: argparse.Namespace) -> int:
    from data_prep.writer import SPLITS, StagedOutput
    from pipeline.latents import LatentInfo, load_autoencoder
    from pipeline.manifest import LATENT_ENCODING, Manifest, ShardInfo, find_split_dirs, read_manifest, write_manifest

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    stage = load_autoencoder(args.autoencoder, key="AE_RUN")
    split_dirs = find_split_dirs(args.shards)
    if not split_dirs:
        raise UserError(f"SHARDS: {args.shards} holds no data-prep split (no manifest.json in it or its subdirectories)")
    manifests = {}
    for directory in split_dirs:
        manifest = read_manifest(directory)
        if manifest.kind != "images":
            raise UserError(f"SHARDS: {directory} holds {manifest.kind}, not images")
        if manifest.split not in SPLITS:
            raise UserError(f"SHARDS: {directory} is split {manifest.split!r}; expected one of {', '.join(SPLITS)}")
        manifests[manifest.split] = (directory, manifest)
    data = stage.config.data
    latent_shape = tuple(stage.model.latent_shape)
    output = StagedOutput(args.out, list(manifests), args.overwrite)
    try:
        results = {}
        for split, (directory, manifest) in manifests.items():
            tasks = [(str(directory / shard.name), str(output.path(split) / shard.name), data.image_size,
                      data.channels, args.store, args.batch_size) for shard in manifest.shards]
            results[split] = _encode_all(args, tasks)
        # The scale from the train split (the only one when there is no train split).
        totals = np.sum([r[2] for r in results.get("train", next(iter(results.values())))], axis=0)
        mean = totals[0] / totals[2]
        std = float(np.sqrt(max(totals[1] / totals[2] - mean * mean, 1e-12)))
        info = LatentInfo(
            autoencoder=str(args.autoencoder), checkpoint=stage.checkpoint,
            checkpoint_sha256=stage.checkpoint_sha256, step=stage.step,
            stored=args.store, latent_shape=latent_shape,
            scale_factor=1.0 / std, image_size=data.image_size, image_channels=data.channels)
        written = {}
        for split, (directory, manifest) in manifests.items():
            shards = tuple(ShardInfo(name=Path(path).name, num_samples=count, num_bytes=size, sha256=digest)
                           for (path, size, digest), count, _ in results[split])
            written[split] = Manifest(
                split=split, image_size=latent_shape[1], channels=latent_shape[0], encoding=LATENT_ENCODING,
                num_samples=sum(s.num_samples for s in shards), shards=shards, skipped=(),
                source=str(directory), created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                num_classes=manifest.num_classes, class_names=manifest.class_names,
                class_counts=manifest.class_counts, keys=manifest.keys, kind="latents", latents=info.to_dict())
            write_manifest(written[split], output.path(split))
        finals = output.commit()
    except BaseException:
        output.discard()
        raise
    for split, manifest in written.items():
        print(f"{split}: {manifest.num_samples} latents {list(latent_shape)} in {len(manifest.shards)} "
              f"shard{'s' if len(manifest.shards) != 1 else ''} -> {finals[split]}")
    print(f"latent scale factor {info.scale_factor:.5f} (1/std over the "
          f"{'train' if 'train' in results else next(iter(results))} split); autoencoder checkpoint "
          f"{stage.checkpoint} sha256 {stage.checkpoint_sha256[:12]}")
    return 0


def _encode_all(args, tasks: list[tuple]) -> list:
    if args.workers == 1 or len(tasks) <= 1:
        _init(args.autoencoder)
        return [_encode_shard(task) for task in tasks]
    # fork: the workers start at once, without importing torch again.
    with multiprocessing.get_context("fork").Pool(min(args.workers, len(tasks)), _init, (args.autoencoder,)) as pool:
        return pool.map(_encode_shard, tasks, chunksize=1)


def _init(autoencoder: str) -> None:
    import torch

    from pipeline.latents import load_autoencoder

    torch.set_num_threads(1)
    if _worker.get("run") != autoencoder:
        _worker.update(run=autoencoder, model=load_autoencoder(autoencoder, key="AE_RUN").model)


def _encode_shard(task: tuple) -> tuple:
    """Encode one shard; ((path, bytes, sha256), samples, [Σμ, Σ(μ²+σ²), elements])."""
    import torch

    from data_prep.writer import _HashingFile, _member
    from pipeline.data import decode_image, iter_raw_samples
    from pipeline.latents import LATENT_MEMBER, npy_bytes

    source, target, image_size, channels, store, batch_size = task
    model = _worker["model"]
    sums = np.zeros(3, dtype=np.float64)
    pending: list[tuple[str, dict, np.ndarray]] = []
    count = 0
    tmp = target + ".tmp"

    def flush(tar):
        nonlocal count
        if not pending:
            return
        batch = torch.from_numpy(np.stack([image for _, _, image in pending]))
        with torch.no_grad():
            mean, logvar = model.encode(batch)
        mean, logvar = mean.double(), logvar.double()
        sums[0] += mean.sum().item()
        # E[z²] of what the diffusion model will see: drawn z (moments) or μ itself (mean)
        sums[1] += (mean.square() + logvar.exp() if store == "moments" else mean.square()).sum().item()
        sums[2] += mean.numel()
        stored = torch.cat([mean, logvar], 1) if store == "moments" else mean
        for (key, members, _), latent in zip(pending, stored.half().numpy()):
            out = {f"{key}.{LATENT_MEMBER}": npy_bytes(latent)}
            for extension in ("cls", "json"):
                if extension in members:
                    out[f"{key}.{extension}"] = members[extension]
            for name in sorted(out):
                tar.addfile(_member(name, out[name]), io.BytesIO(out[name]))
            count += 1
        pending.clear()

    with open(tmp, "wb") as handle:
        hashing = _HashingFile(handle)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in iter_raw_samples(source):
                pending.append((key, members, decode_image(members, key, source, image_size, channels)))
                if len(pending) == batch_size:
                    flush(tar)
            flush(tar)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return (target, hashing.num_bytes, hashing.sha256.hexdigest()), count, sums
