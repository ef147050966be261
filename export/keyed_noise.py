"""fastvae's per-row keyed noise (``fastvae.noise``) in numpy, for the torch-free scorer.

The exported scorer takes its noise as inputs; this module draws it as fastvae's evaluation does: the
value at (row, column) is a function of (seed, salt, row, column) alone (lowbias32 hash, Box-Muller in
float64), so a row scores the same in any batch, and on a run's test images the scorer sees exactly the
eps of ``fastvae.evaluate``. numpy's uint32 arithmetic wraps and shifts logically, as the torch version's
masked int32 ops do; ``tests/test_export_parts.py`` checks the two agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from fastvae.noise_keys import EVAL_SALT, IW_SALT, mix

_MUL1, _MUL2, _GOLDEN = np.uint32(0x7FEB352D), np.uint32(0x846CA68B), np.uint32(0x9E3779B9)


def _hash32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * _MUL1
    x = x ^ (x >> np.uint32(15))
    x = x * _MUL2
    return x ^ (x >> np.uint32(16))


def row_bits(seed: int, salt: int, rows: np.ndarray, width: int, col0: int = 0) -> np.ndarray:
    """(len(rows), width) uint32 hash values of columns col0 .. col0 + width of each row."""
    k = mix(seed, salt)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
    lo = (rows & 0xFFFFFFFF).astype(np.uint32)
    hi = (rows >> 32).astype(np.uint32)
    with np.errstate(over="ignore"):
        row_key = _hash32(_hash32(lo ^ np.uint32(k & 0xFFFFFFFF)) ^ hi ^ np.uint32(k >> 32))
        cols = np.arange(col0, col0 + width, dtype=np.int64).astype(np.uint32) * _GOLDEN
        return _hash32(row_key + cols)


def row_normal(seed: int, salt: int, rows: np.ndarray, width: int, col0: int = 0) -> np.ndarray:
    """(R, width) float32 standard normals: fastvae.noise.row_normal."""
    bits = (row_bits(seed, salt, rows, 2 * width, 2 * col0) >> np.uint32(8)) & np.uint32(0xFFFFFF)
    u = ((bits.astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 24))).astype(np.float64)
    u = u.reshape(-1, width, 2)
    radius = np.sqrt(-2.0 * np.log(u[..., 0]))
    return (radius * np.cos((2.0 * np.pi) * u[..., 1])).astype(np.float32)


def elbo_eps(seed: int, rows: np.ndarray, latent_dim: int) -> np.ndarray:
    """(R, Z) the eps fastvae's evaluation draws for the -ELBO of rows ``rows``."""
    return row_normal(seed, EVAL_SALT, rows, latent_dim)


def iw_eps(seed: int, rows: np.ndarray, k: int, latent_dim: int) -> np.ndarray:
    """(R, K, Z) the eps of fastvae's k-sample importance-weighted bound for rows ``rows``."""
    return row_normal(seed, IW_SALT, rows, k * latent_dim).reshape(-1, k, latent_dim)
