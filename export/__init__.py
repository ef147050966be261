"""fastvae.export: ONNX export of a trained run (decoder, encoder, scorer) and torch-free CPU runtimes.

Installed from the repository's ``export/`` folder as ``fastvae.export``. Importing this package (or
``fastvae.export.sample``) does not import torch: ``Sampler`` needs only numpy and onnxruntime (and
Pillow for PNG grids); ``export_decoder`` loads torch when it is first used.
"""

from __future__ import annotations

import importlib

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
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastvae.export' has no attribute {name!r}")
