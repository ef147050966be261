"""Evaluation does not depend on how it is batched: every draw is keyed by the row's own index."""

import numpy as np
import pytest
import torch

from fastvae import ReferenceVAE, VAEConfig, elbo_stats, importance_weighted_nll
from fastvae import model as model_module
from fastvae.data import DeviceData
from fastvae.evaluate import elbo_terms_by_row, eval_rows, iw_bound_by_row
from fastvae.noise import row_normal, row_uniform

CFG = VAEConfig(input_dim=50, hidden_dims=(33,), latent_dim=5, activation="tanh")
N = 1000


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ReferenceVAE(CFG).eval()
    x = (np.random.default_rng(1).random((N, 50)) * 255).astype(np.uint8)
    return model, DeviceData(x, torch.device("cpu"))


def _per_sample(model, data, bs, binarized=True):
    out = []
    for start in range(0, N, bs):
        rows = torch.arange(start, min(start + bs, N))
        out.append(elbo_terms_by_row(model, eval_rows(data, rows, 7, binarized), rows, 7).neg_elbo)
    return torch.cat(out)


def test_per_sample_elbo_is_bit_identical_across_batch_sizes(setup):
    model, data = setup
    a, b, c = (_per_sample(model, data, bs) for bs in (1000, 333, 64))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_elbo_stats_do_not_depend_on_batch_size(setup):
    model, data = setup
    stats = [elbo_stats(model, data, seed=7, batch_size=bs, binarize=True) for bs in (1000, 333, 64)]
    assert stats[0].neg_elbo == pytest.approx(stats[1].neg_elbo, rel=1e-12)
    assert stats[0].neg_elbo == pytest.approx(stats[2].neg_elbo, rel=1e-12)


def test_iw_bound_is_bit_identical_across_batch_and_chunk_sizes(setup, monkeypatch):
    model, data = setup
    rows_all = torch.arange(200)
    x = eval_rows(data, rows_all, 7, True)

    def iw(bs, draws, group):
        monkeypatch.setattr(model_module, "IW_DRAWS", draws)
        monkeypatch.setattr(model_module, "IW_GROUP", group)
        parts = [
            iw_bound_by_row(model, x[s : s + bs], rows_all[s : s + bs], 60, 7) for s in range(0, 200, bs)
        ]
        return torch.cat(parts)

    ref = iw(200, 512, 8)
    for bs in (37, 100, 64, 1):
        assert torch.equal(iw(bs, 512, 8), ref), bs
    # the memory schedule (draws per block, rows per block) moves values by rounding only
    torch.testing.assert_close(iw(64, 7, 3), ref, rtol=1e-6, atol=1e-5)


class _Rank:
    """A DistInfo stand-in for one of ``world`` ranks whose all-reduce is left to the test."""

    enabled = True

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world

    def all_reduce_sum(self, t):
        return t


def test_two_ranks_give_the_same_totals_as_one_process(setup):
    model, data = setup
    one = elbo_stats(model, data, seed=7, batch_size=128, binarize=True)
    # each rank returns its share of the sums over all N rows; adding them is what the all-reduce does
    parts = [elbo_stats(model, data, seed=7, batch_size=128, binarize=True, dist=_Rank(r, 2)) for r in (0, 1)]
    assert parts[0].neg_elbo + parts[1].neg_elbo == pytest.approx(one.neg_elbo, rel=1e-12)
    assert parts[0].kl + parts[1].kl == pytest.approx(one.kl, rel=1e-12)


def test_elbo_and_iw_score_the_same_binarized_images(setup, monkeypatch):
    """Batches of 1000 for the -ELBO and of 100 for the IW bound: every row gets the same binarized image."""
    model, data = setup
    seen = {"elbo": {}, "iw": {}}

    def spy(kind, orig):
        def wrapped(m, x, rows, *args):
            for r, xi in zip(rows.tolist(), x):
                seen[kind][r] = xi.clone()
            return orig(m, x, rows, *args)

        return wrapped

    import fastvae.evaluate as ev

    monkeypatch.setattr(ev, "elbo_terms_by_row", spy("elbo", ev.elbo_terms_by_row))
    monkeypatch.setattr(ev, "iw_bound_by_row", spy("iw", ev.iw_bound_by_row))
    elbo_stats(model, data, seed=7, batch_size=1000, binarize=True)
    importance_weighted_nll(model, data, 3, seed=7, batch_size=100, binarize=True, limit=300)
    assert len(seen["iw"]) == 300
    for r, xi in seen["iw"].items():
        assert torch.equal(xi, seen["elbo"][r]), r
    assert set(torch.unique(seen["iw"][0]).tolist()) <= {0.0, 1.0}


def test_binarization_probability_and_independence(setup):
    """Pixel j of row r is 1 with probability x[r, j]; rows and seeds give unrelated draws."""
    _, data = setup
    rows = torch.arange(N)
    p = data.batch(rows)
    b = eval_rows(data, rows, 7, True)
    assert float((b - p).mean()) == pytest.approx(0.0, abs=3e-3)  # E[b] = p, 50,000 pixels
    assert not torch.equal(b, eval_rows(data, rows, 8, True))
    u = row_uniform(7, 1, rows, 64)
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.01


def test_row_normal_matches_a_standard_normal():
    """Moments and a Kolmogorov-Smirnov distance against the exact normal CDF (float64)."""
    z = row_normal(0, 11, torch.arange(2000), 100).double().flatten()  # 200,000 draws
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.01
    s, _ = torch.sort(z)
    cdf = torch.distributions.Normal(0.0, 1.0).cdf(s)
    emp = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
    assert float((cdf - emp).abs().max()) < 1.63 / len(s) ** 0.5  # KS at the 1% level


def test_reported_names_say_what_they_are(setup):
    """test -ELBO is rec + KL whatever beta; the objective is rec + beta * KL."""
    model, data = setup
    beta_model = ReferenceVAE(CFG.replace(beta=0.25)).eval()
    beta_model.load_state_dict(model.state_dict())
    s = elbo_stats(beta_model, data, seed=7)
    assert s.neg_elbo == pytest.approx(s.rec + s.kl, rel=1e-12)
    assert s.objective == pytest.approx(s.rec + 0.25 * s.kl, rel=1e-9)
    assert s.neg_elbo == pytest.approx(elbo_stats(model, data, seed=7).neg_elbo, rel=1e-12)
