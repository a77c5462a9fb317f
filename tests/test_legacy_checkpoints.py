"""Checkpoints written by earlier versions of the trainer still load and resume.

`tests/fixtures/legacy_runs/` holds two run directories (DDP and DeepSpeed ZeRO-2, one process,
a 3-step tiny DDPM shrunk to a few thousand parameters) written by the trainer as it was before
its redesign into strategies and components (commit 5b9460c). Each is resumed to step 6 by
today's code and compared with an uninterrupted 6-step run of today's code on the same data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_runs"
SAVED_STEP = 3
FINAL_STEP = 6
SHRUNK = [
    "data.num_workers=0", "data.batch_size=4", "model.base_channels=4", "model.norm_groups=2",
    "model.num_heads=1", "model.channel_mult=[1]", "model.attention_resolutions=[]",
    "model.sample_steps=2", "model.timesteps=50", "train.warmup_steps=1", "checkpoint.every_steps=3",
    "checkpoint.keep_last=10", "sample.n=2", "wandb.mode=disabled",
]
STRATEGY = {"ddp": [], "deepspeed": ["distributed.strategy=deepspeed", "deepspeed.zero_stage=2"]}


@pytest.fixture(scope="module")
def digits_200(tmp_path_factory) -> Path:
    """The data the fixtures were trained on: `data-prep digits OUT --samples-per-shard 200`."""
    out = tmp_path_factory.mktemp("legacy") / "digits"
    result = run_cli("data-prep", "digits", str(out), "--samples-per-shard", "200")
    assert result.returncode == 0, result.stderr
    return out


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:09d}"


@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
def test_checkpoint_from_before_the_redesign_resumes(kind, digits_200, tmp_path):
    data = [f"data.shards={digits_200 / 'train'}", f"data.eval_shards={digits_200 / 'test'}"]
    legacy = tmp_path / "legacy"
    shutil.copytree(FIXTURES / kind, legacy)
    fixture = _checkpoint(legacy, SAVED_STEP)
    fixture_model = load_file(fixture / "model.safetensors")

    # Loading alone is exact: the exported weights are the fixture's.
    exported = tmp_path / "exported.safetensors"
    result = run_cli("launch", "export", str(legacy), "--no-ema", "--out", str(exported))
    assert result.returncode == 0, result.stderr
    got = load_file(exported)
    assert got.keys() == fixture_model.keys()
    assert all(torch.equal(got[name], fixture_model[name]) for name in got)

    resumed = run_cli("launch", "local", str(legacy / "config.yaml"), f"run_dir={legacy}", *SHRUNK, *data,
                      *STRATEGY[kind], f"train.max_steps={FINAL_STEP}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {fixture}" in resumed.stderr
    reference = tmp_path / "reference"
    fresh = run_cli("launch", "local", "configs/tiny/ddpm.yaml", f"run_dir={reference}", *SHRUNK, *data,
                    *STRATEGY[kind], f"train.max_steps={FINAL_STEP}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    final, want = _checkpoint(legacy, FINAL_STEP), _checkpoint(reference, FINAL_STEP)
    got_state, want_state = (json.loads((path / "trainer.json").read_text()) for path in (final, want))
    assert {k: got_state[k] for k in ("step", "images_seen")} == {"step": FINAL_STEP, "images_seen": FINAL_STEP * 4}
    assert got_state == want_state
    # The data stream carried on where the legacy run stopped.
    got_data, want_data = (json.loads((path / "rank-00000.json").read_text())["data"] for path in (final, want))
    assert got_data == want_data
    # Same weights as the uninterrupted run: bit-exact where this machine reproduces the
    # fixture's first three steps exactly (the machine that made it does), else close.
    exact = all(torch.equal(a, b) for a, b in zip(
        load_file(_checkpoint(reference, SAVED_STEP) / "model.safetensors").values(), fixture_model.values()))
    for name in ("model.safetensors", "ema.safetensors"):
        got_tensors, want_tensors = load_file(final / name), load_file(want / name)
        for key in want_tensors:
            if exact:
                assert torch.equal(got_tensors[key], want_tensors[key]), f"{name}:{key}"
            else:
                torch.testing.assert_close(got_tensors[key], want_tensors[key], atol=5e-2, rtol=0)
