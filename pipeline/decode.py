"""Image bytes to square 8-bit arrays: decode, reduce, crop, convert. No torch here.

The training loader (`pipeline.data`) calls `decode_square` for every sample; `data-prep` uses the
same `to_8bit` and `resize_crop` when it writes shards, so an image resized at load time and one
resized when the shards were written go through the same steps.

Resizing keeps the aspect ratio: the shorter side is scaled to the target and a square is cut
from the longer side, at its centre or at a given fraction of the free length (random crops pass
a fraction drawn per sample); nothing is ever stretched. Only the square that is kept is
resampled (Pillow's ``resize(box=...)``), so the cropped-away parts cost nothing. A JPEG whose
shorter side is at least twice the target is decoded at a reduced scale (1/2, 1/4 or 1/8, still
at least the target: ``Image.draft``), which makes large stored images cost little more than
small ones. An image already at the target size takes none of these steps.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MODES = {1: "L", 3: "RGB"}
# Member extensions that hold a sample's image in a shard, in the order they are looked for.
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff", "gif")
# Resampling of load-time resizes: bilinear, antialiased when reducing (as every Pillow resize
# is; torchvision's default too), about twice as fast as bicubic in Pillow; reductions of more
# than REDUCING_GAP times start with a box reduction by an integer factor (Pillow's
# reducing_gap: indistinguishable from a full-precision resize at 3).
LOAD_RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0


def to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """Any PIL mode as 8-bit "RGB" or "L".

    Transparency (alpha, a palette's transparent index, an L or RGB transparent colour) is
    composited on white; 16-bit modes and 32-bit "I" are read as 16-bit (divided by 257); "F" is
    taken as 0..1 when it lies there, as 0..255 when it lies there, else stretched from its min
    to its max; CMYK and YCbCr go through PIL's conversion to RGB.
    """
    if image.mode == mode and "transparency" not in image.info:
        return image
    if image.mode in ("P", "PA"):
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")  # a GIF's or PNG's transparent colour
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.float64)
        image = _gray_from_float(np.clip(values, 0, 65535) / 257.0)
    elif image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            values = values * 255.0
        elif not (low >= 0 and high <= 255):
            values = (values - low) * (255.0 / (high - low)) if high > low else values * 0
        image = _gray_from_float(values)
    elif image.mode == "1":
        image = image.convert("L")
    if image.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, ...
    return image if image.mode == mode else image.convert(mode)


def _gray_from_float(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def crop_box(width: int, height: int, offset: float = 0.5) -> tuple[int, int, int, int]:
    """The largest square of a width×height image, `offset` (0 to 1) along its longer side.

    0 is the left (or top) end, 0.5 the centre, 1 the right (or bottom) end.
    """
    side = min(width, height)
    free = max(width, height) - side
    shift = min(free, max(0, int(offset * free + 0.5)))
    if width >= height:
        return (shift, 0, shift + side, side)
    return (0, shift, side, shift + side)


def resize_crop(image: Image.Image, size: int, offset: float = 0.5,
                resample: Image.Resampling = LOAD_RESAMPLE,
                reducing_gap: float | None = REDUCING_GAP) -> Image.Image:
    """The `size`×`size` image of the square `crop_box` of `image` (shorter side to `size`)."""
    width, height = image.size
    box = crop_box(width, height, offset)
    side = box[2] - box[0]
    if side == size:
        return image if (width, height) == (size, size) else image.crop(box)
    return image.resize((size, size), resample, box=box,
                        reducing_gap=reducing_gap if side > size else None)


def reduce_on_decode(image: Image.Image, size: int, mode: str | None) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when its shorter side is >= 2× `size`.

    The reduced image still has both sides >= `size`. `mode` "L" also decodes a colour JPEG
    straight to grey. Call before ``load()``; other formats are left as they are.
    """
    if image.format == "JPEG" and min(image.size) >= 2 * size:
        image.draft(mode if mode == "L" else None, (size, size))


def decode_square(data: bytes, size: int, channels: int, offset: float = 0.5) -> np.ndarray:
    """uint8 ``[H, W]`` (channels 1) or ``[H, W, 3]`` array of `data` as a `size` square.

    An image stored at `size`×`size` is only decoded and converted; any other is reduced on
    decode where it can be, and resized along `resize_crop` at `offset`. Raises what Pillow
    raises for undecodable bytes.
    """
    mode = MODES[channels]
    with Image.open(io.BytesIO(data)) as image:
        if image.size != (size, size):
            reduce_on_decode(image, size, mode)
        image.load()
        if image.mode != mode:
            image = to_8bit(image, mode)
        if image.size != (size, size):
            image = resize_crop(image, size, offset)
        return np.asarray(image, dtype=np.uint8)
