"""fastvae.objective: each objective value against formulas written here with torch.distributions in
float64 (not with the module under test), its one K-sample path, and the one fused-path decision."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from fastvae import ReferenceVAE, VAEConfig
from fastvae import objective as objectives
from fastvae.errors import FastVAEError

B, K, Z = 9, 4, 3


def _model(cfg: VAEConfig, seed: int = 0) -> ReferenceVAE:
    torch.manual_seed(seed)
    return ReferenceVAE(cfg).double()


def _by_hand(model, x, eps):
    """(log p(x|z_j) (B, K), log p(z_j) (B, K), log q(z_j|x) (B, K), closed-form KL (B, Z)) in float64."""
    mu, logvar = model.encode(x)
    q = Normal(mu[:, None], torch.exp(0.5 * logvar)[:, None])
    z = q.loc + q.scale * eps  # (B, K, Z)
    logits = torch.stack([model.decode(z[:, j]) for j in range(z.shape[1])], 1)  # (B, K, D), a row at a time
    log_lik = Bernoulli(logits=logits, validate_args=False).log_prob(x[:, None].expand_as(logits)).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = q.log_prob(z).sum(-1)
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return log_lik, log_p, log_q, kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), p)


@pytest.fixture
def batch(tiny_config):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, tiny_config.flat_dim, generator=g, dtype=torch.float64)
    return x, torch.randn(B, K, Z, generator=g, dtype=torch.float64)


def test_of_builds_each_objective_from_the_config(tiny_config):
    cfg = tiny_config
    assert objectives.of(cfg) == objectives.ELBO(1)
    assert objectives.of(dataclasses.replace(cfg, k=5)) == objectives.ELBO(5)
    assert objectives.of(dataclasses.replace(cfg, objective="iwae", k=5)) == objectives.IWAE(5)
    assert objectives.of(dataclasses.replace(cfg, model="ae")) == objectives.Reconstruction()
    # the kernels' flags: K samples reduced per row for k > 1 or an importance-weighted bound
    assert [o.multi for o in (objectives.ELBO(1), objectives.ELBO(2), objectives.IWAE(1))] == [
        False,
        True,
        True,
    ]
    assert (objectives.ELBO(3).kernel_iw, objectives.IWAE(3).kernel_iw) == (False, True)
    assert not objectives.Reconstruction().noise and objectives.Reconstruction().k == 1


def test_elbo_k_averages_the_reconstruction_over_k_draws(tiny_config, batch):
    cfg = dataclasses.replace(tiny_config, k=K)
    model, (x, eps) = _model(cfg), batch
    t = objectives.ELBO(K).terms(model, x, eps, beta=0.3)
    log_lik, _, _, kl = _by_hand(model, x, eps)
    torch.testing.assert_close(t.rec, -log_lik.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.kl_per_dim, kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.loss, -log_lik.mean(1) + 0.3 * kl.sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(objectives.ELBO(K).report(t, 0.3), t.loss, rtol=0, atol=0)


def test_iwae_is_the_importance_weighted_bound(tiny_config, batch):
    cfg = dataclasses.replace(tiny_config, objective="iwae", k=K)
    model, (x, eps) = _model(cfg), batch
    t = model.objective(x, eps, beta=1.0)
    log_lik, log_p, log_q, kl = _by_hand(model, x, eps)
    want = -(torch.logsumexp(log_lik + log_p - log_q, 1) - math.log(K))
    torch.testing.assert_close(t.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.kl, (log_q - log_p).mean(1), rtol=1e-12, atol=1e-12)  # the Monte Carlo KL
    torch.testing.assert_close(t.kl_per_dim, kl, rtol=1e-12, atol=1e-12)
    # beta < 1 weakens the prior term inside the weights
    half = -(torch.logsumexp(log_lik - 0.5 * (log_q - log_p), 1) - math.log(K))
    torch.testing.assert_close(model.objective(x, eps, beta=0.5).loss, half, rtol=1e-12, atol=1e-12)
    assert objectives.IWAE(K).report(t, 1.0) is t.loss  # training reports the bound itself
    with pytest.raises(FastVAEError, match="free bits"):
        model.objective(x, eps, free_bits=0.1)


def test_importance_weights_are_written_once_and_match_the_densities(tiny_config, batch):
    model, (x, eps) = _model(tiny_config), batch
    mu, logvar = model.encode(x)
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * eps
    _, log_p, log_q, _ = _by_hand(model, x, eps)
    got = objectives.log_ratio(z, eps, logvar[:, None])
    torch.testing.assert_close(got, log_q - log_p, rtol=1e-12, atol=1e-12)


def test_reconstruction_is_the_autoencoder_loss(tiny_config, batch):
    cfg = dataclasses.replace(tiny_config, model="ae")
    model, (x, eps) = _model(cfg), batch
    t = model.objective(x, eps[:, 0])  # eps is ignored: z = mu(x)
    mu, _ = model.encode(x)
    want = F.binary_cross_entropy_with_logits(model.decode(mu), x, reduction="none").sum(-1)
    torch.testing.assert_close(t.loss, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(t.rec, t.loss) and not t.kl.any() and not t.kl_per_dim.any()
    assert torch.equal(objectives.Reconstruction().report(t, 1.0), t.rec)


def test_k_equal_one_is_the_k_sample_path_and_k_copies_of_one_draw_agree(tiny_config, batch):
    model, (x, eps) = _model(tiny_config), batch
    one = objectives.ELBO(1).terms(model, x, eps[:, 0], beta=0.7)
    shaped = objectives.ELBO(1).terms(model, x, eps[:, :1], beta=0.7)  # (B, 1, Z): the same draw
    same = objectives.ELBO(K).terms(model, x, eps[:, :1].expand(B, K, Z), beta=0.7)  # K copies of it
    for a in (shaped, same):
        torch.testing.assert_close(a.loss, one.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.rec, one.rec, rtol=1e-12, atol=1e-12)


def test_the_free_bits_floor_charges_the_floor_under_it():
    kl = torch.rand(50, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.2
    floor = 0.1
    charged = objectives.free_bits_floor(kl, floor)
    torch.testing.assert_close(charged.sum(-1).mean(), kl.mean(0).clamp(min=floor).sum(), rtol=1e-12, atol=0)
    assert objectives.free_bits_floor(kl, 0.0) is kl


def test_a_badly_shaped_eps_is_one_clear_error(tiny_config, batch):
    model, (x, eps) = _model(dataclasses.replace(tiny_config, k=K)), batch
    with pytest.raises(FastVAEError, match="eps must be"):
        model.objective(x, eps[:, :2])
    with pytest.raises(FastVAEError, match="eps must be"):
        _model(tiny_config).objective(x, eps[:, :, :2])


def test_plan_for_is_the_one_fused_decision(tiny_config):
    pytest.importorskip("triton")
    from fastvae.fused import FusedVAE
    from fastvae.kernels.activations import ACT_CODES
    from fastvae.kernels.vae import Plan

    cfg = dataclasses.replace(tiny_config, classes=4, objective="iwae", k=3)
    plan = FusedVAE(cfg).plan_for(32, torch.bfloat16)
    assert plan == Plan(32, 36, (17,), 3, ACT_CODES["tanh"], torch.bfloat16, 4, 3, True)
    assert FusedVAE(dataclasses.replace(cfg, likelihood="gaussian")).plan_for(32, torch.float32) == (
        "likelihood 'gaussian'"
    )
    elbo = FusedVAE(tiny_config)
    assert elbo.plan_for(32, torch.float32, free_bits=0.1) == "free bits"
    assert elbo.plan_for(32, torch.float32, grad_x=True) == "a gradient w.r.t. x"
    ae = FusedVAE(dataclasses.replace(tiny_config, model="ae"))
    assert isinstance(ae.plan_for(32, torch.float32), Plan)  # under autograd: eps = 0, beta = 0
    assert "in-kernel" in ae.plan_for(32, torch.float32, step=True)  # the whole step draws noise
