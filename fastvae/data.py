"""Data: the bundled MNIST, user files, folders of images and in-memory data, validated, kept whole on the training device.

Batches are gathered on the device by a shuffled index (no DataLoader workers in the hot loop);
uint8 data stays uint8 there (4x less memory) and is scaled to [0, 1] per batch.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastvae.config import describe_data
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


# Image files a folder of images may hold (read through Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The fixed seed of the shuffle that holds out a folder's test split (a folder is sorted by class).
FOLDER_SPLIT_SEED = 0


def load_dataset(
    source: Any = "mnist",
    likelihood: str = "bernoulli",
    *,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    progress: bool = True,
) -> Dataset:
    """The train and test split of any data form, validated alike (one :class:`FastVAEError` line).

    ``source``: "mnist" (bundled); a ``.npy``/``.npz`` file; a folder of PNG/JPEG images (labels from
    subfolder names when there are subfolders, as torchvision's ImageFolder); a numpy array or torch
    tensor (N, ...); a ``(train, test)`` pair of those; or a map-style torch ``Dataset`` (materialised
    once). A ``.npz`` with ``x_train`` and ``x_test`` is its own split; any other single source holds out
    its last 10% as the test split (a folder is shuffled first, with a fixed seed).
    """
    if isinstance(source, Dataset):
        return _checked_split(source.name, source.x_train, source.x_test, source.y_train, source.y_test,
                              likelihood)  # fmt: skip
    if isinstance(source, (str, os.PathLike)):
        return _load_path(str(source), likelihood, image_size, grayscale, progress)
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise FastVAEError(f"data: a sequence must be a (train, test) pair, got {len(source)} items")
        x_tr, y_tr = _in_memory(source[0], "data[0] (train)", progress)
        x_te, y_te = _in_memory(source[1], "data[1] (test)", progress)
        return _checked_split(describe_data(source), x_tr, x_te, y_tr, y_te, likelihood)
    x, y = _in_memory(source, "data", progress)
    return _held_out(describe_data(source), validate_array(x, likelihood, "data"), y, "data")


def _load_path(source: str, likelihood: str, image_size, grayscale: bool, progress: bool) -> Dataset:
    if source in ("dsprites", "dsprites-small"):  # procedural, with factor labels: fastvae.dsprites
        from fastvae.dsprites import as_dataset

        return as_dataset(source)
    if source == "mnist":
        with np.load(mnist_path(), allow_pickle=False) as f:
            return Dataset("mnist", f["x_train"], f["x_test"], f["y_train"], f["y_test"])
    path = Path(source)
    if path.is_dir() and path.suffix in (".npy", ".npz"):
        raise FastVAEError(f"{path}: is a directory, expected a .npy or .npz file")
    if path.is_dir():
        x, y = read_image_folder(path, image_size, grayscale, progress)
        order = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(x))
        x, y = x[order], (None if y is None else y[order])
        return _held_out(path.name, validate_array(x, likelihood, str(path)), y, str(path))
    arrays = _read_arrays(path)
    if "x_train" in arrays and "x_test" in arrays:
        return _checked_split(path.name, arrays["x_train"], arrays["x_test"], arrays.get("y_train"),
                              arrays.get("y_test"), likelihood, f"{path}")  # fmt: skip
    if len(arrays) != 1:
        raise FastVAEError(
            f"{path}: expected one array, or x_train and x_test, found {', '.join(sorted(arrays)) or 'none'}"
        )
    return _held_out(path.name, validate_array(next(iter(arrays.values())), likelihood, str(path)), None,
                     str(path))  # fmt: skip


def _checked_split(
    name: str, x_train, x_test, y_train, y_test, likelihood: str, where: str = "data"
) -> Dataset:
    """A given split, each part through ``validate_array``/``validate_labels``."""
    x_train = validate_array(x_train, likelihood, f"{where}[x_train]")
    x_test = validate_array(x_test, likelihood, f"{where}[x_test]")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise FastVAEError(
            f"{where}: x_train and x_test differ in sample shape ({x_train.shape[1:]} vs {x_test.shape[1:]})"
        )
    y_train = validate_labels(y_train, len(x_train), f"{where}[y_train]")
    y_test = validate_labels(y_test, len(x_test), f"{where}[y_test]")
    return Dataset(name, x_train, x_test, y_train, y_test)


def _held_out(name: str, x: np.ndarray, y: np.ndarray | None, where: str) -> Dataset:
    """One validated array split into train and its last ``HOLDOUT_FRACTION`` as test."""
    if len(x) < 2:
        raise FastVAEError(f"{where}: need at least 2 samples to hold out a test split, found {len(x)}")
    y = validate_labels(y, len(x), f"{where} labels")
    n_test = max(1, int(round(len(x) * HOLDOUT_FRACTION)))
    y_train, y_test = (None, None) if y is None else (y[:-n_test], y[-n_test:])
    return Dataset(name, x[:-n_test], x[-n_test:], y_train, y_test)


def is_in_memory(recorded: str) -> bool:
    """Whether a run's recorded data names in-memory data (a description, not a path)."""
    return recorded.startswith("<") and recorded.endswith(">")


def _in_memory(obj: Any, name: str, progress: bool) -> tuple[Any, np.ndarray | None]:
    """(samples, labels or None) of an array, a tensor or a map-style Dataset, for ``validate_array``."""
    if isinstance(obj, np.ndarray):
        return obj, None
    if isinstance(obj, torch.Tensor):
        return _tensor_numpy(obj), None
    if isinstance(obj, (str, os.PathLike)):
        raise FastVAEError(f"{name}: a path inside a (train, test) pair is not supported; pass arrays")
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return materialise(obj, name, progress)
    raise FastVAEError(
        f"{name}: unsupported data of type {type(obj).__name__}; pass a path, a numpy array, a torch tensor, "
        "a (train, test) pair or a map-style torch Dataset"
    )


def _tensor_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _item_array(v: Any) -> np.ndarray:
    return _tensor_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)  # PIL images, lists, numbers


