"""Every strategy in every combination a GPU run uses, on two processes.

DDP, DeepSpeed ZeRO-1, ZeRO-2, ZeRO-3 and FSDP2, each with EMA off, EMA on and sampled (with
checkpoints written in the background, ``checkpoint.async_save``), and EMA on with grids of the
live weights (``sample.use_ema=false``); every cell in bf16, with what a GPU run
turns on: MFU (a stated peak), sample grids, held-out bits/dim, FID (stand-in features) and a
checkpoint every two steps, and the hang watchdog armed with a short timeout. Each cell must end
with exit status 0, log all of it, and leave a checkpoint that a 1-process job resumes exactly:
tests/sharded_probe.py assembles what that job holds through the libraries' own APIs (FSDP2's
``full_tensor``, DeepSpeed's ``safe_get_full_*``) and it must equal the checkpoint's files bit for
bit. One cell per strategy (the one with the live-weights grid, where the sharded paths differ
most) is in the quick tier; the rest in the full tier.
"""

from __future__ import annotations

import json

import pytest

from pipeline import checkpoint
from tests.conftest import run_cli
from tests.runs import TINY, overrides, read_jsonl
from tests.sharded_probe import assert_holds, run_probe

STRATEGIES = {
    "ddp": {"distributed.strategy": "ddp"},
    "zero1": {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 1},
    "zero2": {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 2},
    "zero3": {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 3},
    "fsdp": {"distributed.strategy": "fsdp"},
}
EMA = {
    "ema-off": {"train.ema_halflife_images": "null", "train.ema_rampup_ratio": "null"},
    "ema": {"sample.use_ema": "true", "checkpoint.async_save": "true"},  # checkpoints written in the background
    "live-grid": {"sample.use_ema": "false"},
}
QUICK = "live-grid"
CELL = {
    "train.max_steps": 4,
    "train.mixed_precision": "bf16",
    "train.log_every_steps": 2,
    "checkpoint.every_steps": 2,
    "checkpoint.keep_last": 2,
    "data.batch_size": 4,  # per process: a global batch of 8
    "wandb.peak_tflops": 0.05,
    "distributed.hang_timeout_minutes": 0.5,
    "sample.every_steps": 2,
    "sample.at_end": "true",
    "model.timesteps": 100,
    "eval.every_steps": 2,
    "eval.max_images": 8,
    "eval.fid_images": 16,
    "eval.fid_every_steps": 4,
    "eval.fid_feature_network": "random_conv",
}


def cells():
    for strategy in STRATEGIES:
        for ema in EMA:
            marks = [pytest.mark.quick] if ema == QUICK else []
            yield pytest.param(strategy, ema, id=f"{strategy}-{ema}", marks=[pytest.mark.slow, *marks])


@pytest.mark.parametrize("strategy,ema", list(cells()))
def test_every_strategy_runs_everything_a_gpu_run_logs_and_resumes_exactly(strategy, ema, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    values = {**CELL, **STRATEGIES[strategy], **EMA[ema]}
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir, **values), "--nproc", "2")
    assert result.returncode == 0, f"{strategy}/{ema}: exit {result.returncode}\n{result.stderr[-5000:]}"

    records = read_jsonl(run_dir / "metrics.jsonl")
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [2, 4]
    assert all(r["mfu"] > 0 for r in trained), trained
    assert any("eval/bits_per_dim" in r for r in records) and any("eval/fid" in r for r in records)
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step-000000002.png",
                                                                           "step-000000004.png"]
    events = [json.loads(line) for rank in (0, 1)
            for line in (run_dir / "ranks" / f"rank-{rank:05d}.jsonl").read_text().splitlines()]
    digests = {r["weights_sha256"] for r in events if r["event"] == "end"}
    assert len(digests) == 1, "the ranks ended with different weights"
    saves = [r for r in events if r["event"] == "checkpoint"]
    assert sorted(r["step"] for r in saves) == [2, 2, 4, 4] and all(r["stall_s"] >= 0 for r in saves)
    if values.get("checkpoint.async_save") == "true":  # training waited for the copy only; the write says its cost
        assert all(r.get("async_save") for r in saves)
        written = [r for r in events if r["event"] == "checkpoint_written"]
        assert sorted(r["step"] for r in written) == [2, 2, 4, 4] and all(r["written_bytes"] > 0 for r in written)

    # 2 -> 1: the checkpoint of step 4, resumed by one process, is what that process holds.
    four = checkpoint.checkpoints_dir(run_dir) / "step-000000004"
    probe = tmp_path / "probe.safetensors"
    run_probe(run_dir, ["data.batch_size=8", "train.max_steps=6"], 1, probe)
    assert_holds(probe, four, optimizer=strategy != "ddp")  # DDP's optimizer is one whole file


def test_the_matrix_is_whole():
    """Every strategy and EMA mode is a cell; one quick cell per strategy."""
    ids = {param.id: param.marks for param in cells()}
    assert len(ids) == len(STRATEGIES) * len(EMA)
    quick = [name for name, marks in ids.items() if any(mark.name == "quick" for mark in marks)]
    assert sorted(quick) == sorted(f"{strategy}-{QUICK}" for strategy in STRATEGIES)
