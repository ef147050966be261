"""The reference model's math, checked against independent computations (torch.distributions, float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from fastvae import ReferenceVAE, VAEConfig
from fastvae.model import kl_per_dim


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl_per_dim(mu, logvar), kl_divergence(q, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_negative_elbo_matches_hand_written_terms(activation):
    torch.manual_seed(1)
    cfg = VAEConfig(input_dim=12, hidden_dims=(7, 5), latent_dim=3, activation=activation, beta=0.7)
    model = ReferenceVAE(cfg).double()
    x = torch.rand(11, 12, dtype=torch.float64)
    eps = torch.randn(11, 3, dtype=torch.float64)
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    logits = model.decode(z)
    p = torch.sigmoid(logits)
    bce = -(x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum(-1)  # plain formula, float64
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(model.negative_elbo(x, eps), bce + 0.7 * kl, rtol=1e-10, atol=1e-10)


def test_gaussian_likelihood_matches_torch_distributions():
    torch.manual_seed(2)
    cfg = VAEConfig(input_dim=6, hidden_dims=(5,), latent_dim=2, likelihood="gaussian")
    model = ReferenceVAE(cfg).double()
    with torch.no_grad():
        model.output_logvar.copy_(torch.randn(6))
    x, out = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ref = -Normal(out, torch.exp(0.5 * model.output_logvar)).log_prob(x).sum(-1)
    torch.testing.assert_close(model.reconstruction_nll(x, out), ref)


def test_bce_with_logits_is_exact_for_saturated_logits():
    cfg = VAEConfig(input_dim=2, hidden_dims=(3,), latent_dim=1)
    model = ReferenceVAE(cfg)
    out = torch.tensor([[60.0, -60.0]])
    x = torch.tensor([[0.0, 1.0]])
    # sigmoid-then-BCE clamps log(0) at -100; the exact value is 60 nats per pixel
    torch.testing.assert_close(model.reconstruction_nll(x, out), torch.tensor([120.0]))


def test_importance_weighted_bound_against_independent_float64(tiny_config):
    torch.manual_seed(3)
    model = ReferenceVAE(tiny_config).double()
    x = torch.rand(4, 36, dtype=torch.float64).round()
    k = 50
    got = model.importance_weighted_bound(x, k, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(k, 4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mu, logvar = model.encode(x)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    z = mu + torch.exp(0.5 * logvar) * eps  # (k, B, Z)
    lik = Independent(Bernoulli(logits=model.decode(z)), 1).log_prob(x)
    log_w = lik + prior.log_prob(z) - q.log_prob(z)
    ref = -(torch.logsumexp(log_w, 0) - math.log(k))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_importance_weighted_bound_is_tighter_and_shrinks_with_k(tiny_config, monkeypatch):
    import fastvae.model as m

    torch.manual_seed(4)
    model = ReferenceVAE(tiny_config)
    x = torch.rand(64, 36).round()
    elbo = torch.stack([model.negative_elbo(x) for _ in range(200)]).mean(0)  # E[-ELBO], sample-averaged
    monkeypatch.setattr(m, "IW_DRAWS", 16)  # force several chunks of draws
    g = torch.Generator().manual_seed(0)
    iw = {k: model.importance_weighted_bound(x, k, generator=g).mean().item() for k in (1, 10, 100, 1000)}
    assert iw[1] == pytest.approx(elbo.mean().item(), abs=0.5)  # k = 1 is the ELBO in expectation
    assert iw[1000] <= iw[100] + 0.05 <= iw[10] + 0.1 <= iw[1] + 0.15
    assert iw[1000] < elbo.mean().item()


def test_sample_is_reproducible_and_in_range(tiny_config):
    model = ReferenceVAE(tiny_config)
    a = model.sample(5, generator=torch.Generator().manual_seed(1))
    b = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (5, 36) and torch.equal(a, b)
    assert ((a >= 0) & (a <= 1)).all()
    logits = model.decode(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(a, torch.sigmoid(logits))


def test_gradients_reach_mu_and_logvar(tiny_config):
    model = ReferenceVAE(tiny_config)
    x = torch.rand(3, 36)
    model.negative_elbo(x).sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert F.mse_loss(model.head.weight.grad, torch.zeros_like(model.head.weight)) > 0
