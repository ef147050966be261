"""Hidden MLP layers on a 2-D grid (row blocks x feature tiles): y = act(a W^T + b) and its input gradient
dx = ((s * dy) W) * act'(h), each in one kernel, with the neighbouring step fused where it is row-local:

forward, the A operand (``A_MODE``):
    A_LOAD    a is read from memory (an earlier layer's output, or the caller's x);
    A_GATHER  the first layer reads its rows straight from the resident uint8 data set by index
              (``batches[cursor, row]``), scales to [0, 1] and binarizes with counter-keyed Philox noise
              when asked; the first feature tile's programs write the compute-dtype x for the backward;
    A_LATENT  a is z, finished in the prologue from the previous kernel's head partials (see latent.py).
forward epilogue: ``HEAD`` (last encoder layer) also emits this tile's partial of the encoder head GEMM.
``LABEL`` (the first encoder and decoder layers of a conditional VAE): [a, onehot(y)] W^T = a W_a^T +
W_y[:, y], so the label is a per-row bias gathered from the label weight's column y: no GEMM, no launch.
The gathering layer reads y from the resident labels by the same index as the pixels and writes it out for
the decoder and the weight gradients (whose label groups read onehot(y) as a comparison, never stored).
backward: ``DZ`` (first decoder layer) also emits this tile's partial dz = dx_tile W_dec0[tile, :], and
``FINALIZE`` (the output layer's input gradient) sums the BCE partials of the output kernel into the
per-sample loss (+ beta KL) and, with ``ACCUMULATE``, adds it to the engine's device loss accumulator.

The forward stores only y: for ReLU the backward mask is y > 0 and for tanh the derivative is 1 - y^2,
so no pre-activation is kept. Weights may be fp32 (master copy) while activations are bf16: a tile is
cast to the activation dtype as it is loaded, and every dot accumulates in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import triton
import triton.language as tl

from fastvae.kernels.activations import act_grad_from_output, apply_act
from fastvae.kernels.heuristics import Tiles, latent_pad, launch
from fastvae.kernels.latent import latent_rows
from fastvae.kernels.row_noise import row_uniform


class AMode(IntEnum):
    """The forward kernel's A operand (``A_MODE``): named on the host (launcher, estimate, resources)."""

    LOAD = 0
    GATHER = 1
    LATENT = 2


# The same modes as the kernel reads them: a @triton.jit function sees only tl.constexpr globals.
A_LOAD, A_GATHER, A_LATENT = (tl.constexpr(int(m)) for m in AMode)
UINT8_SCALE = tl.constexpr(255.0)


@dataclass(frozen=True)
class Gather:
    """A_GATHER: the first layer's rows come from the resident uint8 data set."""

    data: torch.Tensor  # (N, D) uint8
    batches: torch.Tensor  # (steps, B) int64 data indices of the epoch's batches
    cursor: torch.Tensor  # int64 [1] this step's batch
    x_out: torch.Tensor  # (B, D) the gathered batch, compute dtype
    binarize: tuple[torch.Tensor, int, int] | None = None  # (epoch_base int64 (), key_lo, key_hi) or None


@dataclass(frozen=True)
class LabelIn:
    """LABEL: the per-row label bias of a conditional VAE's first encoder or decoder layer."""

    w: torch.Tensor  # (N, C) label weight (the label columns of [W | W_y])
    y: torch.Tensor  # (B,) int32 labels: read, or written by a gathering layer
    data: torch.Tensor | None = None  # (N_data,) int64 resident labels (a gathering layer reads y from here)


@dataclass(frozen=True)
class LatentIn:
    """A_LATENT: z is finished in the prologue from the head partials of the previous kernel."""

    partials: torch.Tensor  # (T, B, 2 ZP) fp32 head partials
    b_head: torch.Tensor  # (2Z,) head bias
    eps: torch.Tensor | None  # (B, Z) fp32 caller noise, or None: drawn from rng
    rng: torch.Tensor  # int64 [seed, counter]
    mulv: torch.Tensor  # (B, 2Z) fp32 out
    z: torch.Tensor  # (B, Z) out, compute dtype
    kl: torch.Tensor  # (B,) fp32 out


@dataclass(frozen=True)
class LossFinalize:
    """FINALIZE: sum the output kernel's BCE partials into the per-sample loss (+ beta KL)."""

    rec_partials: torch.Tensor  # (T, B) fp32
    kl: torch.Tensor  # (B,) fp32
    beta: torch.Tensor  # () fp32
    loss: torch.Tensor  # (B,) fp32 out
    loss_acc: torch.Tensor | None = None  # (B,) fp32 device accumulator, += loss (ACCUMULATE)


