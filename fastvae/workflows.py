"""Whole tasks on a run directory, one function each: what the ``fastvae`` commands call, open to Python.

Each function takes a run directory (or a run already loaded by :func:`fastvae.runs.load_run`), does the
work, writes its file where ``out`` asks, and returns what the command prints. Bad input raises
:class:`fastvae.errors.FastVAEError` with one line. The arrays-in, arrays-out pieces they are built from
live in ``fastvae.toolkit`` and ``fastvae.evaluate``; this module sits above ``fastvae.runs``, which
imports both, so that no import loop forms.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastvae import toolkit
from fastvae.atomic import check_writable
from fastvae.backends import resolve_device
from fastvae.config import VAEConfig, describe_data
from fastvae.data import load_dataset, load_labels, resolve_label, unit_float
from fastvae.errors import FastVAEError
from fastvae.evaluate import ElboStats, elbo_stats, importance_weighted_nll
from fastvae.images import SAMPLE_ROWS, save_grid
from fastvae.limits import IW_DEFAULT_CPU, IW_DEFAULT_GPU, check_fits
from fastvae.runs import Run, load_model, load_run, read_run_config

if TYPE_CHECKING:
    from fastvae.quality import QualityReport

RunLike = str | os.PathLike | Run
AE_NOTE = "autoencoder: no q(z|x) to sample, so no ELBO and no importance-weighted bound"


def open_run(run: RunLike, device: str | torch.device = "auto", data: Any = None) -> Run:
    """``run`` itself when it is loaded, else the run directory loaded on ``device`` (auto | cpu | cuda)."""
    if isinstance(run, Run):
        return run
    return load_run(run, _device(device), data=data)


def _device(device: str | torch.device) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else torch.device(device)


def _check_out(path: str | os.PathLike | None) -> None:
    if path is not None:
        check_writable(path)


# ---- eval ------------------------------------------------------------------------------------------------
def default_iw(device: str | torch.device) -> int:
    """Importance samples for the IW bound when none are given: the IWAE paper's 5000 on a GPU, 500 on a
    CPU (k = 5000 over 10,000 test images took ~23 min on a 2-core CPU, seconds on a GPU)."""
    return IW_DEFAULT_GPU if torch.device(device).type == "cuda" else IW_DEFAULT_CPU


@dataclass
class RunEvaluation:
    """A run's test figures: the -ELBO and its parts, and the k-sample importance-weighted NLL."""

    stats: ElboStats
    objective: str  # the training objective's name (elbo | iwae)
    k: int  # its samples per row
    beta: float
    conditional: bool  # the figures then bound -log p(x|y), not -log p(x)
    is_ae: bool  # an autoencoder: no ELBO and no IW bound; its figure is -log p(x|mu(x))
    iw_k: int = 0  # importance samples of the IW bound (0: not computed)
    iw_nll: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record ``fastvae eval --json`` prints."""
        s = self.stats
        out: dict[str, Any] = {
            "n": s.n, "test_neg_elbo": s.neg_elbo, "test_objective": s.objective, "test_rec": s.rec,
            "test_kl": s.kl, "active_units": s.active_units, "objective": self.objective, "k": self.k,
            "conditional": self.conditional,
        }  # fmt: skip
        if self.is_ae:
            out.update(model="ae", iw_nll=None, note=AE_NOTE)
        elif self.iw_k > 0:
            out.update(iw_k=self.iw_k, iw_nll=self.iw_nll)
        return out


def evaluate_run(
    run: RunLike, *, iw: int | None = None, limit: int | None = None, data: Any = None,
    device: str | torch.device = "auto", progress: bool = False,
    on_elbo: Callable[[RunEvaluation], None] | None = None,
) -> RunEvaluation:  # fmt: skip
    """The test -ELBO of a run (first ``limit`` test samples; ``data`` replaces its data set), then its
    ``iw``-sample IW NLL (None: :func:`default_iw` of the device; 0: skip). ``on_elbo`` sees the result
    before the IW bound's minutes start. An autoencoder gets its reconstruction NLL and no IW bound."""
    run = open_run(run, device, data)
    cfg = run.config
    stats = elbo_stats(run.model, run.test, seed=run.seed, binarize=run.binarized, limit=limit)
    result = RunEvaluation(stats, cfg.objective, cfg.k, cfg.beta, cfg.conditional, cfg.is_ae)
    if on_elbo is not None:
        on_elbo(result)
    k = default_iw(run.test.x.device) if iw is None else iw
    if k > 0 and not cfg.is_ae:
        result.iw_nll = importance_weighted_nll(run.model, run.test, k, seed=run.seed, binarize=run.binarized,
                                                limit=limit, progress=progress)  # fmt: skip
        result.iw_k = k
    return result


