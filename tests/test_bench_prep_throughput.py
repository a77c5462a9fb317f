"""benchmarks/prep_throughput.py end to end on a tiny set: sources made, both data-prep jobs timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "prep_throughput.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_images_and_reshard_rows(tmp_path):
    work, out = tmp_path / "work", tmp_path / "rows.jsonl"
    done = bench("--images", "8", "--min-side", "40", "--max-side", "90", "--size", "32",
                 "--samples-per-shard", "3", "--jobs", "images,reshard", "--workdir", str(work),
                 "--out", str(out))
    assert done.returncode == 0, done.stderr
    sizes = {Image.open(p).size for p in (work / "images").glob("*.jpg")}
    assert len(sizes) > 1 and all(40 <= side <= 90 for size in sizes for side in size)
    assert len(list((work / "source").glob("*.tar"))) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["job"] for row in rows] == ["images", "reshard"]
    for row in rows:
        assert row["images"] == 8 and row["img_s"] > 0 and row["img_s_per_core"] > 0
        assert row["cpu_s"] > 0 and row["startup_cpu_s"] > 0 and "--workers 1" in row["command"]
        assert "img_s_per_core_after_startup" in row


def test_missing_img2dataset_is_a_one_line_error(tmp_path):
    done = bench("--images", "2", "--min-side", "20", "--max-side", "30", "--jobs", "img2dataset",
                 "--img2dataset", str(tmp_path / "absent"), "--out", str(tmp_path / "rows.jsonl"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("prep_throughput.py: error: img2dataset not found")
