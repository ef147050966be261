"""Counter-keyed random streams: the noise of a step or batch is a function of (seed, key) alone.

Keying by the optimizer step and slicing by the global sample index makes a run independent of the
number of ranks and of interruptions: a resumed run, or N ranks, draw exactly the noise one process
would have drawn.
"""

from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1


def mix(seed: int, key: int) -> int:
    """A 63-bit seed from (seed, key) (SplitMix64 finalizer), so nearby keys give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + key * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


def keyed_generator(seed: int, key: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(mix(seed, key))
    return g
