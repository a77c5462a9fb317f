"""End to end: real `launch` processes train the tiny DDPM on the session's digits shards.

Every test runs the command-line entry points as subprocesses (tests/conftest.py `run_cli`, or
Popen where the test must signal the launcher), with a U-Net shrunk further than
configs/tiny/ddpm.yaml (8 base channels, two levels, no attention: tests/runs.py `FAST`) so that a
step takes a fraction of a second on two shared CPU cores. The stopped-and-resumed run is the run
bank's (`resumed_run`), which tests/test_tracking.py reads too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_cli
from pipeline import checkpoint
from pipeline import config as config_module
from runs import (
    FAKE_API_KEY,
    METRIC_FIELDS,
    RESUMED,
    SIZE,
    TINY,
    assert_ok,
    assert_strictly_increasing,
    check_resumed,
    checkpoint_steps,
    error_lines,
    overrides,
    rank_records,
    read_jsonl,
    stop_and_resume,
)

pytestmark = pytest.mark.slow

# --- (a) one process, start to finish -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory):
    """One finished single-process run (also the run that the sampling tests sample from)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = overrides(digits_dir, run_dir)
    result = run_cli("launch", "local", TINY, *args)
    return run_dir, args, result


def test_single_process_run_writes_its_run_directory(trained_run):
    run_dir, args, result = trained_run
    assert_ok(result)

    resolved = config_module.load(run_dir / "config.yaml")
    assert resolved == config_module.load(REPO / TINY, args)

    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    for record in records:
        for field in METRIC_FIELDS:
            assert isinstance(record[field], (int, float)), (field, record)
    steps = [r["step"] for r in records]
    assert_strictly_increasing(steps)
    assert steps == [5, 10, 15, 20]
    assert [r["images_seen"] for r in records] == [8 * s for s in steps]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]

    assert checkpoint_steps(run_dir) == [10, 20]
    newest = run_dir / "checkpoints" / "step-000000020"
    manifest = checkpoint.verify(newest)
    assert manifest["step"] == 20 and manifest["images_seen"] == 160
    assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "trainer.json"} <= set(manifest["files"])

    samples = sorted((run_dir / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step-000000020.png"]
    with Image.open(samples[0]) as image:
        image.load()
        assert image.mode == "L" and image.size[0] > SIZE

    end = rank_records(run_dir, 0, "end")[-1]
    assert end["step"] == 20 and end["exit_code"] == 0
    assert "Traceback" not in result.stderr


def test_relaunching_a_finished_run_does_nothing_new(trained_run):
    run_dir, args, first = trained_run
    assert_ok(first)
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_cli("launch", "local", TINY, *args)
    assert_ok(result)
    assert "resumed from" in result.stderr and "(step 20," in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert checkpoint_steps(run_dir) == [10, 20]


# --- (f) launch sample ------------------------------------------------------------------------------


def test_sample_is_reproducible_per_seed(trained_run, tmp_path):
    run_dir, _, result = trained_run
    assert_ok(result)
    outputs = {}
    for name, extra in [("a", ["--seed", "0"]), ("b", ["--seed", "0"]), ("c", ["--seed", "1"]),
                        ("raw", ["--seed", "0", "--no-ema"])]:
        out = tmp_path / f"{name}.png"
        sampled = run_cli("launch", "sample", str(run_dir), "--n", "16", "--out", str(out), *extra)
        assert_ok(sampled)
        assert sampled.stdout.strip() == str(out)
        outputs[name] = out.read_bytes()
        with Image.open(out) as image:
            image.load()
            # 16 images of 32 px in a 4 × 4 grid with 2 px padding
            assert image.size == (4 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2)
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]
    assert outputs["raw"] != outputs["a"]  # the EMA weights differ from the raw ones


def test_sample_missing_run_dir(tmp_path):
    missing = tmp_path / "no-such-run"
    result = run_cli("launch", "sample", str(missing), "--n", "4", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "run directory" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_sample_run_dir_without_checkpoint(tmp_path, digits_dir):
    run_dir = tmp_path / "empty-run"
    run_dir.mkdir()
    config = config_module.load(REPO / TINY, overrides(digits_dir, run_dir))
    (run_dir / "config.yaml").write_text(config_module.dump_yaml(config))
    result = run_cli("launch", "sample", str(run_dir), "--n", "4", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "checkpoint" in result.stderr


# --- (b) two processes ------------------------------------------------------------------------------


@pytest.mark.quick
def test_two_process_run(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir, **{"train.max_steps": 10}),
                     "--nproc", "2")
    assert_ok(result)
    starts = [rank_records(run_dir, rank, "start")[-1] for rank in (0, 1)]
    ends = [rank_records(run_dir, rank, "end")[-1] for rank in (0, 1)]
    assert [s["world_size"] for s in starts] == [2, 2]
    assert [s["rank"] for s in starts] == [0, 1]
    shards = [set(s["epoch0_shards"]) for s in starts]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    all_shards = {str(p) for p in (digits_dir / "train").glob("shard-*.tar")}
    assert shards[0] | shards[1] == all_shards
    assert [e["step"] for e in ends] == [10, 10]
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]

    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [5, 10]
    assert records[-1]["images_seen"] == 10 * 8 * 2  # global batch = per-process batch × 2
    manifest = checkpoint.verify(run_dir / "checkpoints" / "step-000000010")
    assert manifest["world_size"] == 2
    assert {"rank-00000.json", "rank-00001.json", "rank-00000.safetensors", "rank-00001.safetensors"} <= set(
        manifest["files"]
    )


# --- (c) stop with SIGTERM and resume -----------------------------------------------------------------


@pytest.mark.quick
def test_sigterm_stops_with_checkpoint_and_relaunch_resumes_exactly(resumed_run, digits_dir, tmp_path):
    check_resumed(resumed_run, nproc=1)

    # On CPU the resumed run is bit-identical to one that was never interrupted: weights,
    # optimizer, RNG and data position (through a data worker) all came back.
    reference_dir = tmp_path / "reference"
    reference = run_cli("launch", "local", TINY, *overrides(
        digits_dir, reference_dir, **{"train.max_steps": 30, "train.log_every_steps": 1, **RESUMED}),
        env={"WANDB_API_KEY": FAKE_API_KEY})
    assert_ok(reference)
    losses = [r["loss"] for r in read_jsonl(resumed_run["run_dir"] / "metrics.jsonl") if "loss" in r]
    reference_losses = [r["loss"] for r in read_jsonl(reference_dir / "metrics.jsonl") if "loss" in r]
    assert losses == reference_losses
    assert (rank_records(resumed_run["run_dir"], 0, "end")[-1]["weights_sha256"]
            == rank_records(reference_dir, 0, "end")[-1]["weights_sha256"])


def test_sigterm_stops_and_resumes_two_processes(digits_dir, tmp_path):
    outcome = stop_and_resume(digits_dir, tmp_path, nproc=2)
    check_resumed(outcome, nproc=2)
    run_dir = outcome["run_dir"]
    ends = [rank_records(run_dir, rank, "end")[-1] for rank in (0, 1)]
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]


