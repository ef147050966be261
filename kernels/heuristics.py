"""Launch heuristics for every fastvae kernel, in one place, and the launch counter the tests read.

Fixed heuristics rather than ``triton.autotune``: autotuning reruns a kernel on live buffers, which
corrupts kernels that update state in place (the RNG counter advanced by the output kernel), and its
tuning runs would land inside a CUDA-graph capture. The numbers below are starting points chosen for
shape legality (``tl.dot`` needs every block dimension >= 16) and for small-batch parallelism; they have
not yet been tuned on a GPU (no GPU was available when they were written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

# Kernel launches issued through :func:`launch` since the last :func:`reset_launch_count`.
_LAUNCHES = [0]


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch a Triton kernel and count it (the launch-count test asserts the per-step total)."""
    _LAUNCHES[0] += 1
    kernel[grid](*args, **kwargs)


def launch_count() -> int:
    return _LAUNCHES[0]


def reset_launch_count() -> None:
    _LAUNCHES[0] = 0


@dataclass(frozen=True)
class Blocks:
    rows: int  # BLOCK_M: batch rows per program
    cols: int  # BLOCK_N: output features per tile
    red: int  # BLOCK_K: reduction (input-feature) chunk
    warps: int


def row_blocks(batch: int) -> Blocks:
    """Tiles for the row-local kernels (forward and input-gradient chains).

    Small batches get 16-row blocks so that more programs exist (B = 128 gives 8 row blocks); large
    batches get 64-row blocks so that each weight tile streamed from L2 serves more rows.
    """
    if batch <= 512:
        return Blocks(16, 64, 32, 4)
    if batch <= 4096:
        return Blocks(32, 64, 32, 4)
    return Blocks(64, 64, 32, 4)


def latent_pad(z: int) -> int:
    """The latent width padded to a power of two >= 16 (tl.dot's minimum); the edge is masked."""
    return max(16, triton.next_power_of_2(z))


# Weight-gradient tiles: (BLOCK_N, BLOCK_K, rows per inner step). One size serves every matrix of the
# step because a single launch covers all of them.
WGRAD_BLOCK_N = 32
WGRAD_BLOCK_K = 32
WGRAD_BLOCK_R = 32
# Rows of the batch one weight-gradient program reduces before handing its partial sum to stage two.
WGRAD_ROWS_PER_SPLIT = 512
WGRAD_MAX_SPLITS = 32


def wgrad_splits(batch: int) -> int:
    """Split-K factor over the batch: 1 (no second stage) up to 512 rows, then one split per 512 rows."""
    return max(1, min(WGRAD_MAX_SPLITS, triton.cdiv(batch, WGRAD_ROWS_PER_SPLIT)))


REDUCE_BLOCK = 1024


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own TF32 switch (off by default, so IEEE fp32 like PyTorch's matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
