"""Class-conditional models, flow matching and the DiT through the real commands (`launch local`,
`launch sample --classes`, `launch eval`), on the test's digits with shrunk models: seconds each.

The DiT trains on two processes under DDP and under DeepSpeed ZeRO-2; the conditional DDPM's
`launch sample --classes` grid is compared byte for byte with the same samples drawn in this
process, row by row in the order the classes were listed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_id_shards, run_cli, tiny_overrides

pytestmark = pytest.mark.slow

SHORT = {"train.max_steps": 4, "train.warmup_steps": 1, "train.log_every_steps": 2,
         "checkpoint.every_steps": 4, "data.batch_size": 8, "sample.n": 4}
SMALL_UNET = {"model.base_channels": 8, "model.norm_groups": 4, "model.timesteps": 50, "model.sample_steps": 2}
SMALL_DIT = {"model.dit_depth": 1, "model.dit_width": 16, "model.dit_heads": 2, "model.patch_size": 4,
             "model.timesteps": 50, "model.sample_steps": 2}


def train(config: str, digits_dir: Path, run_dir: Path, *launch_args: str, **extra):
    overrides = tiny_overrides(digits_dir, run_dir, **{**SHORT, **extra})
    result = run_cli("launch", "local", *launch_args, config, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def cond_run(digits_dir, tmp_path_factory) -> Path:
    return train("configs/tiny/cond_ddpm.yaml", digits_dir, tmp_path_factory.mktemp("cond") / "run",
                 **SMALL_UNET, **{"eval.every_steps": 4, "eval.max_images": 8})


@pytest.mark.quick
def test_a_conditional_run_trains_evaluates_and_draws_its_classes_in_rows(cond_run, digits_dir, tmp_path):
    records = [json.loads(line) for line in (cond_run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("eval/bits_per_dim" in r for r in records)
    # The end-of-training grid: sample.n = 4 images of a conditional model, 2 rows of 2 classes.
    assert png(cond_run / "samples" / "step-000000004.png").shape == (2 * 18 + 2, 2 * 18 + 2)

    out = tmp_path / "g.png"
    result = run_cli("launch", "sample", str(cond_run), "--classes", "2,0,1", "--n", "3", "--out", str(out),
                     "guidance=2.0")
    assert result.returncode == 0, result.stderr[-3000:]
    grid = png(out)
    assert grid.shape == (3 * 18 + 2, 3 * 18 + 2)  # a row per class, 3 images each, 16px + padding
    # The same samples in this process: rows in the order listed, the classes asked for.
    from launch.weights import load_model
    from pipeline import images

    model, _, config = load_model(cond_run)
    labels = images.class_rows([2, 0, 1], 3)
    with torch.no_grad():
        expected = model.sample(9, torch.Generator().manual_seed(0), labels=labels,
                                **{**config.sample.options, "guidance": 2.0})
    assert np.array_equal(grid, images.grid(expected, columns=3))

    report = run_cli("launch", "eval", str(cond_run), "--max-images", "8", "--no-progress")
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads(report.stdout)
    assert math.isfinite(result["bits_per_dim"]) and result["kind"] == "upper_bound" and result["images"] == 8


def test_class_accuracy_rows_per_scale_with_the_sampling_options_given(cond_run, tmp_path):
    """benchmarks/class_accuracy.py: one row per guidance scale, the options after the run
    directory replacing the run's, every image classified."""
    out = tmp_path / "acc.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "class_accuracy.py"), str(cond_run),
                             "eta=0", "--scales", "0,2", "--per-class", "1", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["guidance"] for row in rows] == [0.0, 2.0]
    for row in rows:
        assert row["options"]["eta"] == 0.0 and row["options"]["guidance"] == row["guidance"]
        assert row["images"] == 10 and len(row["per_class"]) == 10 and 0.0 <= row["accuracy"] <= 1.0
    wrong = subprocess.run([sys.executable, str(REPO / "benchmarks" / "class_accuracy.py"), str(cond_run),
                            "sampler=euler"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.startswith("class_accuracy: error: sampler 'euler'")


def test_classes_that_cannot_be_drawn_are_one_line_errors(cond_run, tmp_path):
    wrong = run_cli("launch", "sample", str(cond_run), "--classes", "3,10", "--out", str(tmp_path / "x.png"))
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0
    assert "class 10 is out of range; this model has classes 0..9" in wrong.stderr
    unconditional = tmp_path / "uncond"
    shutil.copytree(REPO / "tests" / "fixtures" / "legacy_runs" / "ddp", unconditional)
    refused = run_cli("launch", "sample", str(unconditional), "--classes", "0", "--out", str(tmp_path / "y.png"))
    assert refused.returncode == 2 and "model is unconditional" in refused.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_a_conditional_model_on_unlabelled_shards_stops_before_training(digits_dir, tmp_path):
    ids = make_id_shards(tmp_path / "ids", num_shards=4, per_shard=6)
    overrides = tiny_overrides(digits_dir, tmp_path / "run", **{**SHORT, **SMALL_UNET, "data.shards": ids,
                                                                  "data.image_size": 8})
    result = run_cli("launch", "local", "configs/tiny/cond_ddpm.yaml", *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().startswith("launch: error: data.shards: labels were asked for but the shards "
                                            "carry none") and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_flow_matching_trains_samples_and_reports_an_ode_estimate(digits_dir, tmp_path):
    run = train("configs/tiny/flow_matching.yaml", digits_dir, tmp_path / "fm", **SMALL_UNET,
                **{"model.likelihood_steps": 2})
    report = run_cli("launch", "eval", str(run), "--max-images", "4", "--no-progress")
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads(report.stdout)
    assert result["kind"] == "estimate" and result["estimator"] == "probability-flow-ode"
    assert result["ode_steps"] == 2 and result["solver"] == "heun" and math.isfinite(result["bits_per_dim"])
    refused = run_cli("launch", "eval", str(run), "--estimator", "exact", "--max-images", "4")
    assert refused.returncode == 2 and "probability-flow ODE estimate" in refused.stderr
    out = tmp_path / "fm.png"
    sampled = run_cli("launch", "sample", str(run), "--classes", "7", "--n", "2", "--out", str(out), "sampler=euler")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert png(out).shape == (18 + 2, 2 * 18 + 2)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_the_dit_trains_on_two_processes(strategy, digits_dir, tmp_path):
    extra = {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 2} if strategy == "deepspeed" else {}
    run = train("configs/tiny/dit.yaml", digits_dir, tmp_path / strategy, "--nproc", "2", **SMALL_DIT, **extra)
    manifest = json.loads((run / "checkpoints" / "step-000000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest.get("strategy", "ddp") == strategy
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(loss) for loss in losses)
    out = tmp_path / "dit.png"
    sampled = run_cli("launch", "sample", str(run), "--classes", "0,1", "--n", "2", "--out", str(out))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert png(out).shape == (2 * 18 + 2, 2 * 18 + 2)


@pytest.mark.parametrize("config, extra", [
    ("configs/tiny/cond_vae.yaml", {"data.image_size": 8}),
    ("configs/tiny/cond_flow.yaml", {"data.image_size": 8, "model.depth": 1, "model.hidden_channels": 8}),
    ("configs/tiny/cond_pixelcnn.yaml", {"data.image_size": 8, "model.filters": 8, "model.num_stages": 2,
                                         "sample.n": 1}),
])
def test_every_family_trains_and_samples_classes(config, extra, digits_dir, tmp_path):
    run = train(config, digits_dir, tmp_path / "run", **extra)
    out = tmp_path / "classes.png"
    sampled = run_cli("launch", "sample", str(run), "--classes", "4,9", "--n", "2", "--out", str(out))
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert png(out).shape == (2 * 10 + 2, 2 * 10 + 2)
