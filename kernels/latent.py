"""The latent step in one launch each way.

Forward (one program per block of rows, carried through the whole step):
    [mu | logvar] = h W_head^T + b_head          encoder head GEMM
    z = mu + exp(0.5 logvar) * eps               reparameterization
    kl = -0.5 sum(1 + logvar - mu^2 - exp(logvar))  per-sample KL, in fp32
    h'0 = act(z W_dec0^T + b_dec0)               first decoder layer: z never leaves registers first

eps is either given by the caller (exact comparison with the reference) or drawn in the kernel with
Philox, keyed by (seed, counter) read from a device tensor and by the sample's global row index: nothing
is baked into a CUDA graph, and the backward regenerates eps from the same key instead of storing it.

Backward (one program per block of rows):
    dz = dh'0 W_dec0                              (dh'0: gradient at the first decoder pre-activation)
    dmu = dz + s beta mu
    dlogvar = dz eps 0.5 exp(0.5 logvar) + s beta 0.5 (exp(logvar) - 1)
    dh = ([dmu | dlogvar] W_head) * act'(h)       gradient at the encoder's last pre-activation
with s the per-sample grad_output. The padded latent columns (Z -> ZP >= 16) are masked to zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.kernels.activations import act_grad_from_output, apply_act
from fastvae.kernels.heuristics import dot_precision, latent_pad, launch, row_blocks


@triton.jit
def _philox_eps(rng_ptr, rows, cols, Z):
    """Standard-normal eps for (global row, latent column): Philox keyed by seed + counter * an odd
    63-bit constant, which spreads successive counters over the key's bits."""
    seed = tl.load(rng_ptr)
    counter = tl.load(rng_ptr + 1)
    key = seed + counter * 0x632BE59BD9B4E019
    offsets = (rows[:, None] * Z + cols[None, :]).to(tl.int32)
    return tl.randn(key, offsets)


