"""fastvae.export: ONNX export of a trained run (decoder, encoder, scorer) and torch-free CPU runtimes.

Installed from the repository's ``export/`` folder as ``fastvae.export``. Importing this package (or
``fastvae.export.sample``) does not import torch: ``Sampler`` needs only numpy and onnxruntime (and
Pillow for PNG grids); ``export_decoder`` loads torch when it is first used. In the torch-free runtime
install (``fastvae-engine-runtime``), which ships the runtimes only, asking for an exporter raises
``ExportUnavailable`` (an ImportError and a FastVAEError) with one line naming the package to install.
"""

from __future__ import annotations

import importlib

from fastvae.errors import DISTRIBUTION, FastVAEError


class ExportUnavailable(FastVAEError, ImportError):
    """Exporting needs the full package (torch and fastvae's model code), absent from a runtime install."""


_LAZY = {
    "Sampler": "fastvae.export.sample",
    "Encoder": "fastvae.export.encode",
    "Scorer": "fastvae.export.score",
    "export_decoder": "fastvae.export.onnx_export",
    "export_encoder": "fastvae.export.onnx_export",
    "export_scorer": "fastvae.export.onnx_export",
    "export_parts": "fastvae.export.onnx_export",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:
            if _LAZY[name] != "fastvae.export.onnx_export" or not _engine_missing(exc.name or ""):
                raise
            raise ExportUnavailable(
                f"{name} needs the full fastvae package (with torch), not the torch-free runtime "
                f"({exc.name} is missing): pip install '{DISTRIBUTION}[export]'"
            ) from None
        return getattr(module, name)
    raise AttributeError(f"module 'fastvae.export' has no attribute {name!r}")


def _engine_missing(module: str) -> bool:
    """A module of the full package that the runtime install lacks: the exporter itself, torch, or one
    of fastvae's torch modules."""
    top = module.split(".")[0]
    return top == "torch" or module.startswith("fastvae.")
