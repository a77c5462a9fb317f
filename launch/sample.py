"""``launch sample``: a grid of samples from a run directory's newest intact checkpoint, or from a
weights file written by ``launch export``.

The same weights, seed and options give the same PNG bytes: all sampling noise comes from one
seeded CPU generator (see pipeline/models/base.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from launch.weights import load_model
from pipeline import config as config_module, images
from pipeline.errors import UserError
from pipeline.models import check_sample_options


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
    try:
        merged = check_sample_options(config.model.family, {**config.sample.options, **options})
    except ValueError as exc:
        raise UserError(str(exc)) from None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        grid = model.sample(n, generator, **merged)
    return images.save_png(grid, out)
