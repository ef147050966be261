"""FusedVAE: the reference model with its training objective (forward + backward) on Triton.

Same parameters, ``state_dict`` keys and public methods as :class:`ReferenceVAE`, so weights move freely
between the two. ``objective`` (and so ``negative_elbo`` and ``forward``) runs the fused kernels
(``fastvae.kernels.vae``);
``encode``, ``decode``, ``sample`` and ``importance_weighted_bound`` are inference paths and use the
plain PyTorch layers they inherit. What the kernels do not implement (the Gaussian likelihood, free bits)
falls back to the reference path with a one-line notice on stderr.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from fastvae.config import VAEConfig
from fastvae.errors import FastVAEError
from fastvae.model import Objective, ReferenceVAE

_NOTICED: set[str] = set()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_can_run(device: torch.device) -> bool:
    """True where the Triton kernels can run: a CUDA device, or the CPU under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _notice(what: str) -> None:
    if what not in _NOTICED:
        _NOTICED.add(what)
        print(
            f"fastvae: {what}: the fused kernels do not cover it; using the reference PyTorch path",
            file=sys.stderr,
        )


class FusedVAE(ReferenceVAE):
    """An MLP VAE whose training step runs on fused Triton kernels (CUDA, or the CPU interpreter)."""

    def __init__(self, config: VAEConfig, seed: int = 0) -> None:
        super().__init__(config)
        # [seed, counter] for the in-kernel noise: a device tensor advanced by the kernels themselves.
        # Not persistent: state_dict keys stay those of ReferenceVAE.
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64), persistent=False)
        self._beta_cache: dict[tuple[float, str], Tensor] = {}

    def _beta(self, beta: float | Tensor | None, device: torch.device) -> Tensor:
        if isinstance(beta, Tensor):
            return beta
        value = float(self.config.beta if beta is None else beta)
        key = (value, str(device))
        if key not in self._beta_cache:  # one small copy per distinct value, none per step
            self._beta_cache[key] = torch.tensor(value, dtype=torch.float32, device=device)
        return self._beta_cache[key]

    def fused_terms(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor | None = None,
        row_offset: int = 0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(per-sample objective (B,), KL (B,), -log p(x|z) (B,)) through the kernels, as in
        :meth:`ReferenceVAE.objective` (labels ``y`` for a conditional model, ``config.k`` samples per row);
        eps None draws it in-kernel. The autoencoder is the same forward with eps = 0 and beta = 0."""
        from fastvae.kernels.vae import fused_negative_elbo

        x = x.flatten(1)
        if not kernels_can_run(x.device):
            raise RuntimeError(f"FusedVAE needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {x.device}")
        cfg = self.config
        if cfg.is_ae:
            eps, beta = torch.zeros(x.shape[0], cfg.latent_dim, device=x.device), 0.0
        if cfg.conditional:
            self.onehot(y, x.shape[0])  # checks the labels (one line), as the reference does
        elif y is not None:
            raise FastVAEError("labels were given to an unconditional model")
        params = [p for name, p in self.named_parameters() if name != "output_logvar"]
        beta_t = self._beta(beta, x.device)
        loss, kl, rec = fused_negative_elbo(
            x, params, cfg.hidden_dims, cfg.latent_dim, cfg.activation, beta_t, self.rng_state, eps, row_offset,
            labels=y, classes=cfg.classes, k=cfg.k, iw=cfg.objective == "iwae",
        )  # fmt: skip
        if cfg.is_ae:
            return loss, torch.zeros_like(kl), loss
        return loss, kl, (loss - beta_t * kl) if rec is None else rec

    def can_fuse(self, x: Tensor, free_bits: float = 0.0) -> str | None:
        """None when :meth:`objective` runs on the kernels for this input; else why it cannot."""
        if self.config.likelihood != "bernoulli":
            return f"likelihood {self.config.likelihood!r}"
        if free_bits > 0:
            return "free bits"
        if x.requires_grad:
            return "a gradient w.r.t. x"
        return None

    def objective(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor | None = None,
        free_bits: float = 0.0,
    ) -> Objective:
        """:meth:`ReferenceVAE.objective` on the fused kernels (the reference path where they do not
        cover the request, with a one-line notice); eps None draws it in-kernel. The kernels reduce the KL
        over latent dimensions, so ``kl_per_dim`` is None here."""
        why_not = self.can_fuse(x, free_bits)
        if why_not:
            _notice(why_not)
            return super().objective(x, eps, y=y, beta=beta, free_bits=free_bits)
        loss, kl, rec = self.fused_terms(x, eps, y=y, beta=beta)  # (B,) each
        return Objective(loss, rec, kl)
