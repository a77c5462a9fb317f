"""Latent diffusion end to end, through the real command lines (docs/latent.md):

data-prep digits -> launch local (autoencoder) -> data-prep latents -> launch local (latent DiT)
-> launch sample (decoded PNG); exact resume of latent training; a 2-process latent run; the
one-line errors of a wrong autoencoder. Shrunk far below configs/latent/*.yaml so the whole module
runs in a few minutes on two shared CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli
from pipeline import checkpoint, faults

pytestmark = pytest.mark.slow

AE = {
    "model.base_channels": 8,
    "model.norm_groups": 4,
    "model.channel_mult": "[1,2,2]",   # f = 4: 32×32×1 -> 8×8×4
    "data.batch_size": 16,
    "data.num_workers": 0,
    "train.max_steps": 6,
    "train.warmup_steps": 2,
    "train.log_every_steps": 3,
    "checkpoint.every_steps": 6,
    "eval.every_steps": 6,
    "eval.max_images": 16,
    "wandb.mode": "disabled",
}
LDM = {
    "model.dit_depth": 1,
    "model.dit_width": 32,
    "model.dit_heads": 2,
    "model.sample_steps": 2,
    "data.batch_size": 8,
    "data.num_workers": 0,
    "data.shuffle_buffer": 32,
    "train.max_steps": 8,
    "train.warmup_steps": 2,
    "train.log_every_steps": 2,
    "train.deterministic": "true",
    "checkpoint.every_steps": 4,
    "sample.n": 4,
    "eval.every_steps": 0,
    "wandb.mode": "disabled",
}


def _args(values: dict) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def _ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def latents(digits_dir, tmp_path_factory) -> dict[str, Path]:
    """A few steps of the tiny autoencoder and its latents of the digits (2 encoding processes)."""
    root = tmp_path_factory.mktemp("latent")
    ae = root / "ae"
    _ok(run_cli("launch", "local", "configs/latent/tiny_autoencoder.yaml", *_args({
        **AE, "run_dir": ae, "data.shards": digits_dir / "train", "data.eval_shards": digits_dir / "test"})))
    out = root / "latents"
    result = run_cli("data-prep", "latents", str(ae), str(digits_dir), str(out), "--workers", "2")
    _ok(result)
    assert "latent scale factor" in result.stdout
    return {"ae": ae, "latents": out, "root": root, "digits": digits_dir}


def _ldm(latents: dict, run_dir: Path, **extra) -> list[str]:
    return ["configs/latent/tiny_ldm.yaml", *_args({
        **LDM, "run_dir": run_dir, "model.autoencoder": latents["ae"],
        "data.shards": latents["latents"] / "train", "data.eval_shards": latents["latents"] / "test", **extra})]


def test_autoencoder_logs_held_out_psnr_and_kl(latents):
    records = [json.loads(line) for line in (latents["ae"] / "metrics.jsonl").read_text().splitlines()]
    evaluation = [r for r in records if "eval/psnr" in r]
    assert evaluation and evaluation[-1]["eval/psnr"] > 0 and evaluation[-1]["eval/kl"] > 0


def test_latent_shards_carry_moments_labels_and_the_autoencoder(latents):
    from pipeline.data import iter_raw_samples
    from pipeline.latents import LATENT_MEMBER, LatentInfo, checkpoint_sha256
    from pipeline.manifest import read_manifest

    images = read_manifest(latents["digits"] / "train")
    manifest = read_manifest(latents["latents"] / "train")
    assert manifest.kind == "latents" and manifest.encoding == "npy"
    assert (manifest.channels, manifest.image_size) == (4, 8)
    assert manifest.num_samples == images.num_samples and manifest.class_counts == images.class_counts
    info = LatentInfo.from_manifest(manifest, "test")
    assert info.latent_shape == (4, 8, 8) and info.stored == "moments" and info.scale_factor > 0
    found = checkpoint.latest_valid(latents["ae"])
    assert info.checkpoint_sha256 == checkpoint_sha256(found[1])
    key, sample = next(iter_raw_samples(str(latents["latents"] / "train" / manifest.shards[0].name)))
    source_key, source = next(iter_raw_samples(str(latents["digits"] / "train" / images.shards[0].name)))
    assert key == source_key and sample["cls"] == source["cls"]
    array = np.load(__import__("io").BytesIO(sample[LATENT_MEMBER]))
    assert array.dtype == np.float16 and array.shape == (8, 8, 8)  # mean and log-variance



def test_latents_of_the_mean_alone(latents, tmp_path):
    import io

    from data_prep.cli import main as data_prep_main
    from pipeline.data import iter_raw_samples
    from pipeline.latents import LATENT_MEMBER, LatentInfo
    from pipeline.manifest import read_manifest

    out = tmp_path / "mean"
    assert data_prep_main(["latents", str(latents["ae"]), str(latents["digits"] / "test"), str(out), "--store", "mean"]) == 0
    manifest = read_manifest(out / "test")
    info = LatentInfo.from_manifest(manifest, "test")
    stored = np.stack([np.load(io.BytesIO(sample[LATENT_MEMBER])).astype(np.float64)
                       for shard in manifest.shards for _, sample in iter_raw_samples(str(out / "test" / shard.name))])
    assert info.stored == "mean" and stored.shape == (manifest.num_samples, 4, 8, 8)
    assert info.scale_factor == pytest.approx(1 / stored.std(), rel=1e-2)  # 1/std of what is stored


@pytest.fixture(scope="module")
def trained(latents) -> Path:
    """The latent DiT trained without interruption (the reference of the resume test)."""
    run_dir = latents["root"] / "ldm"
    _ok(run_cli("launch", "local", *_ldm(latents, run_dir)))
    return run_dir


@pytest.mark.quick
def test_latent_diffusion_trains_and_samples_decoded_images(latents, trained):
    assert sorted((trained / "samples").glob("*.png")), "no training grid"
    out = latents["root"] / "decoded.png"
    _ok(run_cli("launch", "sample", str(trained), "--n", "2", "--classes", "3,7", "--out", str(out)))
    from pipeline import images

    height, width = images.grid(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), columns=2).shape[:2]
    decoded = Image.open(out)
    assert decoded.size == (width, height), decoded.size  # 32×32 images, not 8×8 latents


def test_latent_training_resumes_exactly(latents, trained):
    resumed = latents["root"] / "resumed"
    failed = run_cli("launch", "local", *_ldm(latents, resumed), env=faults.env(fail_at_step=7))
    assert failed.returncode != 0
    assert [step for step, _ in checkpoint.list_checkpoints(resumed)] == [4]
    _ok(run_cli("launch", "local", *_ldm(latents, resumed)))
    a = load_file(checkpoint.list_checkpoints(trained)[-1][1] / "model.safetensors")
    b = load_file(checkpoint.list_checkpoints(resumed)[-1][1] / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), [n for n in a if not torch.equal(a[n], b[n])]
    assert float(a["latent_scale"]) != 1.0  # the manifest's scale, kept through the resume


def test_two_process_latent_run(latents):
    run_dir = latents["root"] / "two"
    result = run_cli("launch", "local", *_ldm(latents, run_dir, **{"train.max_steps": 4, "sample.at_end": "false"}),
                     "--nproc", "2")
    _ok(result)
    assert [step for step, _ in checkpoint.list_checkpoints(run_dir)] == [4]


def test_one_line_errors(latents, tmp_path):
    import shutil

    from data_prep.cli import main as data_prep_main
    from pipeline import config as config_module
    from pipeline import models
    from pipeline.data import resolve_shards
    from pipeline.errors import UserError
    from pipeline.latents import check_latent_data

    # Latents re-encoded by "another" checkpoint: the hash in their manifest differs.
    other = tmp_path / "latents"
    shutil.copytree(latents["latents"], other)
    manifest = json.loads((other / "train" / "manifest.json").read_text())
    manifest["latents"]["checkpoint_sha256"] = "0" * 64
    (other / "train" / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("launch", "local", *_ldm(latents, tmp_path / "a", **{"data.shards": other / "train"}))
    assert result.returncode != 0 and "the latents were encoded by" in result.stderr, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if "error:" in line][0].count("encode the shards again") == 1

    config = config_module.load("configs/latent/tiny_ldm.yaml", _ldm(latents, tmp_path / "b")[1:])
    shards = resolve_shards(str(latents["latents"] / "train"), "data.shards")
    image_model = models.build(config.model.model_copy(update={"autoencoder": None}), 8, 1)
    with pytest.raises(UserError, match="set model.autoencoder"):
        check_latent_data(image_model, shards, "data.shards", set_scale=True)
    with pytest.raises(UserError, match="set data.image_size=8"):
        models.build(config.model, 16, 1)
    with pytest.raises(UserError, match="not a run directory"):
        models.build(config.model.model_copy(update={"autoencoder": str(latents["digits"])}), 8, 1)
    assert data_prep_main(["latents", str(latents["digits"]), str(latents["digits"]), str(tmp_path / "d")]) == 2
    assert data_prep_main(["latents", str(latents["ae"]), str(tmp_path), str(tmp_path / "d")]) == 2
