"""Data: the bundled MNIST, user files, folders of images and in-memory data, validated, kept whole on the training device.

Batches are gathered on the device by a shuffled index (no DataLoader workers in the hot loop);
uint8 data stays uint8 there (4x less memory) and is scaled to [0, 1] per batch.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastvae.config import describe_data
from fastvae.errors import FastVAEError
from fastvae.inputs import read_arrays, read_image_folder

# Fraction of a single-array user file held out as its test split.
HOLDOUT_FRACTION = 0.1


@dataclass
class Dataset:
    """Train and test arrays of shape (N, *data_shape), uint8 0..255 or float32 in the data's range;
    ``classes``: the class names of the labels (label i is ``classes[i]``) when known (a folder of images
    in class subfolders)."""

    name: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    classes: tuple[str, ...] | None = None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def mnist_path() -> Path:
    """Path of the bundled MNIST archive (CC BY-SA 3.0, Y. LeCun and C. Cortes; see datasets/README.md)."""
    return Path(str(resources.files("fastvae.datasets").joinpath("mnist.npz")))


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
    tensor (N, ...); a ``(train, test)`` pair of those; a dict or an opened ``np.load(...npz)`` holding
    x_train and x_test (and optionally y_train, y_test), or one array; or a map-style torch ``Dataset``
    (materialised once). A ``.npz`` with ``x_train`` and ``x_test`` is its own split; any other single
    source holds out its last 10% as the test split (a folder is shuffled first, with a fixed seed).
    """
    if isinstance(source, Dataset):
        return _checked_split(source.name, source.x_train, source.x_test, source.y_train, source.y_test,
                              likelihood, classes=source.classes)  # fmt: skip
    if isinstance(source, (str, os.PathLike)):
        return _load_path(str(source), likelihood, image_size, grayscale, progress)
    if isinstance(source, (Mapping, np.lib.npyio.NpzFile)):
        return _from_arrays(describe_data(source), _mapping_arrays(source), likelihood, "data")
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
        from fastvae.dsprites import load_factor_data  # built here: dsprites must not import data (a loop)

        d = load_factor_data(source)  # labels: the shape class
        return Dataset(source, d.x_train, d.x_test, d.y_train, d.y_test)
    if source == "mnist":
        with np.load(mnist_path(), allow_pickle=False) as f:
            return Dataset("mnist", f["x_train"], f["x_test"], f["y_train"], f["y_test"])
    path = Path(source)
    if path.is_dir() and path.suffix in (".npy", ".npz"):
        raise FastVAEError(f"{path}: is a directory, expected a .npy or .npz file")
    if path.is_dir():
        x, y, classes = read_image_folder(path, image_size, True if grayscale else None, progress)
        order = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(x))
        x, y = x[order], (None if y is None else y[order])
        return _held_out(path.name, validate_array(x, likelihood, str(path)), y, str(path), classes)
    return _from_arrays(path.name, read_arrays(path), likelihood, str(path))


