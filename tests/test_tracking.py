"""Monitoring end to end: the run bank's tiny DDPM run (tests/conftest.py `resumed_run`), stopped
with SIGTERM and relaunched, with W&B offline, MFU against a stated peak, checkpoint artifacts,
in-training FID/KID (stand-in feature network) and a fake W&B API key in the environment. Its
offline transaction logs are read with tests/wandb_reader.py; then `launch eval --fid` (on a copy)
and `launch status --plot` run on it. Also unit tests of the FLOP count behind MFU, the peak
table, and the git commit in the run config."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from runs import FAKE_API_KEY, assert_strictly_increasing, read_jsonl, wandb_logs


def _run_config(path: Path) -> dict:
    from wandb_reader import iter_records

    config = {}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            config[item.key] = json.loads(item.value_json)
    return config


def _artifacts(path: Path) -> list:
    from wandb_reader import iter_records

    return [r.artifact for r in iter_records(path) if r.WhichOneof("record_type") == "artifact"]


@pytest.mark.slow
@pytest.mark.quick
def test_one_wandb_run_continues_at_the_right_step(resumed_run):
    from wandb_reader import read_run

    run_dir, stop_step = resumed_run["run_dir"], resumed_run["stop_step"]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    logs = wandb_logs(run_dir)
    assert len(logs) == 2 and {p.name for p in logs} == {f"run-{run_id}.wandb"}  # one per launch
    runs = [read_run(p) for p in logs]
    assert [r.run_id for r in runs] == [run_id, run_id]
    steps = [[row["step"] for row in r.history if "train/loss" in row] for r in runs]
    assert steps[0] == list(range(1, stop_step + 1)) and steps[1] == list(range(stop_step + 1, 31))
    assert_strictly_increasing(steps[0] + steps[1])
    for run in runs:
        assert {"name": "*", "step_metric": "step"} in run.metric_definitions
        internal = [row["_step"] for row in run.history]
        assert internal == sorted(internal) and len(set(internal)) == len(internal)
        for row in run.history:
            if "train/loss" in row:
                assert isinstance(row["train/loss"], float) and isinstance(row["step"], int)

    # The W&B history holds the same losses as metrics.jsonl.
    metrics = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    for run in runs:
        for row in run.history:
            if "train/loss" in row:
                assert row["train/loss"] == pytest.approx(metrics[row["step"]])


@pytest.mark.slow
@pytest.mark.quick
def test_wandb_holds_throughput_mfu_images_config_artifacts_and_fid(resumed_run):
    from wandb_reader import read_run

    run_dir = resumed_run["run_dir"]
    logs = wandb_logs(run_dir)
    rows = [row for path in logs for row in read_run(path).history]
    train_rows = [row for row in rows if "train/loss" in row]
    for row in train_rows:
        for key in ("images_per_s", "mfu", "lr", "grad_norm", "data_wait_fraction", "images_seen"):
            assert f"train/{key}" in row, key
        assert 0 < row["train/mfu"] < 1  # against the stated 0.05 TFLOP/s peak
        assert any(key.startswith("train/mse_q") for key in row)  # the family's own terms
        assert "train/gpu_mem_max_allocated_gib" not in row  # CPU run
    images = [row for row in rows if "samples/path" in row]
    assert sorted(row["step"] for row in images) == [10, 20, 30][-len(images):] and images[-1]["step"] == 30
    media = [path for path in run_dir.glob("wandb/*/files/media/images/*.png")]
    assert media, "the sample grids are copied into the offline run"

    quality = {row["step"]: row for row in rows if "eval/fid" in row}
    assert set(quality) >= {20, 30} and set(quality) <= {10, 20, 30}
    for row in quality.values():
        assert row["eval/fid"] > 0 and "eval/kid" in row and row["eval/fid_images"] == 40
    metrics = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/fid" in r}
    assert {s: r["eval/fid"] for s, r in metrics.items()} == pytest.approx({s: r["eval/fid"] for s, r in quality.items()})

    config = _run_config(logs[-1])
    assert config["model"]["family"] == "diffusion" and config["train"]["max_steps"] == 30
    assert "git_commit" in config and "git_dirty" in config
    assert config["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", config["git_commit"])

    artifacts = [a for path in logs for a in _artifacts(path)]
    aliases = {alias for a in artifacts for alias in a.aliases}
    assert {"step-10", "step-20", "step-30"} <= aliases
    for artifact in artifacts:
        assert artifact.type == "model" and artifact.name.startswith("checkpoints-")
        for entry in artifact.manifest.contents:
            assert entry.ref.startswith((run_dir / "checkpoints").resolve().as_uri())


@pytest.mark.slow
def test_api_key_lands_nowhere_in_the_run_directory_or_logs(resumed_run):
    key = FAKE_API_KEY.encode()
    files = [p for p in resumed_run["run_dir"].rglob("*") if p.is_file() and not p.is_symlink()]
    files += list((resumed_run["tmp_path"] / "logs").glob("*"))
    assert len(files) > 20
    leaked = [str(p) for p in files if key in p.read_bytes()]
    assert not leaked


@pytest.mark.slow
def test_launch_eval_with_fid(resumed_run, tmp_path):
    run_dir = tmp_path / "run"  # `launch eval` writes into the run directory: a copy of the bank's run
    shutil.copytree(resumed_run["run_dir"], run_dir, symlinks=True)
    result = run_cli("launch", "eval", str(run_dir), "--fid", "40", "--max-images", "4", "--batch-size", "20")
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 30 and report["images"] == 4 and report["bits_per_dim"] > 0
    assert report["fid"] > 0 and report["fid_images"] == 40 and report["fid_network"].startswith("random_conv")
    assert json.loads((run_dir / "eval" / "step-000000030.json").read_text())["fid"] == report["fid"]

    missing = run_dir / "nothing-here.pth"
    result = run_cli("launch", "eval", str(run_dir), "--fid", "4", "--max-images", "2",
                     "--fid-network", "inception", "--inception-weights", str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr


@pytest.mark.slow
def test_launch_status_of_the_run_with_a_plot(resumed_run, tmp_path):
    run_dir = resumed_run["run_dir"]
    out = tmp_path / "status.png"
    result = run_cli("launch", "status", str(run_dir), "--plot", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "step:        30 of 30 (100%)" in text and "images seen: 240" in text
    assert "FID:" in text and "ETA:         done" in text and "step-000000030" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- unit tests: FLOPs, peaks, code version ---------------------------------------------------------


class LinearModel(torch.nn.Module):
    """loss(x) of the model interface around one Linear layer, with some randomness in it."""

    def __init__(self, features_in: int = 12, features_out: int = 5):
        super().__init__()
        self.layer = torch.nn.Linear(features_in, features_out, bias=False)

    def forward(self, x):
        x = x.float().flatten(1) + torch.randn(x.shape[0], 12, device=x.device)
        loss = self.layer(x).square().mean()
        return loss, {"mse": loss.detach()}


def test_flops_per_image_counts_forward_and_backward_on_a_meta_twin():
    from pipeline import tracking

    built = []

    def build():
        built.append(LinearModel())
        return built[-1]

    example = torch.zeros((2, 1, 3, 4), dtype=torch.uint8)
    rng = torch.get_rng_state()
    flops = tracking.flops_per_image(build, example)
    # forward 2·in·out, backward 2·in·out for the weight gradient (the input needs none)
    assert flops == 2 * 12 * 5 + 2 * 12 * 5
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(built) == 1 and built[0].layer.weight.is_meta  # nothing allocated, nothing trained


def test_peak_flops_table_and_override(monkeypatch):
    from pipeline import tracking

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert tracking.peak_flops(cpu, "bf16", None) is None
    assert tracking.peak_flops(cpu, "no", 2.5) == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert tracking.peak_flops(cuda, "bf16", None) == pytest.approx(989.4e12)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert tracking.peak_flops(cuda, "no", None) == pytest.approx(66.9e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert tracking.peak_flops(cuda, "fp16", None) == pytest.approx(756e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert tracking.peak_flops(cuda, "bf16", None) is None


def test_code_version_names_the_checkout_commit():
    import subprocess

    from pipeline import tracking

    version = tracking.code_version()
    head = subprocess.run(["git", "-C", str(Path(tracking.__file__).parent.parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert version["git_commit"] == head.stdout.strip() and isinstance(version["git_dirty"], bool)
    else:
        assert version == {"git_commit": None, "git_dirty": None}
