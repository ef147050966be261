"""Evaluation: the test -ELBO (with its parts), the training objective, and the importance-weighted NLL.

Every noise draw here is keyed by the row's own index in the split and a fixed salt (``fastvae.noise``'s
row rule): the eps of the -ELBO, the k importance samples and the dynamic binarization of test images.
So no figure depends on the eval batch size, the IW chunk size, the number of ranks or the device, and
the -ELBO and the IW bound of a binarized run score the same binarized image: each test image is
binarized once per seed, the draw shared by all k samples, as in the IWAE protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from fastvae import objective as objectives
from fastvae.data import DeviceData
from fastvae.distributed import DistInfo
from fastvae.model import fixed_row_blocks
from fastvae.noise import binarize, row_normal
from fastvae.noise_keys import BINARIZE_SALT, EVAL_SALT, IW_SALT
from fastvae.objective import Terms


@dataclass
class ElboStats:
    neg_elbo: float  # mean per-sample -ELBO (nats): rec + KL, whatever beta training used
    objective: float  # mean rec + beta * KL at the model's configured beta: what training minimized
    rec: float  # mean -log p(x|z)
    kl: float  # mean KL(q(z|x) || p(z))
    kl_per_dim: list[float]  # mean KL of each latent dimension
    n: int

    @property
    def active_units(self) -> int:
        """Latent dimensions carrying more than 0.01 nats of KL: fewer means posterior collapse."""
        return sum(k > 0.01 for k in self.kl_per_dim)


def eval_rows(data: DeviceData, rows: Tensor, seed: int, binarized: bool) -> Tensor:
    """The evaluation view of test rows ``rows`` (indices into ``data``): float in [0, 1], binarized
    once per (seed, row) when the run trains on binarized data. Every consumer of test images uses it."""
    x = data.batch(rows.to(data.x.device))
    return binarize(x, seed, BINARIZE_SALT, rows) if binarized else x


def _shard(n: int, dist: DistInfo | None) -> range:
    """This rank's contiguous share of rows 0..n."""
    if dist is None or not dist.enabled:
        return range(0, n)
    per = -(-n // dist.world_size)
    return range(min(n, dist.rank * per), min(n, (dist.rank + 1) * per))


def _row_ids(start: int, stop: int, device: torch.device) -> Tensor:
    return torch.arange(start, stop, device=device)


@torch.no_grad()
def elbo_terms_by_row(
    model: torch.nn.Module, x: Tensor, rows: Tensor, seed: int, y: Tensor | None = None
) -> Terms:
    """For consecutive test rows ``rows`` (labels ``y`` for a conditional VAE) with their keyed eps:
    rec, KL and KL per dimension of one draw (the -ELBO, whatever the training objective), and as ``loss``
    the figure the objective reports (``fastvae.objective``, at the config's beta, no free bits; with K
    samples per row, their K draws, the first of which is the -ELBO's). The reference (plain PyTorch) path
    on every backend: it keeps the KL per latent dimension, which the report needs. Computed in row blocks
    aligned to the rows' indices: bit-identical in any batching."""
    cfg = model.config
    obj, z, k = objectives.of(cfg), cfg.latent_dim, cfg.k
    eps = row_normal(seed, EVAL_SALT, rows, k * z).to(x.device)  # (B, K Z)

    def parts(xb: Tensor, eb: Tensor, *yb: Tensor) -> Tensor:  # (R, 3 + Z): rec, kl, loss, kl per dim
        d = objectives.draw(model, xb, eb.view(len(xb), k, z), yb[0] if yb else None, k, noise=obj.noise)
        t = obj.from_draw(d, cfg.beta, 0.0)
        kl = t.kl_per_dim  # closed form: the -ELBO's, whatever the objective
        return torch.cat([torch.stack([d.rec[:, 0], kl.sum(-1), obj.report(t, cfg.beta)], -1), kl], -1)

    labels = () if y is None else (y,)
    p = fixed_row_blocks(parts, x.flatten(1), eps, *labels, offset=int(rows[0]) if len(rows) else 0)
    return Terms(p[:, 2], p[:, 0], p[:, 1], p[:, 3:])


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
    """Mean test -ELBO and objective with one reparameterized draw per sample."""
    was_training = model.training
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    z_dim = model.config.latent_dim
    device = data.x.device
    sums = torch.zeros(3 + z_dim, dtype=torch.float64, device=device)  # rec, kl, objective, kl per dim
    rows = _shard(n, dist)
    for start in range(rows.start, rows.stop, batch_size):
        idx = _row_ids(start, min(start + batch_size, rows.stop), device)
        o = elbo_terms_by_row(model, eval_rows(data, idx, seed, binarize), idx, seed, data.labels(idx))
        sums[0] += o.rec.double().sum()
        sums[1] += o.kl.double().sum()
        sums[2] += o.loss.double().sum()
        sums[3:] += o.kl_per_dim.double().sum(0)
    if dist is not None:
        dist.all_reduce_sum(sums)
    model.train(was_training)
    s = (sums / max(n, 1)).tolist()
    return ElboStats(s[0] + s[1], s[2], s[0], s[1], s[3:], n)


@torch.no_grad()
def iw_bound_by_row(
    model: torch.nn.Module, x: Tensor, rows: Tensor, k: int, seed: int, y: Tensor | None = None
) -> Tensor:
    """(B,) k-sample importance-weighted -log p(x) (-log p(x|y) with labels ``y``) of consecutive test rows
    ``rows``, draw j of row r keyed by (r, j)."""
    z_dim = model.config.latent_dim

    def noise(start: int, c: int) -> Tensor:  # (c, B, Z): columns start*Z .. (start+c)*Z of each row
        return (
            row_normal(seed, IW_SALT, rows, c * z_dim, start * z_dim)
            .view(len(rows), c, z_dim)
            .transpose(0, 1)
        )

    return model.importance_weighted_bound(
        x, k, noise=noise, row_offset=int(rows[0]) if len(rows) else 0, y=y
    )


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
        idx = _row_ids(start, min(start + batch_size, n), data.x.device)
        x = eval_rows(data, idx, seed, binarize)
        total += iw_bound_by_row(model, x, idx, k, seed, data.labels(idx)).double().sum().item()
    return total / max(n, 1)