@triton.jit
def _latent_fwd_kernel(
    h_ptr,  # (M, H) encoder's last hidden activation
    wh_ptr,  # (2Z, H) encoder head weight: rows 0..Z-1 give mu, Z..2Z-1 give logvar
    bh_ptr,  # (2Z,) encoder head bias
    eps_ptr,  # (M, Z) caller's noise; unused when USE_RNG
    rng_ptr,  # int64 [seed, counter] device tensor; read when USE_RNG
    rng_used_ptr,  # int64 [2] output: the key used (for the backward and for advancing the counter)
    wd_ptr,  # (H0', Z) first decoder layer weight
    bd_ptr,  # (H0',) first decoder layer bias
    mulv_ptr,  # (M, 2Z) output [mu | logvar], fp32
    z_ptr,  # (M, Z) output z, in the activation dtype (the decoder's weight gradient reads it)
    kl_ptr,  # (M,) output per-sample KL, fp32
    hd_ptr,  # (M, H0') output act(z W_dec0^T + b_dec0)
    M,
    H,
    Z,
    HD,  # H0', width of the first decoder layer
    row_offset,  # global index of row 0 (rank * local batch under DDP): keys the in-kernel noise
    USE_RNG: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ZP: tl.constexpr,  # Z padded to a power of two >= 16
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rz = tl.arange(0, ZP)
    m_mask = rm < M
    z_mask = rz < Z
    mz_mask = m_mask[:, None] & z_mask[None, :]

    # encoder head: mu and logvar as two (BLOCK_M, ZP) accumulators
    acc_mu = tl.zeros((BLOCK_M, ZP), dtype=tl.float32)
    acc_lv = tl.zeros((BLOCK_M, ZP), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < H
        a = tl.load(h_ptr + rm[:, None] * H + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wk_mask = k_mask[:, None] & z_mask[None, :]
        w_mu = tl.load(wh_ptr + rz[None, :] * H + rk[:, None], mask=wk_mask, other=0.0)
        w_lv = tl.load(wh_ptr + (rz[None, :] + Z) * H + rk[:, None], mask=wk_mask, other=0.0)
        acc_mu = tl.dot(a, w_mu.to(a.dtype), acc_mu, input_precision=PRECISION)
        acc_lv = tl.dot(a, w_lv.to(a.dtype), acc_lv, input_precision=PRECISION)
    mu = acc_mu + tl.load(bh_ptr + rz, mask=z_mask, other=0.0).to(tl.float32)[None, :]
    lv = acc_lv + tl.load(bh_ptr + Z + rz, mask=z_mask, other=0.0).to(tl.float32)[None, :]

    # reparameterization and KL, fp32
    if USE_RNG:
        eps = _philox_eps(rng_ptr, row_offset + rm, rz, Z)
        if pid == 0:
            tl.store(rng_used_ptr, tl.load(rng_ptr))
            tl.store(rng_used_ptr + 1, tl.load(rng_ptr + 1))
    else:
        eps = tl.load(eps_ptr + rm[:, None] * Z + rz[None, :], mask=mz_mask, other=0.0).to(tl.float32)
    var = tl.exp(lv)
    z = mu + tl.exp(0.5 * lv) * eps
    z = tl.where(mz_mask, z, 0.0)
    kl = tl.sum(tl.where(mz_mask, -0.5 * (1.0 + lv - mu * mu - var), 0.0), axis=1)
    tl.store(mulv_ptr + rm[:, None] * (2 * Z) + rz[None, :], mu, mask=mz_mask)
    tl.store(mulv_ptr + rm[:, None] * (2 * Z) + Z + rz[None, :], lv, mask=mz_mask)
    zc = z.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + rm[:, None] * Z + rz[None, :], zc, mask=mz_mask)
    tl.store(kl_ptr + rm, kl, mask=m_mask)

    # first decoder layer from z held in registers
    for n0 in range(0, HD, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < HD
        w = tl.load(wd_ptr + rn[None, :] * Z + rz[:, None], mask=z_mask[:, None] & n_mask[None, :], other=0.0)
        y = tl.dot(zc, w.to(zc.dtype), input_precision=PRECISION)
        y = apply_act(y + tl.load(bd_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :], ACT)
        tl.store(
            hd_ptr + rm[:, None] * HD + rn[None, :],
            y.to(hd_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )


@triton.jit
def _latent_bwd_kernel(
    dhd_ptr,  # (M, H0') gradient at the first decoder layer's pre-activation (already scaled by s)
    wd_ptr,  # (H0', Z) first decoder layer weight
    mulv_ptr,  # (M, 2Z) saved [mu | logvar], fp32
    eps_ptr,  # (M, Z) caller's noise; unused when USE_RNG
    rng_used_ptr,  # int64 [seed, counter] the forward used; read when USE_RNG
    s_ptr,  # (M,) grad_output of the per-sample loss
    s_stride,  # element stride of s (0 for an expanded scalar)
    beta_ptr,  # () KL weight, fp32 device scalar
    wh_ptr,  # (2Z, H) encoder head weight
    h_ptr,  # (M, H) encoder's last hidden activation (for act')
    dmulv_ptr,  # (M, 2Z) output [dmu | dlogvar] (the head's weight gradient reads it)
    dh_ptr,  # (M, H) output gradient at the encoder's last pre-activation
    M,
    H,
    Z,
    HD,
    row_offset,
    USE_RNG: tl.constexpr,
    ACT: tl.constexpr,  # encoder activation
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ZP: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rz = tl.arange(0, ZP)
    m_mask = rm < M
    z_mask = rz < Z
    mz_mask = m_mask[:, None] & z_mask[None, :]

    # dz = dh'0 W_dec0
    dz = tl.zeros((BLOCK_M, ZP), dtype=tl.float32)
    for k0 in range(0, HD, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < HD
        g = tl.load(
            dhd_ptr + rm[:, None] * HD + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(wd_ptr + rk[:, None] * Z + rz[None, :], mask=k_mask[:, None] & z_mask[None, :], other=0.0)
        dz = tl.dot(g, w.to(g.dtype), dz, input_precision=PRECISION)

    mu = tl.load(mulv_ptr + rm[:, None] * (2 * Z) + rz[None, :], mask=mz_mask, other=0.0)
    lv = tl.load(mulv_ptr + rm[:, None] * (2 * Z) + Z + rz[None, :], mask=mz_mask, other=0.0)
    if USE_RNG:
        eps = _philox_eps(rng_used_ptr, row_offset + rm, rz, Z)
    else:
        eps = tl.load(eps_ptr + rm[:, None] * Z + rz[None, :], mask=mz_mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rm * s_stride, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    sb = s * tl.load(beta_ptr)
    std = tl.exp(0.5 * lv)
    dmu = tl.where(mz_mask, dz + sb * mu, 0.0)
    dlv = tl.where(mz_mask, dz * eps * 0.5 * std + sb * 0.5 * (std * std - 1.0), 0.0)
    dmu_c = dmu.to(dmulv_ptr.dtype.element_ty)
    dlv_c = dlv.to(dmulv_ptr.dtype.element_ty)
    tl.store(dmulv_ptr + rm[:, None] * (2 * Z) + rz[None, :], dmu_c, mask=mz_mask)
    tl.store(dmulv_ptr + rm[:, None] * (2 * Z) + Z + rz[None, :], dlv_c, mask=mz_mask)

    # dh = ([dmu | dlogvar] W_head) * act'(h)
    for n0 in range(0, H, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
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
    eps = _philox_eps(rng_ptr, row_offset + rm, rz, Z)
    tl.store(out_ptr + rm[:, None] * Z + rz[None, :], eps, mask=(rm[:, None] < M) & (rz[None, :] < Z))


def latent_forward(
    h, w_head, b_head, eps, rng_state, rng_used, w_dec, b_dec, act, row_offset, mulv, z, kl, hd
) -> None:  # fmt: skip
    """Launch the latent forward; ``eps`` None draws the noise in-kernel from ``rng_state``."""
    m, hdim = h.shape
    zdim = z.shape[1]
    assert w_head.shape == (2 * zdim, hdim) and w_dec.shape[1] == zdim and mulv.shape == (m, 2 * zdim)
    blk = row_blocks(m)
    use_rng = eps is None
    # grid: one program per block of rows; each carries its rows from h through to h'0
    grid = (triton.cdiv(m, blk.rows),)
    launch(
        _latent_fwd_kernel, grid,
        h, w_head, b_head, eps if eps is not None else h, rng_state, rng_used, w_dec, b_dec, mulv, z, kl, hd,
        m, hdim, zdim, w_dec.shape[0], row_offset,
        USE_RNG=use_rng, ACT=act, PRECISION=dot_precision(h.dtype), BLOCK_M=blk.rows, BLOCK_N=blk.cols,
        BLOCK_K=blk.red, ZP=latent_pad(zdim), num_warps=blk.warps,
    )  # fmt: skip


def latent_backward(
    dhd, w_dec, mulv, eps, rng_used, grad_out, beta, w_head, h, act, row_offset, dmulv, dh
) -> None:  # fmt: skip
    m, hdim = h.shape
    zdim = w_dec.shape[1]
    blk = row_blocks(m)
    # grid: one program per block of rows
    grid = (triton.cdiv(m, blk.rows),)
    launch(
        _latent_bwd_kernel, grid,
        dhd, w_dec, mulv, eps if eps is not None else mulv, rng_used if rng_used is not None else mulv, grad_out,
        grad_out.stride(0), beta, w_head, h, dmulv, dh,
        m, hdim, zdim, w_dec.shape[0], row_offset,
        USE_RNG=eps is None, ACT=act, PRECISION=dot_precision(dhd.dtype), BLOCK_M=blk.rows, BLOCK_N=blk.cols,
        BLOCK_K=blk.red, ZP=latent_pad(zdim), num_warps=blk.warps,
    )  # fmt: skip


def draw_eps(rng_state: torch.Tensor, rows: int, z: int, row_offset: int = 0) -> torch.Tensor:
    """The eps the fused kernels draw for ``rng_state`` (for tests and for checking against the reference)."""
    out = torch.empty(rows, z, dtype=torch.float32, device=rng_state.device)
    # grid: one program per block of 16 rows
    launch(_draw_eps_kernel, (triton.cdiv(rows, 16),), rng_state, out, rows, z, row_offset, BLOCK_M=16,
           ZP=latent_pad(z))  # fmt: skip
    return out
