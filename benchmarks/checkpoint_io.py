"""Checkpoint save and load times of a config's full training state, on CPU.

The state is what the trainer saves (pipeline/trainer.py ``save_checkpoint``): model and EMA
weights (safetensors), AdamW state (``torch.save``, loaded with ``weights_only=True``), trainer
and per-rank JSON, RNG state; written through pipeline/checkpoint.py (staged, fsynced, hashed,
manifest, rename). One process; the optimizer state is filled by one AdamW step on random
gradients. Each figure is the median of ``--repeats`` runs. Prints one JSON line per measurement:

- ``save_sync``: a synchronous save, all of it blocking training;
- ``save_async``: ``blocked_s`` (host copy of the state; what training waits for; the first
  save, which allocates the host buffers, is reported as ``first_blocked_s``) and
  ``background_s`` (encode, write, fsync, hash, commit on the thread);
- ``load``: ``verify_s`` (the newest checkpoint's sizes and sha256) and ``load_s`` (read, hash
  again, decode, ``load_state_dict`` into model, EMA and optimizer). Files were just written, so
  they come from the page cache: a cold read from disk or a network filesystem adds its
  bandwidth's worth.

    python benchmarks/checkpoint_io.py configs/ddpm_cifar32.yaml --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import checkpoint, models
from pipeline import config as config_module
from pipeline.ema import EMA


def build_state(config):
    torch.manual_seed(0)
    model = models.build(config.model, config.data.image_size, config.data.channels)
    ema = EMA(model, config.train.ema_halflife_images or 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, foreach=True)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, ema, optimizer


def parts_of(model, ema, optimizer, step: int) -> dict:
    """The files of one single-process checkpoint, as the trainer builds them."""
    return {
        checkpoint.rank_file(0, "json"): ("json", {"rng": {}, "data": {"positions": {}, "next_local": 0}}),
        checkpoint.rank_file(0, "safetensors"): ("tensors", {"torch": torch.get_rng_state()}),
        "model.safetensors": ("tensors", model.state_dict()),
        "ema.safetensors": ("tensors", ema.state_dict()),
        "optimizer.pt": ("torch", optimizer.state_dict()),
        "trainer.json": ("json", {"step": step, "images_seen": step, "world_size": 1, "scaler": None}),
    }


def save_sync(run_dir: Path, parts: dict, step: int) -> float:
    started = time.perf_counter()
    staging = checkpoint.prepare_staging(run_dir, step)
    records = checkpoint.write_files(staging, checkpoint.encode_parts(parts))
    checkpoint.commit(run_dir, step, step, records, keep_last=1)
    return time.perf_counter() - started


def save_async(run_dir: Path, writer: checkpoint.BackgroundWriter, parts: dict, step: int) -> tuple[float, float]:
    started = time.perf_counter()
    checkpoint.prepare_staging(run_dir, step)
    writer.start(step, step, parts, {})
    blocked = time.perf_counter() - started
    writer.wait()
    return blocked, time.perf_counter() - started - blocked


def load(run_dir: Path, model, ema, optimizer) -> tuple[float, float]:
    started = time.perf_counter()
    path, manifest = checkpoint.latest_valid(run_dir)
    verified = time.perf_counter()
    loaded = checkpoint.LoadedCheckpoint(path, manifest)
    model.load_state_dict(loaded.tensors("model.safetensors"))
    ema.load_state_dict(loaded.tensors("ema.safetensors"))
    optimizer.load_state_dict(loaded.torch_object("optimizer.pt"))
    loaded.json("trainer.json")
    loaded.tensors(checkpoint.rank_file(0, "safetensors"))
    return verified - started, time.perf_counter() - verified


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/ddpm_cifar32.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)

    config = config_module.load(args.config, [])
    model, ema, optimizer = build_state(config)
    work = Path(tempfile.mkdtemp(prefix="checkpoint_io-", dir=args.dir))
    common = {
        "config": args.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    try:
        sync_times, blocked, background, verify_times, load_times = [], [], [], [], []
        writer = checkpoint.BackgroundWriter(work, rank=0, world_size=1, keep_last=1)
        for repeat in range(args.repeats):
            sync_times.append(save_sync(work, parts_of(model, ema, optimizer, 2 * repeat + 1), 2 * repeat + 1))
            verify_s, load_s = load(work, model, ema, optimizer)
            verify_times.append(verify_s)
            load_times.append(load_s)
            blocked_s, background_s = save_async(work, writer, parts_of(model, ema, optimizer, 2 * repeat + 2), 2 * repeat + 2)
            blocked.append(blocked_s)
            background.append(background_s)
        found = checkpoint.latest_valid(work)
        size = sum(record["bytes"] for record in found[1]["files"].values())
        common["checkpoint_bytes"] = size
        common["load_average_1min"] = round(os.getloadavg()[0], 2)
        median = lambda values: round(statistics.median(values), 3)  # noqa: E731
        for record in (
            {"measure": "save_sync", "blocked_s": median(sync_times)},
            {"measure": "save_async", "blocked_s": median(blocked[1:] or blocked),
             "first_blocked_s": round(blocked[0], 3), "background_s": median(background)},
            {"measure": "load", "verify_s": median(verify_times), "load_s": median(load_times),
             "total_s": median([v + t for v, t in zip(verify_times, load_times)])},
        ):
            print(json.dumps({**record, **common, "repeats": args.repeats}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
