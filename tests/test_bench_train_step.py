"""benchmarks/diffusers_baseline.py and benchmarks/train_step.py: the diffusers network is ours
(same parameters, same outputs after the weight copy), and the benchmark runs end to end on CPU.

Compiled mode is not run here: compiling even the tiny network takes minutes on these CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytest.importorskip("diffusers")
sys.path.insert(0, str(REPO / "benchmarks"))

import diffusers_baseline  # noqa: E402
import train_step  # noqa: E402

from pipeline import config as config_module  # noqa: E402
from pipeline import models


def network_config(name: str):
    path, overrides, _ = train_step.NETWORKS[name]
    return config_module.load(REPO / path, overrides)


@pytest.mark.parametrize("name, expected", [("cifar32", 35_746_307), ("256", 113_673_219)])
def test_diffusers_network_has_our_parameters(name, expected):
    """Every parameter maps by name and shape (copy_weights raises otherwise): built on the meta
    device, so the 256 network costs no memory or compute."""
    config = network_config(name)
    with torch.device("meta"):
        ours = models.build(config.model, config.data.image_size, config.data.channels).net
        theirs = diffusers_baseline.diffusers_unet_for(config.model, config.data.image_size,
                                                       config.data.channels)
    diffusers_baseline.copy_weights(ours, theirs)
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert sum(p.numel() for p in theirs.parameters()) == expected


@pytest.mark.parametrize("name, batch", [("tiny", 2), ("cifar32", 1)])
def test_same_outputs_after_copy(name, batch):
    config = network_config(name)
    difference, scale = diffusers_baseline.check_same_outputs(
        config.model, config.data.image_size, config.data.channels, batch=batch)
    assert scale > 0.1  # randomized weights: the output is not the initial all-zeros
    assert difference <= diffusers_baseline.RELATIVE_TOLERANCE * scale


def test_copy_weights_names_the_mismatch():
    config = network_config("tiny")
    wider = config.model.model_copy(update={"base_channels": 64})
    ours = models.build(config.model, config.data.image_size, config.data.channels).net
    theirs = diffusers_baseline.diffusers_unet_for(wider, config.data.image_size,
                                                   config.data.channels)
    with pytest.raises(ValueError, match=r"conv_in.weight: ours \(32, 3, 3, 3\), diffusers \(64, 3, 3, 3\)"):
        diffusers_baseline.copy_weights(ours, theirs)


def test_head_counts_diffusers_cannot_express():
    """num_heads=2 over attention widths 32 and 64 means head widths 16 and 32; diffusers has one."""
    config = network_config("tiny")
    mixed = config.model.model_copy(update={"attention_resolutions": (16, 8), "num_heads": 2})
    with pytest.raises(ValueError, match="one attention_head_dim.*head_channels"):
        diffusers_baseline.diffusers_unet_kwargs(mixed, 16, 3)
    by_width = mixed.model_copy(update={"head_channels": 16})
    assert diffusers_baseline.diffusers_unet_kwargs(by_width, 16, 3)["attention_head_dim"] == 16


@pytest.mark.parametrize("argv, message", [
    (["--networks", "cifar10"], "--networks 'cifar10'"),
    (["--modes", "fast"], "--modes 'fast'"),
    (["--networks", "tiny", "--batches", "cifar32=8"], "not in --networks tiny"),
    (["--batches", "0,4"], "positive integers"),
    (["--compile-mode", "max"], "--compile-mode 'max'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--loss-check", "3"], "at least 8 steps"),
    (["--modes", "none"], "measures nothing without --loss-check"),
])
def test_bad_arguments_are_one_line(argv, message):
    with pytest.raises(SystemExit, match=message) as raised:
        train_step.parse_args(argv)
    assert "\n" not in str(raised.value)


def test_batches_per_network():
    args = train_step.parse_args(["--networks", "cifar32,256", "--batches", "256=8"])
    assert args.batches == {"cifar32": [128, 512], "256": [8]}
    assert train_step.parse_args(["--networks", "tiny", "--batches", "4,2"]).batches == {"tiny": [4, 2]}


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--networks", "tiny",
         "--batches", "4", "--modes", "eager", "--steps", "3", "--warmup", "1",
         "--loss-check", "8", "--out", str(out), "--profile", str(tmp_path / "profile.txt")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    steps = [row for row in rows if row["kind"] == "train_step"]
    assert sorted(row["impl"] for row in steps) == ["diffusers", "ours"]
    for row in steps:
        for field in ("impl", "network", "batch", "img_s", "mfu", "compiled", "tflops", "params",
                      "flops_per_image", "peak_mem_mb", "ratio_vs_diffusers_compiled", "device",
                      "date", "torch"):
            assert field in row, field
        assert row["network"] == "tiny" and row["batch"] == 4 and row["compiled"] is False
        assert row["img_s"] > 0 and row["tflops"] > 0
        assert row["device"] == "cpu" and row["mfu"] is None and row["peak_mem_mb"] is None
        assert row["ratio_vs_diffusers_compiled"] is None  # no compiled diffusers row to divide by
    assert steps[0]["params"] == steps[1]["params"] == 1_002_883
    assert steps[0]["flops_per_image"] == steps[1]["flops_per_image"]
    (check,) = [row for row in rows if row["kind"] == "loss_check"]
    assert check["steps"] == 8 and check["window"] == 2
    for field in ("mean_fp32", "mean_bf16", "difference", "step_std", "within_noise"):
        assert field in check, field
    assert "tiny" in done.stdout and "ours" in done.stdout
    profile = (tmp_path / "profile.txt").read_text()
    for impl in ("diffusers", "ours"):
        section = profile.split(f"## tiny batch 4 {impl} eager")[1].split("## ")[0]
        # Both sides' attention runs on a fused kernel, not the unfused math path.
        assert "scaled_dot_product_flash_attention" in section, section
