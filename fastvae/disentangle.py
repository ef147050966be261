"""Disentanglement of a model trained on dSprites: MIG and SAP as ``disentanglement_lib`` computes them,
latent traversals labelled by factor, and factor edits read back by nearest neighbour in the grid.

- MIG (Chen et al., 2018), as ``disentanglement_lib/evaluation/metrics/mig.py``: the mean codes mu(x)
  of a seeded sample (10,000 images in its study config) are discretised per latent into 20 histogram
  bins (``np.digitize(c, np.histogram(c, 20)[1][:-1])``); I[j, k] = ``sklearn.metrics.mutual_info_score``
  (factor k, binned latent j); H[k] = I(factor k; factor k); MIG = mean over factors of
  (largest I[:, k] - second largest) / H[k].
- SAP (Kumar et al., 2018), as ``sap_score.py``: for each latent j and factor k a score S[j, k]; SAP =
  mean over factors of the gap between the two largest S[:, k]. ``disentanglement_lib``'s study uses
  ``continuous_factors=False``: S[j, k] is the test accuracy (5,000 further images) of
  ``LinearSVC(C=0.01, class_weight="balanced")`` predicting factor k from latent j alone. With
  ``continuous=True``, S[j, k] = cov(mu_j, y_k)^2 / (var mu_j var y_k) (0 where var mu_j <= 1e-12).

Factors are the grid's class indices (as ``disentanglement_lib``'s dSprites returns them). scikit-learn
is the optional ``metrics`` extra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastvae import dsprites
from fastvae.errors import FastVAEError, require

NUM_BINS = 20  # disentanglement_lib's mig.gin: discretizer.num_bins = 20
NUM_TRAIN, NUM_TEST = 10_000, 5_000  # its mig.gin / sap_score.gin sample sizes
MAX_EVAL = 1_000_000


def _metrics():
    return require("sklearn.metrics", "disentanglement metrics")


def histogram_discretize(codes: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """(N, Z) integer bins of (N, Z) codes, each latent on its own ``num_bins``-bin histogram."""
    codes = np.asarray(codes, dtype=np.float64)
    out = np.zeros(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        out[:, j] = np.digitize(codes[:, j], np.histogram(codes[:, j], num_bins)[1][:-1])
    return out


def mutual_info_matrix(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(Z, F) mutual information (nats) of each discrete latent with each factor."""
    mis = _metrics().mutual_info_score
    z, f = discrete_codes.shape[1], factors.shape[1]
    return np.array([[mis(factors[:, k], discrete_codes[:, j]) for k in range(f)] for j in range(z)]).reshape(
        z, f
    )


