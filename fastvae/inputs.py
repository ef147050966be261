"""Reading user data, torch-free: ``.npy``/``.npz`` arrays and folders of PNG/JPEG images.

Training (``fastvae.data``) and the torch-free runtimes (``fastvae.export.runtime``) both read through
these functions, so a file or folder that trains is a file or folder that encodes and scores, alike.
Every failure is one :class:`FastVAEError` line.

16-bit images (a 16-bit greyscale PNG opens as mode ``I;16``, or ``I`` in older Pillows) are reduced to
8 bits by keeping the high byte (``v >> 8``), the rule Pillow itself applies to 16-bit colour PNGs, so
grey and colour 16-bit files agree, and 8-bit data saved as 16 bits (``v * 257``) comes back exactly.
Everything a folder gives is then uint8 0..255 ([0, 1] after the usual division by 255): 8 bits per
channel is what every other image file gives, and keeps resident data 4x smaller than float32. Pillow's
own ``convert("L")`` clips such pixels at 255 instead (almost every pixel white).
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fastvae.errors import FastVAEError

# Image files a folder of images may hold (read through Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow modes read as greyscale (one channel).
GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageFolder(NamedTuple):
    """A folder of images read whole: ``x`` uint8 (N, H, W) or (N, H, W, 3); ``labels`` (N,) int64 and
    ``classes`` (the subfolder names, label i is ``classes[i]``) when the images sit in class subfolders."""

    x: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...] | None


def read_arrays(
    path: str | os.PathLike, choose: Callable[[list[str]], Sequence[str]] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of a ``.npy`` (as ``{"x": array}``) or ``.npz`` file; ``choose(names)`` picks which of
    an ``.npz``'s arrays to read (default: all). Truncated, pickled or foreign files: one clear line."""
    path = Path(path)
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
            names = list(f.files)
            arrays = {k: f[k] for k in (choose(names) if choose else names)}
    except MemoryError:
        raise FastVAEError(f"{path}: the arrays do not fit in memory") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__  # truncated, pickled
        raise FastVAEError(f"{path}: not a readable NumPy file ({first})") from None
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):  # numpy hands back a member that is no .npy as its raw bytes
            raise FastVAEError(f"{path}: not a readable NumPy file ({k!r} is not an array)")
    return arrays


def image_files(path: str | os.PathLike) -> tuple[list[Path], np.ndarray | None, tuple[str, ...] | None]:
    """(files in a fixed order, labels, class names) of a folder of images. ImageFolder's rule: with
    subfolders, the classes are the sorted subfolder names and an image's label is its subfolder's index;
    else the images at the top level, unlabelled."""
    path = Path(path)
    if not path.is_dir():
        raise FastVAEError(f"{path}: no such folder")

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
        return top, None, None
    files, labels = [], []
    for label, d in enumerate(classes):
        found = images(d, True)
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int64), tuple(d.name for d in classes)


def open_image(f: Path) -> Any:
    """A Pillow image, fully decoded. Unreadable files, and files over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, where Pillow only warns as well as where it refuses): one line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            img.load()
            return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FastVAEError(
            f"{f}: too large to decode safely ({_first_line(exc)}); shrink the image, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS for files you trust"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zlib.error) as exc:
        raise FastVAEError(f"{f}: not a readable image ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def to_mode(img: Any, mode: str, f: Path) -> Any:
    """``img`` as Pillow mode "L" or "RGB", 16-bit pixels reduced to 8 bits by their high byte."""
    from PIL import Image

    if img.mode.startswith("I"):  # 16-bit greyscale: "I;16" (Pillow >= 10.x) or "I" (32-bit int)
        v = np.asarray(img)
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi > 65535:
            raise FastVAEError(f"{f}: integer pixels must lie in 0..65535, found {lo}..{hi}")
        img = Image.fromarray((v.astype(np.uint32) >> 8).astype(np.uint8), "L")
    return img.convert(mode)


def is_grey(f: Path) -> bool:
    """Whether an image file is greyscale, from its header only."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb is refused, in one line, when the file is read
            with Image.open(f) as img:
                return img.mode in GREY_MODES
    except Exception:  # an unreadable file is reported, in one line, when it is read
        return False


def read_image_folder(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    grayscale: bool | None = None,
    progress: bool = False,
) -> ImageFolder:
    """A folder of PNG/JPEG images (see ``image_files``) as one uint8 array: greyscale (N, H, W) when
    ``grayscale``, colour (N, H, W, 3) when ``grayscale`` is False, and by default greyscale when every
    image is. They must share one size unless ``image_size`` (H, W) resizes them."""
    from PIL import Image

    from fastvae.limits import check_fits

    files, labels, classes = image_files(path)
    first = open_image(files[0])
    h, w = image_size if image_size else (first.height, first.width)
    grey = grayscale if grayscale is not None else all(is_grey(f) for f in files)
    mode = "L" if grey else "RGB"
    shape = (len(files), h, w) if grey else (len(files), h, w, 3)
    check_fits(
        int(np.prod(shape)), f"{len(files):,} images of {h}x{w}", "pass a smaller image_size / --image-size"
    )
    x = np.empty(shape, np.uint8)
    for i, f in enumerate(_progress(files, progress)):
        img = to_mode(open_image(f), mode, f)
        if image_size:
            img = img.resize((w, h), Image.BILINEAR)
        elif img.size != (w, h):
            raise FastVAEError(
                f"{f}: {img.height}x{img.width} pixels, {files[0].name} has {h}x{w}; pass image_size=(H, W) "
                "(--image-size H,W) to resize them all"
            )
        x[i] = np.asarray(img)
    return ImageFolder(x, labels, classes)


def _progress(files: list[Path], show: bool) -> Iterable[Path]:
    """A progress bar over the files when asked and tqdm is installed (the runtime does not need it)."""
    if not show:
        return files
    try:
        from tqdm import tqdm
    except ImportError:
        return files
    return tqdm(files, desc="reading images", leave=False, unit="img")