# ---- score -----------------------------------------------------------------------------------------------
@dataclass
class ScoreResult:
    """Per-sample anomaly scores (nats; higher is more unusual), and the run's held-out reference."""

    neg_elbo: np.ndarray  # (N,) -ELBO; an autoencoder's -log p(x|mu(x))
    iw_nll: np.ndarray  # (N,) iw-sample IW NLL; NaN where iw == 0
    iw: int  # importance samples (0: none; always 0 for an autoencoder)
    is_ae: bool
    reference: np.ndarray | None = None  # the same figure on the run's test split (with plot)
    auc: float | None = None  # ROC AUC of the scored data against the reference

    @property
    def scores(self) -> np.ndarray:
        """The figure the histogram and the AUC use: the IW NLL, or the -ELBO when iw == 0."""
        return self.neg_elbo if self.iw == 0 else self.iw_nll

    @property
    def figure(self) -> str:
        """The name of :attr:`scores`."""
        if self.is_ae:
            return "reconstruction NLL"
        return "-ELBO" if self.iw == 0 else f"IW NLL (k={self.iw})"


def score_labels(config: VAEConfig, data: Any, labels: Any, n: int) -> Tensor | None:
    """The labels a conditional VAE scores -log p(x|y) with: ``labels`` (a .npy/.npz path, n integers), or
    MNIST's own test labels for data "mnist"; None for an unconditional VAE (which refuses labels)."""
    if not config.conditional:
        if labels is not None:
            raise FastVAEError(
                "--labels applies to a conditional VAE (trained with --conditional); this one is not"
            )
        return None
    if labels is None and isinstance(data, str) and data == "mnist":
        y = load_dataset("mnist").y_test  # the bundled test split's own labels
    elif labels is None:
        raise FastVAEError(
            "a conditional VAE scores -log p(x|y): give --labels FILE.npy, one integer label per sample"
        )
    else:
        y = load_labels(labels, n)
    if y.min() < 0 or y.max() >= config.classes:
        raise FastVAEError(f"labels must be in 0..{config.classes - 1}, got {y.min()}..{y.max()}")
    return torch.from_numpy(y)


def score_run(
    run: RunLike, data: Any, *, iw: int = 100, labels: Any = None, out: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None, reference: bool = False, reference_limit: int = 1000,
    device: str | torch.device = "auto", progress: bool = False,
) -> ScoreResult:  # fmt: skip
    """Score ``data`` (any form ``fastvae.data.load_array`` takes, read as the run reads its own) with a
    run's model: per-sample -ELBO and ``iw``-sample IW NLL (a conditional VAE: given ``labels``). ``out``:
    also the CSV. ``reference`` (implied by ``plot``): also the same figure on the first ``reference_limit``
    held-out test images of the run, and the ROC AUC of the scored data against them; ``plot``: their
    histograms."""
    run = open_run(run, device)
    x = torch.from_numpy(unit_float(run.read_samples(data)))
    y = score_labels(run.config, data, labels, len(x))
    _check_out(out)
    _check_out(plot)
    iw = 0 if run.config.is_ae else iw  # no IW bound for an autoencoder; its -ELBO is -log p(x|mu(x))
    nelbo, iw_nll = toolkit.anomaly_scores(run.model, x, iw, progress=progress, y=y)
    result = ScoreResult(nelbo, iw_nll, iw, run.config.is_ae)
    if out is not None:
        toolkit.write_scores_csv(str(out), nelbo, iw_nll, iw)
    if plot is not None or reference:
        ref_elbo, ref_iw = toolkit.anomaly_scores(run.model, run.test_images(0, reference_limit, raw=True), iw,
                                                  y=run.test_labels(0, reference_limit))  # fmt: skip
        result.reference = ref_elbo if iw == 0 else ref_iw
        result.auc = toolkit.roc_auc(result.reference, result.scores)
    if plot is not None:
        from fastvae.plots import score_histogram

        name = Path(data).name if isinstance(data, (str, os.PathLike)) else describe_data(data)
        score_histogram(result.reference, result.scores, what=result.figure, scored_name=name, auc=result.auc,
                        out=plot)  # fmt: skip
    return result


