"""The training objectives as small values built from the config: the one module that writes the loss.

:func:`of` gives a model's objective from its :class:`~fastvae.config.VAEConfig`:

- :class:`ELBO` ``(k)``: -log p(x|z) + beta * KL(q(z|x) || N(0, I)), the reconstruction term averaged over
  K draws (K = 1: Kingma & Welling's VAE; K > 1: the IWAE paper's "VAE, k = K" baseline), the KL in closed
  form, each latent dimension's batch-mean KL optionally floored by free bits (Kingma et al., 2016);
- :class:`IWAE` ``(k)``: the K-sample importance-weighted bound -log (1/K) sum_j w_j (Burda et al., 2015);
- :class:`Reconstruction`: the plain autoencoder's -log p(x|mu(x)), no noise and no KL.

Each owns its per-sample loss from the model's parts (``terms``), the figure training and evaluation report
(``report``) and that figure's name (``figure``), and whether the fused kernels cover it (``kernel_iw``: the
``iw`` flag the kernels take, None where they do not; ``noise``: whether the kernels draw its latent noise).
Every objective runs the one K-sample path :func:`draw` (K = 1 is its special case), and the importance
weights' log-ratio (:func:`log_ratio`) and the free-bits floor (:func:`free_bits_floor`) are written once.
A new objective is one class here plus its kernel flag. Outside the fused kernels and the ONNX graph, no
other module writes a loss: the model, the fused model, evaluation, the engine, the benchmark contenders
and the ONNX scorer all call these values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from fastvae.config import VAEConfig
from fastvae.errors import FastVAEError


class Networks(Protocol):
    """The parts of a model an objective reads (``ReferenceVAE`` has them)."""

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]: ...
    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor: ...
    def reconstruction_nll(self, x: Tensor, out: Tensor) -> Tensor: ...


@dataclass
class Terms:
    """One draw of an objective for a batch; every field is per sample."""

    loss: Tensor  # (B,) what training minimizes (its batch mean), free bits applied
    rec: Tensor  # (B,) -log p(x|z) (the mean over the K samples)
    kl: Tensor  # (B,) KL(q(z|x) || N(0, I)) summed over latent dimensions (IWAE: the K-sample mean of
    # log q(z_j|x) - log p(z_j), the Monte Carlo KL whose sum with rec is the K-sample mean -ELBO)
    kl_per_dim: Tensor | None = None  # (B, Z); None where a fused path reduces it in-kernel

    @property
    def neg_elbo(self) -> Tensor:
        """(B,) the -ELBO itself (beta = 1, no free bits), whatever the objective's settings."""
        return self.rec + self.kl


@dataclass
class Draw:
    """The model's parts for K latent draws per row: what every objective is built from."""

    mu: Tensor  # (B, Z)
    logvar: Tensor  # (B, Z)
    eps: Tensor | None  # (B, K, Z) standard normals; None for the deterministic z = mu
    z: Tensor  # (B, K, Z)
    rec: Tensor  # (B, K) -log p(x|z_j)
    rec_mean: Tensor  # (B,) its mean over the K draws (K = 1: the one draw's, no reduction)


# ---- the formulas, once -----------------------------------------------------------------------------------
def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) for each latent dimension, (B, Z), in closed form."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - torch.exp(logvar))


def free_bits_floor(kl: Tensor, free_bits: float) -> Tensor:
    """The KL (B, Z) as charged: a dimension whose batch-mean KL is under ``free_bits`` nats contributes the
    constant floor instead, so it gets no pressure towards the prior (the batch mean of the charged sum is
    sum_d max(KL_d, floor))."""
    if free_bits <= 0:
        return kl
    above = kl.detach().mean(0) >= free_bits  # (Z,): the dimensions the floor does not hold
    return torch.where(above, kl, torch.full_like(kl, free_bits))


def log_ratio(z: Tensor, eps: Tensor, logvar: Tensor) -> Tensor:
    """log q(z_j|x) - log p(z_j), (B, K), for draws z_j = mu + exp(logvar / 2) * eps_j: ``z`` and ``eps``
    (B, K, Z), ``logvar`` (B, 1, Z). The 2 pi terms cancel, and (z - mu)^2 / sigma^2 = eps^2."""
    return 0.5 * (z.pow(2) - eps.pow(2) - logvar).sum(-1)


