"""Runs side by side: prior samples, interpolations between the same test pairs, the 2-D latent map, the
test figures and the quality scores, as one figure (``fastvae.plots.compare_figure``) and one table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastvae.errors import FastVAEError
from fastvae.quality import ROWS, QualityReport, check_seed, run_quality

N_PAIRS = 3
STEPS = 8  # decoded points per interpolation, endpoints (the reconstructions) included


@dataclass
class RunSummary:
    name: str
    kind: str  # "AE", "VAE" or "beta-VAE (beta=4)"
    latent_dim: int
    data_shape: tuple[int, ...]
    samples: np.ndarray  # (64, D) prior samples E[x|z], z ~ N(0, I)
    interpolations: np.ndarray  # (N_PAIRS * (STEPS + 2), D): image a, the decoded line, image b, per pair
    codes: np.ndarray | None  # (N, 2) test posterior means where Z = 2
    labels: np.ndarray | None
    neg_elbo: float | None  # test -ELBO (None for the AE: it has no ELBO)
    rec_at_mean: float  # test -log p(x | z = mu(x)), the figure every model has
    quality: QualityReport


def kind_of(config) -> str:
    if config.is_ae:
        return "AE"
    return "VAE" if config.beta == 1 else f"beta-VAE (beta={config.beta:g})"


@torch.no_grad()
def rec_at_mean(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean -log p(x | z = mu(x)) over the rows of x: reconstruction error without sampling, in nats."""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        total += model.reconstruction_nll(xb, model.decode(model.encode(xb)[0])).double().sum().item()
    return total / len(x)


def test_pairs(n_test: int, seed: int = 0) -> list[tuple[int, int]]:
    """N_PAIRS (a, b) test indices drawn from the seed alone, so every run shows the same pairs."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_test, generator=g)[: 2 * N_PAIRS].view(N_PAIRS, 2)
    return [tuple(p) for p in idx.tolist()]


@torch.no_grad()
def summarize(
    run, name: str, pairs: list[tuple[int, int]], *, n_quality: int = 5000, seed: int = 0
) -> RunSummary:
    """Everything the comparison shows of one loaded run (:func:`fastvae.runs.load_run`)."""
    from fastvae.evaluate import elbo_stats
    from fastvae.toolkit import interpolate, posterior_means, prior_samples

    model, cfg = run.model, run.config
    samples = prior_samples(model, 64, seed).float().cpu().numpy()
    lines = []
    for a, b in pairs:
        xa, xb = run.test_images(a, a + 1), run.test_images(b, b + 1)
        lines += [xa.cpu(), interpolate(model, xa[0], xb[0], STEPS).float().cpu(), xb.cpu()]
    x = run.test_images()
    codes = posterior_means(model, x[:5000]).numpy() if cfg.latent_dim == 2 else None
    labels = None if run.labels is None or codes is None else np.asarray(run.labels)[: len(codes)]
    neg_elbo = (
        None if cfg.is_ae else elbo_stats(model, run.test, seed=run.seed, binarize=run.binarized).neg_elbo
    )
    return RunSummary(name, kind_of(cfg), cfg.latent_dim, cfg.data_shape, samples, torch.cat(lines).numpy(),
                      codes, labels, neg_elbo, rec_at_mean(model, x),
                      run_quality(run, n_quality, seed))  # fmt: skip


def compare_runs(paths: list[str], names: list[str] | None = None, *, device="cpu", n_quality: int = 5000,
                 seed: int = 0) -> list[RunSummary]:  # fmt: skip
    """Load and summarize each run; they must share a data shape and test split size."""
    from fastvae.runs import load_run
    from fastvae.toolkit import refuse_conditional

    seed = check_seed(seed)  # before minutes of loading and scoring
    if len(paths) < 2:
        raise FastVAEError("compare needs at least two run directories")
    if names is not None and len(names) != len(paths):
        raise FastVAEError(f"--names gives {len(names)} names for {len(paths)} runs")
    runs = [load_run(p, device) for p in paths]
    for r in runs:
        refuse_conditional(r.model, f"fastvae compare ({r.path})")
    shapes, sizes = {r.config.data_shape for r in runs}, {len(r.test) for r in runs}
    if len(shapes) != 1 or len(sizes) != 1:
        raise FastVAEError("compare needs runs on the same data (same sample shape and test split)")
    pairs = test_pairs(sizes.pop(), seed)
    names = names or [r.path.name for r in runs]
    return [summarize(r, n, pairs, n_quality=n_quality, seed=seed) for r, n in zip(runs, names)]


def _f(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pair(prior, mid, attr: str, digits: int) -> str:
    if prior is None:
        return "unavailable"
    return f"{getattr(prior, attr):.{digits}f} / {getattr(mid, attr):.{digits}f}"


def table(summaries: list[RunSummary]) -> str:
    """A Markdown table, one row per run; quality columns for prior samples (prior) and midpoints (mid)."""
    head = ("| run | model | Z | test -ELBO | test rec NLL at z=mu | confidence prior / mid | "
            "class entropy bits prior / mid | MNIST-FD prior / mid |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for s in summaries:
        q = s.quality.rows
        prior, mid = q.get(ROWS[0]), q.get(ROWS[1])

        lines.append(f"| {s.name} | {s.kind} | {s.latent_dim} | {_f(s.neg_elbo)} | {_f(s.rec_at_mean)} | "
                     f"{_pair(prior, mid, 'confidence', 3)} | {_pair(prior, mid, 'entropy_bits', 2)} | {_pair(prior, mid, 'mnist_fd', 1)} |")  # fmt: skip
    # the floor and the judge's accuracy come from the first run that has scores: an unlabelled run
    # (first or not) has neither
    judged = next((s.quality for s in summaries if s.quality.rows), None)
    real = None if judged is None else judged.rows.get(ROWS[2])
    if real is not None:
        acc = judged.classifier_accuracy
        lines.append(f"\nReal held-out test images score confidence {real.confidence:.3f}, entropy "
                     f"{real.entropy_bits:.2f} bits, MNIST-FD {real.mnist_fd:.1f} (the floor for n = {real.n}); "
                     f"the judge's test accuracy is {acc:.4f}.")  # fmt: skip
    for s in summaries:
        if s.quality.unavailable:
            lines.append(f"\n{s.name}: {s.quality.unavailable}.")
    return "\n".join(lines)
