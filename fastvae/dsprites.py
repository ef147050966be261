"""A procedural re-creation of dSprites (Matthey et al., 2017), with its factor labels; no download.

This is *not* the original file: the shapes are drawn by the rule below, so images are not
pixel-identical to DeepMind's. The factor grid, its order and the ``.npz`` key names follow the original
(``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``), so code written for it runs on this one.

Factors, in the original order (position Y fastest, then position X, orientation, scale, shape):

- colour: white (1 value, kept as the first column of ``latents_classes``/``latents_values``);
- shape: square, ellipse, heart (values 1, 2, 3);
- scale: 6 values, ``linspace(0.5, 1, 6)``;
- orientation: 40 values ``2 pi k / 40``, k = 0..39, in [0, 2 pi) (the original lists 40 values
  including both 0 and 2 pi; ours has no duplicate angle);
- posX, posY: 32 values each, ``linspace(0, 1, 32)``.

The rendering rule: a 64 x 64 binary image; pixel (row i, column j) has its centre at
(x, y) = (j + 0.5, i + 0.5). The shape's centre is (cx, cy) = 64 * (0.2 + 0.6 * (posX, posY)), so posX
moves it right and posY down. Each pixel centre is mapped into the shape's own frame by the inverse
transform: u = (cos t * dx - sin t * dy) / (10 s), v = (sin t * dx + cos t * dy) / (10 s) with
(dx, dy) = (x - cx, cy - y) (y up), t the orientation and s the scale (10 s pixels is the unit), so
the shape turns counterclockwise as displayed. The pixel is on when the shape's implicit function
holds there:

- square: max(|u|, |v|) <= 0.8;
- ellipse: u^2 + (v / 0.5)^2 <= 1 (twice as wide as tall at t = 0);
- heart: with (a, b) = 1.15 (u, v) + (0, 0.1): (a^2 + b^2 - 1)^3 - a^2 b^3 <= 0.

The whole grid, 737,280 images, is rendered once and cached bit-packed (``np.packbits``: 377 MB)
under ``fastvae.quality.cache_dir()``; ``dsprites-small`` keeps every 4th position (8 x 8 positions,
46,080 images, 24 MB packed) for tests and CPU runs. As ``--data``, the images are uint8 0/255, a fixed
10% are held out as the test split, the class label is the shape (0..2) and the five factors ride
along as :attr:`FactorDataset.factors_test`.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError

FACTORS = ("shape", "scale", "orientation", "posX", "posY")
SHAPES = ("square", "ellipse", "heart")
FULL_SIZES = (3, 6, 40, 32, 32)  # classes per factor in the original grid
SIZE = 64
RENDER_VERSION = 1  # bump when the rule changes: old cache files are then ignored
SPLIT_SEED = 0  # the fixed shuffle that holds out the test split
HOLDOUT = 0.1
_MARGIN, _SPAN, _UNIT = 0.2, 0.6, 10.0  # centre = 64 * (margin + span * pos); 10 px per unit at scale 1
_CHUNK = 2048  # images rendered at a time (a few 32 MB temporaries)


def factor_values() -> list[np.ndarray]:
    """The value of each class of each factor (shape: 1, 2, 3 as in the original)."""
    return [
        np.arange(1.0, 4.0),
        np.linspace(0.5, 1.0, 6),
        2 * math.pi * np.arange(40) / 40,
        np.linspace(0.0, 1.0, 32),
        np.linspace(0.0, 1.0, 32),
    ]


@dataclass(frozen=True)
class Grid:
    """A factor grid: for each factor, the classes (of the full grid) it keeps."""

    name: str
    keep: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(k) for k in self.keep)

    def __len__(self) -> int:
        return math.prod(self.sizes)

    def classes(self, index: np.ndarray) -> np.ndarray:
        """(N, 5) full-grid class indices of grid rows ``index`` (posY fastest, as the original)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise FastVAEError(f"{self.name}: image index out of range 0..{len(self) - 1}")
        local = np.stack(np.unravel_index(index, self.sizes), axis=-1)
        return np.stack([np.asarray(k)[local[..., f]] for f, k in enumerate(self.keep)], axis=-1)

    def index(self, classes: np.ndarray) -> np.ndarray:
        """Grid rows of (N, 5) full-grid classes (each must be a class the grid keeps)."""
        classes = np.asarray(classes, dtype=np.int64)
        local = []
        for f, k in enumerate(self.keep):
            lookup = np.full(FULL_SIZES[f], -1, np.int64)
            lookup[list(k)] = np.arange(len(k))
            local.append(lookup[classes[..., f]])
        if any((c < 0).any() for c in local):
            raise FastVAEError(f"{self.name}: a factor class the grid does not hold")
        return np.ravel_multi_index(tuple(local), self.sizes)

    def values(self, classes: np.ndarray) -> np.ndarray:
        """(N, 5) factor values of (N, 5) full-grid classes."""
        vals = factor_values()
        return np.stack([vals[f][classes[..., f]] for f in range(len(FACTORS))], axis=-1)


