"""Tile helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def rows_times_wt(
    x_ptr,  # (M, K) row-major activations
    w_ptr,  # (N, K) row-major weight (nn.Linear layout)
    rm,  # (BLOCK_M,) row indices
    rn,  # (BLOCK_N,) output-feature indices
    M,
    N,
    K,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_N) fp32 tile x[rm] @ W[rn]^T, masked at every edge; W is cast to x's dtype."""
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # (BLOCK_K, BLOCK_N) tile of W^T
        w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    return acc
