"""FusedVAE: the reference model with its training path (negative_elbo forward + backward) on Triton.

Same parameters, ``state_dict`` keys and public methods as :class:`ReferenceVAE`, so weights move freely
between the two. ``negative_elbo`` and ``forward`` run the fused kernels (``fastvae.kernels.vae``);
``encode``, ``decode``, ``sample`` and ``importance_weighted_bound`` are inference paths and use the
plain PyTorch layers they inherit. What the kernels do not implement (the Gaussian likelihood, free bits)
falls back to the reference path with a one-line notice on stderr.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from fastvae.backends import kernels_can_run
from fastvae.config import VAEConfig
from fastvae.model import ReferenceVAE

_NOTICED: set[str] = set()


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
        self, x: Tensor, eps: Tensor | None = None, *, beta: float | Tensor | None = None, row_offset: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(per-sample rec + beta * KL (B,), KL (B,)) through the kernels; eps None draws it in-kernel."""
        from fastvae.kernels.vae import fused_negative_elbo

        x = x.flatten(1)
        if not kernels_can_run(x.device):
            raise RuntimeError(f"FusedVAE needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {x.device}")
        cfg = self.config
        params = [p for name, p in self.named_parameters() if name != "output_logvar"]
        return fused_negative_elbo(
            x, params, cfg.hidden_dims, cfg.latent_dim, cfg.activation, self._beta(beta, x.device), self.rng_state,
            eps, row_offset,
        )  # fmt: skip

    def negative_elbo(self, x: Tensor, eps: Tensor | None = None, *, beta: float | None = None) -> Tensor:
        fallback = self._fallback(x)
        if fallback:
            _notice(fallback)
            return super().negative_elbo(x, eps, beta=beta)
        return self.fused_terms(x, eps, beta=beta)[0]

    def _fallback(self, x: Tensor, free_bits: float = 0.0) -> str | None:
        """Why this call must take the reference path, or None."""
        if self.config.likelihood != "bernoulli":
            return f"likelihood {self.config.likelihood!r}"
        if free_bits > 0:
            return "free bits"
        if x.requires_grad:
            return "a gradient w.r.t. x"
        return None

    def forward(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        beta: float | Tensor | None = None,
        free_bits: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        fallback = self._fallback(x, free_bits)
        if fallback:
            _notice(fallback)
            return super().forward(x, eps, beta=beta, free_bits=free_bits)
        loss, kl = self.fused_terms(x, eps, beta=beta)
        if beta is None or (not isinstance(beta, Tensor) and float(beta) == self.config.beta):
            report = loss.detach()
        else:  # KL warm-up: report the -ELBO at the configured beta
            report = loss.detach() + (self.config.beta - self._beta(beta, x.device)) * kl
        return loss.mean(), report
