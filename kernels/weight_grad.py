"""Weight and bias gradients of every layer in one launch, deterministic.

For each layer g: dW_g = dy_g^T a_g and db_g = sum_rows dy_g, where dy_g (M, N_g) is the gradient at
the layer's pre-activation and a_g (M, K_g) its input. All layers share one grouped launch: a small
int64 table on the device describes each group (its first program, tiles, where dy and a live), and
each program finds its group by scanning that table. Activations live in one workspace buffer (the
network input x aside), so the table holds offsets, not pointers: it depends only on the shapes, is built
once per shape, and stays valid inside a CUDA graph.

Determinism: the batch is split into S fixed row ranges (split-K over the batch); program (tile, s)
writes its partial sum to its own slot of a (S, P) buffer and a second kernel adds the S slots in a
fixed order. No float atomics, so two runs give bit-identical gradients. With S = 1 (batches up to
512 rows) the first stage writes the gradients directly and the second launch is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastvae.kernels.heuristics import (
    REDUCE_BLOCK,
    WGRAD_BLOCK_K,
    WGRAD_BLOCK_N,
    WGRAD_BLOCK_R,
    dot_precision,
    launch,
    wgrad_splits,
)

# Columns of the group table: first program, k tiles, a in x (0) or workspace (1), dy offset, a offset,
# N, K, weight offset, bias offset, scale dy rows by grad_output (0/1).
TABLE_COLS = 10


@triton.jit
def _grouped_wgrad_kernel(
    table_ptr,  # int64 (G, 10) group descriptors, see TABLE_COLS
    ws_ptr,  # workspace holding every dy and every layer input except x
    x_ptr,  # (M, D) network input (the first layer's a)
    s_ptr,  # (M,) grad_output, scales dy rows of groups that ask for it
    s_stride,  # element stride of s (0 for an expanded scalar)
    out_ptr,  # (S, P) fp32 partial gradients; the gradients themselves when S == 1
    G,  # number of groups
    M,  # batch rows
    P,  # gradient elements over all groups (row stride of out)
    S,  # batch splits
    rows_per_split,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # batch rows per inner step
):
    pid = tl.program_id(0)
    grp = pid * 0  # an int32 tensor from the start, so the loop carries one type
    for g in range(1, G):
        grp = tl.where(pid >= tl.load(table_ptr + g * 10), g, grp)
    row = table_ptr + grp * 10
    start = tl.load(row)
    tiles_k = tl.load(row + 1)
    a_sel = tl.load(row + 2)
    dy_off = tl.load(row + 3)
    a_off = tl.load(row + 4)
    N = tl.load(row + 5)
    K = tl.load(row + 6)
    w_off = tl.load(row + 7)
    b_off = tl.load(row + 8)
    scale_rows = tl.load(row + 9)

    local = pid - start
    split = local % S
    tile = local // S
    tn = tile // tiles_k
    tk = tile % tiles_k
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tk * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    if a_sel == 0:
        a_base = x_ptr + a_off
    else:
        a_base = ws_ptr + a_off
    dy_base = ws_ptr + dy_off

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(M, lo + rows_per_split)
    for r0 in range(lo, hi, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < hi
        dy = tl.load(
            dy_base + rr[:, None] * N + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )
        if scale_rows != 0:
            s = tl.load(s_ptr + rr * s_stride, mask=r_mask, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * s[:, None]).to(dy.dtype)
        a = tl.load(a_base + rr[:, None] * K + rk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), a.to(dy.dtype), acc, input_precision=PRECISION)
        bacc += tl.sum(dy.to(tl.float32), axis=0)
    out = out_ptr + split * P
    tl.store(out + w_off + rn[:, None] * K + rk[None, :], acc, mask=n_mask[:, None] & k_mask[None, :])
    if tk == 0:
        tl.store(out + b_off + rn, bacc, mask=n_mask)


@triton.jit
def _split_sum_kernel(
    part_ptr,  # (S, P) fp32 partial sums
    out_ptr,  # (P,) fp32 output
    P,
    S,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * P + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


@dataclass(frozen=True)
class GradGroup:
    """One layer's weight gradient: dy at ``dy_off`` (M, n) in the workspace, a (M, k) in x or the workspace."""

    dy_off: int
    a_off: int | None  # None: a is the network input x
    n: int
    k: int
    w_off: int  # offset of dW (n, k) in the flat gradient
    b_off: int  # offset of db (n,)
    scale_rows: bool = False


_TABLES: dict[tuple, tuple[torch.Tensor, int]] = {}


def _table(groups: tuple[GradGroup, ...], splits: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The device table for ``groups`` (cached per shape: built and copied once) and the program count."""
    key = (groups, splits, str(device))
    if key not in _TABLES:
        rows, start = [], 0
        for g in groups:
            tiles_n, tiles_k = triton.cdiv(g.n, WGRAD_BLOCK_N), triton.cdiv(g.k, WGRAD_BLOCK_K)
            a_sel, a_off = (0, 0) if g.a_off is None else (1, g.a_off)
            rows.append(
                [start, tiles_k, a_sel, g.dy_off, a_off, g.n, g.k, g.w_off, g.b_off, int(g.scale_rows)]
            )
            start += tiles_n * tiles_k * splits
        _TABLES[key] = (torch.tensor(rows, dtype=torch.int64, device=device), start)
    return _TABLES[key]


def grouped_weight_grads(
    groups: tuple[GradGroup, ...],
    ws: torch.Tensor,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Write every group's dW and db into the flat fp32 gradient ``out`` (P,), in 1 or 2 launches."""
    m = x.shape[0]
    p = out.numel()
    assert x.dtype == ws.dtype and out.dtype == torch.float32
    splits = wgrad_splits(m)
    table, programs = _table(groups, splits, x.device)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), WGRAD_BLOCK_R) * WGRAD_BLOCK_R
    part = out if splits == 1 else torch.empty(splits, p, dtype=torch.float32, device=out.device)
    # grid: one program per (group, N tile, K tile, batch split)
    launch(
        _grouped_wgrad_kernel, (programs,), table, ws, x, grad_out, grad_out.stride(0), part, len(groups), m, p, splits,
        rows_per_split, PRECISION=dot_precision(x.dtype), BLOCK_N=WGRAD_BLOCK_N, BLOCK_K=WGRAD_BLOCK_K,
        BLOCK_R=WGRAD_BLOCK_R,
    )  # fmt: skip
    if splits > 1:
        # grid: one program per REDUCE_BLOCK gradient elements
        launch(_split_sum_kernel, (triton.cdiv(p, REDUCE_BLOCK),), part, out, p, splits, BLOCK=REDUCE_BLOCK)
