"""The reference VAE in plain PyTorch: the definition every fast backend is checked against.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2013). The encoder gives q(z|x) = N(mu, diag
exp(logvar)); z = mu + exp(0.5 logvar) * eps with eps ~ N(0, I) (the reparameterization trick); the
decoder gives p(x|z), Bernoulli (logits) or Gaussian (mean, learned per-pixel log-variance); the prior
is N(0, I).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvae.config import VAEConfig

LOG_2PI = math.log(2.0 * math.pi)
_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}
# Rows (samples x importance draws) decoded at once by importance_weighted_bound: 32768 rows of 784
# logits is ~100 MB of fp32, so k = 5000 runs in chunks for any batch.
IW_ROWS_PER_CHUNK = 32768


class ReferenceVAE(nn.Module):
    """An MLP VAE whose four core methods read like the paper.

    Parameters (their ``state_dict`` keys are shared by every backend):
    ``encoder.{i}`` hidden layers, ``head`` (H -> 2Z, giving [mu | logvar]), ``decoder.{i}`` hidden
    layers (the encoder's widths mirrored), ``output`` (H -> D), and for the Gaussian likelihood
    ``output_logvar`` (D,), a per-pixel log-variance shared by all samples (a per-sample variance lets
    the decoder shrink it without bound on flat image regions; a per-pixel one is stable and is what
    the papers' continuous experiments use).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.flat_dim, *config.hidden_dims)
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], 2 * config.latent_dim)
        dec_widths = (config.latent_dim, *reversed(config.hidden_dims))
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec_widths[:-1], dec_widths[1:]))
        self.output = nn.Linear(dec_widths[-1], config.flat_dim)
        if config.likelihood == "gaussian":
            self.output_logvar = nn.Parameter(torch.zeros(config.flat_dim))
        self._act = _ACTIVATIONS[config.activation]

    # ---- the model -------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x): returns (mu, logvar), each (B, Z)."""
        h = x.flatten(1)  # (B, D)
        for layer in self.encoder:
            h = self._act(layer(h))  # (B, H)
        mu, logvar = self.head(h).chunk(2, dim=-1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
        """z = mu + sigma * eps: the noise is an input, so gradients reach mu and logvar."""
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        """p(x|z): Bernoulli logits (or the Gaussian mean), (B, D)."""
        h = z
        for layer in self.decoder:
            h = self._act(layer(h))
        return self.output(h)

    def negative_elbo(self, x: Tensor, eps: Tensor | None = None, *, beta: float | None = None) -> Tensor:
        """Per-sample -ELBO in nats, (B,): -log p(x|z) + beta * KL(q(z|x) || N(0, I)).

        ``eps`` (B, Z) is the standard-normal reparameterization noise, drawn when None. ``beta``
        overrides ``config.beta`` (KL warm-up schedules use it).
        """
        rec, kl = self.elbo_terms(x, eps)
        return rec + (self.config.beta if beta is None else beta) * kl.sum(-1)

    def forward(
        self, x: Tensor, eps: Tensor | None = None, *, beta: float | None = None, free_bits: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """Training step: (objective to minimize, a scalar; per-sample -ELBO (B,), detached).

        The objective is the batch mean of -log p(x|z) + beta * KL; with ``free_bits`` > 0 each latent
        dimension's batch-mean KL is floored at that many nats (Kingma et al., 2016), so dimensions under
        the floor get no pressure towards the prior. DDP calls this method.
        """
        rec, kl = self.elbo_terms(x, eps)
        beta = self.config.beta if beta is None else beta
        if free_bits > 0:
            objective = rec.mean() + beta * kl.mean(0).clamp(min=free_bits).sum()
        else:
            objective = (rec + beta * kl.sum(-1)).mean()
        return objective, (rec + self.config.beta * kl.sum(-1)).detach()

    # ---- pieces ----------------------------------------------------------------------------------
    def elbo_terms(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(-log p(x|z) (B,), KL per latent dimension (B, Z)) for one reparameterized draw."""
        x = x.flatten(1)
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = self.reparameterize(mu, logvar, eps)
        return self.reconstruction_nll(x, self.decode(z)), kl_per_dim(mu, logvar)

    def reconstruction_nll(self, x: Tensor, out: Tensor) -> Tensor:
        """-log p(x|z) summed over features, (B,), from the decoder's output ``out`` (B, D)."""
        x = x.flatten(1)
        if self.config.likelihood == "bernoulli":
            # BCE with logits, never sigmoid then BCE: the latter clamps log(0) and loses precision.
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        logvar = self.output_logvar
        return 0.5 * (LOG_2PI + logvar + (x - out).pow(2) * torch.exp(-logvar)).sum(-1)

    def mean_output(self, out: Tensor) -> Tensor:
        """The decoder's expected x: probabilities (Bernoulli) or the mean (Gaussian)."""
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out

    # ---- use -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, *, temperature: float = 1.0) -> Tensor:
        """n samples of E[x|z] with z ~ N(0, temperature^2 I): probabilities (n, D) for Bernoulli."""
        p = next(self.parameters())
        z = temperature * torch.randn(n, self.config.latent_dim, generator=generator, device=p.device)
        return self.mean_output(self.decode(z.to(p.dtype)))

    @torch.no_grad()
    def importance_weighted_bound(
        self, x: Tensor, k: int, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """-log p(x) estimated with k importance samples from q(z|x) (Burda et al., 2015), (B,) nats.

        log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x); the bound tightens as k grows and k = 5000
        is the NLL figure the IWAE paper reports. Computed in chunks of draws so any k fits in memory.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        x = x.flatten(1)
        b, z_dim = x.shape[0], self.config.latent_dim
        mu, logvar = self.encode(x)  # (B, Z)
        std = torch.exp(0.5 * logvar)
        chunk = max(1, min(k, IW_ROWS_PER_CHUNK // max(b, 1)))
        total = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            eps = torch.randn(c, b, z_dim, generator=generator, device=x.device, dtype=mu.dtype)
            z = mu + std * eps  # (c, B, Z)
            log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)  # (c, B)
            log_prior = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            out = self.decode(z.reshape(c * b, z_dim))
            log_lik = -self.reconstruction_nll(x.repeat(c, 1), out).view(c, b)
            log_w = (log_lik + log_prior - log_q).double()
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        return -(total - math.log(k)).to(mu.dtype)


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) for each latent dimension, (B, Z), in closed form."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - torch.exp(logvar))