# Long by design: one fused kernel (its stages share registers and one launch); splitting it into
# helpers would not shorten what a reader must follow, and each stage is commented where it starts.
@triton.jit
def _layer_fwd_kernel(
    a_ptr,  # (M, K) input activations (A_LOAD); None otherwise
    data_ptr,  # (N_data, K) uint8 resident data set (A_GATHER); None otherwise
    batches_ptr,  # (steps, M) int64 row indices of the epoch's batches (A_GATHER)
    cursor_ptr,  # int64 [1] index of this step's batch in ``batches`` (A_GATHER)
    epoch_base_ptr,  # int64 () epoch * N: sample id = epoch_base + data index keys the binarization (BINARIZE)
    x_out_ptr,  # (M, K) output: the gathered batch in the compute dtype (A_GATHER)
    hp_ptr,  # (T_in, M, 2 ZP) fp32 head partials of the previous kernel (A_LATENT)
    bh_ptr,  # (2Z,) encoder head bias (A_LATENT)
    eps_ptr,  # (M, Z) fp32 caller noise (A_LATENT and not USE_RNG); None otherwise
    rng_ptr,  # int64 [seed, counter] (A_LATENT with USE_RNG)
    mulv_ptr,  # (M, 2Z) fp32 output [mu | logvar] (A_LATENT)
    z_ptr,  # (M, Z) output z (A_LATENT)
    kl_ptr,  # (M,) fp32 output KL (A_LATENT)
    w_ptr,  # (N, K) weight, nn.Linear layout
    b_ptr,  # (N,) bias
    y_ptr,  # (M, N) output act(a W^T + b), in the compute dtype
    whead_ptr,  # (2Z, N) encoder head weight (HEAD); None otherwise
    hp_out_ptr,  # (T, M, 2 ZP) fp32 output head partials, T = the grid's feature tiles (HEAD)
    step_ptr,  # () fp32 Adam step counter, incremented by program (0, 0) (BUMP_STEP); None otherwise
    wy_ptr,  # (N, C) label weight (LABEL); None otherwise
    label_ptr,  # (M // K,) int32 labels: read (LABEL), or written by the first feature tile (LABEL, A_GATHER)
    label_data_ptr,  # (N_data,) int64 resident labels, indexed like the pixels (LABEL, A_GATHER)
    M,  # rows (batch; batch x K on the decoder side)
    N,  # output features
    K,  # input features (Z when A_LATENT)
    Z,  # latent width (A_LATENT, HEAD)
    C,  # label classes (LABEL)
    T_in,  # head partials to sum (A_LATENT)
    row_offset,  # global index of batch row 0: keys the in-kernel eps
    SAMPLES,  # latent samples per batch row: row r is sample r % SAMPLES of batch row r // SAMPLES
    key_lo,  # int32 words of noise.mix(seed, salt) for the binarization (BINARIZE)
    key_hi,
    A_MODE: tl.constexpr,  # A_LOAD, A_GATHER or A_LATENT
    BINARIZE: tl.constexpr,  # A_GATHER: x = [u < pixel], u by fastvae.noise's row rule (row_noise.py)
    USE_RNG: tl.constexpr,  # A_LATENT: eps drawn in-kernel
    IW: tl.constexpr,  # A_LATENT: the per-sample log-ratio instead of the closed-form KL (latent.py)
    LABEL: tl.constexpr,  # add the label bias W_y[:, y]
    HEAD: tl.constexpr,  # emit head partials
    BUMP_STEP: tl.constexpr,  # advance the optimizer's step counter
    ACT: tl.constexpr,  # 0 none, 1 relu, 2 tanh
    PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ZP: tl.constexpr,  # Z padded to a power of two >= 16
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    # the first feature tile's programs write the per-row outputs: a row bound of 0 masks the others
    write_rows = tl.where(pid_n == 0, M, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if A_MODE == A_LATENT:
        zc = latent_rows(hp_ptr, bh_ptr, eps_ptr, rng_ptr, mulv_ptr, z_ptr, kl_ptr, rm, write_rows, M, Z, T_in,
                         row_offset, SAMPLES, USE_RNG, IW, ZP)  # fmt: skip
        rz = tl.arange(0, ZP)
        w = tl.load(
            w_ptr + rn[None, :] * K + rz[:, None], mask=(rz[:, None] < K) & n_mask[None, :], other=0.0
        )
        acc = tl.dot(zc, w.to(zc.dtype), acc, input_precision=PRECISION)
    else:
        if A_MODE == A_GATHER:
            cursor = tl.load(cursor_ptr)
            src = tl.load(batches_ptr + cursor * M + rm, mask=m_mask, other=0)
            if BINARIZE:
                ids = tl.load(epoch_base_ptr) + src  # run-wide sample ids (schedules.sample_ids)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < K
            mk_mask = m_mask[:, None] & k_mask[None, :]
            if A_MODE == A_GATHER:
                px = tl.load(data_ptr + src[:, None] * K + rk[None, :], mask=mk_mask, other=0)
                xf = tl.div_rn(px.to(tl.float32), UINT8_SCALE)  # exact, as torch divides
                if BINARIZE:
                    u = row_uniform(ids, rk, key_lo, key_hi)
                    xf = (u < xf).to(tl.float32)
                a = xf.to(x_out_ptr.dtype.element_ty)
                tl.store(
                    x_out_ptr + rm[:, None] * K + rk[None, :], a, mask=mk_mask & (rm < write_rows)[:, None]
                )
            else:
                a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=mk_mask, other=0.0)
            # (BLOCK_K, BLOCK_N) tile of W^T
            w = tl.load(
                w_ptr + rn[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if LABEL:
        if A_MODE == A_GATHER:
            lab = tl.load(label_data_ptr + src, mask=m_mask, other=0).to(tl.int32)
            tl.store(label_ptr + rm, lab, mask=rm < write_rows)
        else:
            lab = tl.load(label_ptr + rm // SAMPLES, mask=m_mask, other=0)
        # [a, onehot(y)] W^T = a W_a^T + W_y[:, y]: the label weight's column y, gathered per row
        wy = tl.load(
            wy_ptr + rn[None, :] * C + lab[:, None], mask=m_mask[:, None] & n_mask[None, :], other=0.0
        )
        acc += wy.to(tl.float32)
    y = apply_act(acc + bias[None, :], ACT)
    yc = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], yc, mask=m_mask[:, None] & n_mask[None, :])
    if HEAD:
        # this tile's share of [mu | logvar] = h W_head^T: (BLOCK_M, ZP) each, padded columns are zero
        rz = tl.arange(0, ZP)
        wz_mask = n_mask[:, None] & (rz[None, :] < Z)
        w_mu = tl.load(whead_ptr + rz[None, :] * N + rn[:, None], mask=wz_mask, other=0.0)
        w_lv = tl.load(whead_ptr + (rz[None, :] + Z) * N + rn[:, None], mask=wz_mask, other=0.0)
        p_mu = tl.dot(yc, w_mu.to(yc.dtype), input_precision=PRECISION)
        p_lv = tl.dot(yc, w_lv.to(yc.dtype), input_precision=PRECISION)
        out = hp_out_ptr + (pid_n * M + rm[:, None]) * (2 * ZP) + rz[None, :]
        tl.store(out, p_mu, mask=m_mask[:, None])
        tl.store(out + ZP, p_lv, mask=m_mask[:, None])
    if BUMP_STEP:
        if pid_m + pid_n == 0:
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)


# Long by design: one fused kernel (its stages share registers and one launch); splitting it into
# helpers would not shorten what a reader must follow, and each stage is commented where it starts.
@triton.jit
def _layer_bwd_kernel(
    dy_ptr,  # (M, N) gradient at this layer's pre-activation output (unscaled when ROW_SCALE)
    s_ptr,  # (M // K,) per-row scale of dy (ROW_SCALE, FINALIZE); None otherwise
    s_stride,  # element stride of s: 0 when grad_output is an expanded scalar (the backward of mean())
    rw_ptr,  # (M,) fp32 per-sample weights, multiplying s (ROW_WEIGHTS: K samples per row); None otherwise
    s_out_ptr,  # (M,) fp32 output: the combined row scale, for the weight gradients (ROW_WEIGHTS)
    w_ptr,  # (N, K) weight of this layer
    h_ptr,  # (M, K) this layer's input = the previous layer's activated output (for act'); None if ACT == 0
    dx_ptr,  # (M, K) output: ((s * dy) W) * act'(h)
    wz_ptr,  # (K, Z) first decoder layer weight (DZ): this layer's input gradient is that layer's dy
    dzp_ptr,  # (T, M, ZP) fp32 output dz partials, T = the grid's feature tiles (DZ)
    rp_ptr,  # (T_rec, M) fp32 BCE partial row sums of the output kernel (FINALIZE)
    kl_ptr,  # (M,) fp32 KL (FINALIZE)
    beta_ptr,  # () fp32 KL weight (FINALIZE)
    loss_ptr,  # (M,) fp32 output per-sample -ELBO (FINALIZE)
    loss_acc_ptr,  # (M,) fp32 device loss accumulator, += loss (ACCUMULATE)
    M,
    N,
    K,
    Z,  # latent width (DZ)
    T_rec,  # BCE partials per row (FINALIZE)
    SAMPLES,  # rows per s entry (ROW_WEIGHTS)
    ACT: tl.constexpr,  # activation that produced h (its derivative is applied); 0 for the network input
    ROW_SCALE: tl.constexpr,  # scale each row by s (dy was stored unscaled by the forward)
    ROW_WEIGHTS: tl.constexpr,  # row r's scale is s[r // SAMPLES] * rw[r]
    DZ: tl.constexpr,
    FINALIZE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # reduction chunk over N
    BLOCK_K: tl.constexpr,  # output tile over K (the second grid axis)
    ZP: tl.constexpr,
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
        if ROW_WEIGHTS:
            s = tl.load(s_ptr + (rm // SAMPLES) * s_stride, mask=m_mask, other=0.0).to(tl.float32)
            s = s * tl.load(rw_ptr + rm, mask=m_mask, other=0.0)
            tl.store(s_out_ptr + rm, s, mask=rm < tl.where(pid_k == 0, M, 0))
        else:
            s = tl.load(s_ptr + rm * s_stride, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    mask = m_mask[:, None] & k_mask[None, :]
    if ACT != 0:
        h = tl.load(h_ptr + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * act_grad_from_output(h, ACT)
    dxc = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], dxc, mask=mask)
    if DZ:
        rz = tl.arange(0, ZP)
        wz = tl.load(
            wz_ptr + rk[:, None] * Z + rz[None, :], mask=k_mask[:, None] & (rz[None, :] < Z), other=0.0
        )
        dz = tl.dot(dxc, wz.to(dxc.dtype), input_precision=PRECISION)
        tl.store(dzp_ptr + (pid_k * M + rm[:, None]) * ZP + rz[None, :], dz, mask=m_mask[:, None])
    if FINALIZE:
        if pid_k == 0:
            rec = tl.load(rp_ptr + rm, mask=m_mask, other=0.0)
            for t in range(1, T_rec):  # fixed order: deterministic
                rec += tl.load(rp_ptr + t * M + rm, mask=m_mask, other=0.0)
            loss = rec + tl.load(beta_ptr) * tl.load(kl_ptr + rm, mask=m_mask, other=0.0)
            tl.store(loss_ptr + rm, loss, mask=m_mask)
            if ACCUMULATE:
                prev = tl.load(loss_acc_ptr + rm, mask=m_mask, other=0.0)
                tl.store(loss_acc_ptr + rm, prev + loss, mask=m_mask)


def layer_forward(
    *,
    w: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    act: int,
    tiles: Tiles,
    precision: str,
    a: torch.Tensor | None = None,
    gather: Gather | None = None,
    latent: LatentIn | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    step: torch.Tensor | None = None,
    zdim: int = 0,
    row_offset: int = 0,
    label: LabelIn | None = None,
    samples: int = 1,
    iw: bool = False,
) -> None:
    """out (M, N) = act(A (M, K) @ w (N, K)^T + b) with A from ``a``, ``gather`` or ``latent``.

    ``head``: (w_head (2Z, N), partials out (tiles over N, M, 2 ZP)); ``step``: the Adam step to advance;
    ``label``: add the label bias; ``samples``: K latent samples per batch row (M = B K, A_LATENT);
    ``iw``: write the per-sample log-ratio instead of the closed-form KL (A_LATENT).
    """
    m, n = out.shape
    k = w.shape[1]
    assert w.shape == (n, k) and b.shape == (n,), (w.shape, b.shape, out.shape)
    mode = AMode.LATENT if latent is not None else AMode.GATHER if gather is not None else AMode.LOAD
    binarize = gather is not None and gather.binarize is not None
    epoch_base, key_lo, key_hi = gather.binarize if binarize else (None, 0, 0)
    use_rng = latent is not None and latent.eps is None
    g = gather if gather is not None else Gather(*(None,) * 4)
    lat = latent if latent is not None else LatentIn(*(None,) * 7)
    lab = label if label is not None else LabelIn(None, None)
    if head is not None:
        assert head[1].shape[0] == triton.cdiv(n, tiles.cols), (head[1].shape, n, tiles)
    # grid: one program per (row block, output-feature tile)
    grid = (triton.cdiv(m, tiles.rows), triton.cdiv(n, tiles.cols))
    launch(
        _layer_fwd_kernel, grid,
        a_ptr=a, data_ptr=g.data, batches_ptr=g.batches, cursor_ptr=g.cursor, epoch_base_ptr=epoch_base,
        x_out_ptr=g.x_out, hp_ptr=lat.partials, bh_ptr=lat.b_head, eps_ptr=lat.eps,
        rng_ptr=lat.rng if use_rng else None, mulv_ptr=lat.mulv, z_ptr=lat.z, kl_ptr=lat.kl, w_ptr=w, b_ptr=b,
        y_ptr=out, whead_ptr=head[0] if head else None, hp_out_ptr=head[1] if head else None, step_ptr=step,
        wy_ptr=lab.w, label_ptr=lab.y, label_data_ptr=lab.data,
        M=m, N=n, K=k, Z=zdim, C=lab.w.shape[1] if label else 0, T_in=latent.partials.shape[0] if latent else 0,
        row_offset=row_offset, SAMPLES=samples, key_lo=key_lo, key_hi=key_hi, A_MODE=int(mode), BINARIZE=binarize,
        USE_RNG=use_rng, IW=iw, LABEL=label is not None, HEAD=head is not None,
        BUMP_STEP=step is not None, ACT=act, PRECISION=precision, BLOCK_M=tiles.rows, BLOCK_N=tiles.cols,
        BLOCK_K=latent_pad(k) if latent is not None else tiles.red, ZP=latent_pad(max(zdim, 1)),
        num_warps=tiles.warps,
    )  # fmt: skip


def layer_backward_input(
    *,
    dy: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor | None,
    act: int,
    out: torch.Tensor,
    tiles: Tiles,
    precision: str,
    row_scale: torch.Tensor | None = None,
    dz: tuple[torch.Tensor, torch.Tensor] | None = None,
    finalize: LossFinalize | None = None,
    row_weights: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> None:
    """out (M, K) = ((row_scale * dy) (M, N) @ w (N, K)) * act'(h).

    ``dz``: (w_dec0 (K, Z), partials out (tiles over K, M, ZP)). ``row_weights``: (rw (M,), scale out (M,),
    K): row r's scale is row_scale[r // K] * rw[r], also written to ``scale out`` for the weight gradients.
    """
    m, n = dy.shape
    k = w.shape[1]
    assert w.shape == (n, k) and out.shape == (m, k)
    fin = finalize if finalize is not None else LossFinalize(*(None,) * 4)
    rw, s_out, samples = row_weights if row_weights is not None else (None, None, 1)
    zdim = dz[0].shape[1] if dz is not None else 0
    if dz is not None:
        assert dz[1].shape[0] == triton.cdiv(k, tiles.cols)
    # grid: one program per (row block, input-feature tile)
    grid = (triton.cdiv(m, tiles.rows), triton.cdiv(k, tiles.cols))
    launch(
        _layer_bwd_kernel, grid,
        dy_ptr=dy, s_ptr=row_scale, s_stride=row_scale.stride(0) if row_scale is not None else 0, rw_ptr=rw,
        s_out_ptr=s_out, w_ptr=w,
        h_ptr=h if act != 0 else None, dx_ptr=out, wz_ptr=dz[0] if dz else None, dzp_ptr=dz[1] if dz else None,
        rp_ptr=fin.rec_partials, kl_ptr=fin.kl, beta_ptr=fin.beta, loss_ptr=fin.loss, loss_acc_ptr=fin.loss_acc,
        M=m, N=n, K=k, Z=zdim, T_rec=fin.rec_partials.shape[0] if finalize else 0, SAMPLES=samples,
        ACT=act, ROW_SCALE=row_scale is not None, ROW_WEIGHTS=row_weights is not None, DZ=dz is not None, FINALIZE=finalize is not None,
        ACCUMULATE=fin.loss_acc is not None, PRECISION=precision, BLOCK_M=tiles.rows,
        BLOCK_N=tiles.red, BLOCK_K=tiles.cols, ZP=latent_pad(max(zdim, 1)), num_warps=tiles.warps,
    )  # fmt: skip
