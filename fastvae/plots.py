"""Figures drawn with matplotlib (the ``plot`` extra): the latent scatter and the anomaly-score histogram.
PNG grids of images need no matplotlib and live in ``fastvae.images``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastvae.errors import require


def _pyplot():
    matplotlib = require("matplotlib", "this figure")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "this figure")


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


def compare_figure(summaries: list, out: str | Path) -> None:
    """One column per run (``fastvae.compare.RunSummary``): 8x8 prior samples, the interpolations, and
    the test posterior means where Z = 2 with the prior's 2-sigma circle; quality scores in the titles."""
    from fastvae.images import grid_array
    from fastvae.quality import ROWS

    plt = _pyplot()
    k, maps = len(summaries), any(s.codes is not None for s in summaries)
    ratios = [4, 1.6, 3.6] if maps else [4, 1.6, 0.3]  # no run with Z = 2: only a line of text there
    fig, axes = plt.subplots(
        3, k, figsize=(4.2 * k, 9.2 + 3.3 * maps), dpi=100, gridspec_kw={"height_ratios": ratios}
    )
    axes = np.asarray(axes).reshape(3, k)
    for col, s in enumerate(summaries):
        prior = s.quality.rows.get(ROWS[0])
        score = "" if prior is None else f"\nMNIST-FD {prior.mnist_fd:.1f}, confidence {prior.confidence:.2f}"
        ax = axes[0, col]
        ax.imshow(grid_array(s.samples, s.data_shape, 8), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{s.name}: {s.kind}, Z = {s.latent_dim}\nprior samples{score}", fontsize=9)
        ax = axes[1, col]
        per_row = len(s.interpolations) // 3
        ax.imshow(grid_array(s.interpolations, s.data_shape, per_row, pad=1), cmap="gray", vmin=0, vmax=255)
        mid = s.quality.rows.get(ROWS[1])
        extra = "" if mid is None else f" (midpoints: MNIST-FD {mid.mnist_fd:.1f})"
        ax.set_title(f"interpolations, same test pairs{extra}", fontsize=9)
        _latent_panel(plt, axes[2, col], s)
    for ax in axes[:2].ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _latent_panel(plt, ax, s) -> None:
    if s.codes is None:
        ax.text(0.5, 0.5, f"Z = {s.latent_dim}: no 2-D latent map", ha="center", va="center", fontsize=10)
        ax.set_axis_off()
        return
    c = s.codes
    colours = None if s.labels is None else [plt.cm.tab10(int(v) % 10) for v in s.labels]
    ax.scatter(c[:, 0], c[:, 1], s=2, alpha=0.5, c=colours)
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(2 * np.cos(t), 2 * np.sin(t), "k--", lw=1, label="N(0, I) 2-sigma")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"test codes mu(x), coloured by label\n(x {c[:, 0].min():.0f}..{c[:, 0].max():.0f}, "
                 f"y {c[:, 1].min():.0f}..{c[:, 1].max():.0f})", fontsize=9)  # fmt: skip


def traversal_figure(
    images: np.ndarray, data_shape: tuple[int, ...], labels: list[str], limit: float, out: str | Path
) -> None:
    """Latent traversals: one row per label, its images (rows * steps, D) left to right from -limit to
    +limit, each row labelled (latent, KL, the factor it carries)."""
    from fastvae.images import grid_array

    plt = _pyplot()
    steps = len(images) // max(1, len(labels))
    grid = grid_array(images, data_shape, ncol=steps)
    rows = len(labels)
    fig, ax = plt.subplots(figsize=(0.8 * steps + 2.4, 0.5 + 0.8 * rows), dpi=110)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    h = grid.shape[0] / max(1, rows)
    ax.set_yticks([h * (r + 0.5) for r in range(rows)], labels, fontsize=8)
    w = grid.shape[1] / max(1, steps)
    ax.set_xticks([w * 0.5, w * (steps - 0.5)], [f"{-limit:g}", f"+{limit:g}"], fontsize=8)
    ax.set_title("latent traversals (most KL first): z_j swept, the rest at mu(x)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def rate_distortion(rows: list[dict], out: str | Path) -> None:
    """KL (rate) against reconstruction NLL (distortion), one point per model, coloured by beta (Alemi et al.,
    2018, "Fixing a Broken ELBO"); ``rows``: a sweep's summary rows (test_kl, test_rec, beta, status)."""
    plt = _pyplot()
    done = [r for r in rows if r.get("test_kl") is not None and r.get("test_rec") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    betas = sorted({r["beta"] for r in done})
    cmap = plt.cm.viridis
    for j, b in enumerate(betas):
        pts = [r for r in done if r["beta"] == b]
        colour = cmap(j / max(len(betas) - 1, 1))
        ax.scatter([r["test_kl"] for r in pts], [r["test_rec"] for r in pts], s=36, color=colour,
                   label=f"beta {b:g}", edgecolors="k", linewidths=0.4)  # fmt: skip
    xs = np.array([r["test_kl"] for r in done] or [0.0])
    lo, hi = 0.0, float(xs.max()) * 1.05 + 1e-9
    ys = np.array([r["test_kl"] + r["test_rec"] for r in done] or [0.0])
    for e in np.unique(np.round(np.quantile(ys, [0.0, 0.5]), 1)):  # lines of equal -ELBO: rate + distortion
        ax.plot([lo, hi], [e - lo, e - hi], "k:", lw=0.8)
        ax.annotate(f"-ELBO {e:g}", (lo, e - lo), fontsize=7, ha="left", va="bottom")
    ax.set_xlabel("rate: test KL(q(z|x) || p(z)), nats")
    ax.set_ylabel("distortion: test -log p(x|z), nats")
    ax.set_title(f"rate-distortion of {len(done)} models (dotted: equal -ELBO)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def disentanglement_against_beta(rows: list[dict], out: str | Path) -> None:
    """A beta sweep on data with known factors: MIG and SAP (left axis) and the reconstruction NLL (right
    axis) against beta, one point per model; ``rows``: the sweep's summary rows (beta, mig, sap, test_rec)."""
    plt = _pyplot()
    done = sorted((r for r in rows if r.get("mig") is not None), key=lambda r: r["beta"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    betas = [r["beta"] for r in done]
    ax.scatter(betas, [r["mig"] for r in done], color="C0", label="MIG", edgecolors="k", linewidths=0.4)
    ax.scatter(betas, [r["sap"] for r in done], color="C1", marker="s", label="SAP", edgecolors="k", linewidths=0.4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("beta")
    ax.set_ylabel("disentanglement score")
    rec = ax.twinx()
    rec.scatter(betas, [r["test_rec"] for r in done], color="C2", marker="^", label="reconstruction")
    rec.set_ylabel("test -log p(x|z), nats")
    handles = ax.get_legend_handles_labels()
    more = rec.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    ax.set_title(f"MIG, SAP and reconstruction against beta ({len(done)} models)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
