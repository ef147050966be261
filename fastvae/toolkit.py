"""What people do with a trained VAE: interpolation, the 2-D manifold, latent maps, anomaly scores.

Each function takes a model (any backend) and arrays, and returns arrays; the CLI turns them into PNG
and CSV files. All are inference only (``torch.no_grad``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastvae.errors import FastVAEError
from fastvae.evaluate import elbo_stats, elbo_terms_by_row, iw_bound_by_row
from fastvae.images import SAMPLE_ROWS
from fastvae.noise import keyed_generator


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_labels(
    model: torch.nn.Module, n: int, label: int | None = None, ncol: int = SAMPLE_ROWS
) -> Tensor | None:
    """Labels for n samples of a conditional VAE (None for an unconditional one): ``label`` for all, or by
    default the grid's row r (of ``ncol`` images) showing label r % C, so a grid shows every class in turn.
    One clear line for a label out of range or given to an unconditional model."""
    c = model.config.classes
    if not model.config.conditional:
        if label is not None:
            raise FastVAEError(
                "--label applies to a conditional VAE (trained with --conditional); this one is not"
            )
        return None
    if label is not None and not 0 <= label < c:
        raise FastVAEError(f"--label must be in 0..{c - 1} for this model, got {label}")
    y = torch.full((n,), label) if label is not None else (torch.arange(n) // ncol) % c
    return y.to(_device(model))


@torch.no_grad()
def prior_samples(model: torch.nn.Module, n: int, seed: int, label: int | None = None) -> Tensor:
    """n samples of E[x|z], z ~ N(0, I) drawn from a generator keyed by ``seed``: the same images in a
    run's samples.png, in ``fastvae compare`` and in ``fastvae quality`` for one seed. (n, D) on the model's
    device. A conditional VAE's samples have ``label``, or row r of a 10-column grid shows label r % C."""
    y = sample_labels(model, n, label)
    return model.sample(n, generator=keyed_generator(seed, 0, _device(model)), y=y)


@torch.no_grad()
def interpolate(
    model: torch.nn.Module,
    x_a: Tensor,
    x_b: Tensor,
    steps: int = 10,
    *,
    labels: tuple[int, int] | None = None,
    label: int | None = None,
) -> Tensor:
    """Decode the straight line between the posterior means of x_a and x_b: (steps, D), endpoints
    included (they are the two reconstructions). A conditional VAE encodes each end with its own label
    (``labels``) and decodes the whole path with one fixed ``label`` (default: x_a's)."""
    if steps < 2:
        raise FastVAEError(f"steps must be >= 2, got {steps}")
    device = _device(model)
    y_ends = y_path = None
    if model.config.conditional:
        if labels is None:
            raise FastVAEError("a conditional VAE needs the two images' labels to encode them")
        fixed = labels[0] if label is None else label
        for v in labels:
            sample_labels(model, 1, v)  # range checks, one line each
        y_ends = torch.tensor(labels, device=device)
        y_path = sample_labels(model, steps, fixed)
    elif label is not None:
        sample_labels(model, 1, label)  # the one-line refusal
    mu, _ = model.encode(torch.stack([x_a.flatten(), x_b.flatten()]).to(device), y_ends)  # (2, Z)
    t = torch.linspace(0.0, 1.0, steps, device=mu.device)[:, None]  # (steps, 1)
    z = (1 - t) * mu[0] + t * mu[1]  # (steps, Z)
    return model.mean_output(model.decode(z, y_path))


def most_active_dims(kl_per_dim: list[float] | Tensor, k: int = 2) -> list[int]:
    """Indices of the k latent dimensions with the largest average KL (the ones the model uses)."""
    kl = torch.as_tensor(kl_per_dim, dtype=torch.float64)
    return sorted(torch.argsort(kl, descending=True)[:k].tolist())


