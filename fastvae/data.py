"""Data: the bundled MNIST and user arrays, validated, kept whole on the training device.

Batches are gathered on the device by a shuffled index (no DataLoader workers in the hot loop);
uint8 data stays uint8 there (4x less memory) and is scaled to [0, 1] per batch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastvae.errors import FastVAEError

# Fraction of a single-array user file held out as its test split.
HOLDOUT_FRACTION = 0.1


@dataclass
class Dataset:
    """Train and test arrays of shape (N, *data_shape), uint8 0..255 or float32 in the data's range."""

    name: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def mnist_path() -> Path:
    """Path of the bundled MNIST archive (CC BY-SA 3.0, Y. LeCun and C. Cortes; see datasets/README.md)."""
    return Path(str(resources.files("fastvae.datasets").joinpath("mnist.npz")))


def load_dataset(source: str = "mnist", likelihood: str = "bernoulli") -> Dataset:
    """Load "mnist" (bundled) or a ``.npy``/``.npz`` file.

    A ``.npz`` with ``x_train`` and ``x_test`` (and optional ``y_train``/``y_test``) is used as split;
    any other file must hold one array (N, ...), of which the last 10% is held out as the test split.
    """
    if source == "mnist":
        with np.load(mnist_path(), allow_pickle=False) as f:
            return Dataset("mnist", f["x_train"], f["x_test"], f["y_train"], f["y_test"])
    path = Path(source)
    arrays = _read_arrays(path)
    if "x_train" in arrays and "x_test" in arrays:
        x_train = validate_array(arrays["x_train"], likelihood, f"{path}[x_train]")
        x_test = validate_array(arrays["x_test"], likelihood, f"{path}[x_test]")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise FastVAEError(f"{path}: x_train and x_test differ in sample shape")
        y_train = validate_labels(arrays.get("y_train"), len(x_train), f"{path}[y_train]")
        y_test = validate_labels(arrays.get("y_test"), len(x_test), f"{path}[y_test]")
        return Dataset(path.name, x_train, x_test, y_train, y_test)
    if len(arrays) != 1:
        raise FastVAEError(
            f"{path}: expected one array, or x_train and x_test, found {', '.join(sorted(arrays)) or 'none'}"
        )
    x = validate_array(next(iter(arrays.values())), likelihood, str(path))
    if len(x) < 2:
        raise FastVAEError(f"{path}: need at least 2 samples to hold out a test split, found {len(x)}")
    n_test = max(1, int(round(len(x) * HOLDOUT_FRACTION)))
    return Dataset(path.name, x[:-n_test], x[-n_test:])


def load_array(source: str, likelihood: str = "bernoulli") -> np.ndarray:
    """One validated array (N, ...) from a file, or the MNIST test split for "mnist"."""
    if source == "mnist":
        return load_dataset("mnist").x_test
    path = Path(source)
    arrays = _read_arrays(path)
    key = "x_test" if "x_test" in arrays else ("x" if "x" in arrays else None)
    if key is None and len(arrays) != 1:
        raise FastVAEError(f"{path}: expected one array (or x / x_test), found {', '.join(sorted(arrays))}")
    return validate_array(arrays[key] if key else next(iter(arrays.values())), likelihood, str(path))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FastVAEError(f"{path}: no such data file")
    if path.is_dir():
        raise FastVAEError(f"{path}: is a directory, expected a .npy or .npz file")
    if not path.is_file():  # a FIFO or a device: a read would block or never end
        raise FastVAEError(f"{path}: not a regular file, expected a .npy or .npz file")
    if path.suffix not in (".npy", ".npz"):
        raise FastVAEError(f"{path}: unsupported file type {path.suffix or '(none)'}; use .npy or .npz")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # .npy content, whatever the name says
            return {"x": loaded}
        with loaded as f:
            return {k: f[k] for k in f.files}
    except MemoryError:
        raise FastVAEError(f"{path}: the arrays do not fit in memory") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # truncated, pickled, foreign
        raise FastVAEError(f"{path}: not a readable NumPy file ({first})") from None


def validate_array(x: np.ndarray, likelihood: str, name: str) -> np.ndarray:
    """Check an (N, ...) data array and return it as uint8 or float32; raise FastVAEError naming ``name``."""
    if not isinstance(x, np.ndarray):
        raise FastVAEError(f"{name}: not an array")
    if x.ndim < 2:
        raise FastVAEError(
            f"{name}: expected shape (N, features...) with at least 2 dimensions, got {x.shape}"
        )
    if x.size == 0:
        raise FastVAEError(f"{name}: empty array of shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise FastVAEError(f"{name}: unsupported dtype {x.dtype}; use uint8 (0..255) or float")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise FastVAEError(f"{name}: integer values must lie in 0..255, found {lo}..{hi}")
        return x.astype(np.uint8)
    with np.errstate(all="ignore"):
        finite = np.isfinite(x)
    if not finite.all():
        bad = int((~finite).sum())
        raise FastVAEError(f"{name}: {bad} value(s) are NaN or infinite")
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise FastVAEError(f"{name}: values exceed the float32 range")
    x = x.astype(np.float32)
    if likelihood == "bernoulli":
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise FastVAEError(
                f"{name}: values must lie in [0, 1] for a Bernoulli likelihood, found {lo:g}..{hi:g}"
            )
    return x


def validate_labels(y: np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    """Labels (n,) as int64, or None when absent; one clear error for any other shape or type."""
    if y is None:
        return None
    if not isinstance(y, np.ndarray) or y.ndim != 1 or len(y) != n:
        shape = getattr(y, "shape", None)
        raise FastVAEError(f"{name}: expected {n} labels in a 1-D array (one per sample), got shape {shape}")
    if y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    raise FastVAEError(f"{name}: labels must be integers, got dtype {y.dtype}")


def unit_float(x: np.ndarray) -> np.ndarray:
    """A validated array (N, ...) as float32 rows (N, D): uint8 scaled to [0, 1], floats as they are."""
    flat = x.reshape(len(x), -1)
    return flat.astype(np.float32) / 255.0 if flat.dtype == np.uint8 else flat.astype(np.float32)


class DeviceData:
    """A whole split resident on one device; ``batch(idx)`` gathers rows as float (B, D) in [0, 1]."""

    def __init__(self, x: np.ndarray, device: torch.device | str) -> None:
        self.scaled = x.dtype == np.uint8
        self.x = torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1))).to(device)  # (N, D)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: Tensor) -> Tensor:
        rows = self.x.index_select(0, idx)
        return rows.float().div_(255.0) if self.scaled else rows.float()
