"""Where fastvae caches what it can rebuild (the quality judge's classifier, the dSprites grids): torch-free, so ``--help``
can print the folder without importing torch."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FASTVAE_CACHE``, else ``~/.cache/fastvae``."""
    return Path(os.environ.get("FASTVAE_CACHE") or Path.home() / ".cache" / "fastvae")
