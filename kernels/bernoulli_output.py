"""The output step: decoder output GEMM + Bernoulli log-likelihood + its gradient, on a 2-D grid.

    logits = h' W_out^T + b_out
    rec    = sum_d softplus(logits) - x * logits          (BCE with logits, summed per sample, fp32)
    dlogits = sigmoid(logits) - x                          (written now: the loss is terminal)

One program per (row block, output-feature tile): at B = 128 that is 8 x 13 = 104 CTAs for MNIST's 784
outputs, where one program per row block gave 8. Each program writes its tile's BCE row sums to its own
slot of a (tiles, M) buffer; the per-sample loss rec + beta * kl is summed from the slots in a fixed
order by the next kernel (deterministic, no atomics): by the output layer's input-gradient kernel in the
engine's step, or by the small :func:`finalize_loss` kernel when the autograd forward must return it.
The logits and probabilities are never stored; the backward only scales dlogits by grad_output (as
Liger-Kernel's fused linear + cross-entropy does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.kernels.heuristics import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, Tiles, launch
from fastvae.kernels.tiles import rows_times_wt


@triton.jit
def _bernoulli_output_kernel(
    hd_ptr,  # (M, K) decoder's last hidden activation
    w_ptr,  # (D, K) output weight
    b_ptr,  # (D,) output bias
    x_ptr,  # (M, D) targets in [0, 1]
    dlogits_ptr,  # (M, D) output sigmoid(logits) - x
    rp_ptr,  # (T, M) fp32 output: this tile's BCE row sums, T = the grid's feature tiles
    M,
    D,
    K,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < D
    acc = rows_times_wt(hd_ptr, w_ptr, rm, rn, M, D, K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    logits = acc + tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    x = tl.load(x_ptr + rm[:, None] * D + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    # softplus(l) - x l, written stably: max(l, 0) - x l + log(1 + exp(-|l|))
    e = tl.exp(-tl.abs(logits))
    bce = tl.maximum(logits, 0.0) - x * logits + tl.log(1.0 + e)
    tl.store(rp_ptr + pid_n * M + rm, tl.sum(tl.where(mask, bce, 0.0), axis=1), mask=m_mask)
    # sigmoid from the same exp: l >= 0 -> 1 / (1 + e), l < 0 -> e / (1 + e)
    sig = tl.where(logits >= 0, 1.0, e) / (1.0 + e)
    tl.store(
        dlogits_ptr + rm[:, None] * D + rn[None, :], (sig - x).to(dlogits_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _finalize_loss_kernel(
    rp_ptr,  # (T, M) fp32 BCE partial row sums
    kl_ptr,  # (M,) fp32 KL
    beta_ptr,  # () fp32 KL weight
    loss_ptr,  # (M,) fp32 output per-sample -ELBO
    rng_ptr,  # int64 [seed, counter]: counter advanced by program 0 (ADVANCE_RNG); None otherwise
    rng_used_ptr,  # int64 [2] output: the key this step used, for the backward (ADVANCE_RNG)
    M,
    T,
    ADVANCE_RNG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK + tl.arange(0, BLOCK)
    m_mask = rm < M
    rec = tl.load(rp_ptr + rm, mask=m_mask, other=0.0)
    for t in range(1, T):  # fixed order: deterministic
        rec += tl.load(rp_ptr + t * M + rm, mask=m_mask, other=0.0)
    tl.store(
        loss_ptr + rm, rec + tl.load(beta_ptr) * tl.load(kl_ptr + rm, mask=m_mask, other=0.0), mask=m_mask
    )
    if ADVANCE_RNG:
        # every kernel that reads the key ran before this one (stream order)
        if pid == 0:
            seed = tl.load(rng_ptr)
            counter = tl.load(rng_ptr + 1)
            tl.store(rng_used_ptr, seed)
            tl.store(rng_used_ptr + 1, counter)
            tl.store(rng_ptr + 1, counter + 1)


def bernoulli_output_forward(
    *,
    hd: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    dlogits: torch.Tensor,
    rec_partials: torch.Tensor,
    tiles: Tiles,
    precision: str,
) -> None:
    m, k = hd.shape
    d = w.shape[0]
    assert w.shape == (d, k) and x.shape == (m, d) and dlogits.shape == (m, d)
    assert rec_partials.shape == (triton.cdiv(d, tiles.cols), m)
    # grid: one program per (row block, output-feature tile)
    grid = (triton.cdiv(m, tiles.rows), triton.cdiv(d, tiles.cols))
    launch(
        _bernoulli_output_kernel, grid,
        hd_ptr=hd, w_ptr=w, b_ptr=b, x_ptr=x, dlogits_ptr=dlogits, rp_ptr=rec_partials, M=m, D=d, K=k,
        PRECISION=precision, BLOCK_M=tiles.rows, BLOCK_N=tiles.cols, BLOCK_K=tiles.red, num_warps=tiles.warps,
    )  # fmt: skip


def finalize_loss(
    *,
    rec_partials: torch.Tensor,
    kl: torch.Tensor,
    beta: torch.Tensor,
    loss: torch.Tensor,
    rng_state: torch.Tensor | None,
    rng_used: torch.Tensor | None,
) -> None:
    """loss = sum of the BCE partials + beta * kl; with ``rng_state``, snapshot it to ``rng_used`` and advance."""
    t, m = rec_partials.shape
    # grid: one program per ELEMENTWISE_BLOCK rows
    launch(
        _finalize_loss_kernel, (triton.cdiv(m, ELEMENTWISE_BLOCK),),
        rp_ptr=rec_partials, kl_ptr=kl, beta_ptr=beta, loss_ptr=loss, rng_ptr=rng_state, rng_used_ptr=rng_used,
        M=m, T=t, ADVANCE_RNG=rng_state is not None, BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS,
    )  # fmt: skip