@torch.no_grad()
def manifold(
    model: torch.nn.Module,
    n: int = 20,
    dims: tuple[int, int] = (0, 1),
    edge: float = 0.05,
    label: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode an n x n grid of z whose coordinates in ``dims`` are the standard normal's quantiles at
    linspace(edge, 1 - edge, n) (the AEVB paper's figure of the learned MNIST manifold), the other
    coordinates held at 0. Returns (images (n*n, D), grid values (n,)); row r varies dims[0] downwards.
    A conditional VAE decodes every z with ``label`` (the style manifold of one class; required)."""
    if n < 2:
        raise FastVAEError(f"n must be >= 2, got {n}")
    z_dim = model.config.latent_dim
    if z_dim < 2:
        raise FastVAEError("the manifold needs a latent space of at least 2 dimensions")
    if len(set(dims)) != 2 or not all(0 <= d < z_dim for d in dims):
        raise FastVAEError(f"dims must be two different latent indices below {z_dim}, got {dims}")
    device = _device(model)
    q = torch.linspace(edge, 1 - edge, n, dtype=torch.float64)
    vals = torch.distributions.Normal(0.0, 1.0).icdf(q).float()  # (n,)
    z = torch.zeros(n, n, z_dim)
    z[:, :, dims[0]] = vals.flip(0)[:, None]  # top row: largest value, as in a plot's y axis
    z[:, :, dims[1]] = vals[None, :]
    if model.config.conditional and label is None:
        raise FastVAEError(
            f"a conditional VAE's manifold is drawn for one label: give --label 0..{model.config.classes - 1}"
        )
    y = sample_labels(model, n * n, label)
    return model.mean_output(model.decode(z.view(n * n, z_dim).to(device), y)), vals


@torch.no_grad()
def posterior_means(
    model: torch.nn.Module, x: Tensor, batch_size: int = 1000, y: Tensor | None = None
) -> Tensor:
    """mu(x) (mu(x, y) with labels ``y`` for a conditional VAE) for every row of x, (N, Z), on the CPU."""
    device = _device(model)
    out = []
    for i in range(0, len(x), batch_size):
        yb = None if y is None else y[i : i + batch_size].to(device)
        out.append(model.encode(x[i : i + batch_size].to(device), yb)[0].cpu())
    return torch.cat(out)


def project_2d(mu: Tensor) -> tuple[Tensor, str]:
    """(N, 2) coordinates of the posterior means: the means themselves for Z = 2, else their first two
    principal components. Returns the coordinates and a description of the axes."""
    if mu.shape[1] == 1:
        return torch.cat([mu, torch.zeros_like(mu)], 1), "z1 (latent is 1-D)"
    if mu.shape[1] == 2:
        return mu, "z1, z2"
    centred = mu.double() - mu.double().mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    share = (s[:2] ** 2).sum() / (s**2).sum()
    return (centred @ v[:2].T).float(), f"first two principal components ({100 * share:.0f}% of variance)"


@torch.no_grad()
def anomaly_scores(
    model: torch.nn.Module, x: Tensor, k: int = 100, *, seed: int = 0, batch_size: int = 100,
    progress: bool = False, y: Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-sample -ELBO and k-sample importance-weighted NLL (nats): higher means more unusual;
    ``progress`` shows a bar (with an ETA) on stderr. A conditional VAE scores -log p(x|y) with labels y."""
    import sys

    from tqdm import tqdm

    device = _device(model)
    nelbo, iw = [], []
    starts = range(0, len(x), batch_size)
    for start in tqdm(
        starts, desc="scoring", unit="batch", disable=not progress, leave=False, file=sys.stderr
    ):
        xb = x[start : start + batch_size].to(device)
        rows = torch.arange(start, start + len(xb), device=device)  # noise keyed by the row's index in x
        yb = None if y is None else y[start : start + batch_size].to(device)
        nelbo.append(elbo_terms_by_row(model, xb, rows, seed, yb).neg_elbo.double().cpu())
        if k > 0:
            iw.append(iw_bound_by_row(model, xb, rows, k, seed, yb).double().cpu())
    nelbo_all = torch.cat(nelbo).numpy()
    return nelbo_all, (torch.cat(iw).numpy() if iw else np.full_like(nelbo_all, np.nan))


def roc_auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Probability that an anomalous sample scores higher than a normal one (ties count half):
    the area under the ROC curve, by the Mann-Whitney U statistic."""
    scores = np.concatenate([normal, anomalous])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    ranks = (sums / counts)[inverse]  # average ranks for ties
    n_a, n_n = len(anomalous), len(normal)
    return float((ranks[n_n:].sum() - n_a * (n_a + 1) / 2) / (n_a * n_n))


def usage_per_dim(model: torch.nn.Module, x: Tensor, y: Tensor | None = None) -> list[float]:
    """How much the model uses each latent dimension on the rows of x (labels ``y`` for a conditional VAE):
    the mean KL for a VAE, the variance of the codes mu(x) for the autoencoder (its KL is zero)."""
    if model.config.is_ae:
        return posterior_means(model, x, y=y).double().var(0).tolist()
    return kl_per_dim_on(model, x, y)


def kl_per_dim_on(model: torch.nn.Module, x: Tensor, y: Tensor | None = None) -> list[float]:
    """Mean KL of each latent dimension over the rows of x (labels ``y`` for a conditional VAE)."""
    from fastvae.data import DeviceData

    labels = None if y is None else y.cpu().numpy()
    data = DeviceData(x.cpu().numpy().astype(np.float32), _device(model), labels)
    return elbo_stats(model, data).kl_per_dim


def refuse_conditional(model: torch.nn.Module, what: str) -> None:
    """One clear line where a command is not defined for a conditional VAE."""
    if model.config.conditional:
        raise FastVAEError(f"{what} is not defined for a conditional VAE (trained with --conditional)")


def write_scores_csv(path: str, nelbo: np.ndarray, iw: np.ndarray, k: int) -> None:
    """index, -ELBO and (k > 0) the k-sample IW NLL per row, as CSV, written atomically."""
    import csv
    import io

    from fastvae.atomic import atomic_write_bytes

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "neg_elbo", *([f"iw_nll_k{k}"] if k else [])])
    for i, (e, q) in enumerate(zip(nelbo, iw)):
        w.writerow([i, f"{e:.4f}", *([f"{q:.4f}"] if k else [])])
    atomic_write_bytes(path, buf.getvalue().encode())
