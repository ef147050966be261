"""fastvae: a performance-first Variational Autoencoder engine for PyTorch.

Importing ``fastvae`` imports neither torch nor numpy: the public names below load their modules on
first use, so the torch-free ONNX sampler (``fastvae.export.sample``) runs where torch is absent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastvae._version import __version__

# public name -> module that defines it
_LAZY = {
    "VAEConfig": "fastvae.config",
    "PRESETS": "fastvae.config",
    "preset": "fastvae.config",
    "FastVAEError": "fastvae.errors",
    "ReferenceVAE": "fastvae.model",
    "FusedVAE": "fastvae.fused",
    "TrainConfig": "fastvae.config",
    "train": "fastvae.trainer",
    "sweep": "fastvae.sweeps",
    "load_model": "fastvae.runs",
    "save_model": "fastvae.runs",
    "load_dataset": "fastvae.data",
    "elbo_stats": "fastvae.evaluate",
    "importance_weighted_nll": "fastvae.evaluate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from fastvae.config import PRESETS, TrainConfig, VAEConfig, preset
    from fastvae.data import load_dataset
    from fastvae.errors import FastVAEError
    from fastvae.evaluate import elbo_stats, importance_weighted_nll
    from fastvae.fused import FusedVAE
    from fastvae.model import ReferenceVAE
    from fastvae.runs import load_model, save_model
    from fastvae.sweeps import sweep
    from fastvae.trainer import train