def iw_log_weights(log_lik: Tensor, z: Tensor, eps: Tensor, logvar: Tensor) -> Tensor:
    """log p(x|z_j) + log p(z_j) - log q(z_j|x), (B, K), from ``log_lik`` (B, K): the importance weights of
    the IWAE objective, of ``ReferenceVAE.importance_weighted_bound`` and of the exported scorer."""
    return log_lik - log_ratio(z, eps, logvar)


def iw_nll(log_w: Tensor) -> Tensor:
    """-log (1/K) sum_i w_i from log-weights (B, K): the K-sample importance-weighted NLL, (B,)."""
    return -(torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1]))


def _mean_k(t: Tensor) -> Tensor:
    """(B, K) -> (B,) mean over the samples (K = 1: the column itself, no kernel)."""
    return t[:, 0] if t.shape[1] == 1 else t.mean(1)


def _check_eps(eps: Tensor, b: int, k: int, z_dim: int) -> Tensor:
    """``eps`` as (B, K, Z); (B, Z) is accepted for K = 1."""
    if eps.dim() == 2 and k == 1:
        eps = eps[:, None]
    # not while exporting: the batch sizes of x and eps are two symbols there, and comparing them would pin them
    if not torch.compiler.is_exporting() and tuple(eps.shape) != (b, k, z_dim):
        want = (b, z_dim) if k == 1 else (b, k, z_dim)
        raise FastVAEError(f"eps must be {want} (B, K, Z with K = {k}), got {tuple(eps.shape)}")
    return eps


def draw(
    model: Networks, x: Tensor, eps: Tensor | None, y: Tensor | None, k: int, *, noise: bool = True
) -> Draw:
    """The one K-sample path: encode x (B, D) (with labels ``y`` (B,) when conditional), draw K
    reparameterized z per row (``eps`` (B, K, Z), or (B, Z) for K = 1; drawn when None) and decode the B K
    rows (row i K + j is draw j of row i). ``noise`` False: the deterministic z = mu (``eps`` ignored)."""
    x = x.flatten(1)
    b = x.shape[0]  # shape[0], not len(): stays symbolic in an export
    mu, logvar = model.encode(x, y)  # (B, Z) each
    z_dim = mu.shape[-1]
    if not noise:
        eps, z_rows = None, mu
    else:
        if eps is None:
            eps = torch.randn(b, k, z_dim, dtype=mu.dtype, device=mu.device)
        eps = _check_eps(eps, b, k, z_dim)
        std = torch.exp(0.5 * logvar)  # the reparameterization trick: z_j = mu + std * eps_j
        # K = 1 on (B, Z) rows: the same values as the broadcast, without its views in the autograd graph
        z_rows = mu + std * eps[:, 0] if k == 1 else (mu[:, None] + std[:, None] * eps).reshape(b * k, z_dim)
    k = 1 if eps is None else k
    if k == 1:
        x_rows, y_rows = x, y
    else:  # expand, not repeat_interleave: the same rows, and a plain reshape in an exported graph
        x_rows = x[:, None].expand(b, k, x.shape[1]).reshape(b * k, x.shape[1])
        y_rows = None if y is None else y.repeat_interleave(k)
    rec_rows = model.reconstruction_nll(x_rows, model.decode(z_rows, y_rows))  # (B K,)
    rec = rec_rows.view(b, k)
    return Draw(mu, logvar, eps, z_rows.view(b, k, z_dim), rec, rec_rows if k == 1 else rec.mean(1))


# ---- the objectives -----------------------------------------------------------------------------------------
class Objective:
    """An objective: per-sample loss, reported figure, kernel flags. Subclasses are frozen dataclasses."""

    k: int = 1
    name: ClassVar[str]  # its name in the config (``objective``, or ``model`` "ae")
    figure: ClassVar[str]  # the name of the figure :meth:`report` gives
    kernel_iw: ClassVar[bool | None]  # the fused kernels' ``iw`` flag for it; None: they do not cover it
    noise: ClassVar[bool] = True  # draws latent noise (the fused training step draws it in-kernel)

    @property
    def multi(self) -> bool:
        """K samples reduced per row (K > 1, or an importance-weighted bound): the kernels' K-sample path."""
        return self.k > 1 or bool(self.kernel_iw)

    @property
    def label(self) -> str:
        """A short description for log lines, e.g. ``iwae k=5``."""
        return f"{self.name} k={self.k}"

    def terms(
        self,
        model: Networks,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor = 1.0,
        free_bits: float = 0.0,
    ) -> Terms:
        """The objective's per-sample terms for batch ``x`` through ``model``'s networks."""
        self.check(free_bits)
        return self.from_draw(draw(model, x, eps, y, self.k, noise=self.noise), beta, free_bits)

    def check(self, free_bits: float) -> None:
        """Raise :class:`FastVAEError` for an option this objective does not define."""

    def from_draw(self, d: Draw, beta: float | Tensor, free_bits: float) -> Terms:
        raise NotImplementedError

    def report(self, t: Terms, beta: float) -> Tensor:
        """(B,) the figure training and evaluation report, at the config's ``beta`` (no warm-up, no free
        bits): rec + beta * KL."""
        return t.rec + beta * t.kl

    def kernel_inputs(self, eps: Tensor | None, beta: float | Tensor | None, rows: int, z_dim: int, device):
        """(eps, beta) as the fused kernels take them for this objective."""
        return eps, beta

    def from_kernels(self, loss: Tensor, kl: Tensor, rec: Tensor | None, beta: Tensor) -> Terms:
        """Terms from the fused kernels' (loss, KL, rec or None for one sample): one sample's rec is
        loss - beta * KL."""
        return Terms(loss, (loss - beta * kl) if rec is None else rec, kl)


