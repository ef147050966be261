"""The keys of fastvae's random streams, torch-free: every salt, and the ``mix`` hash that turns (seed, key)
into a stream's seed. ``fastvae.noise`` (torch) and ``fastvae.export.keyed_noise`` (numpy, shipped by the
torch-free runtime) both draw from these, so the two cannot drift apart.

Each salt keeps one use's noise apart from every other use's with the same seed: training and test noise
of one seed are unrelated, and the -ELBO's eps are not the importance samples'.
"""

from __future__ import annotations

# evaluation (fastvae.evaluate; the exported scorer draws EVAL_SALT and IW_SALT too)
EVAL_SALT = 1_000_003  # the -ELBO's eps of each test row
BINARIZE_SALT = 2_000_003  # the dynamic binarization of each test image (once per seed)
IW_SALT = 3_000_017  # the k importance samples of each test row
# training (fastvae.schedules)
TRAIN_BINARIZE_SALT = 4_000_037
TRAIN_EPS_SALT = 5_000_011
SHUFFLE_SALT = 7_000_003

_M64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def mix(seed: int, key: int) -> int:
    """A 63-bit seed from (seed, key) (SplitMix64 finalizer), so nearby keys give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _MASK63
