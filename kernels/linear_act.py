"""Hidden MLP layers: y = act(x W^T + b) in one kernel, and its input gradient with the activation
derivative fused into the same pass: dx = ((s * dy) W) * act'(x).

The forward stores only y: for ReLU the backward mask is y > 0 and for tanh the derivative is 1 - y^2,
so no pre-activation is kept. Weights may be fp32 (master copy) while activations are bf16: a tile is
cast to the activation dtype as it is loaded, and every dot accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.kernels.activations import act_grad_from_output, apply_act
from fastvae.kernels.heuristics import dot_precision, launch, row_blocks
from fastvae.kernels.tiles import rows_times_wt


@triton.jit
def _linear_act_fwd_kernel(
    x_ptr,  # (M, K) input activations, row-major
    w_ptr,  # (N, K) weight, nn.Linear layout (out_features, in_features)
    b_ptr,  # (N,) bias
    y_ptr,  # (M, N) output act(x W^T + b), written in x's dtype
    M,  # rows (batch)
    N,  # output features
    K,  # input features
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 tanh
    PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = rows_times_wt(x_ptr, w_ptr, rm, rn, M, N, K, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y = apply_act(acc + bias[None, :], ACT)
    tl.store(
        y_ptr + rm[:, None] * N + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _linear_bwd_input_kernel(
    dy_ptr,  # (M, N) gradient w.r.t. this layer's pre-activation output
    w_ptr,  # (N, K) weight of this layer
    h_ptr,  # (M, K) this layer's input = the previous layer's activated output (for act'); unused if ACT == 0
    s_ptr,  # (M,) per-row scale of dy (grad_output of the per-sample loss); unused unless ROW_SCALE
    s_stride,  # element stride of s: 0 when grad_output is an expanded scalar (the backward of mean())
    dx_ptr,  # (M, K) output: ((s * dy) W) * act'(h)
    M,
    N,
    K,
    ACT: tl.constexpr,  # activation that produced h (its derivative is applied); 0 for the network input
    ROW_SCALE: tl.constexpr,  # scale each row by s (dy was stored unscaled by the forward)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # reduction chunk over N
    BLOCK_K: tl.constexpr,  # output tile over K
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = rm < M
    k_mask = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        dy = tl.load(
            dy_ptr + rm[:, None] * N + rn[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0
        )
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=PRECISION)
    if ROW_SCALE:
        s = tl.load(s_ptr + rm * s_stride, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    mask = m_mask[:, None] & k_mask[None, :]
    if ACT != 0:
        h = tl.load(h_ptr + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * act_grad_from_output(h, ACT)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


def linear_act_forward(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: int, out: torch.Tensor
) -> None:
    """out (M, N) = act(x (M, K) @ w (N, K)^T + b); all contiguous, out in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    assert w.shape == (n, k) and b.shape == (n,) and out.shape == (m, n), (x.shape, w.shape, out.shape)
    blk = row_blocks(m)
    # grid: one program per (row block, output-feature tile)
    grid = (triton.cdiv(m, blk.rows), triton.cdiv(n, blk.cols))
    launch(
        _linear_act_fwd_kernel, grid, x, w, b, out, m, n, k,
        ACT=act, PRECISION=dot_precision(x.dtype), BLOCK_M=blk.rows, BLOCK_N=blk.cols, BLOCK_K=blk.red,
        num_warps=blk.warps,
    )  # fmt: skip


def linear_backward_input(
    dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor | None, act: int, out: torch.Tensor,
    row_scale: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """out (M, K) = ((row_scale * dy) (M, N) @ w (N, K)) * act'(h); h is the layer input (unused if act is none)."""
    m, n = dy.shape
    k = w.shape[1]
    assert w.shape == (n, k) and out.shape == (m, k)
    blk = row_blocks(m)
    # grid: one program per (row block, input-feature tile)
    grid = (triton.cdiv(m, blk.rows), triton.cdiv(k, blk.cols))
    launch(
        _linear_bwd_input_kernel, grid, dy, w, h if h is not None else dy, row_scale if row_scale is not None else dy,
        row_scale.stride(0) if row_scale is not None else 0, out, m, n, k,
        ACT=act, ROW_SCALE=row_scale is not None, PRECISION=dot_precision(dy.dtype),
        BLOCK_M=blk.rows, BLOCK_N=blk.red, BLOCK_K=blk.cols, num_warps=blk.warps,
    )  # fmt: skip