def _mapping_arrays(source: Any) -> dict[str, Any]:
    """The arrays of a dict or of an opened .npz (``np.load``), read once; one line when one is
    unreadable (a truncated archive) or a key is not a string."""
    keys = list(source.keys())
    if not all(isinstance(k, str) for k in keys):
        raise FastVAEError(f"data: a dict of arrays needs string keys (x_train, x_test, ...), got {keys!r:.80}")
    try:
        return {k: source[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FastVAEError(f"data: an array of the .npz is unreadable ({first})") from None


def _from_arrays(name: str, arrays: dict[str, Any], likelihood: str, where: str) -> Dataset:
    """A split from named arrays (a .npz file, a dict): x_train and x_test (and y_train, y_test) are
    the split; one array alone is held out as usual."""
    if "x_train" in arrays and "x_test" in arrays:
        pairs = {k: _in_memory(arrays[k], f"{where}[{k}]", False)[0] for k in ("x_train", "x_test")}
        labels = {k: _label_array(arrays.get(k), f"{where}[{k}]") for k in ("y_train", "y_test")}
        return _checked_split(name, pairs["x_train"], pairs["x_test"], labels["y_train"], labels["y_test"],
                              likelihood, where)  # fmt: skip
    if len(arrays) != 1:
        raise FastVAEError(
            f"{where}: expected one array, or x_train and x_test, found {', '.join(sorted(arrays)) or 'none'}"
        )
    x = _in_memory(next(iter(arrays.values())), where, False)[0]
    return _held_out(name, validate_array(x, likelihood, where), None, where)


def _label_array(y: Any, name: str) -> np.ndarray | None:
    """Labels given as an array or a tensor (or None), as numpy for ``validate_labels``."""
    if y is None or isinstance(y, np.ndarray):
        return y
    if isinstance(y, torch.Tensor):
        return _tensor_numpy(y)
    if isinstance(y, (list, tuple)):
        return np.asarray(y) if all(isinstance(v, (int, np.integer)) for v in y) else np.asarray(y, object)
    raise FastVAEError(f"{name}: labels must be an array or a tensor, got {type(y).__name__}")


def _checked_split(
    name: str, x_train, x_test, y_train, y_test, likelihood: str, where: str = "data",
    classes: tuple[str, ...] | None = None,
) -> Dataset:  # fmt: skip
    """A given split, each part through ``validate_array``/``validate_labels``."""
    x_train = validate_array(x_train, likelihood, f"{where}[x_train]")
    x_test = validate_array(x_test, likelihood, f"{where}[x_test]")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise FastVAEError(
            f"{where}: x_train and x_test differ in sample shape ({x_train.shape[1:]} vs {x_test.shape[1:]})"
        )
    y_train = validate_labels(y_train, len(x_train), f"{where}[y_train]")
    y_test = validate_labels(y_test, len(x_test), f"{where}[y_test]")
    return Dataset(name, x_train, x_test, y_train, y_test, classes)


def _held_out(
    name: str, x: np.ndarray, y: np.ndarray | None, where: str, classes: tuple[str, ...] | None = None
) -> Dataset:
    """One validated array split into train and its last ``HOLDOUT_FRACTION`` as test."""
    if len(x) < 2:
        raise FastVAEError(f"{where}: need at least 2 samples to hold out a test split, found {len(x)}")
    y = validate_labels(y, len(x), f"{where} labels")
    n_test = max(1, int(round(len(x) * HOLDOUT_FRACTION)))
    y_train, y_test = (None, None) if y is None else (y[:-n_test], y[-n_test:])
    return Dataset(name, x[:-n_test], x[-n_test:], y_train, y_test, classes)


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
    if isinstance(obj, (bytes, bytearray)):  # an opened .npz member that is no .npy
        raise FastVAEError(f"{name}: not an array (raw bytes)")
    if isinstance(obj, (Mapping, np.lib.npyio.NpzFile)):
        raise FastVAEError(
            f"{name}: a dict of arrays is taken only as the whole data (x_train, x_test, y_train, y_test)"
        )
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return materialise(obj, name, progress)
    raise FastVAEError(
        f"{name}: unsupported data of type {type(obj).__name__}; pass a path, a numpy array, a torch tensor, "
        "a dict with x_train and x_test, a (train, test) pair or a map-style torch Dataset"
    )


def _tensor_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _item_array(v: Any) -> np.ndarray:
    return _tensor_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)  # PIL images, lists, numbers


# Kinds of item arrays that may share one data array: mixing them would reinterpret values (uint8 pixels
# 0..255 next to floats in [0, 1]: the floats would be cast to 0 or the pixels read as 255x too bright).
_KINDS = {"b": "bool", "u": "integer", "i": "integer", "f": "float"}


def materialise(ds: Any, name: str = "data", progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a map-style Dataset once into one array (N, ...), with a progress bar. Items are samples, or
    ``(sample, label, ...)`` tuples with integer scalar labels. Items must agree in shape and in kind of
    dtype (all integer pixels or all floats: a mix is refused, never guessed); labels must be integers,
    on every item or on none."""
    from tqdm import tqdm

    n = len(ds)
    if n == 0:
        raise FastVAEError(f"{name}: the Dataset is empty")
    x = y = None
    for i in tqdm(range(n), desc="reading dataset", disable=not progress, leave=False, unit="item"):
        item, label = _split_item(ds[i], name, i)
        a = _item_array(item)
        kind = _KINDS.get(a.dtype.kind)
        if kind is None:
            raise FastVAEError(f"{name}: item {i} holds {a.dtype} values; samples must be numbers (int or float)")
        if x is None:
            x = np.empty((n, *a.shape), dtype=a.dtype)
            y = None if label is None else np.empty(n, np.int64)
        if a.shape != x.shape[1:]:
            raise FastVAEError(f"{name}: item {i} has shape {a.shape}, item 0 has {x.shape[1:]}")
        if kind != _KINDS[x.dtype.kind]:
            raise FastVAEError(
                f"{name}: item {i} is {a.dtype}, item 0 is {x.dtype}: every item must be one kind (uint8 "
                "pixels 0..255 or floats in the data's range), or values would be misread; convert them alike"
            )
        if not np.can_cast(a.dtype, x.dtype):
            x = x.astype(np.result_type(x.dtype, a.dtype))  # float32 then float64, int8 then int16: widen
        x[i] = a
        if (label is None) != (y is None):
            raise FastVAEError(
                f"{name}: item {i} {'has no label' if label is None else 'has a label'}, item 0 "
                f"{'has one' if label is None else 'has none'}: label every item or none"
            )
        if y is not None:
            y[i] = _int_label(label, name, i)
    return x, y


def _split_item(item: Any, name: str, i: int) -> tuple[Any, Any]:
    """(sample, label or None) of one Dataset item; dicts refused in words about dicts."""
    if isinstance(item, Mapping):
        keys = ", ".join(repr(k) for k in list(item)[:6])
        raise FastVAEError(
            f"{name}: item {i} is a dict ({keys}); fastvae reads items that are a sample or a (sample, label) "
            "tuple: wrap the Dataset so __getitem__ returns them"
        )
    if isinstance(item, (tuple, list)):
        if not item:
            raise FastVAEError(f"{name}: item {i} is an empty {type(item).__name__}")
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _int_label(label: Any, name: str, i: int) -> int:
    """One Dataset item's label as an int: an integer scalar (or an integral float); strings, vectors
    (one-hot) and other objects refused in one line."""
    a = _item_array(label) if not isinstance(label, str) else np.asarray(label, object)
    if a.ndim != 0:
        raise FastVAEError(
            f"{name}: item {i}'s label has shape {a.shape}; labels must be integer scalars (for a one-hot "
            "vector, give its argmax)"
        )
    v = a.item()
    if isinstance(v, (bool, np.bool_)) or isinstance(v, (int, np.integer)):
        if not -(2**63) <= int(v) < 2**63:
            raise FastVAEError(f"{name}: item {i}'s label {int(v)} does not fit in 64 bits")
        return int(v)
    if isinstance(v, float) and np.isfinite(v) and v == round(v) and abs(v) < 2**63:
        return int(v)
    raise FastVAEError(
        f"{name}: item {i}'s label is {v!r:.40} ({type(v).__name__}); labels must be integers 0..C-1 "
        "(map class names to integers)"
    )


def load_array(
    source: Any,
    likelihood: str = "bernoulli",
    *,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """One validated array (N, ...) from a file, a folder of images, an array, a tensor or a Dataset, or the
    MNIST test split for "mnist"; a .npz, a dict or an opened .npz gives its x_test, x or only array."""
    if isinstance(source, (Mapping, np.lib.npyio.NpzFile)):
        arrays, where = _mapping_arrays(source), "data"
    elif not isinstance(source, (str, os.PathLike)):
        return validate_array(_in_memory(source, "data", progress)[0], likelihood, "data")
    elif source in ("mnist", "dsprites", "dsprites-small"):
        return load_dataset(source).x_test
    elif Path(source).is_dir():
        folder = read_image_folder(source, image_size, True if grayscale else None, progress)
        return validate_array(folder.x, likelihood, str(source))
    else:
        arrays, where = read_arrays(source), str(source)
    key = "x_test" if "x_test" in arrays else ("x" if "x" in arrays else None)
    if key is None and len(arrays) != 1:
        raise FastVAEError(f"{where}: expected one array (or x / x_test), found {', '.join(sorted(arrays))}")
    x = _in_memory(arrays[key] if key else next(iter(arrays.values())), where, False)[0]
    return validate_array(x, likelihood, where)


def load_labels(source: str | os.PathLike, n: int) -> np.ndarray:
    """n integer labels from a .npy, or a .npz's y_test / y (or its one array); one clear line otherwise."""
    arrays = read_arrays(Path(source))
    key = next((k for k in ("y_test", "y") if k in arrays), None)
    if key is None and len(arrays) != 1:
        raise FastVAEError(
            f"{source}: expected one array of labels (or y / y_test), found {', '.join(sorted(arrays))}"
        )
    return validate_labels(arrays[key] if key else next(iter(arrays.values())), n, str(source))


def resolve_label(label: str | int | None, classes: Sequence[str] | None) -> int | None:
    """A label given by the user (``--label``) as the integer the model takes: a class name recorded by
    the run (a folder's subfolder names; a name wins over the same digits read as an index, so a folder
    of classes "1".."10" takes ``--label 7`` as the class "7"), else an integer >= 0. None stays None."""
    if label is None or isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return None if label is None else int(label)
    if classes is not None and not (
        isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)
    ):
        raise FastVAEError(f"the run's recorded classes are not a list of names: {classes!r:.60}")
    text = str(label).strip()
    if classes and text in classes:
        return list(classes).index(text)
    try:
        value = int(text)
    except ValueError:
        known = f"a class of this run ({', '.join(classes)[:200]}) nor " if classes else ""
        raise FastVAEError(f"--label {text!r:.40} is neither {known}an integer label") from None
    if value < 0:
        raise FastVAEError(f"--label must be >= 0, got {value}")
    return value


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
    integral = np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all()
    if integral and (not y.size or np.abs(y).max() < 2**63):  # beyond int64, astype would wrap
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
