"""Counter-keyed random streams: the noise of a step or batch is a function of (seed, key) alone.

Keying by the optimizer step and slicing by the global sample index makes a run independent of the
number of ranks and of interruptions: a resumed run, or N ranks, draw exactly the noise one process
would have drawn.
"""

from __future__ import annotations

import torch

from fastvae.noise_keys import mix


def keyed_generator(seed: int, key: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix(seed, key))
    return g


# ---- per-row counter noise: the value at (row, column) is a function of (seed, salt, row, column) alone ----
# Every noise draw whose figure must not depend on batching (binarization, evaluation's eps and importance
# samples) comes from here, so a row sees the same noise in any batch, chunk, rank layout or device. It
# is a 32-bit integer hash (Wellons' "lowbias32") in int32 tensor ops: products wrap modulo 2**32 and
# right shifts are masked to be logical, so every device gives the same bits. int32 rather than int64:
# 0.17 s against 0.55 s for 10,000 x 784 values on the 2-core EPYC (torch.rand: 0.03 s).


def _i32(v: int) -> int:
    """A 32-bit pattern as the int32 value with the same bits."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


_MUL1, _MUL2, _GOLDEN = _i32(0x7FEB352D), _i32(0x846CA68B), _i32(0x9E3779B9)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 bit patterns."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def row_bits(seed: int, salt: int, rows: torch.Tensor, width: int, col0: int = 0) -> torch.Tensor:
    """(len(rows), width) int32 hash values for columns col0 .. col0 + width of each row (int64 ids)."""
    if col0 < 0 or col0 + width > 1 << 31:
        raise ValueError(f"row noise has 2**31 columns per row, asked for {col0}..{col0 + width}")
    k = mix(seed, salt)
    rows = rows.to(torch.int64).view(-1, 1)  # (R, 1)
    lo = (rows & 0xFFFFFFFF).to(torch.int32)
    hi = (rows >> 32).to(torch.int32)
    row_key = _hash32(_hash32(lo ^ _i32(k)) ^ hi ^ _i32(k >> 32))  # (R, 1)
    # Weyl steps of the golden ratio separate the columns before the final hash.
    cols = torch.arange(col0, col0 + width, dtype=torch.int32, device=rows.device) * _GOLDEN  # (W,)
    return _hash32(row_key + cols)  # (R, W)


def row_uniform(seed: int, salt: int, rows: torch.Tensor, width: int, col0: int = 0) -> torch.Tensor:
    """(R, width) float32 uniforms in (0, 1), from the top 24 bits (exact in float32, never 0 or 1)."""
    bits = (row_bits(seed, salt, rows, width, col0) >> 8) & 0xFFFFFF
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def row_normal(seed: int, salt: int, rows: torch.Tensor, width: int, col0: int = 0) -> torch.Tensor:
    """(R, width) float32 standard normals (Box-Muller in float64 over column pairs 2j, 2j + 1)."""
    u = row_uniform(seed, salt, rows, 2 * width, 2 * col0).double().view(-1, width, 2)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    return (radius * torch.cos((2.0 * torch.pi) * u[..., 1])).float()


def binarize(x: torch.Tensor, seed: int, salt: int, rows: torch.Tensor) -> torch.Tensor:
    """Dynamic binarization of (R, D) probabilities: pixel j of row ``rows[i]`` is 1 with probability
    x[i, j], drawn by the row rule, so a row gets the same draw in any batch."""
    return (row_uniform(seed, salt, rows, x.shape[1]) < x).to(x.dtype)
