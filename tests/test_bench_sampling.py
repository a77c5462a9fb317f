"""benchmarks/sampling.py: runs end to end on CPU, both sides evaluate the network equally often,
and our DDIM and DDPM samplers give diffusers' outputs from the same noise where their grids
agree.

Compiled mode is not run here: compiling even the tiny network takes minutes on these CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import sampling  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--networks", "cifar10"], "--networks 'cifar10'"),
    (["--samplers", "ddim100"], "--samplers 'ddim100'"),
    (["--modes", "fast"], "--modes 'fast'"),
    (["--networks", "tiny", "--batch", "cifar32=8"], "not in --networks tiny"),
    (["--batch", "0"], "positive integer"),
    (["--ddpm-steps", "1"], "between 2 and 1000"),
    (["--warmup-steps", "0"], "--warmup-steps between 1"),
])
def test_bad_arguments_are_one_line(argv, message):
    with pytest.raises(SystemExit, match=message) as raised:
        sampling.parse_args(argv)
    assert "\n" not in str(raised.value)


def test_batch_per_network():
    args = sampling.parse_args(["--batch", "256=4"])
    assert args.batch == {"cifar32": 256, "256": 4}
    assert sampling.parse_args(["--networks", "tiny", "--batch", "3"]).batch == {"tiny": 3}


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--networks", "tiny",
         "--batch", "2", "--modes", "eager", "--precision", "fp32", "--ddpm-steps", "8",
         "--warmup-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    checks = {(row["sampler"], row["case"].split(":")[0]): row
              for row in rows if row["kind"] == "sampler_check"}
    assert set(checks) == {("ddim", "linspace"), ("ddim", "trailing"), ("ddpm", "the same chain")}
    for row in checks.values():
        assert row["same_timesteps"]
        assert row["evals"]["ours"] == row["evals"]["diffusers"] == row["steps"]
    assert checks["ddpm", "the same chain"]["steps"] == 8
    # Same grid, same noise: equal to float32 rounding. Our grid with diffusers' t - 20 rule:
    # a visible difference (the check would be vacuous if the network's output were zero).
    assert checks["ddim", "trailing"]["max_abs_diff"] < 1e-3
    assert checks["ddpm", "the same chain"]["max_abs_diff"] < 1e-3
    assert checks["ddim", "linspace"]["max_abs_diff"] > 1e-3

    timed = [row for row in rows if row["kind"] == "sampling"]
    assert sorted((row["impl"], row["sampler"]) for row in timed) == [
        ("diffusers", "ddim"), ("diffusers", "ddpm"), ("ours", "ddim"), ("ours", "ddpm")]
    for row in timed:
        for field in ("impl", "network", "sampler", "steps", "batch", "compiled", "img_s", "evals",
                      "peak_mem_mb", "ratio_vs_diffusers", "device", "date", "torch"):
            assert field in row, field
        assert row["network"] == "tiny" and row["batch"] == 2 and row["compiled"] is False
        assert row["img_s"] > 0 and row["evals_s"] > 0
        assert row["steps"] == {"ddim": 50, "ddpm": 8}[row["sampler"]] == row["evals"]
        assert row["device"] == "cpu" and row["peak_mem_mb"] is None
        assert (row["ratio_vs_diffusers"] is None) == (row["impl"] == "diffusers")
    for sampler in ("ddim", "ddpm"):
        ours, theirs = (next(r for r in timed if r["impl"] == impl and r["sampler"] == sampler)
                        for impl in ("ours", "diffusers"))
        assert ours["evals"] == theirs["evals"]
        assert ours["ratio_vs_diffusers"] == pytest.approx(ours["img_s"] / theirs["img_s"])
    assert "tiny" in done.stdout and "ours" in done.stdout
