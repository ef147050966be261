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

K latent samples per row (rows r = i K + j compare against x[i]): the per-row objective needs all K samples'
sums, so a small kernel (:func:`finalize_loss` with ``samples``) reduces them: the mean of the K ELBOs, or
the importance-weighted bound -log mean_j exp(log w_j), log w_j = -rec_j - beta (log q_j - log p_j), by a
running (max, sum) log-sum-exp, and writes each sample's normalised weight (1/K for the ELBO) for the
backward. It is its own launch because every program of the first backward kernel would otherwise redo the
K x T partial sums of its rows once per feature tile.
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
    x_ptr,  # (M // K, D) targets in [0, 1]: row r compares against x[r // K]
    dlogits_ptr,  # (M, D) output sigmoid(logits) - x
    rp_ptr,  # (T, M) fp32 output: this tile's BCE row sums, T = the grid's feature tiles
    M,
    D,
    K,
    SAMPLES,  # latent samples per data row
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
    x = tl.load(x_ptr + (rm // SAMPLES)[:, None] * D + rn[None, :], mask=mask, other=0.0).to(tl.float32)
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
def _sample_rec(rp_ptr, r, mask, MK, T):
    """-log p(x|z) of decoder rows r: the T BCE partials summed in a fixed order."""
    rec = tl.load(rp_ptr + r, mask=mask, other=0.0)
    for t in range(1, T):
        rec += tl.load(rp_ptr + t * MK + r, mask=mask, other=0.0)
    return rec


# Long by design: the K-sample reduction's two passes share their loads' layout; each is commented.
@triton.jit
def _finalize_loss_kernel(
    rp_ptr,  # (T, M K) fp32 BCE partial row sums
    kl_ptr,  # (M K,) fp32 KL (closed form), or log q - log p of each sample (IW)
    beta_ptr,  # () fp32 KL weight
    loss_ptr,  # (M,) fp32 output per-sample objective
    rec_ptr,  # (M,) fp32 output mean -log p(x|z_j) over the samples (MULTI); None otherwise
    kl_out_ptr,  # (M,) fp32 output the KL (elbo) or the mean log-ratio (IW) (MULTI); None otherwise
    rw_ptr,  # (M K,) fp32 output normalised sample weights (MULTI); None otherwise
    loss_acc_ptr,  # (M,) fp32 device accumulator, += loss (ACCUMULATE); None otherwise
    rng_ptr,  # int64 [seed, counter]: counter advanced by program 0 (ADVANCE_RNG); None otherwise
    rng_used_ptr,  # int64 [2] output: the key this step used, for the backward (ADVANCE_RNG)
    M,  # data rows
    T,
    K,  # latent samples per data row (MULTI)
    MULTI: tl.constexpr,  # K samples per row (k > 1 or IW)
    IW: tl.constexpr,  # the importance-weighted bound instead of the mean ELBO
    ACCUMULATE: tl.constexpr,
    ADVANCE_RNG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK + tl.arange(0, BLOCK)
    m_mask = rm < M
    beta = tl.load(beta_ptr)
    if MULTI:
        # pass 1: the K samples' rec and log-weights, with a running log-sum-exp (max, sum)
        rec_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        kl_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        run_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, K):  # fixed order: deterministic
            r = rm * K + j
            rec_j = _sample_rec(rp_ptr, r, m_mask, M * K, T)
            kl_j = tl.load(kl_ptr + r, mask=m_mask, other=0.0)
            rec_sum += rec_j
            kl_sum += kl_j
            lw = -(rec_j + beta * kl_j)
            new_max = tl.maximum(run_max, lw)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(lw - new_max)
            run_max = new_max
        if IW:
            loss = -(run_max + tl.log(run_sum) - tl.log(K * 1.0))
            kl_mean = kl_sum / K
        else:
            kl_mean = tl.load(kl_ptr + rm * K, mask=m_mask, other=0.0)  # the same closed form for every j
            loss = rec_sum / K + beta * kl_mean
        tl.store(rec_ptr + rm, rec_sum / K, mask=m_mask)
        tl.store(kl_out_ptr + rm, kl_mean, mask=m_mask)
        # pass 2: each sample's normalised weight w_j = exp(log w_j - logsumexp) (1/K for the ELBO)
        for j in range(0, K):
            r = rm * K + j
            if IW:
                lw = -(
                    _sample_rec(rp_ptr, r, m_mask, M * K, T)
                    + beta * tl.load(kl_ptr + r, mask=m_mask, other=0.0)
                )
                w = tl.exp(lw - run_max) / run_sum
            else:
                w = tl.full((BLOCK,), 1.0, dtype=tl.float32) / K
            tl.store(rw_ptr + r, w, mask=m_mask)
    else:
        rec = _sample_rec(rp_ptr, rm, m_mask, M, T)
        loss = rec + beta * tl.load(kl_ptr + rm, mask=m_mask, other=0.0)
    tl.store(loss_ptr + rm, loss, mask=m_mask)
    if ACCUMULATE:
        tl.store(loss_acc_ptr + rm, tl.load(loss_acc_ptr + rm, mask=m_mask, other=0.0) + loss, mask=m_mask)
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
    samples: int = 1,
) -> None:
    """dlogits and the BCE partials of ``hd`` (M, K) against ``x`` (M / samples, D)."""
    m, k = hd.shape
    d = w.shape[0]
    assert w.shape == (d, k) and x.shape == (m // samples, d) and dlogits.shape == (m, d)
    assert rec_partials.shape == (triton.cdiv(d, tiles.cols), m)
    # grid: one program per (row block, output-feature tile)
    grid = (triton.cdiv(m, tiles.rows), triton.cdiv(d, tiles.cols))
    launch(
        _bernoulli_output_kernel, grid,
        hd_ptr=hd, w_ptr=w, b_ptr=b, x_ptr=x, dlogits_ptr=dlogits, rp_ptr=rec_partials, M=m, D=d, K=k, SAMPLES=samples,
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
    samples: tuple[int, bool, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    loss_acc: torch.Tensor | None = None,
) -> None:
    """loss = sum of the BCE partials + beta * kl; with ``rng_state``, snapshot it to ``rng_used`` and advance.

    ``samples``: (K, iw, rec out (B,), kl out (B,), weights out (B K,)) for K samples per row (objective
    "elbo" with k > 1, or "iwae"); ``loss_acc`` (B,): add the loss to it.
    """
    t, mk = rec_partials.shape
    k, iw, rec, kl_out, weights = samples if samples is not None else (1, False, None, None, None)
    m = mk // k
    # grid: one program per ELEMENTWISE_BLOCK data rows
    launch(
        _finalize_loss_kernel, (triton.cdiv(m, ELEMENTWISE_BLOCK),),
        rp_ptr=rec_partials, kl_ptr=kl, beta_ptr=beta, loss_ptr=loss, rec_ptr=rec, kl_out_ptr=kl_out,
        rw_ptr=weights, loss_acc_ptr=loss_acc, rng_ptr=rng_state, rng_used_ptr=rng_used, M=m, T=t, K=k,
        MULTI=samples is not None, IW=iw, ACCUMULATE=loss_acc is not None, ADVANCE_RNG=rng_state is not None,
        BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS,
    )  # fmt: skip