GRIDS = {
    "dsprites": Grid("dsprites", tuple(tuple(range(n)) for n in FULL_SIZES)),
    "dsprites-small": Grid(
        "dsprites-small",
        (*(tuple(range(n)) for n in FULL_SIZES[:3]), tuple(range(0, 32, 4)), tuple(range(0, 32, 4))),
    ),
}


def is_dsprites(source: object) -> bool:
    """Whether a ``--data`` value names a dSprites grid."""
    return isinstance(source, str) and source in GRIDS


def grid(name: str) -> Grid:
    if name not in GRIDS:
        raise FastVAEError(f"unknown dSprites grid {name!r}; choose from {', '.join(GRIDS)}")
    return GRIDS[name]


def render(classes: np.ndarray) -> np.ndarray:
    """(N, 64, 64) bool images of (N, 5) full-grid factor classes, by the module's rule."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1, len(FACTORS))
    out = np.empty((len(classes), SIZE, SIZE), dtype=bool)
    for start in range(0, len(classes), _CHUNK):
        out[start : start + _CHUNK] = _render_chunk(classes[start : start + _CHUNK])
    return out


def _render_chunk(c: np.ndarray) -> np.ndarray:
    vals = factor_values()
    scale, theta = vals[1][c[:, 1]], vals[2][c[:, 2]]
    cx = SIZE * (_MARGIN + _SPAN * vals[3][c[:, 3]])
    cy = SIZE * (_MARGIN + _SPAN * vals[4][c[:, 4]])
    centres = np.arange(SIZE, dtype=np.float64) + 0.5
    dx = centres[None, None, :] - cx[:, None, None]  # (N, 1, 64): columns
    dy = cy[:, None, None] - centres[None, :, None]  # (N, 64, 1): rows, y up
    cos, sin, unit = (
        np.cos(theta)[:, None, None],
        np.sin(theta)[:, None, None],
        (_UNIT * scale)[:, None, None],
    )
    u = (cos * dx - sin * dy) / unit  # inverse rotation by -theta, then inverse scale
    v = (sin * dx + cos * dy) / unit
    shape = c[:, 0][:, None, None]
    square = np.maximum(np.abs(u), np.abs(v)) <= 0.8
    ellipse = u * u + (v / 0.5) ** 2 <= 1.0
    a, b = 1.15 * u, 1.15 * v + 0.1
    heart = (a * a + b * b - 1.0) ** 3 - a * a * b**3 <= 0.0
    return np.where(shape == 0, square, np.where(shape == 1, ellipse, heart))


def _cache_path(g: Grid) -> Path:
    from fastvae.cache import cache_dir

    return cache_dir() / f"dsprites-v{RENDER_VERSION}-{g.name}.npy"


def packed_images(name: str = "dsprites-small", *, cache: bool = True) -> np.ndarray:
    """The whole grid bit-packed, (N, 512) uint8 (``np.packbits`` of each 64 x 64 image): read from the
    cache, or rendered and cached (atomic write)."""
    from fastvae.limits import check_fits

    g = grid(name)
    path = _cache_path(g)
    if cache and path.is_file():
        try:
            packed = np.load(path, allow_pickle=False)
            if packed.shape == (len(g), SIZE * SIZE // 8) and packed.dtype == np.uint8:
                return packed
        except (ValueError, OSError, EOFError):  # a damaged cache file: render again and replace it
            pass
    check_fits(2 * len(g) * SIZE * SIZE // 8, f"the {name} grid ({len(g):,} images, bit-packed)",
               "use --data dsprites-small")  # fmt: skip
    packed = np.empty((len(g), SIZE * SIZE // 8), dtype=np.uint8)
    for start in range(0, len(g), _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, len(g)))
        packed[rows] = np.packbits(render(g.classes(rows)).reshape(len(rows), -1), axis=1)
    if cache:
        from fastvae.atomic import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, packed)
        atomic_write_bytes(path, buf.getvalue())
    return packed


def images(name: str, index: np.ndarray | None = None, *, cache: bool = True) -> np.ndarray:
    """(N, 64, 64) uint8 0/1 images of grid rows ``index`` (all rows when None)."""
    packed = packed_images(name, cache=cache)
    rows = packed if index is None else packed[np.asarray(index, dtype=np.int64)]
    return np.unpackbits(rows, axis=1).reshape(len(rows), SIZE, SIZE)


@dataclass
class FactorData:
    """A dSprites grid as training data: images uint8 0/255, shape labels and the five factor classes."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    factors_train: np.ndarray  # (N, 5) int64 full-grid classes, FACTORS order
    factors_test: np.ndarray
    grid: Grid


