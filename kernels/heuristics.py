"""Launch settings for every fastvae kernel, in one place, and the one launch helper: every tiling rule
lives here (``kernels/vae.py``'s ``Plan`` only names its inputs to them).

Fixed heuristics rather than ``triton.autotune``: autotuning reruns a kernel on live buffers, which
corrupts kernels that update state in place (the RNG counter, the Adam moments, the step cursor), and its
tuning runs would land inside a CUDA-graph capture. The numbers are chosen from the resource report
(``python -m fastvae.kernels.resources``: compiled for sm_90, not timed), see the comment on each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

# The H100 SXM has 132 SMs; the H200 has the same count. Grids are sized against it.
H100_SMS = 132
# Work-count goal for one launch: a kernel carrying a large GEMM at B = 128 should have at least this many
# CTAs (the target; about 3/4 of the SMs busy in the first wave).
MIN_CTAS_LARGE_GEMM = 96

# While recording (the resource report), launches are captured here instead of run.
_RECORDING: list[list] = []


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel, its grid, its keyword arguments (launch options included)."""

    kernel: object
    grid: tuple[int, ...]
    kwargs: dict

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", str(self.kernel))

    @property
    def ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


def launch(kernel, grid: tuple[int, ...], **kwargs) -> None:
    """Launch ``kernel`` on ``grid`` with keyword arguments only (recorded instead when recording)."""
    if _RECORDING:
        _RECORDING[-1].append(Launch(kernel, tuple(grid), dict(kwargs)))
        return
    kernel[grid](**kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect the launches issued inside the block without running them (tensors may live on ``meta``)."""
    out: list[Launch] = []
    _RECORDING.append(out)
    try:
        yield out
    finally:
        _RECORDING.pop()


@dataclass(frozen=True)
class Tiles:
    rows: int  # BLOCK_M: batch rows per program
    cols: int  # BLOCK_N: output features per program (the second grid axis)
    red: int  # BLOCK_K: reduction chunk
    warps: int


def layer_tiles(batch: int, width: int, dtype: torch.dtype) -> Tiles:
    """Tiles of the row-local kernels (forward layers, input gradients): a 2-D grid (row blocks x feature tiles).

    Small batches: 16-row blocks and the widest feature tile that still gives >= MIN_CTAS_LARGE_GEMM
    programs. B = 128 has 8 row blocks, so a 784-wide layer takes 64-column tiles (8 x 13 = 104 CTAs) and a
    400-wide one 32-column tiles (8 x 13 = 104), 4 warps (48-72 registers in fp32, report). Larger batches:
    32 (<= 4096 rows) or 64 rows per block with 64-column tiles and 8 warps, so that each weight tile streamed
    from L2 serves more rows; with 4 warps the 64 x 64 fp32 tiles used 255 registers and spilled (report,
    sm_90, compiled, not timed). A mid-size batch whose 32-row grid would stay under MIN_CTAS_LARGE_GEMM
    takes the small-batch tiles: iwae-k5's decoder at B = 128 (640 rows, 200 wide) had 20 x 4 = 80 CTAs in
    the output layer's input gradient; with 16-row blocks 40 x 4 = 160.
    """
    if batch <= 512 or (
        batch <= 4096 and triton.cdiv(batch, 32) * triton.cdiv(width, 64) < MIN_CTAS_LARGE_GEMM
    ):
        rows = 16
        cols = 64
        while cols > 16 and triton.cdiv(batch, rows) * triton.cdiv(width, cols) < MIN_CTAS_LARGE_GEMM:
            cols //= 2
        return Tiles(rows, cols, 32, 4)
    if batch <= 4096:
        return Tiles(32, 64, 32, 8)
    return Tiles(64, 64, 32, 8)


# The gathering first layer (uint8 load, scale, row-hash binarization per element) reduces in 16-column
# chunks: with 32, the hash's live values pushed ptxas to 128 registers and 24-48 spilled bytes (paper
# B = 1024, iwae B = 16384, fp32); with 16, 68-128 registers and no spill in every cell (report, sm_90).
GATHER_BLOCK_K = 16


# cp.async copies 4, 8 or 16 bytes per thread: a (rows, BLOCK_K) uint8 chunk spread over 32 x warps threads
# with fewer than 4 bytes each is loaded by a synchronous ld.global.b16 every trip (the first layer's
# 49-step load chain at B = 128: 16 x 16 pixels over 128 threads). Report, sm_90: with 32-column chunks at
# B = 128 and 1,024 the main loop has only cp.async left (0 synchronous loads in its PTX).
GATHER_MIN_BYTES_PER_THREAD = 4


def gather_tiles(t: Tiles) -> Tiles:
    """The gathering first layer's tiles: GATHER_BLOCK_K-column chunks, widened until every thread copies
    at least GATHER_MIN_BYTES_PER_THREAD pixels, so that the chunk can be loaded asynchronously."""
    red = GATHER_BLOCK_K
    while t.rows * red < GATHER_MIN_BYTES_PER_THREAD * 32 * t.warps:
        red *= 2
    return Tiles(t.rows, t.cols, red, t.warps)


def latent_pad(z: int) -> int:
    """The latent width padded to a power of two >= 16 (tl.dot's minimum); the edge is masked."""
    return max(16, triton.next_power_of_2(z))


@dataclass(frozen=True)
class WgradTiles:
    n: int  # BLOCK_N: rows of dW per program
    k: int  # BLOCK_K: columns of dW per program
    r: int  # BLOCK_R: batch rows per inner step (the GEMM's reduction chunk)
    warps: int


def wgrad_tiles(
    dtype: torch.dtype, batch: int, shapes: tuple[tuple[int, int], ...] = (), labels: bool = False
) -> WgradTiles:
    """Weight-gradient GEMM tiles: the batch is the reduction dimension.

    fp32 (IEEE FMA dots): 64 x 32 with 16-row chunks and 8 warps: 76 registers, 3 CTAs/SM, so that
    pytorch-example's 364 CTAs at B = 128 run in one wave (64 x 64 at 16 warps: 80 registers but 1 CTA/SM,
    196 CTAs in two waves; 32 x 64 at 8 warps: 88 registers, 2 CTAs/SM, 371 CTAs, two waves). At B = 16,384
    the 364 tiles fill the SMs without a batch split (no split-K sum kernel). With Adam in the epilogue,
    64 x 64 tiles took 4 warps 255 registers + 8 B spilled, 8 warps 128 + 8 B spilled (report, sm_90).
    With ``labels`` (a conditional VAE's onehot groups, built in registers) 64 x 32 at 8 warps used 192
    registers, 1 CTA/SM: three waves; there 64 x 64 at 16 warps (128 registers, 210 CTAs) is kept.
    bf16 / TF32: 128 x 128 on tensor cores (wgmma) with 32-row chunks, 8 warps: 253 registers, no spill. Where
    the batch is too small to split (< 2 x WGRAD_MIN_ROWS_PER_SPLIT rows), 64 x 128 (244 registers), so
    that pytorch-example has 112 CTAs instead of 64 at B = 128 and 1,024; where even that leaves fewer than
    MIN_CTAS_LARGE_GEMM programs for the (n, k) ``shapes`` of the groups (iwae, B = 128: 78), 64 x 64 with
    4 warps (iwae: 148 CTAs, 238 registers in bf16 and 249 in TF32, 2 CTAs/SM: one wave; 8 warps used 138
    registers but 1 CTA/SM, two waves).
    TF32 at 128 x 128 takes 16-row chunks: its fp32 operands in 32-row chunks used 255 registers and spilled
    60 bytes (pytorch-example, paper, iwae at B = 16,384, iwae-k5 at 1,024); 16 rows: 190 registers (232 for
    the conditional VAE), no spill. Report, sm_90, compiled, not timed.
    """
    if dtype == torch.float32 and dot_precision(dtype) == "ieee":
        return WgradTiles(64, 64, 16, 16) if labels else WgradTiles(64, 32, 16, 8)
    if batch < 2 * WGRAD_MIN_ROWS_PER_SPLIT:
        tiles = WgradTiles(64, 128, 32, 8)
        if (
            shapes
            and sum(triton.cdiv(n, tiles.n) * triton.cdiv(k, tiles.k) for n, k in shapes)
            < MIN_CTAS_LARGE_GEMM
        ):
            return WgradTiles(64, 64, 32, 4)
        return tiles
    return WgradTiles(128, 128, 16 if dtype == torch.float32 else 32, 8)


# Minimum batch rows a split-K program reduces: below this a split costs more (an extra pass over the
# (S, P) partials) than the SMs it fills.
WGRAD_MIN_ROWS_PER_SPLIT = 1024
WGRAD_MAX_SPLITS = 16


def wgrad_splits(batch: int, tiles: int) -> int:
    """Split-K over the batch only to fill the SMs: enough splits for two CTAs per SM, each >= 1024 rows."""
    want = triton.cdiv(2 * H100_SMS, max(tiles, 1))
    return max(1, min(WGRAD_MAX_SPLITS, want, batch // WGRAD_MIN_ROWS_PER_SPLIT))


# Elements per program of the elementwise kernels (split-K sum + Adam, loss): 1024 fp32 = 8 per thread.
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own TF32 switch (off by default, so IEEE fp32 like PyTorch's matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ---- the fused VAE step's per-kernel variations (kernels/vae.py's Plan asks these) ---------------------------
def weighted_tiles(tiles: Tiles, multi: bool) -> Tiles:
    """The output layer's input gradient with K-sample row weights (it also loads the weights and stores
    the combined row scale): at most 32 rows (iwae-k5 B = 1024 fp32, 64-row blocks: 80 registers and
    8 spilled bytes; 32 rows: none. Report, sm_90, compiled, not timed)."""
    if multi and tiles.rows > 32:
        return Tiles(32, tiles.cols, tiles.red, tiles.warps)
    return tiles


def latent_tiles(t: Tiles, zp: int, small_k: bool = False) -> Tiles:
    """Tiles ``t`` of a kernel that also carries latent-width work (``zp``: the padded latent width): the same
    feature tiles (the partial counts must match), fewer rows where the report showed spills (sm_90, compiled,
    not timed).

    Head / dz partials next to a large GEMM: half the rows when Z pads to 64 or more (iwae, Z = 50 -> 64,
    B = 16384 fp32: 64-row blocks used 255 registers and spilled 230-1,550 bytes; 32 rows: none).
    ``small_k`` (the latent prologue + first decoder layer, the latent backward: reductions over ZP only,
    so no weight reuse to protect): at most 32 rows (paper, B = 16384 fp32: 64 rows spilled 16 bytes at
    80 registers; 32 rows: 64 registers, 4 CTAs/SM, no spill)."""
    if t.rows >= 32 and (zp >= 64 or (small_k and t.rows > 32)):
        return Tiles(t.rows // 2, t.cols, t.red, t.warps)
    return t
