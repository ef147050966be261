"""Shared pieces of the torch-free runtimes (``Encoder``, ``Scorer``): numpy, onnxruntime and Pillow only.

Opening a fastvae ONNX part with the sampler's CPU session options, and reading inputs: a ``.npy`` array,
an ``.npz`` archive (its ``x``, ``x_test`` or only array) or a folder of PNG images, as (N, D) float32 in
[0, 1] (uint8 pixels are divided by 255, as fastvae's ``unit_float`` does).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from fastvae.atomic import atomic_write_bytes
from fastvae.errors import FastVAEError
from fastvae.export.sample import physical_cores

REQUIRED_METADATA = ("fastvae_version", "latent_dim", "data_shape")
NPZ_KEYS = ("x", "x_test")


class OnnxPart:
    """A fastvae ONNX part (``part`` metadata) in an onnxruntime CPU session."""

    part = ""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FastVAEError(f"{path}: no such model file")
        if threads is not None and threads < 1:
            raise FastVAEError(f"threads must be >= 1, got {threads}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
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
            raise FastVAEError(f"{path}: not a fastvae model (metadata lacks {', '.join(missing)})")
        part = meta.get("part", "decoder")
        if part != self.part:
            raise FastVAEError(
                f"{path}: a fastvae {part}, not a {self.part} (export it with --part {self.part})"
            )
        self.path = path
        self.metadata = meta
        self.threads = opts.intra_op_num_threads
        self.latent_dim = int(meta["latent_dim"])
        self.data_shape = tuple(json.loads(meta["data_shape"]))
        self.in_dim = int(np.prod(self.data_shape))
        self.outputs = [o.name for o in self.session.get_outputs()]

    def check_x(self, x: np.ndarray) -> np.ndarray:
        """x (N, D) or (N, *data_shape) as contiguous float32 (N, D), validated."""
        x = np.asarray(x)
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


def read_inputs(path: str | os.PathLike) -> np.ndarray:
    """(N, ...) array from a .npy file, a .npz archive or a folder of PNG images (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise FastVAEError(f"{path}: no .png files in this folder")
        try:
            imgs = [np.asarray(Image.open(p).convert("L")) for p in files]
        except Exception as exc:
            raise FastVAEError(f"{path}: cannot read the PNG images ({str(exc).splitlines()[0]})") from None
        if len({a.shape for a in imgs}) != 1:
            raise FastVAEError(f"{path}: the PNG images differ in size")
        return np.stack(imgs)
    if not path.is_file():
        raise FastVAEError(f"{path}: no such file or folder")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.keys())
                key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise FastVAEError(
                        f"{path}: no array named {' or '.join(NPZ_KEYS)} (found {', '.join(keys)})"
                    )
                return f[key]
        return np.load(path, allow_pickle=False)
    except FastVAEError:
        raise
    except Exception as exc:
        raise FastVAEError(
            f"{path}: not a readable .npy/.npz array ({str(exc).splitlines()[0][:120]})"
        ) from None


def check_out(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise FastVAEError(f"{path}: the output must end in {' or '.join(suffixes)}")
    if not path.resolve().parent.is_dir():
        raise FastVAEError(f"{path}: the folder {path.parent} does not exist")
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
