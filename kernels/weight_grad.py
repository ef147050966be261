"""Weight and bias gradients of every layer as GEMM tiles in one launch, deterministic, optionally with Adam
in the epilogue.

For each layer g: dW_g = dy_g^T a_g and db_g = sum_rows dy_g, where dy_g (M, N_g) is the gradient at
the layer's pre-activation and a_g (M, K_g) its input: a GEMM whose reduction dimension is the batch.
One program computes one (BLOCK_N, BLOCK_K) tile of one dW over its batch rows, streaming (BLOCK_R, BLOCK_N)
and (BLOCK_R, BLOCK_K) chunks of dy and a into a dot (tensor cores in bf16 / TF32, FMA in IEEE fp32). All
layers share one grouped launch: a small int64 table on the device describes each group (its first
program, tiles, where dy and a live), and each program finds its group by scanning that table.
Activations live in one workspace buffer (the network input x may live outside it), so the table holds
offsets, not pointers: it depends only on the shapes, is built once per shape, and stays valid inside a
CUDA graph.

Rows differ by group: the decoder side of a K-sample objective has B K rows, the encoder side B. A
conditional VAE's label weights are groups whose A operand is onehot(y) (B, C), formed in registers from the
labels by comparison: dW_y = dy^T onehot(y) is the scatter-add of dy's rows by label, done as a GEMM over
the batch in a fixed order (deterministic, no atomics).

Split-K over the batch is used only to fill the SMs (see ``heuristics.wgrad_splits``): with S > 1,
program (tile, s) writes its partial sum to its own slot of an (S, P) buffer and :func:`_split_sum_kernel`
adds the S slots in a fixed order. No float atomics, so two runs give bit-identical gradients.

Epilogue: the gradient tile is stored to the flat gradient buffer (autograd path), or, with FUSED_ADAM,
handed to Adam (``adam.py``) and never stored (the engine's step). The engine's step also advances the
step cursor and the RNG counter here (program 0): this is the step's last kernel and none of its programs
reads either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastvae.kernels.adam import adam_apply, adam_scalars
from fastvae.kernels.heuristics import (
    ELEMENTWISE_BLOCK,
    ELEMENTWISE_WARPS,
    WgradTiles,
    launch,
    wgrad_splits,
)

# Columns of the group table, one row per layer.
COL_START = tl.constexpr(0)  # first program of the group
COL_TILES_K = tl.constexpr(1)  # K tiles per N tile
COL_A_IN_X = tl.constexpr(2)  # 1: a is the network input x (x_ptr), 0: a lives in the workspace
COL_DY_OFF = tl.constexpr(3)  # element offset of dy (M, N) in the workspace
COL_A_OFF = tl.constexpr(4)  # element offset of a (M, K) in the workspace (0 for x)
COL_N = tl.constexpr(5)
COL_K = tl.constexpr(6)
COL_W_OFF = tl.constexpr(7)  # offset of dW (N, K) in the flat parameter / gradient buffer
COL_B_OFF = tl.constexpr(8)  # offset of db (N,)
COL_SCALE_ROWS = tl.constexpr(9)  # 1: scale dy's rows by grad_output (dlogits is stored unscaled)
COL_M = tl.constexpr(10)  # rows of dy and a (B, or B K on the decoder side of a K-sample objective)
COL_LABEL_DIV = tl.constexpr(11)  # > 0: a is onehot(labels[r // this]) (a label weight); 0: a is read
COL_ROWS_PER_SPLIT = tl.constexpr(12)  # rows each batch split reduces (a multiple of BLOCK_R)
TABLE_COLS = tl.constexpr(13)
# Rows of a weight-gradient tile per Adam slice: 16 x 128 fp32 = 8 elements per thread at 8 warps.
ADAM_ROWS = 16


# Long by design: one fused kernel (its stages share registers and one launch); splitting it into
# helpers would not shorten what a reader must follow, and each stage is commented where it starts.
@triton.jit
def _grouped_wgrad_kernel(
    table_ptr,  # int64 (G, TABLE_COLS) group descriptors
    ws_ptr,  # workspace holding every dy and every layer input except (maybe) x
    x_ptr,  # (M, D) network input when it lives outside the workspace; None otherwise
    labels_ptr,  # (B,) int32 labels of a conditional VAE (HAS_LABELS); None otherwise
    s_ptr,  # (M,) grad_output, scales dy rows of groups that ask for it
    s_stride,  # element stride of s (0 for an expanded scalar)
    out_ptr,  # (S, P) fp32 partial gradients; the gradients themselves when S == 1 (Adam reads them back)
    params_ptr,  # (P,) fp32 flat parameters (FUSED_ADAM); None otherwise
    m_ptr,  # (P,) fp32 Adam first moments (FUSED_ADAM)
    v_ptr,  # (P,) fp32 Adam second moments (FUSED_ADAM)
    lowp_ptr,  # (P,) bf16 parameter copy the kernels read (WRITE_LOWP)
    hyper_ptr,  # float64 Adam hyper-parameters (FUSED_ADAM), see adam.py
    step_ptr,  # () fp32 Adam step (FUSED_ADAM)
    cursor_ptr,  # int64 [1] step cursor, += 1 by program 0 (ADVANCE)
    rng_ptr,  # int64 [seed, counter], counter += 1 by program 0 (ADVANCE)
    G,  # number of groups
    P,  # gradient elements over all groups (row stride of out)
    S,  # batch splits
    X_IN_WS: tl.constexpr,  # x lives in the workspace (the engine gathered it there)
    HAS_LABELS: tl.constexpr,  # some groups are label weights
    FUSED_ADAM: tl.constexpr,
    WRITE_LOWP: tl.constexpr,
    ADVANCE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # batch rows per inner step
    ADAM_ROWS: tl.constexpr,  # rows of the dW tile per Adam slice (FUSED_ADAM)
):
    pid = tl.program_id(0)
    grp = pid * 0  # an int32 tensor from the start, so the loop carries one type
    for gi in range(1, G):
        grp = tl.where(pid >= tl.load(table_ptr + gi * TABLE_COLS + COL_START), gi, grp)
    row = table_ptr + grp * TABLE_COLS
    start = tl.load(row + COL_START)
    tiles_k = tl.load(row + COL_TILES_K)
    a_in_x = tl.load(row + COL_A_IN_X)
    dy_off = tl.load(row + COL_DY_OFF)
    a_off = tl.load(row + COL_A_OFF)
    N = tl.load(row + COL_N)
    K = tl.load(row + COL_K)
    w_off = tl.load(row + COL_W_OFF)
    b_off = tl.load(row + COL_B_OFF)
    scale_rows = tl.load(row + COL_SCALE_ROWS)
    M = tl.load(row + COL_M)

    local = pid - start
    split = local % S
    tile = local // S
    tn = tile // tiles_k
    tk = tile % tiles_k
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tk * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    if X_IN_WS:
        a_base = ws_ptr + a_off
    else:
        if a_in_x != 0:
            a_base = x_ptr + a_off
        else:
            a_base = ws_ptr + a_off
    dy_base = ws_ptr + dy_off

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rows_per_split = tl.load(row + COL_ROWS_PER_SPLIT)
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
        a_mask = r_mask[:, None] & k_mask[None, :]
        if HAS_LABELS:
            # a label group's A is onehot(y) (BLOCK_R, BLOCK_K): its rows' labels compared with its columns.
            # Tensor-core dots take it branch-free (a branch spilled 40 bytes at 255 registers, conditional
            # pytorch-example B = 16384 bf16); FMA dots take the branch (branch-free spilled 12-36 bytes at
            # 128 registers in fp32). Report, sm_90, compiled, not timed.
            label_div = tl.load(row + COL_LABEL_DIV)
            if PRECISION == "ieee":
                if label_div != 0:
                    lab = tl.load(labels_ptr + rr // label_div, mask=r_mask, other=-1)
                    a = (lab[:, None] == rk[None, :]).to(dy.dtype)
                else:
                    a = tl.load(a_base + rr[:, None] * K + rk[None, :], mask=a_mask, other=0.0).to(dy.dtype)
            else:
                lab = tl.load(
                    labels_ptr + rr // tl.maximum(label_div, 1), mask=r_mask & (label_div != 0), other=-1
                )
                a = tl.load(a_base + rr[:, None] * K + rk[None, :], mask=a_mask & (label_div == 0), other=0.0)
                a = a.to(dy.dtype) + (lab[:, None] == rk[None, :]).to(dy.dtype)
        else:
            a = tl.load(a_base + rr[:, None] * K + rk[None, :], mask=a_mask, other=0.0).to(dy.dtype)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=PRECISION)
        bacc += tl.sum(dy.to(tl.float32), axis=0)
    w_offs = w_off + rn[:, None] * K + rk[None, :]
    w_mask = n_mask[:, None] & k_mask[None, :]
    b_mask = rn < tl.where((tk == 0) & (b_off >= 0), N, 0)  # the first K tile's programs own the bias, if any
    out = out_ptr + split * P
    tl.store(out + w_offs, acc, mask=w_mask)
    tl.store(out + b_off + rn, bacc, mask=b_mask)
    if FUSED_ADAM:
        # Adam over the tile in ADAM_ROWS-row slices read back from the gradient this program just wrote
        # (L2-resident): holding p, m, v for the whole tile next to the accumulator needed 255 registers and
        # spilled 9.5 KB in bf16 at 128 x 128 (resource report, sm_90). The barrier makes the CTA's own
        # stores visible to all its threads.
        tl.debug_barrier()
        step_size, bc2_sqrt, one_m_b1, beta2, one_m_b2, eps, wd = adam_scalars(hyper_ptr, step_ptr)
        for c in range(0, BLOCK_N, ADAM_ROWS):
            rc = tn * BLOCK_N + c + tl.arange(0, ADAM_ROWS)
            offs = w_off + rc[:, None] * K + rk[None, :]
            mask = (rc < N)[:, None] & k_mask[None, :]
            gw = tl.load(out_ptr + offs, mask=mask, other=0.0)
            adam_apply(params_ptr, m_ptr, v_ptr, lowp_ptr, offs, mask, gw, step_size, bc2_sqrt, one_m_b1, beta2, one_m_b2,
                       eps, wd, WRITE_LOWP)  # fmt: skip
        gb = tl.load(out_ptr + b_off + rn, mask=b_mask, other=0.0)
        adam_apply(params_ptr, m_ptr, v_ptr, lowp_ptr, b_off + rn, b_mask, gb, step_size, bc2_sqrt, one_m_b1, beta2,
                   one_m_b2, eps, wd, WRITE_LOWP)  # fmt: skip
    if ADVANCE:
        if pid == 0:
            tl.store(cursor_ptr, tl.load(cursor_ptr) + 1)
            tl.store(rng_ptr + 1, tl.load(rng_ptr + 1) + 1)


@triton.jit
def _split_sum_kernel(
    part_ptr,  # (S, P) fp32 partial sums
    out_ptr,  # (P,) fp32 output gradient (not FUSED_ADAM); None otherwise
    params_ptr,  # (P,) fp32 flat parameters (FUSED_ADAM)
    m_ptr,  # (P,) Adam first moments (FUSED_ADAM)
    v_ptr,  # (P,) Adam second moments (FUSED_ADAM)
    lowp_ptr,  # (P,) bf16 parameter copy (WRITE_LOWP)
    hyper_ptr,  # float64 Adam hyper-parameters (FUSED_ADAM)
    step_ptr,  # () fp32 Adam step (FUSED_ADAM)
    cursor_ptr,  # int64 [1] step cursor (ADVANCE)
    rng_ptr,  # int64 [seed, counter] (ADVANCE)
    P,
    S,
    FUSED_ADAM: tl.constexpr,
    WRITE_LOWP: tl.constexpr,
    ADVANCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, S):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * P + offs, mask=mask, other=0.0)
    if FUSED_ADAM:
        step_size, bc2_sqrt, one_m_b1, beta2, one_m_b2, eps, wd = adam_scalars(hyper_ptr, step_ptr)
        adam_apply(params_ptr, m_ptr, v_ptr, lowp_ptr, offs, mask, acc, step_size, bc2_sqrt, one_m_b1, beta2,
                   one_m_b2, eps, wd, WRITE_LOWP)  # fmt: skip
    else:
        tl.store(out_ptr + offs, acc, mask=mask)
    if ADVANCE:
        if pid == 0:
            tl.store(cursor_ptr, tl.load(cursor_ptr) + 1)
            tl.store(rng_ptr + 1, tl.load(rng_ptr + 1) + 1)


@dataclass(frozen=True)
class GradGroup:
    """One layer's weight gradient: dy at ``dy_off`` (M, n) in the workspace, a (M, k) in x or the workspace."""

    dy_off: int
    a_off: int | None  # None: a is the network input x
    n: int
    k: int
    w_off: int  # offset of dW (n, k) in the flat gradient
    b_off: int  # offset of db (n,); -1: the layer has no bias (a label weight)
    scale_rows: bool = False
    m: int = 0  # rows of dy and a; 0: the launch's batch
    label_div: int = 0  # > 0: a is onehot(labels[r // label_div]), not read


