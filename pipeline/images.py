"""Sample grids as PNG, byte-for-byte reproducible from the same uint8 images.

A class-conditional model's grid has one row per class (`class_rows`): the images of each class
side by side, the classes top to bottom in the order asked, with the same padding as any grid.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
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


def class_rows(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """The labels of a grid with one row per class: each class ``per_class`` times, in the
    order given, int64 [len(classes) * per_class]; draw them with ``columns=per_class``."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    return torch.tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)


def grid_classes(num_classes: int, images: int) -> tuple[list[int], int]:
    """(classes, images per class) of a training grid of at most ``images`` images, near square:
    one row for each of the first min(num_classes, ceil(sqrt(images))) classes, as many images
    in each as fit (100 images of 10 classes: 10 rows of 10; 64 of 1000 classes: 8 rows of 8)."""
    rows = min(num_classes, math.ceil(math.sqrt(images)))
    return list(range(rows)), images // rows


def png_bytes(images: torch.Tensor, columns: int | None = None) -> bytes:
    canvas = grid(images, columns)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def save_png(images: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write a grid PNG atomically (temporary name, then rename)."""
    return atomic_write(path, png_bytes(images, columns))


def tiles(canvas: np.ndarray, image_size: int, count: int | None = None, padding: int = 2) -> torch.Tensor:
    """The images of a `grid` canvas ([H', W'] or [H', W', C]) back as uint8 [N, C, S, S], row by
    row: every tile, or the first ``count``. ValueError when the canvas is not a grid of S×S images."""
    canvas = canvas[..., None] if canvas.ndim == 2 else canvas
    height, width, _ = canvas.shape
    step = image_size + padding
    if image_size < 1 or (height - padding) % step or (width - padding) % step or height <= padding:
        raise ValueError(f"a {width}x{height} image is not a grid of {image_size}x{image_size} images "
                         f"with {padding}-pixel padding")
    rows, columns = (height - padding) // step, (width - padding) // step
    count = rows * columns if count is None else count
    if not 1 <= count <= rows * columns:
        raise ValueError(f"the grid holds {rows * columns} images ({rows} rows of {columns}), not {count}")
    images = [canvas[padding + row * step : padding + row * step + image_size,
                     padding + column * step : padding + column * step + image_size]
              for row, column in (divmod(index, columns) for index in range(count))]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
