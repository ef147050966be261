"""The row rule of ``fastvae.noise`` inside a kernel: uniform noise at (sample id, column) as a function of
(seed, salt, sample id, column) alone, bit for bit what ``fastvae.noise.row_uniform`` computes with int32
torch ops, so the engine's in-kernel binarization equals the eager path's ``noise.binarize``.

    key      = noise.mix(seed, salt)                         (63 bits, computed on the host: a launch int)
    row_key  = h(h(lo32(id) ^ lo32(key)) ^ hi32(id) ^ hi32(key))
    bits     = h(row_key + column * GOLDEN)                  (int32, wrapping)
    u        = ((bits >> 8) & 0xFFFFFF + 0.5) / 2^24

with h Wellons' "lowbias32" hash. Right shifts are masked so that they are logical on int32.
"""

import triton
import triton.language as tl

from fastvae.noise import _GOLDEN, _MUL1, _MUL2, _i32, mix

HASH_MUL1 = tl.constexpr(_MUL1)
HASH_MUL2 = tl.constexpr(_MUL2)
HASH_GOLDEN = tl.constexpr(_GOLDEN)
UNIFORM_SCALE = tl.constexpr(1.0 / (1 << 24))  # 24 bits: exact in fp32


def key_words(seed: int, salt: int) -> tuple[int, int]:
    """The two int32 words of ``noise.mix(seed, salt)`` (the kernels' ``key_lo`` / ``key_hi``)."""
    k = mix(seed, salt)
    return _i32(k), _i32(k >> 32)


@triton.jit
def _lowbias32(x):
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * HASH_MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * HASH_MUL2
    return x ^ ((x >> 16) & 0xFFFF)


@triton.jit
def row_uniform(ids, cols, key_lo, key_hi):
    """(len(ids), len(cols)) fp32 uniforms in (0, 1) for int64 sample ``ids`` and int32 ``cols``."""
    lo = (ids & 0xFFFFFFFF).to(tl.int32)
    hi = (ids >> 32).to(tl.int32)
    row_key = _lowbias32(_lowbias32(lo ^ key_lo) ^ hi ^ key_hi)
    bits = _lowbias32(row_key[:, None] + cols.to(tl.int32)[None, :] * HASH_GOLDEN)
    return (((bits >> 8) & 0xFFFFFF).to(tl.float32) + 0.5) * UNIFORM_SCALE
