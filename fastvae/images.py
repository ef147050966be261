"""PNG grids of samples and reconstructions (Pillow)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from fastvae.atomic import atomic_write_bytes
from fastvae.errors import FastVAEError

# A conditional VAE's sample grids have this many images per row, each row one label (r % C).
SAMPLE_ROWS = 10

# The largest grid drawn: 40 megapixels (a 6,300-px square, ~120 MB as RGB). Beyond it fewer samples
# are drawn, each at most MAX_SAMPLE_PIXELS.
MAX_GRID_PIXELS = 40_000_000
MAX_SAMPLE_PIXELS = 4_000_000


def to_image_shape(data_shape: tuple[int, ...]) -> tuple[int, int, int, bool]:
    """(channels, height, width, channels_last) used to draw one sample of ``data_shape``.

    (C, H, W) and (H, W, C) images with 1 or 3 channels and (H, W) images keep their layout; anything
    else is drawn as a near-square grey image of its D values, the last row padded."""
    if len(data_shape) == 3 and data_shape[0] in (1, 3):
        return (*data_shape, False)
    if len(data_shape) == 3 and data_shape[2] in (1, 3):
        return (data_shape[2], data_shape[0], data_shape[1], True)
    if len(data_shape) == 2:
        return (1, *data_shape, False)
    d = math.prod(data_shape)
    w = math.ceil(math.sqrt(d))
    return (1, math.ceil(d / w), w, False)


def _as_images(x: np.ndarray, data_shape: tuple[int, ...]) -> np.ndarray:
    """(N, D) values in [0, 1] as (N, C, H, W) float32."""
    c, h, w, last = to_image_shape(data_shape)
    x = np.clip(np.asarray(x, dtype=np.float32).reshape(len(x), -1), 0.0, 1.0)
    if last:
        return x.reshape(len(x), h, w, c).transpose(0, 3, 1, 2)
    if x.shape[1] < c * h * w:  # a flat sample padded to its near-square
        x = np.pad(x, ((0, 0), (0, c * h * w - x.shape[1])), constant_values=1.0)
    return x.reshape(len(x), c, h, w)


def grid_array(x: np.ndarray, data_shape: tuple[int, ...], ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile samples ``x`` (N, D) with values in [0, 1] into one uint8 image (H, W) or (H, W, 3); as many
    as fit in ``MAX_GRID_PIXELS``."""
    c, h, w, _ = to_image_shape(data_shape)
    if h * w > MAX_SAMPLE_PIXELS:
        raise FastVAEError(f"one sample of shape {data_shape} is {h}x{w} pixels, too large to draw")
    x = x[: max(1, MAX_GRID_PIXELS // ((h + pad) * (w + pad)))]
    x = _as_images(x, data_shape)
    n = len(x)
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    canvas = np.ones((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, top : top + h, left : left + w] = x[i]
    img = (canvas * 255.0 + 0.5).astype(np.uint8)
    return img[0] if c == 1 else img.transpose(1, 2, 0)


def save_grid(
    x: np.ndarray, data_shape: tuple[int, ...], path: str | os.PathLike, ncol: int = 8, scale: int = 2
) -> None:
    """Write samples (N, D) in [0, 1] as a PNG grid, ``ncol`` per row, each pixel ``scale`` x ``scale``."""
    img = Image.fromarray(grid_array(x, data_shape, ncol))
    scale = max(1, min(scale, math.isqrt(MAX_GRID_PIXELS // max(1, img.width * img.height))))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())  # a crash never leaves half a PNG