def factor_entropy(factors: np.ndarray) -> np.ndarray:
    """(F,) entropy (nats) of each discrete factor, as disentanglement_lib: I(y; y)."""
    mis = _metrics().mutual_info_score
    return np.array([mis(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])


@dataclass
class MIGResult:
    score: float
    gaps: np.ndarray  # (F,) normalised gap per factor
    top: np.ndarray  # (F,) the latent with the most information about each factor
    mi: np.ndarray  # (Z, F) mutual information, nats
    entropy: np.ndarray  # (F,)

    @property
    def normalised(self) -> np.ndarray:
        """(Z, F) I[j, k] / H[k]: the share of each factor's entropy a latent carries."""
        return self.mi / self.entropy[None, :]


def mig(
    codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS, *, discretize: bool = True
) -> MIGResult:
    """MIG of codes (N, Z) against discrete factors (N, F). ``discretize=False`` takes codes that are
    already discrete (disentanglement_lib's tests use an identity discretiser)."""
    codes, factors = _check_pair(codes, factors)
    if codes.shape[1] < 2:
        raise FastVAEError("MIG needs at least 2 latent dimensions (it is a gap between the top two)")
    disc = histogram_discretize(codes, num_bins) if discretize else codes.astype(np.int64)
    m = mutual_info_matrix(disc, factors)
    h = factor_entropy(factors)
    if (h <= 0).any():
        bad = int(np.flatnonzero(h <= 0)[0])
        raise FastVAEError(f"factor {bad} is constant in the sample: its entropy is 0, MIG is undefined")
    top2 = np.sort(m, axis=0)[::-1]
    gaps = (top2[0] - top2[1]) / h
    return MIGResult(float(gaps.mean()), gaps, np.argmax(m, axis=0), m, h)


@dataclass
class SAPResult:
    score: float
    gaps: np.ndarray  # (F,)
    top: np.ndarray  # (F,)
    matrix: np.ndarray  # (Z, F)


def sap(codes: np.ndarray, factors: np.ndarray, codes_test: np.ndarray | None = None,
        factors_test: np.ndarray | None = None, *, continuous: bool = False) -> SAPResult:  # fmt: skip
    """SAP of codes (N, Z) against factors (N, F); the discrete form scores on (codes_test, factors_test)."""
    codes, factors = _check_pair(codes, factors)
    z, f = codes.shape[1], factors.shape[1]
    s = np.zeros((z, f))
    if continuous:
        for j in range(z):
            for k in range(f):
                c = np.cov(codes[:, j], factors[:, k].astype(np.float64), ddof=1)
                s[j, k] = c[0, 1] ** 2 / (c[0, 0] * c[1, 1]) if c[0, 0] > 1e-12 else 0.0
    else:
        if codes_test is None or factors_test is None:
            raise FastVAEError("the discrete SAP score needs a test sample (codes_test, factors_test)")
        codes_test, factors_test = _check_pair(codes_test, factors_test)
        svm = require("sklearn.svm", "the SAP score")
        for j in range(z):
            for k in range(f):
                clf = svm.LinearSVC(C=0.01, class_weight="balanced")
                clf.fit(codes[:, j : j + 1], factors[:, k])
                s[j, k] = np.mean(clf.predict(codes_test[:, j : j + 1]) == factors_test[:, k])
    top2 = np.sort(s, axis=0)
    gaps = top2[-1] - top2[-2] if z > 1 else top2[-1]
    return SAPResult(float(gaps.mean()), gaps, np.argmax(s, axis=0), s)


def _check_pair(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors) or len(codes) < 2:
        raise FastVAEError(
            f"codes (N, Z) and factors (N, F) must be 2-D with one row per sample, got {codes.shape} and {factors.shape}"
        )
    if not np.isfinite(codes).all():
        raise FastVAEError("the codes hold NaN or infinite values")
    return codes, factors.astype(np.int64)


# ---- a model on a dSprites grid ---------------------------------------------------------------------
@dataclass
class Report:
    """What ``disentanglement`` measures on a seeded sample of a dSprites grid."""

    grid: str
    n: int
    n_test: int
    seed: int
    mig: MIGResult
    sap: SAPResult | None
    kl_per_dim: list[float]
    rec: float | None = None  # test reconstruction -log p(x|z), nats (a run's test split)
    factors: tuple[str, ...] = field(default=dsprites.FACTORS)
    codes: np.ndarray | None = field(default=None, repr=False)  # (n, Z) mean codes of the MIG sample
    classes: np.ndarray | None = field(default=None, repr=False)  # (n, 5) their factor classes

    def rows(self) -> list[dict[str, Any]]:
        """One row per factor: the latent it lives in, its normalised MI, its MIG gap and SAP gap."""
        out = []
        for k, name in enumerate(self.factors):
            j = int(self.mig.top[k])
            row = {"factor": name, "latent": j, "mi_share": float(self.mig.normalised[j, k]),
                   "mig_gap": float(self.mig.gaps[k])}  # fmt: skip
            if self.sap is not None:
                row.update(sap_latent=int(self.sap.top[k]), sap_gap=float(self.sap.gaps[k]))
            out.append(row)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "n": self.n, "n_test": self.n_test, "seed": self.seed,
                "mig": self.mig.score, "sap": None if self.sap is None else self.sap.score, "rec": self.rec,
                "kl_per_dim": self.kl_per_dim, "factors": self.rows(),
                "mi_share": self.mig.normalised.tolist()}  # fmt: skip

    def factor_of(self, latent: int) -> tuple[str, float]:
        """The factor a latent carries most (by its share of the factor's entropy) and that share."""
        share = self.mig.normalised[latent]
        k = int(np.argmax(share))
        return self.factors[k], float(share[k])


def grid_of_run(run: Any) -> str:
    """The dSprites grid a run (a directory, or a loaded Run) was trained on, or one clear line when its
    data has no factor labels."""
    from fastvae.runs import read_run_config

    path, doc = (run, read_run_config(run)[1]) if isinstance(run, (str, os.PathLike)) else (run.path, run.doc)
    data = doc.get("train", {}).get("data", "mnist")
    if not dsprites.is_dsprites(data):
        raise FastVAEError(
            f"{path}: trained on {data!r}, which has no factor labels; disentanglement needs a run "
            f"trained with --data {' or '.join(dsprites.GRIDS)}"
        )
    return data


