"""``launch sample``: a grid of samples from a run directory's newest intact checkpoint, or from a
weights file written by ``launch export``.

The same weights, seed and options give the same PNG bytes: all sampling noise comes from one
seeded CPU generator (see pipeline/models/base.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import checkpoint, config as config_module, images, models
from pipeline.config import RunConfig
from pipeline.errors import UserError


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return config_module.load(path)


def run_checkpoint(run_dir: str | Path, checkpoint_path: str | None = None):
    """The given checkpoint directory, else the run's newest intact one (verified either way)."""
    if checkpoint_path is not None:
        return checkpoint.open_checkpoint(checkpoint_path)
    loaded = checkpoint.find_for_run(run_dir)
    if loaded is None:
        raise UserError(f"{run_dir}: no intact checkpoint (has it trained yet?)")
    return loaded


def load_model(run_dir: str | Path, use_ema: bool = True, checkpoint_path: str | None = None, device: str = "cpu"):
    """(model in eval mode, manifest or metadata, config) for a run directory, or for a weights
    file written by ``launch export`` (which carries its config)."""
    if Path(run_dir).is_file():
        from launch.export import load_weights_file

        return load_weights_file(run_dir, device)
    config = load_run_config(run_dir)
    loaded = run_checkpoint(run_dir, checkpoint_path)
    model = models.build(config.model, config.data.image_size, config.data.channels)
    name = "ema.safetensors" if use_ema and loaded.has("ema.safetensors") else "model.safetensors"
    model.load_state_dict(loaded.tensors(name))
    model.to(device).eval()
    return model, loaded.manifest, config


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        parts, value = config_module.parse_override(pair)
        options[".".join(parts)] = value
    return options


def sample_to_png(
    run_dir: str, n: int, out: str, seed: int, use_ema: bool, options: dict, device: str = "cpu",
    checkpoint_path: str | None = None,
) -> Path:
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    model, manifest, config = load_model(run_dir, use_ema, checkpoint_path, device)
    merged = {**config.sample.options, **options}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        try:
            grid = model.sample(n, generator, **merged)
        except TypeError as exc:
            raise UserError(f"sampling options {sorted(merged)}: {exc}") from None
    return images.save_png(grid, out)
