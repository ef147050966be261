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
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastvae import objective as objectives
from fastvae.config import VAEConfig
from fastvae.errors import FastVAEError
from fastvae.model import ReferenceVAE
from fastvae.objective import Terms

if TYPE_CHECKING:  # Triton is an optional extra: the kernels load when first used
    from fastvae.kernels.vae import Plan

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

    def plan_for(
        self,
        batch: int,
        dtype: torch.dtype,
        *,
        free_bits: float = 0.0,
        grad_x: bool = False,
        step: bool = False,
    ) -> Plan | str:
        """The one decision for the fused path: the kernels' ``Plan`` for a batch of ``batch`` rows computed
        in ``dtype``, or why they cannot run it (a short reason). ``grad_x``: a gradient w.r.t. x is wanted;
        ``step``: for the engine's whole fused step, which draws the latent noise in-kernel."""
        cfg, obj = self.config, objectives.of(self.config)
        if cfg.likelihood != "bernoulli":
            return f"likelihood {cfg.likelihood!r}"
        if obj.kernel_iw is None:
            return f"objective {obj.name!r}"
        if free_bits > 0:
            return "free bits"
        if grad_x:
            return "a gradient w.r.t. x"
        if step and not obj.noise:
            return f"the {obj.figure} objective (the fused step draws latent noise in-kernel)"
        if not triton_available():
            raise RuntimeError("FusedVAE needs Triton: pip install 'fastvae-engine[triton]'")
        from fastvae.kernels.vae import Plan

        return Plan.of(cfg, batch, dtype)

    def fused_terms(
        self,
        x: Tensor,
        plan: Plan,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor | None = None,
        row_offset: int = 0,
    ) -> Terms:
        """:meth:`ReferenceVAE.objective` through the kernels for ``plan`` (from :meth:`plan_for`), labels
        ``y`` for a conditional model, ``config.k`` samples per row; eps None draws it in-kernel. The kernels
        reduce the KL over latent dimensions, so ``kl_per_dim`` is None here."""
        from fastvae.kernels.vae import fused_objective

        x = x.flatten(1)
        if not kernels_can_run(x.device):
            raise RuntimeError(f"FusedVAE needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {x.device}")
        cfg, obj = self.config, objectives.of(self.config)
        eps, beta = obj.kernel_inputs(eps, beta, x.shape[0], cfg.latent_dim, x.device)
        if cfg.conditional:
            self.onehot(y, x.shape[0])  # checks the labels (one line), as the reference does
        elif y is not None:
            raise FastVAEError("labels were given to an unconditional model")
        params = [p for name, p in self.named_parameters() if name != "output_logvar"]
        beta_t = self._beta(beta, x.device)
        loss, kl, rec = fused_objective(x, params, plan, beta_t, self.rng_state, eps, row_offset, labels=y)
        return obj.from_kernels(loss, kl, rec, beta_t)

    def objective(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor | None = None,
        free_bits: float = 0.0,
    ) -> Terms:
        """:meth:`ReferenceVAE.objective` on the fused kernels (the reference path where they do not
        cover the request, with a one-line notice); eps None draws it in-kernel."""
        plan = self.plan_for(x.shape[0], x.dtype, free_bits=free_bits, grad_x=x.requires_grad)
        if isinstance(plan, str):
            _notice(plan)
            return super().objective(x, eps, y=y, beta=beta, free_bits=free_bits)
        return self.fused_terms(x, plan, eps, y=y, beta=beta)