@dataclass(frozen=True)
class AdamBuffers:
    """The engine's flat optimizer state: Adam updates these in the weight-gradient epilogue."""

    params: torch.Tensor  # (P,) fp32
    exp_avg: torch.Tensor  # (P,) fp32
    exp_avg_sq: torch.Tensor  # (P,) fp32
    hyper: torch.Tensor  # float64 [lr, beta1, beta2, eps, weight_decay]
    step: torch.Tensor  # () fp32
    lowp: torch.Tensor | None = None  # (P,) bf16 copy the kernels read, refreshed here


_TABLES: dict[tuple, tuple[torch.Tensor, int]] = {}


def group_tiles(groups: tuple[GradGroup, ...], tiles: WgradTiles) -> int:
    return sum(triton.cdiv(g.n, tiles.n) * triton.cdiv(g.k, tiles.k) for g in groups)


def _table(groups, tiles: WgradTiles, splits: int, device: torch.device, x_in_ws: bool, batch: int):
    """The device table for ``groups`` (cached per shape: built and copied once) and the program count."""
    key = (groups, tiles, splits, str(device), x_in_ws, batch)
    if key not in _TABLES:
        rows, start = [], 0
        for g in groups:
            tiles_n, tiles_k = triton.cdiv(g.n, tiles.n), triton.cdiv(g.k, tiles.k)
            a_in_x = g.a_off is None and not x_in_ws
            a_off = 0 if g.a_off is None else g.a_off
            m = g.m or batch
            rows_per_split = triton.cdiv(triton.cdiv(m, splits), tiles.r) * tiles.r
            rows.append([start, tiles_k, int(a_in_x), g.dy_off, a_off, g.n, g.k, g.w_off, g.b_off,
                         int(g.scale_rows), m, g.label_div, rows_per_split])  # fmt: skip
            start += tiles_n * tiles_k * splits
        assert len(rows[0]) == TABLE_COLS.value
        _TABLES[key] = (torch.tensor(rows, dtype=torch.int64, device=device), start)
    return _TABLES[key]


