"""Evaluation: test -ELBO (with its parts) and the importance-weighted NLL estimate, in nats."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from fastvae.data import DeviceData
from fastvae.distributed import DistInfo
from fastvae.noise import keyed_generator

# Salts that keep evaluation noise apart from training noise drawn with the same seed.
EVAL_SALT = 1_000_003
BINARIZE_SALT = 2_000_003
IW_SALT = 3_000_017


@dataclass
class ElboStats:
    loss: float  # mean per-sample -ELBO (nats): rec + beta * KL
    rec: float  # mean -log p(x|z)
    kl: float  # mean KL(q(z|x) || p(z))
    kl_per_dim: list[float]  # mean KL of each latent dimension
    n: int

    @property
    def active_units(self) -> int:
        """Latent dimensions carrying more than 0.01 nats of KL: fewer means posterior collapse."""
        return sum(k > 0.01 for k in self.kl_per_dim)


def eval_batch(data: DeviceData, start: int, stop: int, seed: int, binarize: bool) -> Tensor:
    """Rows start..stop of ``data`` as float; binarized with noise keyed by the row index when asked."""
    x = data.batch(torch.arange(start, stop, device=data.x.device))
    if binarize:
        g = keyed_generator(seed + BINARIZE_SALT, start, x.device)
        x = (torch.rand(x.shape, generator=g, device=x.device) < x).float()
    return x


def _shard(n: int, dist: DistInfo | None) -> range:
    """This rank's contiguous share of rows 0..n."""
    if dist is None or not dist.enabled:
        return range(0, n)
    per = -(-n // dist.world_size)
    return range(min(n, dist.rank * per), min(n, (dist.rank + 1) * per))


@torch.no_grad()
def elbo_stats(
    model: torch.nn.Module,
    data: DeviceData,
    *,
    seed: int = 0,
    batch_size: int = 1000,
    binarize: bool = False,
    limit: int | None = None,
    dist: DistInfo | None = None,
) -> ElboStats:
    """Mean test -ELBO with one reparameterized draw per sample, the noise keyed by the sample index
    (so the figure does not depend on the batch size or the number of ranks)."""
    was_training = model.training
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    z_dim = model.config.latent_dim
    device = data.x.device
    sums = torch.zeros(3 + z_dim, dtype=torch.float64, device=device)
    rows = _shard(n, dist)
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        x = eval_batch(data, start, stop, seed, binarize)
        g = keyed_generator(seed + EVAL_SALT, start, device)
        eps = torch.randn(stop - start, z_dim, generator=g, device=device)
        rec, kl = model.elbo_terms(x, eps)
        loss = rec + model.config.beta * kl.sum(-1)
        sums[0] += loss.double().sum()
        sums[1] += rec.double().sum()
        sums[2] += kl.double().sum()
        sums[3:] += kl.double().sum(0)
    if dist is not None:
        dist.all_reduce_sum(sums)
    model.train(was_training)
    s = (sums / max(n, 1)).tolist()
    return ElboStats(s[0], s[1], s[2], s[3:], n)


@torch.no_grad()
def importance_weighted_nll(
    model: torch.nn.Module,
    data: DeviceData,
    k: int = 5000,
    *,
    seed: int = 0,
    batch_size: int = 100,
    binarize: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> float:
    """Mean k-sample importance-weighted estimate of -log p(x) over the test split (nats)."""
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    total = 0.0
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=f"IW k={k}", disable=not progress, leave=False):
        stop = min(start + batch_size, n)
        x = eval_batch(data, start, stop, seed, binarize)
        g = keyed_generator(seed + IW_SALT, start, data.x.device)
        total += model.importance_weighted_bound(x, k, generator=g).double().sum().item()
    return total / max(n, 1)
