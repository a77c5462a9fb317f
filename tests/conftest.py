"""Shared fixtures: digits shards made once per test session, and run helpers; the two tiers.

The quick tier (``scripts/test.sh``, ``pytest --tier quick``) runs every test not marked ``slow``
and the slow ones marked ``quick``: at least one end-to-end test of each capability. The full
tier (``scripts/test.sh --full``, plain ``pytest``) runs everything. Where the local Slurm
cluster cannot run (``GENPIPE_NO_SLURM`` names why; scripts/test.sh sets it for a user who is
not root), the tests marked ``slurm`` are left out and one line of the summary says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import tiny_overrides  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parent.parent
NO_SLURM = "GENPIPE_NO_SLURM"


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("quick", "full"), default="full",
                     help="quick: the tests not marked slow, and the slow ones marked quick; full: every test "
                          "(default)")


def pytest_collection_modifyitems(config, items):
    quick = config.getoption("--tier") == "quick"
    no_slurm = os.environ.get(NO_SLURM)
    kept, left_for_full, left_for_slurm = [], [], []
    for item in items:
        if no_slurm and item.get_closest_marker("slurm"):
            left_for_slurm.append(item)
        elif quick and item.get_closest_marker("slow") and not item.get_closest_marker("quick"):
            left_for_full.append(item)
        else:
            kept.append(item)
    if left_for_full or left_for_slurm:
        config.hook.pytest_deselected(items=left_for_full + left_for_slurm)
        items[:] = kept
    config.stash[_LEFT_OUT] = (len(left_for_full), len(left_for_slurm), no_slurm)


_LEFT_OUT = pytest.StashKey[tuple]()


def pytest_report_header(config):
    tier = config.getoption("--tier")
    return f"tier: {tier}" + (" (scripts/test.sh --full runs every test)" if tier == "quick" else "")


def pytest_terminal_summary(terminalreporter, config):
    full_only, slurm, why = config.stash.get(_LEFT_OUT, (0, 0, None))
    if full_only:
        terminalreporter.write_line(f"quick tier: {full_only} slow tests left for the full tier "
                                    f"(scripts/test.sh --full)")
    if slurm:
        terminalreporter.write_line(f"slurm: {slurm} tests that need the local Slurm cluster not run: {why}")


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


# --- the run bank (tests/runs.py): runs that many tests read, trained once per session ----------


@pytest.fixture(scope="session")
def resumed_run(digits_dir, tmp_path_factory) -> dict:
    """The tiny DDPM stopped by SIGTERM after step 3 and relaunched to step 30, one process with a
    data worker, W&B offline (a fake API key in the environment), MFU, grids and FID
    (`runs.RESUMED`): `runs.stop_and_resume`'s outcome, with the launches' logs under
    ``tmp_path``. Tests read it; one that changes it copies it first."""
    from runs import FAKE_API_KEY, RESUMED, stop_and_resume

    tmp_path = tmp_path_factory.mktemp("resumed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_API_KEY", FAKE_API_KEY)
        outcome = stop_and_resume(digits_dir, tmp_path, nproc=1, **RESUMED)
    return {**outcome, "tmp_path": tmp_path}


@pytest.fixture(scope="session")
def ddp_reference(digits_dir, tmp_path_factory) -> Path:
    """The DDP run that ZeRO and FSDP2 runs are compared with: `runs.SHARDED` on two processes,
    rank 0's loss NaN at step 4 (`runs.NAN_AT_4`)."""
    from runs import NAN_AT_4, SHARDED, finish

    run_dir = tmp_path_factory.mktemp("ddp_reference") / "run"
    finish(digits_dir, run_dir, env=NAN_AT_4, **SHARDED)
    return run_dir

