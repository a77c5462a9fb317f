"""benchmarks/loader.py end to end on a tiny set: images made, shards written, rows appended."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "loader.py"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """48 images, workers 0 and 1, batch 8, 32 timed images; both sides where torchvision is."""
    work = tmp_path_factory.mktemp("bench") / "work"
    out = work.parent / "rows.jsonl"
    impls = "ours,torchvision" if HAS_TORCHVISION else "ours"
    done = bench("--images", "48", "--workers", "0,1", "--batch", "8", "--measure-images", "30",
                 "--warmup-batches", "1", "--impl", impls, "--workdir", str(work), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return work, rows, done.stdout


@pytest.mark.slow
def test_data_made_as_image_folder_and_shards(tiny_run):
    work, _, _ = tiny_run
    files = sorted((work / "images").glob("class_*/*.jpg"))
    assert len(files) == 48
    assert len({path.parent.name for path in files}) == 10
    with Image.open(files[0]) as image:
        assert image.size == (256, 256) and image.mode == "RGB"
        assert np.asarray(image).std() > 10  # a photograph, not a flat fill
    manifest = json.loads((work / "shards" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 48 and manifest["encoding"] == "jpg"


def check_rows(rows: list[dict], impl: str) -> None:
    mine = [row for row in rows if row["impl"] == impl]
    assert [row["workers"] for row in mine] == [0, 1]
    for row in mine:
        assert row["batch"] == 8 and row["images"] == 32  # 30 rounded up to whole batches
        assert row["img_s"] > 0 and row["img_s_per_worker"] == row["img_s"]
        assert row["bytes_per_image"] > 10_000 and row["load_1min"] >= 0 and row["date"]


@pytest.mark.slow
def test_our_rows(tiny_run):
    _, rows, stdout = tiny_run
    check_rows(rows, "ours")
    parts = {row["impl"]: row for row in rows if row["impl"].startswith("ours-")}
    assert parts["ours-tar-read"]["images"] == 48 and parts["ours-decode"]["images"] == 30
    stored = next(row for row in rows if row["impl"] == "stored-decode")
    assert stored["images"] == 30 and stored["img_s"] > 0
    assert all(row["img_s"] > 0 and row["workers"] == 0 for row in parts.values())
    assert f"{len(rows)} rows appended" in stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed: the baseline is not measured")
def test_torchvision_rows(tiny_run):
    _, rows, _ = tiny_run
    check_rows(rows, "torchvision")
    assert len(rows) == 7  # and ours-tar-read, ours-decode, stored-decode


@pytest.mark.slow
def test_stored_larger_than_delivered(tmp_path):
    """--stored-size 64 --size 32: 64×64 JPEGs on disk, 32×32 batches from both sides."""
    work, out = tmp_path / "work", tmp_path / "rows.jsonl"
    impls = "ours,torchvision" if HAS_TORCHVISION else "ours"
    done = bench("--images", "24", "--workers", "0", "--batch", "8", "--measure-images", "16",
                 "--warmup-batches", "1", "--impl", impls, "--stored-size", "64", "--size", "32",
                 "--workdir", str(work), "--out", str(out))
    assert done.returncode == 0, done.stderr
    with Image.open(next((work / "images").glob("class_*/*.jpg"))) as image:
        assert image.size == (64, 64)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["impl"] for row in rows} >= {"ours", "ours-decode", "stored-decode"}
    assert all(row["stored_size"] == 64 and row["image_size"] == 32 for row in rows)


def load_benchmark():
    # run as a script, the benchmark finds its sibling modules (torchvision_compat) on sys.path
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_loader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0,x"], "is not a comma-separated list of integers"),
        (["--impl", "ours,dali"], "give distinct names from ours, torchvision"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--images", "10", "--batch", "4", "--workers", "4", "--samples-per-shard", "5"],
         "every worker needs its own"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark().main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
