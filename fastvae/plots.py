"""Figures drawn with matplotlib (the ``plot`` extra): the latent scatter and the anomaly-score histogram.
PNG grids of images need no matplotlib and live in ``fastvae.images``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FastVAEError("this figure needs matplotlib: pip install 'fastvae[plot]'") from None
    return plt


def latent_scatter(coords: np.ndarray, labels: np.ndarray | None, title: str, out: str | Path) -> None:
    """Scatter of (N, 2) latent coordinates, one colour per label when labels are given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    if labels is not None:
        for c in sorted(set(labels.tolist())):
            m = labels == c
            ax.scatter(
                coords[m, 0], coords[m, 1], s=3, alpha=0.6, label=str(c), color=plt.cm.tab10(int(c) % 10)
            )
        ax.legend(title="label", markerscale=4, loc="best", fontsize=8)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=3, alpha=0.6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def score_histogram(
    ref: np.ndarray, scores: np.ndarray, *, what: str, scored_name: str, auc: float, out: str | Path
) -> None:
    """Densities of anomaly scores of the scored data against the run's held-out test split."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = np.histogram_bin_edges(np.concatenate([ref, scores]), bins=60)
    ax.hist(ref, bins=bins, alpha=0.6, density=True, label=f"held-out test split ({len(ref)})")
    ax.hist(scores, bins=bins, alpha=0.6, density=True, label=f"{scored_name} ({len(scores)})")
    ax.set_xlabel(f"{what}, nats")
    ax.set_ylabel("density")
    ax.set_title(f"anomaly scores: ROC AUC {auc:.3f} (scored data vs test split)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
