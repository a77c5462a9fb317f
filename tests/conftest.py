"""Shared fixtures: digits shards made once per test session, and run helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for in-process tests: the 2 CI cores are shared, and threads spinning
    against other processes make tiny convolutions many times slower than one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """`data-prep digits` output (train: 15 shards, test: 4 shards of 32×32 grayscale)."""
    from data_prep.cli import main as data_prep_main

    out = tmp_path_factory.mktemp("digits") / "digits"
    assert data_prep_main(["digits", str(out)]) == 0
    return out


def tiny_overrides(digits_dir: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides that make configs/tiny/*.yaml train for seconds on the test's digits."""
    values = {
        "run_dir": str(run_dir),
        "data.shards": str(digits_dir / "train"),
        "data.eval_shards": str(digits_dir / "test"),
        "data.num_workers": 0,
        "wandb.mode": "disabled",
        "sample.n": 4,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run a console entry point (`launch` or `data-prep`) as a real subprocess."""
    command = {"launch": "launch.cli", "data-prep": "data_prep.cli"}[args[0]]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", command, *args[1:]],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or REPO,
    )


# --- small synthetic shards (added for the data, checkpoint and end-to-end tests) ------------------


def make_id_shards(
    directory: Path,
    num_shards: int = 8,
    per_shard: int = 6,
    size: int = 8,
    channels: int = 1,
    split: str = "train",
) -> Path:
    """A prepared split (shards + manifest.json) whose images say which sample they are.

    Sample ``i`` (0-based over the split) has row 0 filled with ``i`` (so ``images[:, 0, 0, 0]``
    is the id whatever the flip) and row 1 a left-to-right ramp (so a horizontal flip shows).
    At most 256 samples.
    """
    import numpy as np
    from PIL import Image

    from data_prep.writer import Sample, encode_image, write_split

    total = num_shards * per_shard
    assert total <= 256
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(total):
        array = np.full((size, size), 255 - index, dtype=np.uint8)
        array[0, :] = index
        array[1, :] = np.arange(size, dtype=np.uint8) * (200 // size)
        image = Image.fromarray(array, mode="L")
        if channels == 3:
            image = image.convert("RGB")
        samples.append(Sample(image=encode_image(image, "png"), source=f"synthetic/{index}"))
    write_split(
        samples, directory, split=split, image_size=size, channels=channels, encoding="png",
        samples_per_shard=per_shard, source="synthetic",
    )
    return directory