def sample_rows(grid_name: str, n: int, seed: int) -> np.ndarray:
    """n grid rows drawn uniformly with replacement (random factors, as disentanglement_lib samples)."""
    return np.random.default_rng(seed).integers(0, len(dsprites.grid(grid_name)), size=n)


def mean_codes(model: torch.nn.Module, grid_name: str, rows: np.ndarray) -> np.ndarray:
    """(N, Z) posterior means mu(x) of grid rows, float64."""
    from fastvae.toolkit import posterior_means

    x = torch.from_numpy(dsprites.images(grid_name, rows).reshape(len(rows), -1).astype(np.float32))
    return posterior_means(model, x).double().numpy()


def disentanglement(model_or_run: Any, *, grid: str | None = None, n: int = NUM_TRAIN, n_test: int = NUM_TEST,
                    seed: int = 0, num_bins: int = NUM_BINS, with_sap: bool = True,
                    device: str | torch.device = "cpu") -> Report:  # fmt: skip
    """MIG and SAP of a model (or a run directory, or a loaded ``fastvae.runs.Run``) on ``n`` (and
    ``n_test``) seeded samples of a dSprites grid (a run's own grid unless ``grid`` is given)."""
    _metrics()
    run = _as_run(model_or_run, device)
    model = run.model if run is not None else model_or_run
    if grid is None:
        if run is None:
            raise FastVAEError("disentanglement(model): pass grid='dsprites' or 'dsprites-small'")
        grid = grid_of_run(run)
    dsprites.grid(grid)
    for name, v in (("n", n), ("n_test", n_test)):
        if not 2 <= v <= MAX_EVAL:
            raise FastVAEError(f"{name} must be in 2..{MAX_EVAL:,}, got {v}")
    if model.config.flat_dim != dsprites.SIZE * dsprites.SIZE or model.config.conditional:
        raise FastVAEError("the model must be an unconditional VAE on 64x64 images (dSprites)")
    rng_rows = sample_rows(grid, n + n_test, seed)
    g = dsprites.grid(grid)
    factors = g.classes(rng_rows)
    codes = mean_codes(model, grid, rng_rows)
    m = mig(codes[:n], factors[:n], num_bins)
    s = sap(codes[:n], factors[:n], codes[n:], factors[n:]) if with_sap else None
    kl = _kl_per_dim(model, grid, rng_rows[:n])
    rec = _test_rec(run) if run is not None else None
    return Report(grid, n, n_test, seed, m, s, kl, rec, codes=codes[:n], classes=factors[:n])


def _as_run(obj: Any, device) -> Any:
    from fastvae.runs import Run, load_run

    if isinstance(obj, Run):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return load_run(obj, device, data=grid_of_run(obj))
    if not isinstance(obj, torch.nn.Module) or not hasattr(obj, "config"):
        raise FastVAEError(f"expected a fastvae model, a run directory or a Run, got {type(obj).__name__}")
    return None


def _kl_per_dim(model: torch.nn.Module, grid: str, rows: np.ndarray) -> list[float]:
    from fastvae.toolkit import kl_per_dim_on

    x = torch.from_numpy(dsprites.images(grid, rows[:5000]).reshape(-1, 4096).astype(np.float32))
    return [float(v) for v in kl_per_dim_on(model, x)]


def _test_rec(run: Any) -> float:
    from fastvae.evaluate import elbo_stats

    return float(elbo_stats(run.model, run.test, seed=run.seed, binarize=run.binarized).rec)


# ---- traversals -------------------------------------------------------------------------------------
@torch.no_grad()
def traversal(model: torch.nn.Module, x: torch.Tensor, report: Report, *, steps: int = 10, limit: float = 3.0,
              min_kl: float = 0.01) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """The beta-VAE figure: for each latent with KL above ``min_kl`` nats, most KL first, a row decoding
    mu(x) with that latent swept over ``linspace(-limit, limit, steps)`` (prior sigma = 1). Returns the
    images (rows * steps, D) and one label per row."""
    order = [j for j in np.argsort(report.kl_per_dim)[::-1] if report.kl_per_dim[j] > min_kl]
    if not order:
        raise FastVAEError(f"no latent carries more than {min_kl} nats of KL: nothing to traverse")
    device = next(model.parameters()).device
    mu = model.encode(x.reshape(1, -1).to(device))[0]  # (1, Z)
    sweep = torch.linspace(-limit, limit, steps, device=device, dtype=mu.dtype)
    rows, labels = [], []
    for j in order:
        z = mu.repeat(steps, 1)
        z[:, j] = sweep
        rows.append(model.mean_output(model.decode(z)).float().cpu())
        factor, share = report.factor_of(int(j))
        labels.append(f"z{j}  KL {report.kl_per_dim[j]:.2f}  {factor} ({share:.2f})")
    return torch.cat(rows).numpy(), labels


