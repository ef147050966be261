"""The output step: decoder output GEMM + Bernoulli log-likelihood + its gradient, in one pass.

    logits = h' W_out^T + b_out
    rec    = sum_d softplus(logits) - x * logits          (BCE with logits, summed per sample, fp32)
    loss   = rec + beta * kl                               (the per-sample -ELBO)
    dlogits = sigmoid(logits) - x                          (written now: the loss is terminal)

The logits and probabilities are never stored; the backward only scales dlogits by grad_output (as
Liger-Kernel's fused linear + cross-entropy does). One program owns a block of rows and walks all D
output columns, so the per-sample sum is a deterministic register reduction with no atomics.
Program 0 also advances the in-kernel RNG counter, after the latent kernel read it (stream order
makes that safe, and the step stays correct under CUDA-graph replay).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvae.kernels.heuristics import dot_precision, launch, row_blocks
from fastvae.kernels.tiles import rows_times_wt


@triton.jit
def _bernoulli_output_kernel(
    hd_ptr,  # (M, K) decoder's last hidden activation
    w_ptr,  # (D, K) output weight
    b_ptr,  # (D,) output bias
    x_ptr,  # (M, D) targets in [0, 1]
    kl_ptr,  # (M,) per-sample KL from the latent kernel, fp32
    beta_ptr,  # () KL weight, fp32 device scalar
    loss_ptr,  # (M,) output per-sample -ELBO, fp32
    dlogits_ptr,  # (M, D) output sigmoid(logits) - x
    rng_ptr,  # int64 [seed, counter]: counter set to used + 1 when ADVANCE_RNG
    rng_used_ptr,  # int64 [seed, counter] the latent kernel used
    M,
    D,
    K,
    ADVANCE_RNG: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    rec = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < D
        acc = rows_times_wt(hd_ptr, w_ptr, rm, rn, M, D, K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        logits = acc + tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + rm[:, None] * D + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        # softplus(l) - x l, written stably: max(l, 0) - x l + log(1 + exp(-|l|))
        e = tl.exp(-tl.abs(logits))
        bce = tl.maximum(logits, 0.0) - x * logits + tl.log(1.0 + e)
        rec += tl.sum(tl.where(mask, bce, 0.0), axis=1)
        # sigmoid from the same exp: l >= 0 -> 1 / (1 + e), l < 0 -> e / (1 + e)
        sig = tl.where(logits >= 0, 1.0, e) / (1.0 + e)
        tl.store(
            dlogits_ptr + rm[:, None] * D + rn[None, :], (sig - x).to(dlogits_ptr.dtype.element_ty), mask=mask
        )
    kl = tl.load(kl_ptr + rm, mask=m_mask, other=0.0)
    tl.store(loss_ptr + rm, rec + tl.load(beta_ptr) * kl, mask=m_mask)
    if ADVANCE_RNG:
        if pid == 0:
            tl.store(rng_ptr + 1, tl.load(rng_used_ptr + 1) + 1)


def bernoulli_output_forward(hd, w, b, x, kl, beta, loss, dlogits, rng_state, rng_used) -> None:
    """Launch the output kernel; pass ``rng_used`` None when the caller supplied eps (nothing to advance)."""
    m, k = hd.shape
    d = w.shape[0]
    assert w.shape == (d, k) and x.shape == (m, d) and dlogits.shape == (m, d)
    blk = row_blocks(m)
    advance = rng_used is not None
    # grid: one program per block of rows, each walking all D columns (deterministic row sums)
    grid = (triton.cdiv(m, blk.rows),)
    launch(
        _bernoulli_output_kernel, grid,
        hd, w, b, x, kl, beta, loss, dlogits, rng_state, rng_used if advance else rng_state, m, d, k,
        ADVANCE_RNG=advance, PRECISION=dot_precision(hd.dtype), BLOCK_M=blk.rows, BLOCK_N=blk.cols,
        BLOCK_K=blk.red, num_warps=blk.warps,
    )  # fmt: skip