# --- (e) bad inputs through the command line -------------------------------------------------------


@pytest.mark.quick
def test_config_typo_exits_2_with_one_line_and_writes_nothing(digits_dir, tmp_path):
    text = (REPO / TINY).read_text().replace("  batch_size: 32\n", "  batch_sise: 32\n")
    assert "batch_sise" in text
    config_path = tmp_path / "typo.yaml"
    config_path.write_text(text)
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", str(config_path), *overrides(digits_dir, run_dir))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config_path) in lines[0] and "data.batch_sise" in lines[0] and "batch_size" in lines[0]
    assert not run_dir.exists()


def test_typo_in_override_exits_2(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir), "train.max_step=3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_step" in lines[0] and TINY in lines[0], result.stderr
    assert not run_dir.exists()


@pytest.mark.quick
def test_corrupt_shard_exits_2_before_training(digits_dir, tmp_path):
    import shutil

    shards = Path(shutil.copytree(digits_dir / "train", tmp_path / "train"))
    victim = shards / "shard-000004.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    run_dir = tmp_path / "run"
    result = run_cli("launch", "local", TINY, *overrides(digits_dir, run_dir, **{"data.shards": str(shards)}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(victim) in lines[0]
    assert not run_dir.exists()  # nothing trained, nothing written


def _shards_with_a_garbage_image(directory: Path) -> tuple[Path, str]:
    import io

    import numpy as np

    from data_prep.writer import Sample, write_split

    directory.mkdir(parents=True)
    samples = []
    for index in range(8):
        buffer = io.BytesIO()
        Image.fromarray(np.full((32, 32), index * 20, dtype=np.uint8), mode="L").save(buffer, format="PNG")
        samples.append(Sample(image=buffer.getvalue(), source=f"synthetic/{index}"))
    samples[5] = Sample(image=b"this is not an image at all", source="synthetic/5")
    write_split(samples, directory, split="train", image_size=32, channels=1, encoding="png",
                samples_per_shard=4, source="synthetic")
    return directory / "shard-000001.tar", "000000005"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_non_image_sample_exits_2_naming_shard_and_key(digits_dir, tmp_path, num_workers):
    shard, key = _shards_with_a_garbage_image(tmp_path / "train")
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY,
        *overrides(digits_dir, run_dir, **{"data.shards": str(shard.parent), "data.num_workers": num_workers,
                                            "data.batch_size": 4, "data.shuffle_buffer": 1}),
    )
    assert result.returncode == 2, result.stderr[-6000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-6000:]
    assert str(shard) in lines[0] and key in lines[0] and "not a decodable image" in lines[0]
    assert "Traceback" not in result.stderr
    assert not checkpoint_steps(run_dir)


def test_too_few_shards_for_readers_exits_2(digits_dir, tmp_path):
    shard, _ = _shards_with_a_garbage_image(tmp_path / "train")  # 2 shards
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY,
        *overrides(digits_dir, run_dir, **{"data.shards": str(shard.parent), "data.num_workers": 3}),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 shard(s) for 3 readers" in lines[0], result.stderr
    assert not run_dir.exists()


def test_non_image_sample_with_two_processes_gives_one_clear_error(digits_dir, tmp_path):
    shard, key = _shards_with_a_garbage_image(tmp_path / "train")
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", TINY,
        *overrides(digits_dir, run_dir, **{"data.shards": str(shard.parent), "data.batch_size": 4,
                                            "data.shuffle_buffer": 1}),
        "--nproc", "2",
    )
    assert result.returncode == 2, result.stderr[-6000:]
    lines = error_lines(result.stderr)
    assert any(str(shard) in line and key in line for line in lines), result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