# ---- sample ----------------------------------------------------------------------------------------------
def grid_columns(n: int, label_rows: bool, ncol: int | None = None) -> int:
    """Columns of a grid of n samples: ``ncol`` when given, else SAMPLE_ROWS for a conditional VAE's label
    rows (row r shows label r % C), else a square grid."""
    if ncol is not None:
        return ncol
    return SAMPLE_ROWS if label_rows else math.ceil(math.sqrt(n))


@dataclass
class SampleResult:
    images: np.ndarray  # (n, D) float32, E[x|z]
    ncol: int  # grid columns
    label: int | None  # the one label drawn (conditional VAE), else None
    label_rows: bool  # a conditional VAE's grid: row r shows label r % C


def sample_run(
    run: RunLike, n: int = 64, *, seed: int = 0, temperature: float = 1.0, label: str | int | None = None,
    ncol: int | None = None, out: str | os.PathLike | None = None, device: str | torch.device = "auto",
) -> SampleResult:  # fmt: skip
    """n prior samples of a run's model at ``temperature`` (a conditional VAE: of ``label``, a class name
    or 0..C-1, or one label per grid row), drawn from a generator seeded ``seed``; ``out``: the PNG grid.
    Needs only the run's model, not its data."""
    if isinstance(run, Run):
        model, doc = run.model, run.doc
    else:
        model, doc = load_model(run, _device(device)), read_run_config(run)[1]
    dev = next(model.parameters()).device
    label = resolve_label(label, doc.get("classes"))
    check_fits(8 * n * model.config.flat_dim, f"{n:,} samples", "draw fewer with -n", dev)
    label_rows = model.config.conditional and label is None
    ncol = grid_columns(n, label_rows, ncol)
    y = toolkit.sample_labels(model, n, label, ncol)
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    x = model.sample(n, generator=g, temperature=temperature, y=y).float().cpu().numpy()
    if not np.isfinite(x).all():
        raise FastVAEError(
            f"temperature {temperature:g} gives non-finite samples; use a smaller --temperature"
        )
    if out is not None:
        check_writable(out)
        save_grid(x, model.config.data_shape, out, ncol=ncol)
    return SampleResult(x, ncol, label, label_rows)


# ---- interpolate, manifold, latents ----------------------------------------------------------------------
def interpolate_run(
    run: RunLike, first: int, second: int, steps: int = 10, *, label: str | int | None = None,
    out: str | os.PathLike | None = None, device: str | torch.device = "auto",
) -> Tensor:  # fmt: skip
    """Test image ``first``, ``steps`` decoded points on the line from its posterior mean to that of test
    image ``second``, then that image: (steps + 2, D). ``out``: the row as a PNG. A conditional VAE encodes
    each end with its own label and decodes the path with ``label`` (default: the first image's)."""
    run = open_run(run, device)
    label = resolve_label(label, run.doc.get("classes"))
    for name, i in (("--a", first), ("--b", second)):
        if not 0 <= i < len(run.test):
            raise FastVAEError(f"{name} {i} is not a test image index (0..{len(run.test) - 1})")
    _check_out(out)
    x_a, x_b = run.test_images(first, first + 1), run.test_images(second, second + 1)
    ends = None
    if run.config.conditional:
        ends = (int(run.test_labels(first, first + 1)[0]), int(run.test_labels(second, second + 1)[0]))
    path = toolkit.interpolate(run.model, x_a[0], x_b[0], steps, labels=ends, label=label)
    row = torch.cat([x_a, path, x_b])  # image a, the line, image b
    if out is not None:
        save_grid(row.cpu().numpy(), run.config.data_shape, out, ncol=len(row), scale=3)
    return row


def manifold_dims(run: Run, rows: int = 2000) -> tuple[int, int]:
    """The two latent dimensions a manifold spans: (0, 1) for a 2-D latent space, else the two the model
    uses most on its first ``rows`` test images (``toolkit.usage_per_dim``), in increasing order."""
    if run.config.latent_dim == 2:
        return (0, 1)
    usage = toolkit.usage_per_dim(run.model, run.test_images(0, rows), run.test_labels(0, rows))
    first, second = toolkit.most_active_dims(usage, 2)
    return (first, second)


@dataclass
class ManifoldResult:
    images: Tensor  # (n*n, D); row r varies dims[0] downwards
    dims: tuple[int, int]  # the latent dimensions spanned (the rest held at 0)
    latent_dim: int


