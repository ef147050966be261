"""Latent attribute editing: the direction between two groups' mean codes, added to one image's code.

direction = mean mu(x) over images with the attribute - mean mu(x) over images without it; an edit decodes
mu(x) + s * direction for each strength s (White, "Sampling Generative Networks", 2016; the CelebA "smile
vector"). The groups come from labels (``label=3->8``: from the 3s to the 8s) or from a boolean column
of a user's attribute file with one row per test image (``.npy``: a 1-D array or a structured array with
named fields; ``.csv``: a header row of column names; values 1/0, true/false, or CelebA's 1/-1).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastvae.errors import FastVAEError

TRUE = {"1", "true", "yes", "t", "y"}
FALSE = {"0", "-1", "false", "no", "f", "n"}


@torch.no_grad()
def attribute_direction(model: torch.nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """(Z,) mean posterior code of the rows of x (N, D) where ``mask`` (N,) is True, minus that of the rest."""
    mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
    if mask.shape != (len(x),):
        raise FastVAEError(
            f"the attribute mask must have one value per image ({len(x)}), got {tuple(mask.shape)}"
        )
    n_with, n_without = int(mask.sum()), int((~mask).sum())
    if n_with == 0 or n_without == 0:
        raise FastVAEError(
            f"the attribute splits the images {n_with} with / {n_without} without: need both groups"
        )
    from fastvae.toolkit import posterior_means

    mu = posterior_means(model, x).double()  # (N, Z)
    return (mu[mask].mean(0) - mu[~mask].mean(0)).float()


@torch.no_grad()
def edit(model: torch.nn.Module, x: Tensor, direction: Tensor, strengths: list[float]) -> Tensor:
    """The strip (2 + S, D): the image x (D,), its reconstruction, then decode(mu(x) + s * direction) for
    each strength s, as E[x|z] (probabilities for a Bernoulli decoder)."""
    device = next(model.parameters()).device
    x = x.reshape(1, -1).to(device)
    mu = model.encode(x)[0]  # (1, Z)
    s = torch.tensor([0.0, *strengths], device=device, dtype=mu.dtype)[:, None]  # (1 + S, 1)
    z = mu + s * direction.to(device, mu.dtype)  # (1 + S, Z): strength 0 is the reconstruction
    return torch.cat([x.float(), model.mean_output(model.decode(z)).float()])


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise FastVAEError(
            f"--strength: expected comma-separated numbers such as -2,-1,1,2, got {text!r}"
        ) from None
    if not values or not all(np.isfinite(values)):
        raise FastVAEError(f"--strength: expected finite comma-separated numbers, got {text!r}")
    return values


def label_groups(spec: str, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``label=A->B``: (rows labelled A or B, mask of the B rows among them) of the test split."""
    m = re.fullmatch(r"\s*label\s*=\s*(-?\d+)\s*->\s*(-?\d+)\s*", spec)
    if m is None:
        raise FastVAEError(
            f"--attribute {spec!r}: expected label=A->B (e.g. label=3->8) or a column name with --attributes"
        )
    if labels is None:
        raise FastVAEError(f"--attribute {spec}: this run's data has no test labels; pass --attributes FILE")
    a, b = int(m.group(1)), int(m.group(2))
    labels = np.asarray(labels).reshape(-1)
    for c in (a, b):
        if not (labels == c).any():
            raise FastVAEError(f"--attribute {spec}: no test image is labelled {c}")
    if a == b:
        raise FastVAEError(f"--attribute {spec}: the two labels must differ")
    rows = np.flatnonzero((labels == a) | (labels == b))
    return rows, labels[rows] == b


def read_attribute(path: str | Path, name: str, n: int) -> np.ndarray:
    """Boolean column ``name`` (n,) of an attribute file with one row per test image."""
    path = Path(path)
    if not path.is_file():
        raise FastVAEError(f"--attributes {path}: no such file")
    if path.suffix == ".csv":
        values = _csv_column(path, name)
    elif path.suffix == ".npy":
        values = _npy_column(path, name)
    else:
        raise FastVAEError(f"--attributes {path}: use a .csv (with a header row) or a .npy file")
    if len(values) != n:
        raise FastVAEError(
            f"--attributes {path}: {len(values)} rows, but the run's test split has {n} images"
        )
    return np.array([_as_bool(v, path, name, i) for i, v in enumerate(values)], dtype=bool)


def _csv_column(path: Path, name: str) -> list[str]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if name not in header:
            raise FastVAEError(
                f"--attributes {path}: no column {name!r} (columns: {', '.join(header) or 'none'})"
            )
        col = header.index(name)
        return [row[col] if col < len(row) else "" for row in reader if row]


def _npy_column(path: Path, name: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FastVAEError(f"--attributes {path}: not a readable NumPy file ({exc})") from None
    if arr.dtype.names:
        if name not in arr.dtype.names:
            raise FastVAEError(
                f"--attributes {path}: no field {name!r} (fields: {', '.join(arr.dtype.names)})"
            )
        return arr[name]
    if arr.ndim != 1:
        raise FastVAEError(
            f"--attributes {path}: expected a 1-D array or named fields, got shape {arr.shape}"
        )
    return arr


def _as_bool(v, path: Path, name: str, i: int) -> bool:
    s = str(v).strip().lower()
    if s.endswith(".0"):
        s = s[:-2]
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise FastVAEError(
        f"--attributes {path}: row {i} of {name!r} is {v!r}, not a boolean (1/0, true/false, 1/-1)"
    )