def split_rows(g: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of a grid: a fixed shuffle, the last 10% held out."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(g))
    n_test = max(1, int(round(len(g) * HOLDOUT)))
    return order[:-n_test], order[-n_test:]


def load_factor_data(name: str) -> FactorData:
    """The named grid as 0/255 uint8 train/test splits with labels (one clear line when it cannot fit)."""
    from fastvae.limits import check_fits

    g = grid(name)
    check_fits(
        len(g) * SIZE * SIZE + len(g) * SIZE * SIZE // 8,
        f"--data {name} ({len(g):,} images of 64x64 as uint8)",
        "use --data dsprites-small (every 4th position), or a machine with more memory",
    )
    packed = packed_images(name)
    train, test = split_rows(g)
    parts = []
    for rows in (train, test):
        x = np.unpackbits(packed[rows], axis=1).reshape(len(rows), SIZE, SIZE)
        x *= 255  # 0/1 -> 0/255: fastvae scales uint8 data by 1/255
        classes = g.classes(rows)
        parts.append((x, classes[:, 0].copy(), classes))
    (xtr, ytr, ftr), (xte, yte, fte) = parts
    return FactorData(xtr, xte, ytr, yte, ftr, fte, g)


def write_npz(path: str | os.PathLike, name: str = "dsprites") -> Path:
    """The grid as an ``.npz`` with the original's keys: ``imgs`` (N, 64, 64) uint8 0/1,
    ``latents_classes`` and ``latents_values`` (N, 6: colour, shape, scale, orientation, posX, posY) and
    ``metadata`` (a JSON string, so it loads without pickle). Compressed; written atomically."""
    from fastvae.atomic import atomic_write_bytes, check_writable

    target = check_writable(path)
    g = grid(name)
    classes = g.classes(np.arange(len(g)))
    latents_classes = np.concatenate([np.zeros((len(g), 1), np.int64), classes], axis=1)
    latents_values = np.concatenate([np.ones((len(g), 1)), g.values(classes)], axis=1)
    meta = {
        "description": "procedural re-creation of dSprites by fastvae (not the original file); rule in "
        "fastvae/dsprites.py",
        "latents_names": ["color", *FACTORS],
        "latents_sizes": [1, *g.sizes],
        "shapes": list(SHAPES),
        "render_version": RENDER_VERSION,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, imgs=images(name), latents_classes=latents_classes,
                        latents_values=latents_values, metadata=np.array(json.dumps(meta)))  # fmt: skip
    atomic_write_bytes(target, buf.getvalue())
    return target


def factor_index(name: str) -> int:
    """The column of a factor name (case-insensitive), or one clear line listing the names."""
    for i, f in enumerate(FACTORS):
        if f.lower() == name.strip().lower():
            return i
    raise FastVAEError(f"unknown factor {name!r}; dSprites factors are {', '.join(FACTORS)}")
