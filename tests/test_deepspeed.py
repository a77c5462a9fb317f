"""DeepSpeed ZeRO on 2 CPU processes (gloo, DeepSpeed's CPU accelerator), through ``launch local``.

Each training run is a module fixture shared by the tests that read it. The shrunk tiny DDPM of
the run bank (tests/runs.py `SHARDED`, rank 0's loss NaN at step 4) covers ZeRO-1 and ZeRO-3 (the
latter from configs/deepspeed/zero3.json), compared with the bank's DDP run (`ddp_reference`,
which tests/test_fsdp.py compares FSDP2 with); the tiny PixelCNN++
(tests/configs/tiny_pixelcnn.yaml) covers ZeRO-2, compared with its own DDP run. ZeRO-3 without an EMA draws
a sample grid, evaluates held-out bits/dim and FID during training (its whole weights are a
plain module, so rank 0 samples alone), and under bf16 its EMA averages the fp32 masters.

Loss tolerance: relative 1e-4 per logged step. Both strategies train in fp32 from the same
initial weights on the same batches with the same per-rank noise, so the only difference is the
order of floating-point sums (ZeRO's flat-bucket reduce-scatter and flat-partition AdamW against
DDP's bucketed all-reduce and fused AdamW), ~1e-7 relative per operation. A real divergence
(a missed 1/grad_accum, clipping not applied, a wrong learning rate) moves the loss by more than
1e-3 within these six steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import faults
from runs import NAN_AT_4, SHARDED, SHRUNK, finish
from tests.conftest import REPO, run_cli, tiny_overrides

pytestmark = pytest.mark.slow

DDPM = REPO / "configs" / "tiny" / "ddpm.yaml"
PIXELCNN = REPO / "tests" / "configs" / "tiny_pixelcnn.yaml"
STEPS = 6
RESUMED_STEPS = 8
LOSS_RTOL = 1e-4
SMALL = {
    "model.base_channels": 8,
    "model.norm_groups": 4,
    "model.sample_steps": 2,
    "data.batch_size": 8,
    "train.grad_accum": 2,
    "train.warmup_steps": 2,
    "train.log_every_steps": 1,
    "checkpoint.every_steps": 3,
    "sample.n": 2,
}
PIXELCNN_SMALL = {key: value for key, value in SMALL.items() if not key.startswith("model.")}


def _launch(config: Path, digits_dir: Path, run_dir: Path, steps: int, env: dict | None = None, **extra):
    small = SMALL if config == DDPM else PIXELCNN_SMALL
    overrides = tiny_overrides(digits_dir, run_dir, **{**small, "train.max_steps": steps, **extra})
    result = run_cli("launch", "local", "--nproc", "2", str(config), *overrides, env=env)
    result.run_dir = run_dir
    return result


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines) if "loss" in record}


def _deepspeed(stage: int) -> dict:
    return {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": stage}


class Finished:
    """A finished `launch local` of a tests/runs.py `Job`: its run directory and its output."""

    def __init__(self, job):
        self.run_dir, self.stderr = job.run_dir, job.output()


def _sharded(run_dir: Path, digits_dir: Path, steps: int = STEPS, **strategy) -> Finished:
    """The run bank's comparison run (`runs.SHARDED`, rank 0's loss NaN at step 4) under DeepSpeed."""
    return Finished(finish(digits_dir, run_dir, env=NAN_AT_4,
                           **{**SHARDED, "train.max_steps": steps, "distributed.strategy": "deepspeed", **strategy}))


@pytest.fixture(scope="module")
def ddpm_zero1_nan(digits_dir, tmp_path_factory):
    """ZeRO-1 with rank 0's loss NaN at step 4: skipped, counted, training goes on."""
    return _sharded(tmp_path_factory.mktemp("ddpm_z1") / "run", digits_dir, **{"deepspeed.zero_stage": 1})