def materialise(ds: Any, name: str = "data", progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a map-style Dataset once into one array (N, ...), with a progress bar. Items are samples, or
    ``(sample, label, ...)`` tuples (labels kept when they are scalars)."""
    from tqdm import tqdm

    n = len(ds)
    if n == 0:
        raise FastVAEError(f"{name}: the Dataset is empty")
    x = y = None
    for i in tqdm(range(n), desc="reading dataset", disable=not progress, leave=False, unit="item"):
        item = ds[i]
        label = None
        if isinstance(item, (tuple, list)):
            item, label = item[0], (item[1] if len(item) > 1 else None)
        a = _item_array(item)
        if x is None:
            x = np.empty((n, *a.shape), dtype=a.dtype)
            y = np.empty(n, np.float64) if label is not None and _item_array(label).ndim == 0 else None
        if a.shape != x.shape[1:]:
            raise FastVAEError(f"{name}: item {i} has shape {a.shape}, item 0 has {x.shape[1:]}")
        x[i] = a
        if y is not None:
            y[i] = float(_item_array(label))
    return x, y


def _image_files(path: Path) -> tuple[list[Path], np.ndarray | None]:
    """The image files of a folder in a fixed order, and labels from their subfolders (ImageFolder's rule:
    classes are the sorted subfolder names)."""

    def images(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(
        d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and images(d, True)
    )
    top = images(path, False)
    if classes and top:
        raise FastVAEError(
            f"{path}: holds images both at its top level and in subfolders; use one or the other"
        )
    if not classes:
        if not top:
            raise FastVAEError(f"{path}: no PNG or JPEG images in this folder (nor in its subfolders)")
        return top, None
    files, labels = [], []
    for label, d in enumerate(classes):
        found = images(d, True)
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int64)


def read_image_folder(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A folder of PNG/JPEG images as one uint8 array (N, H, W) (greyscale) or (N, H, W, 3), and labels
    from subfolder names or None. Images are greyscale when ``grayscale`` or when every image is; they
    must share one size unless ``image_size`` (H, W) resizes them."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from fastvae.limits import check_fits

    path = Path(path)
    files, labels = _image_files(path)
    first = _open_image(files[0], Image, UnidentifiedImageError)
    h, w = image_size if image_size else (first.height, first.width)
    mode = "L" if grayscale or all(_is_grey(f, Image) for f in files) else "RGB"
    shape = (len(files), h, w) if mode == "L" else (len(files), h, w, 3)
    check_fits(
        int(np.prod(shape)), f"{len(files):,} images of {h}x{w}", "pass a smaller image_size / --image-size"
    )
    x = np.empty(shape, np.uint8)
    for i, f in enumerate(tqdm(files, desc="reading images", disable=not progress, leave=False, unit="img")):
        img = _open_image(f, Image, UnidentifiedImageError).convert(mode)
        if image_size:
            img = img.resize((w, h), Image.BILINEAR)
        elif img.size != (w, h):
            raise FastVAEError(
                f"{f}: {img.height}x{img.width} pixels, {files[0].name} has {h}x{w}; pass image_size=(H, W) "
                "(--image-size H,W) to resize them all"
            )
        x[i] = np.asarray(img)
    return x, labels


def _open_image(f: Path, image_module: Any, unidentified: type) -> Any:
    try:
        img = image_module.open(f)
        img.load()
        return img
    except (unidentified, OSError, ValueError) as exc:
        raise FastVAEError(
            f"{f}: not a readable image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def _is_grey(f: Path, image_module: Any) -> bool:
    try:
        with image_module.open(f) as img:  # reads the header only
            return img.mode in ("1", "L", "I", "I;16", "F")
    except Exception:  # an unreadable file is reported when it is read
        return False


def load_array(
    source: Any,
    likelihood: str = "bernoulli",
    *,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """One validated array (N, ...) from a file, a folder of images, an array, a tensor or a Dataset, or the
    MNIST test split for "mnist"."""
    if not isinstance(source, (str, os.PathLike)):
        return validate_array(_in_memory(source, "data", progress)[0], likelihood, "data")
    if source in ("mnist", "dsprites", "dsprites-small"):
        return load_dataset(source).x_test
    path = Path(source)
    if path.is_dir():
        return validate_array(
            read_image_folder(path, image_size, grayscale, progress)[0], likelihood, str(path)
        )
    arrays = _read_arrays(path)
    key = "x_test" if "x_test" in arrays else ("x" if "x" in arrays else None)
    if key is None and len(arrays) != 1:
        raise FastVAEError(f"{path}: expected one array (or x / x_test), found {', '.join(sorted(arrays))}")
    return validate_array(arrays[key] if key else next(iter(arrays.values())), likelihood, str(path))


def load_labels(source: str | os.PathLike, n: int) -> np.ndarray:
    """n integer labels from a .npy, or a .npz's y_test / y (or its one array); one clear line otherwise."""
    arrays = _read_arrays(Path(source))
    key = next((k for k in ("y_test", "y") if k in arrays), None)
    if key is None and len(arrays) != 1:
        raise FastVAEError(
            f"{source}: expected one array of labels (or y / y_test), found {', '.join(sorted(arrays))}"
        )
    return validate_labels(arrays[key] if key else next(iter(arrays.values())), n, str(source))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FastVAEError(f"{path}: no such data file")
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


def label_classes(dataset: Dataset) -> int:
    """C for a conditional VAE on ``dataset``: one more than its largest label (train or test). One clear
    line when it has no labels or a negative one."""
    if dataset.y_train is None or dataset.y_test is None:
        raise FastVAEError(
            f"{dataset.name} has no labels: a conditional VAE (--conditional) needs y_train and y_test in a "
            ".npz, a labelled Dataset, or a folder of images in one subfolder per class"
        )
    lo = min(int(dataset.y_train.min(initial=0)), int(dataset.y_test.min(initial=0)))
    if lo < 0:
        raise FastVAEError(f"{dataset.name}: labels must be >= 0 for a conditional VAE, got {lo}")
    return max(int(dataset.y_train.max(initial=0)), int(dataset.y_test.max(initial=0))) + 1


class DeviceData:
    """A whole split resident on one device; ``batch(idx)`` gathers rows as float (B, D) in [0, 1]; ``y``:
    its labels (N,) int64, resident too, when a conditional VAE uses them (else None)."""

    def __init__(self, x: np.ndarray, device: torch.device | str, y: np.ndarray | None = None) -> None:
        self.scaled = x.dtype == np.uint8
        self.x = torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1))).to(device)  # (N, D)
        self.y = None if y is None else torch.from_numpy(np.asarray(y, np.int64)).to(device)  # (N,)

    def labels(self, idx: Tensor) -> Tensor | None:
        """The labels of rows ``idx``, or None for unlabelled (unconditional) data."""
        return None if self.y is None else self.y.index_select(0, idx)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: Tensor) -> Tensor:
        rows = self.x.index_select(0, idx)
        return rows.float().div_(255.0) if self.scaled else rows.float()
