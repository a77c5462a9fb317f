"""Sample grids as PNG, byte-for-byte reproducible from the same uint8 images."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.files import atomic_write


def grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 [H', W', C] (or [H', W']) array, images in rows."""
    images = images.detach().cpu()
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        dtype=np.uint8,
    )
    array = images.permute(0, 2, 3, 1).numpy()
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[top : top + height, left : left + width] = array[index]
    return canvas[..., 0] if channels == 1 else canvas


def png_bytes(images: torch.Tensor, columns: int | None = None) -> bytes:
    canvas = grid(images, columns)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def save_png(images: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write a grid PNG atomically (temporary name, then rename)."""
    return atomic_write(path, png_bytes(images, columns))