@pytest.fixture(scope="module")
def ddpm_zero3(digits_dir, tmp_path_factory):
    """ZeRO-3 from the ready file, trained to STEPS, then relaunched to RESUMED_STEPS."""
    run_dir = tmp_path_factory.mktemp("ddpm_z3") / "run"
    zero3 = {"deepspeed.config_file": str(REPO / "configs/deepspeed/zero3.json")}
    first = _sharded(run_dir, digits_dir, **zero3)
    first_metrics = _metrics(run_dir)
    second = _sharded(run_dir, digits_dir, RESUMED_STEPS, **zero3)
    return first, first_metrics, second


@pytest.fixture(scope="module")
def pixelcnn_ddp(digits_dir, tmp_path_factory):
    return _ok(_launch(PIXELCNN, digits_dir, tmp_path_factory.mktemp("pcnn_ddp"), STEPS))


@pytest.fixture(scope="module")
def pixelcnn_zero2(digits_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pcnn_z2")
    first = _ok(_launch(PIXELCNN, digits_dir, run_dir, STEPS, **_deepspeed(2)))
    first_metrics = _metrics(run_dir)
    second = _ok(_launch(PIXELCNN, digits_dir, run_dir, RESUMED_STEPS, **_deepspeed(2)))
    return first, first_metrics, second


# ---------------------------------------------------------------------------------------------
# Same losses as DDP


def _assert_losses_match(reference: dict[int, dict], other: dict[int, dict], steps) -> None:
    for step in steps:
        expected, got = reference[step]["loss"], other[step]["loss"]
        assert math.isclose(got, expected, rel_tol=LOSS_RTOL), (step, expected, got)


def test_zero1_loss_matches_ddp_and_skips_the_same_nan_step(ddp_reference, ddpm_zero1_nan):
    _assert_losses_match(_metrics(ddp_reference), _metrics(ddpm_zero1_nan.run_dir), (1, 2, 3, 5, 6))


@pytest.mark.quick
def test_zero3_loss_matches_ddp_and_skips_the_same_nan_step(ddp_reference, ddpm_zero3):
    _, zero3_metrics, _ = ddpm_zero3
    _assert_losses_match(_metrics(ddp_reference), zero3_metrics, (1, 2, 3, 5, 6))
    assert zero3_metrics[4]["bad_steps"] == 1 and math.isnan(zero3_metrics[4]["loss"])
    assert all(0 < record["mfu"] < 1 for record in zero3_metrics.values())  # FLOPs of a meta twin


def test_zero2_pixelcnn_loss_matches_ddp(pixelcnn_ddp, pixelcnn_zero2):
    _, zero2_metrics, _ = pixelcnn_zero2
    _assert_losses_match(_metrics(pixelcnn_ddp.run_dir), zero2_metrics, range(1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# Checkpoints: recorded strategy, resume at the right step, wrong strategy refused


@pytest.mark.parametrize("which", ["ddpm_zero3", "pixelcnn_zero2"])
def test_resume_continues_at_the_checkpointed_step(which, request):
    first, _, second = request.getfixturevalue(which)
    run_dir = first.run_dir
    assert f"step-{STEPS:09d} (step {STEPS}," in second.stderr
    starts = [json.loads(line) for line in (run_dir / "ranks" / "rank-00001.jsonl").read_text().splitlines()]
    assert [record["step"] for record in starts if record["event"] == "start"] == [0, STEPS]
    metrics = _metrics(run_dir)
    assert sorted(metrics) == list(range(1, RESUMED_STEPS + 1))
    assert all(math.isfinite(metrics[step]["loss"]) for step in metrics if not metrics[step]["bad_steps"])
    manifest = json.loads((run_dir / "checkpoints" / f"step-{RESUMED_STEPS:09d}" / "manifest.json").read_text())
    assert manifest["strategy"] == "deepspeed"
    assert manifest["zero_stage"] == (3 if which == "ddpm_zero3" else 2)
    # Every rank writes its own AdamW moments (and at ZeRO-3 its weights and EMA); nothing whole.
    per_rank = ("optimizer", "model", "ema") if which == "ddpm_zero3" else ("optimizer",)
    assert {f"{part}.rank-{rank:05d}.safetensors" for part in per_rank for rank in (0, 1)} <= set(manifest["files"])
    assert "optimizer.safetensors" not in manifest["files"] and "ema.safetensors" in manifest["files"]


def test_resuming_under_another_strategy_is_a_clear_error(ddpm_zero3, digits_dir):
    first, _, _ = ddpm_zero3
    # One process with twice the batch keeps the global batch the 2-process run had.
    overrides = tiny_overrides(digits_dir, first.run_dir, **{**SHRUNK, **SHARDED, "train.max_steps": RESUMED_STEPS + 2,
                                                             "data.batch_size": 2 * SHRUNK["data.batch_size"]})
    result = run_cli("launch", "local", "--nproc", "1", str(DDPM), *overrides)
    assert result.returncode == 2
    assert "written under deepspeed ZeRO-3, this config trains under ddp" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Export: one safetensors file that sampling loads without DeepSpeed


def test_export_loads_and_samples_without_deepspeed(ddpm_zero3, tmp_path):
    from safetensors.torch import load_file

    from launch.cli import main as launch_main
    from pipeline import checkpoint
    from pipeline.sharding import PartReader

    first, _, _ = ddpm_zero3
    out = tmp_path / "model.safetensors"
    assert launch_main(["export", str(first.run_dir), "--out", str(out)]) == 0
    latest = checkpoint.find_for_run(first.run_dir)
    exported, ema = load_file(str(out)), PartReader(latest, "ema").state_dict()  # the ranks' pieces, whole
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[key], ema[key]) for key in ema)
    png = tmp_path / "grid.png"
    # `deepspeed` made unimportable: sampling must not need it.
    code = (
        "import sys; sys.modules['deepspeed'] = None; from launch.cli import main; "
        f"sys.exit(main(['sample', {str(out)!r}, 'steps=2', '--n', '2', '--out', {str(png)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert png.stat().st_size > 0


def test_pixelcnn_export_matches_its_checkpoint(pixelcnn_zero2, tmp_path):
    from launch.weights import export_weights, load_model, load_weights_file

    first, _, _ = pixelcnn_zero2
    out = export_weights(str(first.run_dir), str(tmp_path / "pcnn.safetensors"), use_ema=False)
    from_file, metadata, _ = load_weights_file(out)
    from_run, _, _ = load_model(first.run_dir, use_ema=False)
    assert metadata["strategy"] == "deepspeed" and metadata["zero_stage"] == "2"
    state_file, state_run = from_file.state_dict(), from_run.state_dict()
    assert all(torch.equal(state_file[key], state_run[key]) for key in state_run)
    # (PixelCNN sampling is 1024 sequential forwards: bits/dim shows the network runs instead.)
    with torch.no_grad():
        bits = from_file.bits_per_dim(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert bits.shape == (2,) and torch.isfinite(bits).all()


# ---------------------------------------------------------------------------------------------
# Training health


def test_nan_step_is_skipped_and_counted(ddpm_zero1_nan):
    run_dir = ddpm_zero1_nan.run_dir
    metrics = _metrics(run_dir)
    assert metrics[4]["bad_steps"] == 1 and math.isnan(metrics[4]["loss"])
    assert [metrics[step]["bad_steps"] for step in (1, 2, 3, 5, 6)] == [0] * 5
    assert metrics[STEPS]["bad_steps_total"] == 1 and math.isfinite(metrics[STEPS]["loss"])
    assert "skipped 1 step(s) with a non-finite loss or gradient" in ddpm_zero1_nan.stderr
    trainer_state = json.loads((run_dir / "checkpoints" / f"step-{STEPS:09d}" / "trainer.json").read_text())
    assert trainer_state["bad_steps_total"] == 1


def test_repeated_nans_stop_the_run_with_its_checkpoint_intact(digits_dir, tmp_path):
    from pipeline import checkpoint

    run_dir = tmp_path / "nan_stop"
    result = _launch(
        DDPM, digits_dir, run_dir, 10, env=faults.env(nan_at_steps=range(3, 11)),
        **{"train.max_bad_steps": 2, "checkpoint.every_steps": 2},
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training stopped at step 4: the last 2 steps had a non-finite loss or gradient" in result.stderr
    assert "Traceback" not in result.stderr
    kept = checkpoint.list_checkpoints(run_dir)
    assert [step for step, _ in kept] == [2]  # the stop comes before step 4's checkpoint
    loaded = checkpoint.open_checkpoint(kept[-1][1])  # verifies sizes and hashes
    assert all(torch.isfinite(t).all() for t in loaded.tensors("model.safetensors").values())


# ---------------------------------------------------------------------------------------------
# ZeRO-3: whole weights for sampling and evaluation; the EMA of the fp32 masters


def test_zero3_without_ema_samples_and_evaluates_during_training(digits_dir, tmp_path):
    # Rank 0 used to sample alone through ZeRO-3's gather hooks and wait forever for rank 1.
    run_dir = tmp_path / "zero3_no_ema"
    result = _launch(DDPM, digits_dir, run_dir, 4, **_deepspeed(3), **{
        "train.ema_halflife_images": "null", "train.ema_rampup_ratio": "null", "sample.every_steps": 2,
        "eval.every_steps": 2, "eval.max_images": 8, "eval.fid_images": 8,
        "eval.fid_feature_network": "random_conv", "checkpoint.every_steps": 4})
    _ok(result)
    assert sorted(path.name for path in (run_dir / "samples").glob("*.png")) == [
        "step-000000002.png", "step-000000004.png"]
    evaluations = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in evaluations if "eval/bits_per_dim" in record]
    assert [record["step"] for record in evaluations] == [2, 4]
    assert all(math.isfinite(record["eval/bits_per_dim"]) and math.isfinite(record["eval/fid"]) for record in evaluations)
    manifest = json.loads((run_dir / "checkpoints" / f"step-{4:09d}" / "manifest.json").read_text())
    assert not any(name.startswith("ema") for name in manifest["files"])


def test_zero3_bf16_ema_averages_the_fp32_masters(digits_dir, tmp_path):
    # An EMA whose half-life is far below one batch follows the weights at once: it must equal
    # the fp32 masters, which bf16 module copies of them would not.
    from pipeline import checkpoint
    from pipeline.sharding import PartReader

    run_dir = tmp_path / "zero3_bf16"
    _ok(_launch(DDPM, digits_dir, run_dir, 2, **_deepspeed(3), **{
        "train.mixed_precision": "bf16", "train.ema_halflife_images": 1e-9, "train.ema_rampup_ratio": "null",
        "train.grad_accum": 1, "checkpoint.every_steps": 2, "sample.at_end": "false"}))
    loaded = checkpoint.find_for_run(run_dir)
    model, ema = PartReader(loaded, "model"), PartReader(loaded, "ema")
    assert sorted(model.layout) == sorted(ema.layout) and model.layout
    for name in model.layout:
        master, average = model.whole(name), ema.whole(name)
        assert master.dtype == average.dtype == torch.float32
        assert torch.equal(master, average), name
    assert any(not torch.equal(model.whole(name), model.whole(name).bfloat16().float()) for name in model.layout)


def test_zero2_bf16_without_ema_samples_and_hashes_the_fp32_masters(digits_dir, tmp_path):
    # Under bf16 the live ZeRO-1/2 module holds rounded copies of the weights: grids, evaluations
    # and the end-of-run hash must use the fp32 masters (what the checkpoint holds), as ZeRO-3 does.
    from launch.weights import load_model
    from pipeline.trainer import weights_digest

    run_dir = tmp_path / "zero2_bf16"
    result = _ok(_launch(DDPM, digits_dir, run_dir, 2, **_deepspeed(2), **{
        "train.mixed_precision": "bf16", "train.ema_halflife_images": "null", "train.ema_rampup_ratio": "null",
        "train.grad_accum": 1, "checkpoint.every_steps": 2}))
    assert (run_dir / "samples" / "step-000000002.png").is_file(), result.stderr[-2000:]
    end = [json.loads(line) for line in (run_dir / "ranks" / "rank-00000.jsonl").read_text().splitlines()][-1]
    masters, _, _ = load_model(run_dir, use_ema=False)
    assert all(parameter.dtype == torch.float32 for parameter in masters.parameters())
    assert end["event"] == "end" and end["weights_sha256"] == weights_digest(masters)

