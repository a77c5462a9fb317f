"""``launch sample``: a grid of samples from a run directory's newest intact checkpoint, or from a
weights file written by ``launch export``.

The same weights, seed and options give the same PNG bytes: all sampling noise comes from one
seeded CPU generator (see pipeline/models/base.py).

A class-conditional run samples ``--classes 0,1,2`` as one grid row per listed class, in the order
listed, ``--n`` images in each row; without ``--classes`` it draws ``--n`` images of the classes in
turn. ``guidance=S`` (diffusion) is the classifier-free guidance scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from launch.weights import load_model
from pipeline import conditioning, images
from pipeline import config as config_module
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
    checkpoint_path: str | None = None, classes: str | None = None,
) -> Path:
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    model, manifest, config = load_model(run_dir, use_ema, checkpoint_path, device)
    try:
        merged = check_sample_options(config.model.family, {**config.sample.options, **options}, config.model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    count, labels, columns = n, {}, None
    if classes is not None:
        rows = images.class_rows(conditioning.parse_classes(classes, model.num_classes), n)
        count, labels, columns = len(rows), {"labels": rows}, n
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        grid = model.sample(count, generator, **labels, **merged)
    return images.save_png(grid, out, columns)
