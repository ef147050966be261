"""The latent step, split across a 2-D grid with no kernel of its own in the forward.

Forward. The last encoder layer's kernel emits, per feature tile t, the partial products
    P_t = h[:, tile t] @ W_head[:, tile t]^T            (M, 2 ZP), fp32
and the next kernel (the first decoder layer, one program per row block x feature tile) sums them in a
fixed order t = 0, 1, ... (deterministic, no atomics) and finishes the latent step in its prologue:
    [mu | logvar] = sum_t P_t + b_head
    z = mu + exp(0.5 logvar) * eps
    kl = -0.5 sum(1 + logvar - mu^2 - exp(logvar))     per sample, fp32
Every feature-tile program of that kernel recomputes this (M x 2ZP x tiles additions, a few kFLOP per row
block): cheaper than a launch. The programs of the first feature tile write mu, logvar, z and kl.

eps is either given by the caller (exact comparison with the reference) or drawn in the kernel with
Philox, keyed by (seed, counter) read from a device tensor and by the sample's global row index: nothing
is baked into a CUDA graph, and the backward regenerates eps from the same key instead of storing it.

Backward (:func:`latent_backward`, one program per row block x encoder feature tile). The first decoder
layer's input-gradient kernel emits partial dz per feature tile; this kernel sums them in order and
    dmu = dz + s beta mu
    dlogvar = dz eps 0.5 exp(0.5 logvar) + s beta 0.5 (exp(logvar) - 1)
    dh[:, tile] = ([dmu | dlogvar] W_head[:, tile]) * act'(h[:, tile])
with s the per-sample grad_output. The padded latent columns (Z -> ZP >= 16) are masked to zero.

K samples per row (``MULTI``: k > 1 or the IWAE objective). The decoder side runs on B K rows, row
r = i K + j holding sample j of batch row i: its eps is keyed by the global sample row (row_offset K + r),
and the kernel writes a per-row KL term: the closed-form KL (objective "elbo") or
    log q(z_j|x) - log p(z_j) = 0.5 sum(z_j^2 - eps_j^2 - logvar)          (objective "iwae")
The backward sums over the K samples of each row, with w_j the normalised importance weight (1/K for "elbo")
already folded into dz_j by the output layer's row scale:
    elbo: dmu = sum_j dz_j + s beta mu,   dlogvar = sum_j dz_j eps_j std / 2 + s beta (std^2 - 1) / 2
    iwae: dmu = sum_j dz_j + c_j z_j,     dlogvar = sum_j dz_j eps_j std / 2 + c_j (z_j eps_j std / 2 - 1 / 2)
with c_j = s beta w_j (the gradient of -log mean_j exp(-rec_j - beta (log q_j - log p_j)) w.r.t. the jth
log-ratio is beta w_j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.kernels.activations import act_grad_from_output
from fastvae.kernels.heuristics import latent_pad, launch

# Philox key spreading: counter * an odd 63-bit constant spreads successive counters over the key's bits.
EPS_KEY_MULT = tl.constexpr(0x632BE59BD9B4E019)
PI = tl.constexpr(3.141592653589793)
# Rows of the eps-drawing helper kernel's programs.
DRAW_EPS_ROWS = 16


@triton.jit
def _box_muller_cos(u1, u2):
    """sqrt(-2 log u1) cos(2 pi u2): Box-Muller as ``tl.randn`` computes it, with the cosine from a polynomial.

    ``tl.randn`` calls libdevice's cosf, whose large-argument reduction (never reached for 2 pi u2 < 2 pi)
    keeps a 28-byte local-memory array: ptxas counted 12-24 spill bytes in every kernel drawing eps (iwae,
    resource report, sm_90). Here cos(2 pi u) = 2 s^2 - 1 with s = sin(pi (u - 1/2)), |pi (u - 1/2)| <= pi/2,
    from its Taylor series to h^13 (truncation error < 7e-10): plain FMAs, no local memory.
    """
    u1 = tl.maximum(1.0e-7, u1)
    h = PI * (u2 - 0.5)
    h2 = h * h
    p = -1.0 / 39916800.0 + h2 * (1.0 / 6227020800.0)
    p = 1.0 / 362880.0 + h2 * p
    p = -1.0 / 5040.0 + h2 * p
    p = 1.0 / 120.0 + h2 * p
    p = -1.0 / 6.0 + h2 * p
    s = h * (1.0 + h2 * p)
    return tl.sqrt(-2.0 * tl.log(u1)) * (2.0 * s * s - 1.0)


@triton.jit
def philox_eps(rng_ptr, rows, cols, Z):
    """Standard-normal eps for (global row, latent column), keyed by the device [seed, counter]."""
    seed = tl.load(rng_ptr)
    counter = tl.load(rng_ptr + 1)
    key = seed + counter * EPS_KEY_MULT
    offsets = (rows[:, None] * Z + cols[None, :]).to(tl.int32)
    i1, i2, _, _ = tl.randint4x(key, offsets)
    return _box_muller_cos(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2))


@triton.jit
def latent_rows(
    hp_ptr,  # (T, M, 2 ZP) fp32 head partials of the last encoder layer's T feature tiles
    bh_ptr,  # (2Z,) head bias
    eps_ptr,  # (M, Z) fp32 caller noise; None when USE_RNG
    rng_ptr,  # int64 [seed, counter]; read when USE_RNG
    mulv_ptr,  # (M, 2Z) fp32 output [mu | logvar]
    z_ptr,  # (M, Z) output z in the activation dtype
    kl_ptr,  # (M,) fp32 output KL
    rm,  # (BLOCK_M,) rows of the decoder side: sample rm % K of batch row rm // K
    write_rows,  # rows below this index are written (M in the programs that write mulv, z, kl; else 0)
    M,  # decoder-side rows, B K
    Z,
    T,
    row_offset,  # global index of batch row 0 (its samples are keyed from row_offset K)
    K,  # latent samples per batch row
    USE_RNG: tl.constexpr,
    IW: tl.constexpr,  # kl_ptr gets log q(z|x) - log p(z) of each sample instead of the closed-form KL
    ZP: tl.constexpr,
):
    """Finish the latent step for rows ``rm``; returns z (BLOCK_M, ZP) in the activation dtype."""
    rz = tl.arange(0, ZP)
    m_mask = rm < M
    z_mask = rz < Z
    mz_mask = m_mask[:, None] & z_mask[None, :]
    src = rm // K  # the batch row whose [mu | logvar] this sample uses
    MB = M // K  # batch rows: the head partials' row count
    base = hp_ptr + src[:, None] * (2 * ZP) + rz[None, :]
    mu = tl.load(base, mask=m_mask[:, None], other=0.0)
    lv = tl.load(base + ZP, mask=m_mask[:, None], other=0.0)
    for t in range(1, T):  # fixed order: deterministic
        mu += tl.load(base + t * MB * (2 * ZP), mask=m_mask[:, None], other=0.0)
        lv += tl.load(base + t * MB * (2 * ZP) + ZP, mask=m_mask[:, None], other=0.0)
    mu += tl.load(bh_ptr + rz, mask=z_mask, other=0.0).to(tl.float32)[None, :]
    lv += tl.load(bh_ptr + Z + rz, mask=z_mask, other=0.0).to(tl.float32)[None, :]
    if USE_RNG:
        eps = philox_eps(rng_ptr, row_offset * K + rm, rz, Z)
    else:
        eps = tl.load(eps_ptr + rm[:, None] * Z + rz[None, :], mask=mz_mask, other=0.0).to(tl.float32)
    z = tl.where(mz_mask, mu + tl.exp(0.5 * lv) * eps, 0.0)
    if IW:
        kl = tl.sum(tl.where(mz_mask, 0.5 * (z * z - eps * eps - lv), 0.0), axis=1)
    else:
        kl = tl.sum(tl.where(mz_mask, -0.5 * (1.0 + lv - mu * mu - tl.exp(lv)), 0.0), axis=1)
    zc = z.to(z_ptr.dtype.element_ty)
    wmask = mz_mask & (rm < write_rows)[:, None]
    mv_mask = wmask & (rm % K == 0)[:, None]  # one sample per batch row writes its [mu | logvar]
    tl.store(mulv_ptr + src[:, None] * (2 * Z) + rz[None, :], mu, mask=mv_mask)
    tl.store(mulv_ptr + src[:, None] * (2 * Z) + Z + rz[None, :], lv, mask=mv_mask)
    tl.store(z_ptr + rm[:, None] * Z + rz[None, :], zc, mask=wmask)
    tl.store(kl_ptr + rm, kl, mask=rm < write_rows)
    return zc


# Long by design: one fused kernel (its stages share registers and one launch); splitting it into
# helpers would not shorten what a reader must follow, and each stage is commented where it starts.
@triton.jit
def _latent_bwd_kernel(
    dzp_ptr,  # (T, M K, ZP) fp32 partial dz of the first decoder layer's T feature tiles (already scaled by s)
    mulv_ptr,  # (M, 2Z) saved [mu | logvar], fp32
    eps_ptr,  # (M K, Z) caller's noise; None when USE_RNG
    rw_ptr,  # (M K,) fp32 normalised importance weights (IW); None otherwise
    rng_ptr,  # int64 [seed, counter] the forward used; read when USE_RNG
    s_ptr,  # (M,) grad_output of the per-sample loss
    s_stride,  # element stride of s (0 for an expanded scalar)
    beta_ptr,  # () KL weight, fp32 device scalar
    wh_ptr,  # (2Z, H) encoder head weight
    h_ptr,  # (M, H) encoder's last hidden activation (for act')
    dmulv_ptr,  # (M, 2Z) output [dmu | dlogvar] (the head's weight gradient reads it)
    dh_ptr,  # (M, H) output gradient at the encoder's last pre-activation
    M,  # rows
    H,  # encoder's last hidden width
    Z,  # latent width
    T,  # dz partials to sum
    row_offset,  # global index of row 0 (keys the regenerated noise)
    K,  # latent samples per row (MULTI)
    USE_RNG: tl.constexpr,
    MULTI: tl.constexpr,  # K samples per row (k > 1 or IW): sum over them
    IW: tl.constexpr,  # the IWAE objective: per-sample prior terms weighted by rw
    ACT: tl.constexpr,  # encoder activation
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # encoder features per program
    ZP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rz = tl.arange(0, ZP)
    m_mask = rm < M
    z_mask = rz < Z
    mz_mask = m_mask[:, None] & z_mask[None, :]

    mu = tl.load(mulv_ptr + rm[:, None] * (2 * Z) + rz[None, :], mask=mz_mask, other=0.0)
    lv = tl.load(mulv_ptr + rm[:, None] * (2 * Z) + Z + rz[None, :], mask=mz_mask, other=0.0)
    s = tl.load(s_ptr + rm * s_stride, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    sb = s * tl.load(beta_ptr)
    std = tl.exp(0.5 * lv)
    if MULTI:
        dmu = tl.zeros((BLOCK_M, ZP), dtype=tl.float32)
        dlv = tl.zeros((BLOCK_M, ZP), dtype=tl.float32)
        for j in range(0, K):  # fixed order over the row's samples: deterministic
            rs = rm * K + j  # the sample's decoder-side row
            base = dzp_ptr + rs[:, None] * ZP + rz[None, :]
            dz = tl.load(base, mask=m_mask[:, None], other=0.0)
            for t in range(1, T):
                dz += tl.load(base + t * M * K * ZP, mask=m_mask[:, None], other=0.0)
            if USE_RNG:
                eps = philox_eps(rng_ptr, row_offset * K + rs, rz, Z)
            else:
                eps = tl.load(eps_ptr + rs[:, None] * Z + rz[None, :], mask=mz_mask, other=0.0).to(tl.float32)
            dmu += dz
            dlv += dz * eps * 0.5 * std
            if IW:
                c = sb * tl.load(rw_ptr + rs, mask=m_mask, other=0.0)[:, None]
                zj = mu + std * eps
                dmu += c * zj
                dlv += c * (zj * eps * 0.5 * std - 0.5)
        if not IW:
            dmu += sb * mu
            dlv += sb * 0.5 * (std * std - 1.0)
        dmu = tl.where(mz_mask, dmu, 0.0)
        dlv = tl.where(mz_mask, dlv, 0.0)
    else:
        base = dzp_ptr + rm[:, None] * ZP + rz[None, :]
        dz = tl.load(base, mask=m_mask[:, None], other=0.0)
        for t in range(1, T):  # fixed order: deterministic
            dz += tl.load(base + t * M * ZP, mask=m_mask[:, None], other=0.0)
        if USE_RNG:
            eps = philox_eps(rng_ptr, row_offset + rm, rz, Z)
        else:
            eps = tl.load(eps_ptr + rm[:, None] * Z + rz[None, :], mask=mz_mask, other=0.0).to(tl.float32)
        dmu = tl.where(mz_mask, dz + sb * mu, 0.0)
        dlv = tl.where(mz_mask, dz * eps * 0.5 * std + sb * 0.5 * (std * std - 1.0), 0.0)
    dmu_c = dmu.to(dmulv_ptr.dtype.element_ty)
    dlv_c = dlv.to(dmulv_ptr.dtype.element_ty)
    # the first feature tile's programs write [dmu | dlogvar] (a row bound of 0 masks the others)
    wmask = (rm[:, None] < tl.where(pid_n == 0, M, 0)) & z_mask[None, :]
    tl.store(dmulv_ptr + rm[:, None] * (2 * Z) + rz[None, :], dmu_c, mask=wmask)
    tl.store(dmulv_ptr + rm[:, None] * (2 * Z) + Z + rz[None, :], dlv_c, mask=wmask)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < H
    wz_mask = z_mask[:, None] & n_mask[None, :]
    w_mu = tl.load(wh_ptr + rz[:, None] * H + rn[None, :], mask=wz_mask, other=0.0)
    w_lv = tl.load(wh_ptr + (rz[:, None] + Z) * H + rn[None, :], mask=wz_mask, other=0.0)
    acc = tl.dot(dmu_c, w_mu.to(dmu_c.dtype), input_precision=PRECISION)
    acc = tl.dot(dlv_c, w_lv.to(dlv_c.dtype), acc, input_precision=PRECISION)
    mn_mask = m_mask[:, None] & n_mask[None, :]
    h = tl.load(h_ptr + rm[:, None] * H + rn[None, :], mask=mn_mask, other=0.0).to(tl.float32)
    acc = acc * act_grad_from_output(h, ACT)
    tl.store(dh_ptr + rm[:, None] * H + rn[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _draw_eps_kernel(
    rng_ptr,  # int64 [seed, counter]
    out_ptr,  # (M, Z) fp32 output
    M,
    Z,
    row_offset,
    BLOCK_M: tl.constexpr,
    ZP: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rz = tl.arange(0, ZP)
    eps = philox_eps(rng_ptr, row_offset + rm, rz, Z)
    tl.store(out_ptr + rm[:, None] * Z + rz[None, :], eps, mask=(rm[:, None] < M) & (rz[None, :] < Z))


def latent_backward(
    *,
    dz_partials: torch.Tensor,
    mulv: torch.Tensor,
    eps: torch.Tensor | None,
    rng_state: torch.Tensor,
    grad_out: torch.Tensor,
    beta: torch.Tensor,
    w_head: torch.Tensor,
    h: torch.Tensor,
    act: int,
    row_offset: int,
    dmulv: torch.Tensor,
    dh: torch.Tensor,
    block_m: int,
    block_n: int,
    warps: int,
    precision: str,
    samples: int = 1,
    iw_weights: torch.Tensor | None = None,
) -> None:
    """[dmu | dlogvar] and the encoder's last pre-activation gradient; ``samples`` K > 1 or
    ``iw_weights`` (B K,) (the IWAE objective) sum the K samples of each row."""
    m, hdim = h.shape
    zdim = mulv.shape[1] // 2
    multi = samples > 1 or iw_weights is not None
    # grid: one program per (row block, encoder feature tile); each sums the dz partials itself
    grid = (triton.cdiv(m, block_m), triton.cdiv(hdim, block_n))
    launch(
        _latent_bwd_kernel, grid,
        dzp_ptr=dz_partials, mulv_ptr=mulv, eps_ptr=eps, rw_ptr=iw_weights, rng_ptr=rng_state, s_ptr=grad_out,
        s_stride=grad_out.stride(0), beta_ptr=beta, wh_ptr=w_head, h_ptr=h, dmulv_ptr=dmulv, dh_ptr=dh,
        M=m, H=hdim, Z=zdim, T=dz_partials.shape[0], row_offset=row_offset, K=samples,
        USE_RNG=eps is None, MULTI=multi, IW=iw_weights is not None, ACT=act, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        ZP=latent_pad(zdim), num_warps=warps,
    )  # fmt: skip


def draw_eps(rng_state: torch.Tensor, rows: int, z: int, row_offset: int = 0) -> torch.Tensor:
    """The eps the fused kernels draw for ``rng_state`` (for tests and for checking against the reference)."""
    out = torch.empty(rows, z, dtype=torch.float32, device=rng_state.device)
    # grid: one program per block of DRAW_EPS_ROWS rows
    launch(
        _draw_eps_kernel, (triton.cdiv(rows, DRAW_EPS_ROWS),),
        rng_ptr=rng_state, out_ptr=out, M=rows, Z=z, row_offset=row_offset, BLOCK_M=DRAW_EPS_ROWS,
        ZP=latent_pad(z),
    )  # fmt: skip
    return out