# ---- factor editing ---------------------------------------------------------------------------------
@dataclass
class FactorEdit:
    factor: str
    latent: int
    sign: float  # +1: a positive strength raises the factor's class
    sd: float  # standard deviation of the latent's mean codes: the unit of a strength


def factor_latent(report: Report, codes: np.ndarray, factors: np.ndarray, factor: str) -> FactorEdit:
    """The latent that carries ``factor`` (most mutual information), its direction and its scale."""
    k = dsprites.factor_index(factor)
    j = int(report.mig.top[k])
    c = np.corrcoef(codes[:, j], factors[:, k])[0, 1] if codes[:, j].std() > 0 else 0.0
    return FactorEdit(dsprites.FACTORS[k], j, 1.0 if not np.isfinite(c) or c >= 0 else -1.0,
                      float(codes[:, j].std()) or 1.0)  # fmt: skip


@torch.no_grad()
def edit_codes(
    model: torch.nn.Module, x: torch.Tensor, e: FactorEdit, strengths: list[float]
) -> torch.Tensor:
    """(1 + S, D): the reconstruction, then decode(mu(x) + s * sign * sd along the factor's latent)."""
    device = next(model.parameters()).device
    mu = model.encode(x.reshape(len(x) if x.ndim > 1 else 1, -1).to(device))[0][:1]
    z = mu.repeat(1 + len(strengths), 1)
    z[1:, e.latent] += torch.tensor(strengths, device=device, dtype=mu.dtype) * e.sign * e.sd
    return model.mean_output(model.decode(z)).float().cpu()


def nearest_rows(grid_name: str, probs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Grid rows nearest (Hamming distance) to each of (M, 4096) decoded images thresholded at 0.5."""
    q = (np.asarray(probs).reshape(len(probs), -1) > 0.5).astype(np.float32)
    packed = dsprites.packed_images(grid_name)
    best, best_d = np.zeros(len(q), np.int64), np.full(len(q), np.inf)
    qn = q.sum(1)
    for start in range(0, len(packed), chunk):
        g = np.unpackbits(packed[start : start + chunk], axis=1).astype(np.float32)
        d = qn[:, None] + g.sum(1)[None, :] - 2.0 * q @ g.T  # (M, chunk) Hamming distances
        i = d.argmin(1)
        better = d[np.arange(len(q)), i] < best_d
        best[better] = start + i[better]
        best_d[better] = d[np.arange(len(q)), i][better]
    return best


def factor_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(M, 5) change of each factor as a share of its range: shape 0/1 (changed or not), orientation the
    circular distance / 20 classes, the rest |delta class| / (classes - 1), on the full grid's classes."""
    d = np.abs(after - before).astype(np.float64)
    d[:, 0] = (d[:, 0] > 0).astype(np.float64)
    d[:, 2] = np.minimum(d[:, 2], dsprites.FULL_SIZES[2] - d[:, 2]) / (dsprites.FULL_SIZES[2] / 2)
    for k in (1, 3, 4):
        d[:, k] /= dsprites.FULL_SIZES[k] - 1
    return d


def measure_edit(model: torch.nn.Module, grid_name: str, e: FactorEdit, strengths: list[float],
                 n: int = 100, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Edits of n seeded grid images at each strength, read back by nearest neighbour against their own
    reconstructions (strength 0): ((S, 5) mean |change| of each factor as a share of its range, see
    ``factor_change``; (S,) mean signed change of the target factor's value). The target should move,
    the others stay."""
    rows = sample_rows(grid_name, n, seed)
    x = torch.from_numpy(dsprites.images(grid_name, rows).reshape(n, -1).astype(np.float32))
    g = dsprites.grid(grid_name)
    decoded = np.concatenate([edit_codes(model, x[i : i + 1], e, strengths).numpy() for i in range(n)])
    read = g.classes(nearest_rows(grid_name, decoded)).reshape(n, 1 + len(strengths), -1)
    before = np.repeat(read[:, :1], len(strengths), 1).reshape(-1, read.shape[-1])
    after = read[:, 1:].reshape(-1, read.shape[-1])
    change = factor_change(before, after).reshape(n, len(strengths), -1).mean(0)
    k = dsprites.factor_index(e.factor)
    signed = (g.values(after)[:, k] - g.values(before)[:, k]).reshape(n, len(strengths)).mean(0)
    return change, signed