def manifold_run(
    run: RunLike, n: int = 20, *, label: str | int | None = None, out: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
) -> ManifoldResult:  # fmt: skip
    """The n x n manifold (``toolkit.manifold``) over :func:`manifold_dims` (a conditional VAE: of
    ``label``, a class name or 0..C-1). ``out``: the PNG grid."""
    run = open_run(run, device)
    label = resolve_label(label, run.doc.get("classes"))
    _check_out(out)
    check_fits(8 * n * n * run.config.flat_dim, f"a {n}x{n} manifold", "use a smaller -n", run.test.x.device)
    dims = manifold_dims(run)
    images, _ = toolkit.manifold(run.model, n, dims, label=label)
    if out is not None:
        save_grid(images.cpu().numpy(), run.config.data_shape, out, ncol=n, scale=2)
    return ManifoldResult(images, dims, run.config.latent_dim)


def latents_run(
    run: RunLike,
    limit: int = 5000,
    *,
    out: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
) -> tuple[Tensor, str]:
    """2-D coordinates of the first ``limit`` test posterior means (``toolkit.project_2d``) and their axes;
    ``out``: the scatter, coloured by label where the data has labels."""
    run = open_run(run, device)
    _check_out(out)
    n = min(limit, len(run.test))
    coords, axes = toolkit.project_2d(
        toolkit.posterior_means(run.model, run.test_images(0, n), y=run.test_labels(0, n))
    )
    if out is not None:
        from fastvae.plots import latent_scatter

        labels = None if run.labels is None else run.labels[:n]
        latent_scatter(coords.numpy(), labels, f"posterior means of {n} test samples: {axes}", out)
    return coords, axes


# ---- edit, quality ---------------------------------------------------------------------------------------
@dataclass
class EditResult:
    strip: Tensor  # (2 + S, D): the image, its reconstruction, one decode per strength
    strengths: list[float]
    n_with: int  # images with the attribute
    n_without: int
    direction: Tensor  # (Z,)


def edit_run(
    run: RunLike, image: int, attribute: str, *, attributes: str | os.PathLike | None = None,
    strengths: str | Sequence[float] = (-2.0, -1.0, 1.0, 2.0), out: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
) -> EditResult:  # fmt: skip
    """Move test image ``image``'s code along ``attribute`` (``label=A->B``, or a boolean column of the
    ``attributes`` file, one row per test image) by each strength (``fastvae.edit``); ``out``: the strip."""
    from fastvae import edit

    strengths = (
        edit.parse_strengths(strengths) if isinstance(strengths, str) else [float(s) for s in strengths]
    )
    run = open_run(run, device)
    toolkit.refuse_conditional(
        run.model, "fastvae edit (a label is an input of a conditional VAE, not a direction)"
    )
    n = len(run.test)
    if not 0 <= image < n:
        raise FastVAEError(f"--image {image} is not a test image index (0..{n - 1})")
    _check_out(out)
    if attributes:
        rows, mask = np.arange(n), edit.read_attribute(attributes, attribute, n)
    else:
        rows, mask = edit.label_groups(attribute, run.labels)
    x = run.test_images()
    direction = edit.attribute_direction(run.model, x[rows], mask)
    strip = edit.edit(run.model, x[image], direction, strengths)
    if out is not None:
        save_grid(strip.cpu().numpy(), run.config.data_shape, out, ncol=len(strip), scale=3)
    return EditResult(strip, strengths, int(mask.sum()), int((~mask).sum()), direction)


def quality_run(
    run: RunLike, n: int = 5000, seed: int = 0, *, device: str | torch.device = "auto"
) -> tuple[Run, QualityReport]:
    """(the loaded run, ``fastvae.quality.run_quality``'s report of its samples and midpoints)."""
    from fastvae.quality import run_quality

    run = open_run(run, device)
    return run, run_quality(run, n, seed)


def compare_run_dirs(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
    table_out: str | os.PathLike | None = None, names: list[str] | None = None,
    device: str | torch.device = "auto", n_quality: int = 5000, seed: int = 0,
) -> str:  # fmt: skip
    """Runs side by side (``fastvae.compare.compare_runs``): the Markdown table, returned and with
    ``table_out`` written; ``out``: the figure."""
    from fastvae.atomic import atomic_write_bytes
    from fastvae.compare import compare_runs, table

    _check_out(out)
    _check_out(table_out)
    summaries = compare_runs([str(p) for p in paths], names, device=_device(device), n_quality=n_quality,
                             seed=seed)  # fmt: skip
    text = table(summaries)
    if out is not None:
        from fastvae.plots import compare_figure

        compare_figure(summaries, out)
    if table_out is not None:
        atomic_write_bytes(table_out, (text + "\n").encode())
    return text


