"""What changes from step to step of a run, each a function of (config, step) alone: the learning rate,
the KL weight, the epoch's shuffle and the training noise. Keyed so that a resumed run, or N ranks, see
exactly what one uninterrupted process would.
"""

from __future__ import annotations

import math

import torch

from fastvae.config import TrainConfig
from fastvae.noise import binarize, keyed_generator, row_normal
from fastvae.noise_keys import SHUFFLE_SALT, TRAIN_BINARIZE_SALT, TRAIN_EPS_SALT


def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate for ``step`` (0-based) of a run of ``total_steps``."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    return cfg.lr


def kl_beta(warmup_steps: int, beta: float, step: int) -> float:
    """KL weight at ``step`` (0-based): linear from beta / warmup_steps up to beta, then constant."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)


def epoch_permutation(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    g = keyed_generator(seed + SHUFFLE_SALT, epoch, device)
    return torch.randperm(n, generator=g, device=device)


def sample_ids(epoch: int | torch.Tensor, n_train: int, idx: torch.Tensor) -> torch.Tensor:
    """Run-wide ids of training samples: epoch * n_train + data index. The training noise of a sample is
    keyed by it, so it does not depend on the batch, the rank or an interruption, and it needs no step
    counter (the engine keeps ``epoch * n_train`` in a device scalar written once per epoch)."""
    return epoch * n_train + idx


def step_noise(
    seed: int, ids: torch.Tensor, x: torch.Tensor, z_dim: int, binarized: bool, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, binarized when asked; eps (B, Z), or (B, K, Z) for ``k`` latent samples per row) for the samples
    ``ids`` (:func:`sample_ids`), both by the row rule of ``fastvae.noise``: a sample's noise does not
    depend on the rank that trains it, and sample j of a row is its columns j Z .. (j + 1) Z."""
    if binarized:
        x = binarize(x, seed, TRAIN_BINARIZE_SALT, ids)
    eps = row_normal(seed, TRAIN_EPS_SALT, ids, k * z_dim).to(x.device)
    return x, eps if k == 1 else eps.view(len(ids), k, z_dim)
