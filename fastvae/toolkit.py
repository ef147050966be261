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
from fastvae.noise import keyed_generator


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prior_samples(model: torch.nn.Module, n: int, seed: int) -> Tensor:
    """n samples of E[x|z], z ~ N(0, I) drawn from a generator keyed by ``seed``: the same images in a
    run's samples.png, in ``fastvae compare`` and in ``fastvae quality`` for one seed. (n, D) on the model's
    device."""
    return model.sample(n, generator=keyed_generator(seed, 0, _device(model)))


@torch.no_grad()
def interpolate(model: torch.nn.Module, x_a: Tensor, x_b: Tensor, steps: int = 10) -> Tensor:
    """Decode the straight line between the posterior means of x_a and x_b: (steps, D), endpoints
    included (they are the two reconstructions)."""
    if steps < 2:
        raise FastVAEError(f"steps must be >= 2, got {steps}")
    mu, _ = model.encode(torch.stack([x_a.flatten(), x_b.flatten()]).to(_device(model)))  # (2, Z)
    t = torch.linspace(0.0, 1.0, steps, device=mu.device)[:, None]  # (steps, 1)
    z = (1 - t) * mu[0] + t * mu[1]  # (steps, Z)
    return model.mean_output(model.decode(z))


def most_active_dims(kl_per_dim: list[float] | Tensor, k: int = 2) -> list[int]:
    """Indices of the k latent dimensions with the largest average KL (the ones the model uses)."""
    kl = torch.as_tensor(kl_per_dim, dtype=torch.float64)
    return sorted(torch.argsort(kl, descending=True)[:k].tolist())


@torch.no_grad()
def manifold(
    model: torch.nn.Module, n: int = 20, dims: tuple[int, int] = (0, 1), edge: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Decode an n x n grid of z whose coordinates in ``dims`` are the standard normal's quantiles at
    linspace(edge, 1 - edge, n) (the AEVB paper's figure of the learned MNIST manifold), the other
    coordinates held at 0. Returns (images (n*n, D), grid values (n,)); row r varies dims[0] downwards."""
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
    return model.mean_output(model.decode(z.view(n * n, z_dim).to(device))), vals


@torch.no_grad()
def posterior_means(model: torch.nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """mu(x) for every row of x, (N, Z), on the CPU."""
    device = _device(model)
    out = [model.encode(x[i : i + batch_size].to(device))[0].cpu() for i in range(0, len(x), batch_size)]
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
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-sample -ELBO and k-sample importance-weighted NLL (nats): higher means more unusual;
    ``progress`` shows a bar (with an ETA) on stderr."""
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
        nelbo.append(elbo_terms_by_row(model, xb, rows, seed).neg_elbo.double().cpu())
        if k > 0:
            iw.append(iw_bound_by_row(model, xb, rows, k, seed).double().cpu())
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


def usage_per_dim(model: torch.nn.Module, x: Tensor) -> list[float]:
    """How much the model uses each latent dimension on the rows of x: the mean KL for a VAE, the variance
    of the codes mu(x) for the autoencoder (its KL is zero)."""
    if model.config.is_ae:
        return posterior_means(model, x).double().var(0).tolist()
    return kl_per_dim_on(model, x)


def kl_per_dim_on(model: torch.nn.Module, x: Tensor) -> list[float]:
    """Mean KL of each latent dimension over the rows of x."""
    from fastvae.data import DeviceData

    data = DeviceData(x.cpu().numpy().astype(np.float32), _device(model))
    return elbo_stats(model, data).kl_per_dim


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