def grouped_weight_grads(
    *,
    groups: tuple[GradGroup, ...],
    ws: torch.Tensor,
    x: torch.Tensor | None,
    grad_out: torch.Tensor,
    batch: int,
    tiles: WgradTiles,
    precision: str,
    out: torch.Tensor | None = None,
    adam: AdamBuffers | None = None,
    advance: tuple[torch.Tensor, torch.Tensor] | None = None,
    x_offset: int | None = None,
    labels: torch.Tensor | None = None,
) -> None:
    """Every group's dW and db into the flat fp32 gradient ``out`` (P,), then through Adam when ``adam``.

    ``x`` None: the network input lives in the workspace at ``x_offset`` (the groups' ``a_off`` None).
    ``advance``: (cursor, rng_state) to advance by one in the step's last kernel. ``labels`` (B,) int32:
    the label groups' y. ``batch``: the rows of groups that do not give their own, and of the split
    heuristic (pass the largest group's rows). 1 or 2 launches.
    """
    assert out is not None, "the flat fp32 gradient buffer (Adam reads the gradient back from it)"
    p = out.numel()
    device = ws.device
    x_in_ws = x is None
    if x_in_ws:
        groups = tuple(g if g.a_off is not None or g.label_div else dataclasses.replace(g, a_off=x_offset)
                       for g in groups)  # fmt: skip
    splits = wgrad_splits(batch, group_tiles(groups, tiles))
    table, programs = _table(groups, tiles, splits, device, x_in_ws, batch)
    part = out if splits == 1 else torch.empty(splits, p, dtype=torch.float32, device=device)
    fused_here = adam is not None and splits == 1
    a = adam if adam is not None else AdamBuffers(*(None,) * 5)
    adv = advance if advance is not None else (None, None)
    # grid: one program per (group, N tile, K tile, batch split)
    launch(
        _grouped_wgrad_kernel, (programs,),
        table_ptr=table, ws_ptr=ws, x_ptr=x, labels_ptr=labels, s_ptr=grad_out, s_stride=grad_out.stride(0),
        out_ptr=part,
        params_ptr=a.params if fused_here else None, m_ptr=a.exp_avg if fused_here else None,
        v_ptr=a.exp_avg_sq if fused_here else None, lowp_ptr=a.lowp if fused_here else None,
        hyper_ptr=a.hyper if fused_here else None, step_ptr=a.step if fused_here else None,
        cursor_ptr=adv[0] if splits == 1 else None, rng_ptr=adv[1] if splits == 1 else None,
        G=len(groups), P=p, S=splits, X_IN_WS=x_in_ws, HAS_LABELS=labels is not None, FUSED_ADAM=fused_here, WRITE_LOWP=fused_here and a.lowp is not None,
        ADVANCE=advance is not None and splits == 1, PRECISION=precision,
        BLOCK_N=tiles.n, BLOCK_K=tiles.k, BLOCK_R=tiles.r, ADAM_ROWS=ADAM_ROWS, num_warps=tiles.warps,
    )  # fmt: skip
    if splits > 1:
        # grid: one program per ELEMENTWISE_BLOCK gradient elements
        launch(
            _split_sum_kernel, (triton.cdiv(p, ELEMENTWISE_BLOCK),),
            part_ptr=part, out_ptr=out, params_ptr=a.params, m_ptr=a.exp_avg, v_ptr=a.exp_avg_sq,
            lowp_ptr=a.lowp, hyper_ptr=a.hyper, step_ptr=a.step, cursor_ptr=adv[0], rng_ptr=adv[1], P=p,
            S=splits, FUSED_ADAM=adam is not None, WRITE_LOWP=a.lowp is not None, ADVANCE=advance is not None,
            BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS,
        )  # fmt: skip
