"""Shared pieces of the torch-free runtimes (``Encoder``, ``Scorer``): numpy, onnxruntime and Pillow only.

Opening a fastvae ONNX part with the sampler's CPU session options, and reading inputs: a ``.npy`` array,
an ``.npz`` archive (its ``x``, ``x_test`` or only array) or a folder of PNG/JPEG images (through
``fastvae.inputs``, the reader training uses), as (N, D) float32 in [0, 1] (uint8 pixels are divided by
255, as fastvae's ``unit_float`` does).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from fastvae.atomic import atomic_write_bytes, check_writable
from fastvae.errors import FastVAEError, require
from fastvae.inputs import image_files, read_arrays, read_image_folder
from fastvae.limits import MAX_SCORER_IW

REQUIRED_METADATA = ("fastvae_version", "latent_dim", "data_shape")
NPZ_KEYS = ("x", "x_test")
LABEL_KEYS = ("y_test", "y")
Arg = tuple[str, int, dict[int, int]]  # a graph input or output: (name, rank, {axis: static size})
GraphIO = tuple[list[Arg], list[Arg]]


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once), from /proc/cpuinfo on Linux."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    try:
        cores, phys, core = set(), None, None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip() and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return max(1, min(allowed, len(cores)))
    except OSError:
        pass
    return max(1, allowed)


class OnnxPart:
    """A fastvae ONNX part (``part`` metadata) in an onnxruntime CPU session.

    Everything read from the file is checked before the first call: the metadata (sizes, ``classes`` and
    a scorer's ``iw_k`` / ``eval_seed``) and the graph's inputs and outputs (names, types, static widths)
    against it, so a forged or foreign file gets one FastVAEError line, not an onnxruntime traceback.

    Inputs (x, z) are arrays of real numbers: bool (read as 0/1), integer or float; uint8 is pixels
    (divided by 255). Complex, string, bytes, object and datetime arrays are refused, never cast (a cast
    would drop an imaginary part or parse text). Labels are integers, or floats with integer values.
    Seeds are integers in 0..MAX_SEED (2**63 - 1, fastvae's seed range), where fastvae's 64-bit seed mixing
    folds no two seeds together (beyond it 2**64 + s would draw the noise of s); a float, a bool, a string
    or a seed beyond the range is refused."""

    part = ""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ort = require("onnxruntime", "the ONNX runtime (Sampler, Encoder, Scorer)")

        if not isinstance(path, (str, os.PathLike)):
            raise FastVAEError(f"the model must be a path to an .onnx file, got {type(path).__name__}")
        path = Path(path)
        if not path.is_file():
            raise FastVAEError(f"{path}: no such model file")
        if threads is not None and (
            isinstance(threads, bool)
            or not isinstance(threads, (int, np.integer))
            or not 1 <= threads <= MAX_THREADS
        ):
            raise FastVAEError(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r:.40}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or physical_cores())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise FastVAEError(
                f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:160]})"
            ) from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise FastVAEError(f"{path}: not a fastvae {self.part} (metadata lacks {', '.join(missing)})")
        part = meta.get("part", "decoder")
        if part != self.part:
            raise FastVAEError(
                f"{path}: a fastvae {part}, not a {self.part} (export it with --part {self.part})"
            )
        self.path = path
        self.metadata = meta
        self.threads = opts.intra_op_num_threads
        self.latent_dim, self.data_shape = _sizes(path, meta)
        self.classes = meta_int(path, meta, "classes", 0, MAX_WIDTH)  # absent before conditional models
        self.in_dim = int(np.prod(self.data_shape))
        self._read_metadata()
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._check_graph()

    def _read_metadata(self) -> None:
        """A part's own metadata, parsed and checked before the graph is (a Scorer reads ``iw_k``)."""

    def graph_io(self) -> GraphIO:
        """(inputs, outputs) the part's graph must have, in order: (name, rank, {axis: static size}); a
        conditional part takes the labels y (B,) int64 last."""
        raise NotImplementedError

    def _check_graph(self) -> None:
        """The graph's own inputs and outputs agree with the part and its metadata: a forged ``latent_dim``,
        ``data_shape`` or ``iw_k``, or a foreign input, would otherwise fail deep inside onnxruntime (or
        draw the wrong images)."""
        want_in, want_out = self.graph_io()
        if self.classes:
            want_in = [*want_in, ("y", 1, {})]
        for kind, args, want in (
            ("inputs", self.session.get_inputs(), want_in),
            ("outputs", self.session.get_outputs(), want_out),
        ):
            names, wanted = [a.name for a in args], [w[0] for w in want]
            if names != wanted:
                why = f" (metadata classes={self.classes})" if kind == "inputs" else ""
                raise FastVAEError(
                    f"{self.path}: graph {kind} {', '.join(names)[:120]}; a fastvae {self.part} has "
                    f"{', '.join(wanted)}{why}"
                )
            for arg, (name, rank, sizes) in zip(args, want):
                dtype = "tensor(int64)" if name == "y" else "tensor(float)"
                if arg.type != dtype:
                    raise FastVAEError(f"{self.path}: graph {name!r} is {arg.type}, expected {dtype}")
                shape = arg.shape if isinstance(arg.shape, list) else None
                if shape is not None and len(shape) != rank:
                    raise FastVAEError(
                        f"{self.path}: graph {name!r} has {len(shape)} dimensions, expected {rank}"
                    )
                for axis, size in sizes.items():
                    got = shape[axis] if shape is not None else None
                    if isinstance(got, int) and got != size:
                        raise FastVAEError(
                            f"{self.path}: graph {name!r} has size {got} in dimension {axis}, the metadata says {size}"
                        )

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run`` whose failure (a graph that checks out but cannot run these feeds) or an output
        of the wrong batch size is one FastVAEError line."""
        try:
            out = self.session.run(names, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise FastVAEError(
                f"{self.path}: the model failed to run ({str(exc).splitlines()[0][:160]})"
            ) from None
        n = len(next(iter(feeds.values())))
        for name, v in zip(names, out):
            if not isinstance(v, np.ndarray) or v.shape[:1] != (n,):
                raise FastVAEError(
                    f"{self.path}: graph output {name!r} has shape {getattr(v, 'shape', None)} for {n} rows"
                )
        return out

    def check_x(self, x: np.ndarray) -> np.ndarray:
        """x (N, D) or (N, *data_shape) as contiguous float32 (N, D), validated."""
        x = real_array(x, "x")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(255.0)
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != self.in_dim:
            raise FastVAEError(
                f"x must have shape (N, {self.in_dim}) or (N, *{self.data_shape}), got {x.shape}"
            )
        x = np.ascontiguousarray(x.reshape(len(x), self.in_dim), dtype=np.float32)
        if not np.isfinite(x).all():
            raise FastVAEError("x holds NaN or infinite values")
        if (
            self.metadata.get("likelihood", "bernoulli") == "bernoulli"
            and x.size
            and (x.min() < 0 or x.max() > 1)
        ):
            raise FastVAEError(
                f"x must lie in [0, 1] for a Bernoulli model, got [{x.min():.3g}, {x.max():.3g}]"
            )
        return x

    def check_y(self, y: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
        """The labels feed of a conditional VAE's part for n rows: y (n,) integers in 0..C-1, checked (the
        graph itself cannot refuse a label out of range); {} for an unconditional one, which takes none.
        Labels are an integer array, or floats with integer values; anything else (bool, strings, objects,
        complex) is refused."""
        if not self.classes:
            if y is not None:
                raise FastVAEError("labels apply to a conditional VAE; this model takes none")
            return {}
        if y is None:
            raise FastVAEError(f"a conditional VAE needs labels y in 0..{self.classes - 1}, one per row")
        y = real_array(y, "labels")
        if (
            y.shape != (n,)
            or y.dtype.kind not in "iuf"
            or (y.dtype.kind == "f" and not (y == np.round(y)).all())
        ):
            raise FastVAEError(f"labels must be {n} integers, got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= self.classes):
            raise FastVAEError(f"labels must be in 0..{self.classes - 1}, got {y.min()}..{y.max()}")
        return {"y": np.ascontiguousarray(y, dtype=np.int64)}


MAX_THREADS = 1024
MAX_WIDTH = 1 << 26  # features or latents per sample: 64 M, beyond any model worth exporting
MAX_SEED = 2**63 - 1  # fastvae's seeds (fastvae.config.MAX_SEED): the keyed noise mixes 63 bits of them
MAX_IW = MAX_SCORER_IW  # a scorer's importance samples (iw_k metadata)
REAL_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def real_array(a, name: str) -> np.ndarray:
    """``a`` as a numpy array of real numbers (bool, integer or float dtype), else one FastVAEError line:
    casting would drop a complex array's imaginary part, parse strings and unpack objects."""
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise FastVAEError(f"{name} is not an array of numbers ({str(exc).splitlines()[0][:100]})") from None
    if arr.dtype.kind not in REAL_KINDS:
        raise FastVAEError(f"{name} must hold real numbers (bool, integer or float), got dtype {arr.dtype}")
    return arr


def check_seed(seed, name: str = "seed") -> int:
    """A seed: an integer in 0..MAX_SEED (not a bool, a float or a string). Within that range distinct
    seeds key distinct noise; beyond it fastvae's 64-bit mixing would wrap (2**64 keys like 0)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise FastVAEError(f"{name} must be an integer in 0..{MAX_SEED}, got {seed!r:.40}")
    return int(seed)


def meta_int(path: Path, meta: dict[str, str], key: str, default: int, hi: int) -> int:
    """The integer metadata ``key`` (``default`` when absent), in 0..hi, else one FastVAEError line."""
    raw = meta.get(key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise FastVAEError(f"{path}: malformed {key} metadata {raw!r:.40} (expected an integer)") from None
    if not 0 <= value <= hi:
        raise FastVAEError(f"{path}: implausible metadata {key}={value!r:.40} (expected 0..{hi})")
    return value


def _sizes(path: Path, meta: dict[str, str]) -> tuple[int, tuple[int, ...]]:
    """(latent_dim, data_shape) from the metadata, each checked: positive, sane and well-formed."""
    try:
        latent = int(meta["latent_dim"])
        shape = tuple(json.loads(meta["data_shape"]))
    except (ValueError, TypeError, json.JSONDecodeError):
        raise FastVAEError(f"{path}: malformed latent_dim or data_shape metadata") from None
    ok_shape = shape and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    if not 0 < latent <= MAX_WIDTH or not ok_shape or int(np.prod(shape, dtype=np.float64)) > MAX_WIDTH:
        raise FastVAEError(f"{path}: implausible metadata latent_dim={latent!r:.20} data_shape={shape!r:.40}")
    return latent, shape


def read_labels(path: str | os.PathLike, n: int) -> np.ndarray:
    """n labels from a .npy, or the y_test / y array of a .npz (the labels of ``read_inputs``'s rows)."""
    path = Path(path)
    if path.is_dir():
        raise FastVAEError(f"{path}: is a folder; labels come from a .npy, or the y_test / y of a .npz")
    found: list[str] = []

    def labels_key(names: list[str]) -> list[str]:
        key = next((k for k in LABEL_KEYS if k in names), None)  # never an .npz's x read as labels
        found[:] = names
        return [] if key is None else [key]

    arrays = read_arrays(path, labels_key)
    if not arrays:
        raise FastVAEError(f"{path}: no labels array y_test or y (found {', '.join(found) or 'none'})")
    y = next(iter(arrays.values()))
    if y.ndim != 1 or len(y) != n:
        raise FastVAEError(f"{path}: expected {n} labels in a 1-D array, got shape {y.shape}")
    return y


def input_labels(part: OnnxPart, a, n: int) -> np.ndarray | None:
    """The labels a command line gives a conditional VAE's part: ``--labels``, else the input .npz's own
    y_test / y, or an input folder's class subfolders (their indices, as training numbers them); None for
    an unconditional part (``check_y`` refuses labels given to it)."""
    if a.labels:
        return read_labels(a.labels, n)
    if part.classes and str(a.input).endswith(".npz"):
        return read_labels(a.input, n)
    if part.classes and Path(a.input).is_dir():
        return image_files(a.input)[1]  # None for a folder without subfolders: check_y asks for labels
    return None


def read_inputs(path: str | os.PathLike, data_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(N, ...) array from a .npy file, a .npz archive or a folder of PNG/JPEG images, read as training
    reads it (``fastvae.inputs``: top-level images or class subfolders, 16-bit pixels by their high byte).
    A folder is read in colour for a model of (H, W, 3) images, in greyscale for one of (H, W) images,
    and otherwise greyscale when every image is."""
    path = Path(path)
    if path.is_dir():
        grey = None
        if data_shape is not None and len(data_shape) in (2, 3):
            grey = len(data_shape) == 2 or data_shape[-1] != 3
        return read_image_folder(path, grayscale=grey).x
    if not path.exists():
        raise FastVAEError(f"{path}: no such file or folder")

    def inputs_key(names: list[str]) -> list[str]:
        key = next((k for k in NPZ_KEYS if k in names), names[0] if len(names) == 1 else None)
        if key is None:
            raise FastVAEError(f"{path}: no array named {' or '.join(NPZ_KEYS)} (found {', '.join(names)})")
        return [key]

    return next(iter(read_arrays(path, inputs_key).values()))


def check_out(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise FastVAEError(f"{path}: the output must end in {' or '.join(suffixes)}")
    check_writable(path)
    return path


def write_table(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> None:
    """Columns of equal length to .npy ((N, C) float32, columns in order) or .csv (index first), atomically."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        buf = io.BytesIO()
        np.save(buf, np.stack([np.asarray(c, np.float32) for c in columns.values()], 1))
        data = buf.getvalue()
    else:
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["index", *columns])
        for i, row in enumerate(zip(*columns.values())):
            w.writerow([i, *(f"{float(v):.6g}" for v in row)])
        data = text.getvalue().encode()
    atomic_write_bytes(path, data)
