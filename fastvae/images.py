"""PNG grids of samples and reconstructions (Pillow)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_image_shape(data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) used to draw one sample of ``data_shape``."""
    if len(data_shape) == 3 and data_shape[0] in (1, 3):
        return data_shape
    if len(data_shape) == 2:
        return (1, *data_shape)
    d = math.prod(data_shape)
    side = math.isqrt(d)
    return (1, side, side) if side * side == d else (1, 1, d)


def grid_array(x: np.ndarray, data_shape: tuple[int, ...], ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile samples ``x`` (N, D) with values in [0, 1] into one uint8 image (H, W) or (H, W, 3)."""
    c, h, w = to_image_shape(data_shape)
    x = np.clip(np.asarray(x, dtype=np.float32).reshape(len(x), c, h, w), 0.0, 1.0)
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
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, format="PNG")