# ---- dSprites: traversals and factor edits (fastvae.disentangle) -------------------------------------------
def dsprites_run(run: RunLike, image: int = 0, device: str | torch.device = "auto") -> Run:
    """A run trained on a dSprites grid, loaded on that grid (one line when its data has no factor labels),
    with ``image`` checked as a test image index."""
    from fastvae.disentangle import grid_of_run

    run = run if isinstance(run, Run) else load_run(run, _device(device), data=grid_of_run(run))
    if not 0 <= image < len(run.test):
        raise FastVAEError(f"--image {image} is not a test image index (0..{len(run.test) - 1})")
    return run


@dataclass
class TraverseResult:
    images: np.ndarray  # (rows * steps, D): one row per active latent, most KL first
    labels: list[str]  # each row's latent and the factor it carries most
    latent_dim: int
    mig: float


def traverse_run(
    run: RunLike, *, image: int = 0, steps: int = 10, limit: float = 3.0, n: int = 10_000, seed: int = 0,
    out: str | os.PathLike | None = None, device: str | torch.device = "auto",
) -> TraverseResult:  # fmt: skip
    """The beta-VAE traversal figure of test image ``image`` (rows labelled from a seeded MIG sample of
    ``n`` images); ``out``: the PNG."""
    from fastvae.disentangle import disentanglement, traversal
    from fastvae.plots import traversal_figure

    _check_out(out)
    run = dsprites_run(run, image, device)
    report = disentanglement(run, n=n, seed=seed, with_sap=False)
    images, labels = traversal(run.model, run.test_images(image, image + 1)[0], report, steps=steps, limit=limit)
    if out is not None:
        traversal_figure(images, run.config.data_shape, labels, limit, out)
    return TraverseResult(images, labels, run.config.latent_dim, report.mig.score)


@dataclass
class FactorEditResult:
    strip: np.ndarray  # (2 + S, D): the image, its reconstruction, one decode per strength
    strengths: list[float]
    factor: str
    latent: int
    sd: float  # one strength: the latent's code std
    mi_share: float  # the latent's mutual information with the factor / the factor's entropy
    read_back: np.ndarray  # (1 + S,): the factor's value read back from the reconstruction and each edit
    change: np.ndarray | None  # (S, 5): mean |change| of each factor over seeded images (measure_edit)
    signed: np.ndarray | None  # (S,): mean signed change of the edited factor


def edit_factor_run(
    run: RunLike, image: int, factor: str, *, strengths: str | Sequence[float] = (-2.0, -1.0, 1.0, 2.0),
    measure: int = 100, seed: int = 0, out: str | os.PathLike | None = None, device: str | torch.device = "auto",
) -> FactorEditResult:  # fmt: skip
    """Move test image ``image`` along the latent that carries dSprites ``factor``; read the edits' true
    factors back by nearest neighbour in the grid, over ``measure`` seeded images too (0: skip)."""
    from fastvae import dsprites, edit
    from fastvae.disentangle import disentanglement, edit_codes, factor_latent, measure_edit, nearest_rows

    k = dsprites.factor_index(factor)  # an unknown name fails before any work
    strengths = (
        edit.parse_strengths(strengths) if isinstance(strengths, str) else [float(s) for s in strengths]
    )
    _check_out(out)
    run = dsprites_run(run, image, device)
    report = disentanglement(run, seed=seed, with_sap=False)
    e = factor_latent(report, report.codes, report.classes, factor)
    x = run.test_images(image, image + 1)
    strip = np.concatenate([x.cpu().numpy(), edit_codes(run.model, x, e, strengths).numpy()])
    if out is not None:
        save_grid(strip, run.config.data_shape, out, ncol=len(strip), scale=3)
    g = dsprites.grid(report.grid)
    read = g.values(g.classes(nearest_rows(report.grid, strip[1:])))[:, k]
    change, signed = (
        measure_edit(run.model, report.grid, e, strengths, n=measure, seed=seed + 1) if measure else (None, None)
    )
    return FactorEditResult(strip, strengths, e.factor, e.latent, e.sd, float(report.mig.normalised[e.latent, k]), read,
                            change, signed)  # fmt: skip