@dataclass(frozen=True)
class ELBO(Objective):
    """-log p(x|z) averaged over K draws + beta * the closed-form KL, free bits floored."""

    k: int = 1
    name: ClassVar[str] = "elbo"
    figure: ClassVar[str] = "-ELBO"
    kernel_iw: ClassVar[bool | None] = False

    def from_draw(self, d: Draw, beta: float | Tensor, free_bits: float) -> Terms:
        rec, kl = d.rec_mean, kl_per_dim(d.mu, d.logvar)  # (B,), (B, Z)
        return Terms(rec + beta * free_bits_floor(kl, free_bits).sum(-1), rec, kl.sum(-1), kl)


@dataclass(frozen=True)
class IWAE(ELBO):
    """-log (1/K) sum_j exp(log w_j), log w_j = -rec_j - beta (log q(z_j|x) - log p(z_j)): the
    importance-weighted bound at beta = 1 (beta < 1 weakens the prior term as KL warm-up does)."""

    name: ClassVar[str] = "iwae"
    figure: ClassVar[str] = "IWAE bound"
    kernel_iw: ClassVar[bool | None] = True

    def check(self, free_bits: float) -> None:
        if free_bits > 0:
            raise FastVAEError("free bits apply to the ELBO's closed-form KL, not to the IWAE objective")

    def from_draw(self, d: Draw, beta: float | Tensor, free_bits: float) -> Terms:
        self.check(free_bits)
        ratio = log_ratio(d.z, d.eps, d.logvar[:, None])  # (B, K)
        loss = iw_nll(-d.rec - beta * ratio)
        return Terms(loss, d.rec_mean, _mean_k(ratio), kl_per_dim(d.mu, d.logvar))

    def report(self, t: Terms, beta: float) -> Tensor:
        """The bound itself."""
        return t.loss


@dataclass(frozen=True)
class Reconstruction(Objective):
    """The plain autoencoder: -log p(x|z) at z = mu(x); no noise, no KL (so nothing to weight or floor)."""

    name: ClassVar[str] = "ae"
    figure: ClassVar[str] = "rec NLL"
    kernel_iw: ClassVar[bool | None] = False  # the ELBO's kernels at eps = 0 and beta = 0
    noise: ClassVar[bool] = False

    def from_draw(self, d: Draw, beta: float | Tensor, free_bits: float) -> Terms:
        rec, kl = d.rec_mean, torch.zeros_like(d.mu)
        return Terms(rec, rec, kl.sum(-1), kl)

    def report(self, t: Terms, beta: float) -> Tensor:
        return t.rec

    def kernel_inputs(self, eps: Tensor | None, beta: float | Tensor | None, rows: int, z_dim: int, device):
        return torch.zeros(rows, z_dim, device=device), 0.0

    def from_kernels(self, loss: Tensor, kl: Tensor, rec: Tensor | None, beta: Tensor) -> Terms:
        return Terms(loss, loss, torch.zeros_like(kl))


def of(config: VAEConfig) -> Objective:
    """The objective a model with ``config`` trains on."""
    if config.is_ae:
        return Reconstruction()
    return IWAE(config.k) if config.objective == "iwae" else ELBO(config.k)


def single_draw(config: VAEConfig) -> Objective:
    """The -ELBO of one draw at beta = 1, whatever the training objective (the autoencoder: its rec NLL):
    the figure evaluation and the exported scorer give for every model."""
    return Reconstruction() if config.is_ae else ELBO(1)
