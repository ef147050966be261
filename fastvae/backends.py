"""Choosing the model implementation: the reference (plain PyTorch) or the fused Triton one."""

from __future__ import annotations

import torch

from fastvae.config import BACKENDS, VAEConfig, default_threads
from fastvae.errors import FastVAEError
from fastvae.fused import FusedVAE, kernels_can_run, triton_available
from fastvae.limits import check_fits
from fastvae.model import ReferenceVAE


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' picks the fused Triton backend on CUDA (where Triton is installed) and the reference elsewhere."""
    if backend not in BACKENDS:
        raise FastVAEError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not kernels_can_run(device):
        why = "Triton is not installed" if not triton_available() else f"device {device} is not a CUDA GPU"
        raise FastVAEError(
            f"backend 'triton' cannot run here: {why} (set TRITON_INTERPRET=1 to interpret on CPU)"
        )
    return backend


def make_model(
    config: VAEConfig, backend: str = "torch", device: torch.device | None = None
) -> torch.nn.Module:
    device = torch.device("cpu") if device is None else device
    # parameters, their gradients and Adam's two moments, in fp32
    check_fits(16 * config.n_parameters, f"a model of {config.n_parameters:,} parameters",
               "choose smaller --hidden-dims or --latent-dim", device)  # fmt: skip
    if resolve_backend(backend, device) == "triton":
        return FusedVAE(config).to(device)
    return ReferenceVAE(config).to(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise FastVAEError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastVAEError("device 'cuda' asked for, but no CUDA GPU is available")
    return torch.device(name)


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads to ``threads``, or to :func:`fastvae.config.default_threads` when None;
    return the count set."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise FastVAEError(f"threads must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
