"""Every model family trains, evaluates and samples through the same commands.

For each family: `launch local` trains its tiny config for a few dozen steps on the test's digits
(held-out bits/dim logged during training), `launch eval` reports held-out bits/dim as JSON, which
must be finite, well below 8 (the uniform model) and below the same model's value at
initialisation; `launch sample` writes a PNG grid of the configured shape. Trained runs are shared
between the tests of a family (module-scoped cache). Diffusion's bound runs over all T timesteps,
so its test run uses T = 100.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_overrides
from pipeline import config as config_module

pytestmark = pytest.mark.slow

# family -> (tiny config, overrides that keep its training to seconds, sampling options to try)
FAMILIES = {
    "vae": ("configs/tiny/vae.yaml", {"train.max_steps": 40, "model.kl_warmup_steps": 20}, ["temperature=1.0"]),
    "flow": ("configs/tiny/flow.yaml", {"train.max_steps": 60}, ["temperature=0.7"]),
    "pixelcnn": ("configs/tiny/pixelcnn.yaml", {"train.max_steps": 24, "sample.n": 1}, []),
    "diffusion": (
        "configs/tiny/ddpm.yaml",
        {"train.max_steps": 60, "model.timesteps": 100, "model.sample_steps": 20},
        ["sampler=ddim", "steps=10"],
    ),
}
KINDS = {"vae": "upper_bound", "flow": "upper_bound", "pixelcnn": "exact", "diffusion": "upper_bound"}
EVAL_IMAGES = {"vae": 64, "flow": 64, "pixelcnn": 64, "diffusion": 16}
SAMPLE_N = {"vae": 6, "flow": 6, "pixelcnn": 1, "diffusion": 4}  # PixelCNN: 1024 passes per grid


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # In-process model work shares the cores with other jobs: spinning intra-op threads are slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    """family -> run directory of a short training run (trained once per module)."""
    runs: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in runs:
            config, extra, _ = FAMILIES[family]
            run_dir = tmp_path_factory.mktemp(f"run_{family}")
            steps = extra["train.max_steps"]
            overrides = tiny_overrides(
                digits_dir, run_dir, **{"eval.every_steps": steps, "eval.max_images": 8, **extra}
            )
            result = run_cli("launch", "local", config, *overrides)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[family] = run_dir
        return runs[family]

    return get


def untrained_bits_per_dim(run_dir: Path, max_images: int) -> float:
    """Held-out bits/dim of the run's model at initialisation (same seed, one data-dependent
    initialising forward in training mode, as the trainer's first step does), in this process."""
    from launch.weights import load_run_config
    from pipeline import models
    from pipeline.data import eval_batches, resolve_shards
    from pipeline.evaluate import held_out_bits_per_dim

    config = load_run_config(run_dir)
    torch.manual_seed(config.seed)
    model = models.build(config.model, config.data.image_size, config.data.channels)
    shards = resolve_shards(config.data.eval_shards)
    common = dict(image_size=config.data.image_size, channels=config.data.channels)
    first = next(iter(eval_batches(shards, rank=0, world_size=1, num_workers=0, batch_size=16, **common)))
    with torch.no_grad():
        model.train()
        model.loss(first)  # ActNorm's data-dependent initialisation (a no-op for other families)
    torch.manual_seed(0)
    bits, _ = held_out_bits_per_dim(model, shards, batch_size=16, max_images=max_images, **common)
    return bits


def eval_json(run_dir: Path, *extra: str) -> dict:
    result = run_cli("launch", "eval", str(run_dir), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.quick
def test_eval_bits_per_dim_beats_untrained_and_uniform(family, trained):
    run_dir = trained(family)
    steps = FAMILIES[family][1]["train.max_steps"]
    images = EVAL_IMAGES[family]

    # Held-out bits/dim was logged during training.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["eval/bits_per_dim"] for r in records if "eval/bits_per_dim" in r]
    assert logged and all(math.isfinite(v) for v in logged)

    result = eval_json(run_dir, "--max-images", str(images), "--batch-size", "16")
    assert result["kind"] == KINDS[family]
    assert result["images"] == images
    assert result["step"] == steps
    assert result["ema"] is True
    assert Path(result["checkpoint"]).name == f"step-{steps:09d}"
    assert json.loads((run_dir / "eval" / f"step-{steps:09d}.json").read_text()) == result

    bits = result["bits_per_dim"]
    untrained = untrained_bits_per_dim(run_dir, images)
    assert math.isfinite(bits) and bits < 8.0, result
    assert bits < untrained - 0.5, (bits, untrained)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_grid(family, trained):
    run_dir = trained(family)
    n = SAMPLE_N[family]
    out = run_dir / "grid.png"
    result = run_cli("launch", "sample", str(run_dir), *FAMILIES[family][2], "--n", str(n), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(out) as image:
        assert image.mode == "L"  # one 8-bit channel
        pixels = np.asarray(image)
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    assert pixels.dtype == np.uint8
    size = config_module.load(run_dir / "config.yaml").data.image_size  # the config's resolution
    assert pixels.shape == (rows * (size + 2) + 2, columns * (size + 2) + 2)  # 2-pixel padding
    if family == "pixelcnn":
        return  # another 1024 network passes; its uint8 contract is unit-tested in test_autoregressive

    from launch.weights import load_model

    model, _, config = load_model(run_dir)
    with torch.no_grad():
        images = model.sample(1, torch.Generator().manual_seed(0), **config.sample.options)
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (1, 1, size, size)


def test_eval_exact_likelihood_is_the_same_on_two_processes(trained):
    run_dir = trained("pixelcnn")
    # The whole held-out split: --max-images would take a different subset per process count.
    one = eval_json(run_dir, "--batch-size", "32")
    two = eval_json(run_dir, "--batch-size", "32", "--nproc", "2")
    assert two["images"] == one["images"] == 359
    assert two["bits_per_dim"] == pytest.approx(one["bits_per_dim"], rel=1e-5)


def test_eval_iwae_bound_is_at_most_the_elbo(trained):
    run_dir = trained("vae")
    elbo = eval_json(run_dir, "--max-images", "64", "--iwae-samples", "1")
    iwae = eval_json(run_dir, "--max-images", "64", "--iwae-samples", "16")
    assert iwae["iwae_samples"] == 16 and iwae["kind"] == "upper_bound"
    # Different noise draws: allow the estimates' spread on 64 images.
    assert iwae["bits_per_dim"] <= elbo["bits_per_dim"] + 0.01


def test_eval_errors_are_one_line(trained, tmp_path):
    run_dir = trained("vae")
    missing = run_cli("launch", "eval", str(run_dir), "--shards", str(tmp_path / "nowhere.tar"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nowhere.tar does not exist" in missing.stderr

    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    no_checkpoint = run_cli("launch", "eval", str(empty))
    assert no_checkpoint.returncode == 2
    assert "no intact checkpoint" in no_checkpoint.stderr and no_checkpoint.stderr.strip().count("\n") == 0

    wrong_family = run_cli("launch", "eval", str(trained("flow")), "--iwae-samples", "4")
    assert wrong_family.returncode == 2 and "vae family only" in wrong_family.stderr
