"""The fused VAE step: forward and hand-written backward of the per-sample -ELBO, and the engine's whole
training step (gather, forward, backward, Adam) as a fixed sequence of 2-D-grid launches.

Kernels for an encoder/decoder with L hidden layers each (``pytorch-example``: L = 1; ``iwae``: L = 2):
    forward : L encoder layers (the first gathers the batch in the engine; the last also emits the head
              GEMM's per-tile partials), L decoder layers (the first finishes the latent step from those
              partials), 1 output (GEMM + BCE partials + dlogits)                           -> 2L + 1
    backward: 1 output-layer input gradient (sums the BCE partials into the loss in the engine), L - 1
              decoder input gradients (the first decoder layer's also emits partial dz), 1 latent backward
              (dz -> dmu, dlogvar -> the encoder's last input gradient), L - 1 encoder input gradients,
              1 grouped weight-gradient GEMM with Adam in its epilogue (+1 split-K sum at large batch)
                                                                                            -> 2L + 1 (+1)
so the engine's replayed step is 6 kernels for L = 1 and 10 for L = 2 at B = 128, and nothing else: the
cursor, RNG counter and loss accumulator advance inside them. The autograd path (FusedVAE in a user's
loop with any torch optimizer) adds one small kernel that sums the loss for the forward's return value and
writes gradients instead of applying Adam.

Why one ``torch.autograd.Function`` for the whole step and not one per layer: the weight gradients of
all layers are computed by a single grouped launch that needs every layer's saved activations at once,
and the activations live in one workspace so that the launch's descriptor table holds shape-only
offsets (built once, valid under CUDA-graph replay). Under torch.compile this Function is a graph break;
the engine does not use autograd at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from fastvae.kernels.activations import ACT_CODES
from fastvae.kernels.bernoulli_output import bernoulli_output_forward, finalize_loss
from fastvae.kernels.heuristics import (
    Tiles,
    dot_precision,
    gather_tiles,
    latent_pad,
    layer_tiles,
    wgrad_tiles,
)
from fastvae.kernels.latent import latent_backward
from fastvae.kernels.linear_act import Gather, LatentIn, LossFinalize, layer_backward_input, layer_forward
from fastvae.kernels.weight_grad import AdamBuffers, GradGroup, grouped_weight_grads


@dataclass(frozen=True)
class Plan:
    """The static structure of a step: widths, activation, dtype, and where each buffer lives."""

    batch: int
    d: int
    enc: tuple[int, ...]  # encoder hidden widths
    z: int
    act: int
    dtype: torch.dtype = torch.float32

    @property
    def dec(self) -> tuple[int, ...]:
        return tuple(reversed(self.enc))

    @property
    def zp(self) -> int:
        return latent_pad(self.z)

    def tiles(self, width: int) -> Tiles:
        return layer_tiles(self.batch, width, self.dtype)

    def latent_tiles(self, width: int, small_k: bool = False) -> Tiles:
        """Tiles of the kernels that also carry latent-width work: the same feature tiles (the partial counts
        must match), fewer rows where the report showed spills (sm_90, compiled, not timed).

        Head / dz partials next to a large GEMM: half the rows when Z pads to 64 or more (iwae, Z = 50 -> 64,
        B = 16384 fp32: 64-row blocks used 255 registers and spilled 230-1,550 bytes; 32 rows: none).
        ``small_k`` (the latent prologue + first decoder layer, the latent backward: reductions over ZP only,
        so no weight reuse to protect): at most 32 rows (paper, B = 16384 fp32: 64 rows spilled 16 bytes at
        80 registers; 32 rows: 64 registers, 4 CTAs/SM, no spill)."""
        t = self.tiles(width)
        if t.rows >= 32 and (self.zp >= 64 or (small_k and t.rows > 32)):
            return Tiles(t.rows // 2, t.cols, t.red, t.warps)
        return t

    def layout(self) -> dict[str, int]:
        """Element offsets of each (B, width) activation and gradient in the workspace, and its size."""
        b, off, out = self.batch, 0, {}
        names = [("x", self.d)] + [(f"h{i}", w) for i, w in enumerate(self.enc)] + [("z", self.z)]
        names += [(f"hd{i}", w) for i, w in enumerate(self.dec)] + [("dlogits", self.d)]
        names += [(f"dh{i}", w) for i, w in enumerate(self.enc)] + [("dmulv", 2 * self.z)]
        names += [(f"dhd{i}", w) for i, w in enumerate(self.dec)]
        for name, w in names:
            out[name] = off
            off += b * w
        out["size"] = off
        return out

    def partial_counts(self) -> dict[str, int]:
        """Feature tiles of the kernels that emit per-tile partial sums (the next kernel sums them)."""
        return {
            "head": triton.cdiv(self.enc[-1], self.tiles(self.enc[-1]).cols),
            "rec": triton.cdiv(self.d, self.tiles(self.d).cols),
            "dz": triton.cdiv(self.dec[0], self.tiles(self.dec[0]).cols),
        }

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes in ReferenceVAE.parameters() order (weight, bias per layer)."""
        shapes, widths = [], (self.d, *self.enc)
        for a, c in zip(widths[:-1], widths[1:]):
            shapes += [(c, a), (c,)]
        shapes += [(2 * self.z, self.enc[-1]), (2 * self.z,)]
        dwidths = (self.z, *self.dec)
        for a, c in zip(dwidths[:-1], dwidths[1:]):
            shapes += [(c, a), (c,)]
        shapes += [(self.d, self.dec[-1]), (self.d,)]
        return shapes

    def grad_groups(self) -> tuple[GradGroup, ...]:
        lay, shapes = self.layout(), self.param_shapes()
        offs, o = [], 0
        for s in shapes:
            offs.append(o)
            o += int(torch.Size(s).numel())
        n_enc = len(self.enc)
        groups = []
        for i in range(n_enc):  # encoder layers
            a = None if i == 0 else lay[f"h{i - 1}"]
            n, k = shapes[2 * i]
            groups.append(GradGroup(lay[f"dh{i}"], a, n, k, offs[2 * i], offs[2 * i + 1]))
        j = 2 * n_enc  # head
        groups.append(
            GradGroup(lay["dmulv"], lay[f"h{n_enc - 1}"], 2 * self.z, self.enc[-1], offs[j], offs[j + 1])
        )
        for i in range(n_enc):  # decoder layers
            j = 2 * (n_enc + 1 + i)
            a = lay["z"] if i == 0 else lay[f"hd{i - 1}"]
            n, k = shapes[j]
            groups.append(GradGroup(lay[f"dhd{i}"], a, n, k, offs[j], offs[j + 1]))
        j = 2 * (2 * n_enc + 1)  # output layer: dy is dlogits, stored unscaled by grad_output
        groups.append(
            GradGroup(lay["dlogits"], lay[f"hd{n_enc - 1}"], self.d, self.dec[-1], offs[j], offs[j + 1], True)
        )
        return tuple(groups)


class Buffers:
    """The workspace (compute dtype) and the fp32 statistics and partial sums of one step."""

    def __init__(self, plan: Plan, device: torch.device | str) -> None:
        b, z, zp = plan.batch, plan.z, plan.zp
        self.plan, self.lay = plan, plan.layout()
        self.ws = torch.empty(self.lay["size"], dtype=plan.dtype, device=device)
        t = plan.partial_counts()
        f32 = dict(dtype=torch.float32, device=device)
        self.mulv = torch.empty(b, 2 * z, **f32)  # [mu | logvar]
        self.kl = torch.empty(b, **f32)
        self.loss = torch.empty(b, **f32)
        self.head_partials = torch.empty(t["head"], b, 2 * zp, **f32)
        self.rec_partials = torch.empty(t["rec"], b, **f32)
        self.dz_partials = torch.empty(t["dz"], b, zp, **f32)

    def view(self, name: str, width: int) -> torch.Tensor:
        o, b = self.lay[name], self.plan.batch
        return self.ws[o : o + b * width].view(b, width)


def run_forward(
    plan: Plan,
    buf: Buffers,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    *,
    x: torch.Tensor | None,
    eps: torch.Tensor | None,
    rng_state: torch.Tensor,
    row_offset: int = 0,
    source: tuple | None = None,
    step: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward launches (2L + 1); returns the x the output kernel compared against. ``source``: (data,
    batches, cursor, binarize) to gather the batch into the workspace (the engine), else ``x`` is read."""
    L, v, prec = len(plan.enc), buf.view, dot_precision(plan.dtype)
    gather = None
    if source is not None:
        data, batches, cursor, binarize = source
        x = v("x", plan.d)
        gather = Gather(data, batches, cursor, x, binarize)
    a = x
    for i in range(L):
        head = (weights[L], buf.head_partials) if i == L - 1 else None
        out = v(f"h{i}", plan.enc[i])
        tiles = plan.latent_tiles(plan.enc[i]) if head else plan.tiles(plan.enc[i])
        if i == 0 and gather is not None:
            tiles = gather_tiles(tiles)
        layer_forward(
            w=weights[i], b=biases[i], out=out, act=plan.act, precision=prec, tiles=tiles,
            a=a if (i > 0 or gather is None) else None, gather=gather if i == 0 else None, head=head,
            step=step if i == 0 else None, zdim=plan.z, row_offset=row_offset,
        )  # fmt: skip
        a = out
    latent = LatentIn(buf.head_partials, biases[L], eps, rng_state, buf.mulv, v("z", plan.z), buf.kl)
    for i in range(L):
        out = v(f"hd{i}", plan.dec[i])
        layer_forward(
            w=weights[L + 1 + i], b=biases[L + 1 + i], out=out, act=plan.act,
            tiles=plan.latent_tiles(plan.dec[i], small_k=True) if i == 0 else plan.tiles(plan.dec[i]),
            precision=prec, a=a if i > 0 else None, latent=latent if i == 0 else None, zdim=plan.z,
            row_offset=row_offset,
        )  # fmt: skip
        a = out
    bernoulli_output_forward(hd=a, w=weights[-1], b=biases[-1], x=x, dlogits=v("dlogits", plan.d),
                             rec_partials=buf.rec_partials, tiles=plan.tiles(plan.d), precision=prec)  # fmt: skip
    return x


def run_backward(
    plan: Plan,
    buf: Buffers,
    weights: list[torch.Tensor],
    *,
    x: torch.Tensor | None,
    eps: torch.Tensor | None,
    rng_used: torch.Tensor,
    grad_out: torch.Tensor,
    beta: torch.Tensor,
    row_offset: int = 0,
    finalize: LossFinalize | None = None,
    grad_flat: torch.Tensor | None = None,
    adam: AdamBuffers | None = None,
    advance: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Backward launches (2L + 1, +1 with split-K): gradients into ``grad_flat`` or Adam into ``adam``."""
    L, v, prec = len(plan.enc), buf.view, dot_precision(plan.dtype)
    dz = (weights[L + 1], buf.dz_partials)
    # output layer: dhd_{L-1} = (s * dlogits) W_out * act'(hd_{L-1})
    layer_backward_input(
        dy=v("dlogits", plan.d), w=weights[-1], h=v(f"hd{L - 1}", plan.dec[-1]), act=plan.act,
        out=v(f"dhd{L - 1}", plan.dec[-1]), precision=prec, row_scale=grad_out,
        tiles=plan.latent_tiles(plan.dec[-1]) if L == 1 else plan.tiles(plan.dec[-1]),
        dz=dz if L == 1 else None, finalize=finalize,
    )  # fmt: skip
    for i in range(L - 1, 0, -1):
        layer_backward_input(
            dy=v(f"dhd{i}", plan.dec[i]), w=weights[L + 1 + i], h=v(f"hd{i - 1}", plan.dec[i - 1]), act=plan.act,
            out=v(f"dhd{i - 1}", plan.dec[i - 1]), precision=prec,
            tiles=plan.latent_tiles(plan.dec[i - 1]) if i == 1 else plan.tiles(plan.dec[i - 1]),
            dz=dz if i == 1 else None,
        )  # fmt: skip
    t = plan.latent_tiles(plan.enc[-1], small_k=True)
    latent_backward(
        dz_partials=buf.dz_partials, mulv=buf.mulv, eps=eps, rng_state=rng_used, grad_out=grad_out, beta=beta,
        w_head=weights[L], h=v(f"h{L - 1}", plan.enc[-1]), act=plan.act, row_offset=row_offset,
        dmulv=v("dmulv", 2 * plan.z), dh=v(f"dh{L - 1}", plan.enc[-1]), block_m=t.rows, block_n=t.cols,
        warps=t.warps, precision=prec,
    )  # fmt: skip
    for i in range(L - 1, 0, -1):
        layer_backward_input(
            dy=v(f"dh{i}", plan.enc[i]), w=weights[i], h=v(f"h{i - 1}", plan.enc[i - 1]), act=plan.act,
            out=v(f"dh{i - 1}", plan.enc[i - 1]), tiles=plan.tiles(plan.enc[i - 1]), precision=prec,
        )  # fmt: skip
    grouped_weight_grads(
        groups=plan.grad_groups(), ws=buf.ws, x=x, grad_out=grad_out, batch=plan.batch,
        tiles=wgrad_tiles(plan.dtype, plan.batch), precision=prec, out=grad_flat, adam=adam, advance=advance,
        x_offset=buf.lay["x"],
    )  # fmt: skip


class FusedNegativeElbo(torch.autograd.Function):
    """(x (B, D), eps (B, Z) or None, rng_state, beta, plan, row_offset, *params) -> (loss (B,), kl (B,))."""

    @staticmethod
    def forward(ctx, x, eps, rng_state, beta, plan: Plan, row_offset: int, *params):
        buf = Buffers(plan, x.device)
        weights, biases = list(params[0::2]), list(params[1::2])
        rng_used = torch.empty(2, dtype=torch.int64, device=x.device) if eps is None else None
        run_forward(plan, buf, weights, biases, x=x, eps=eps, rng_state=rng_state, row_offset=row_offset)
        finalize_loss(rec_partials=buf.rec_partials, kl=buf.kl, beta=beta, loss=buf.loss,
                      rng_state=rng_state if eps is None else None, rng_used=rng_used)  # fmt: skip
        ctx.plan, ctx.row_offset, ctx.buf = plan, row_offset, buf
        ctx.save_for_backward(x, eps, rng_used, beta, *params)
        ctx.mark_non_differentiable(buf.kl)
        ctx.set_materialize_grads(False)  # no zeros kernel for the unused kl gradient
        return buf.loss, buf.kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl):
        x, eps, rng_used, beta, *params = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * (6 + len(params))
        plan: Plan = ctx.plan
        s = grad_loss if grad_loss.stride(0) in (0, 1) else grad_loss.contiguous()  # mean() gives stride 0
        flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=x.device)
        run_backward(plan, ctx.buf, list(params[0::2]), x=x, eps=eps, rng_used=rng_used, grad_out=s, beta=beta,
                     row_offset=ctx.row_offset, grad_flat=flat)  # fmt: skip
        grads, o = [], 0
        for p in params:
            grads.append(flat[o : o + p.numel()].view(p.shape))
            o += p.numel()
        return (None, None, None, None, None, None, *grads)


def fused_negative_elbo(
    x: torch.Tensor,
    params: list[torch.Tensor],
    hidden_dims: tuple[int, ...],
    latent_dim: int,
    activation: str,
    beta: torch.Tensor,
    rng_state: torch.Tensor,
    eps: torch.Tensor | None = None,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample -ELBO (B,) and KL (B,) of a Bernoulli MLP VAE through the fused kernels.

    ``x`` (B, D) contiguous fp32 or bf16 (the compute dtype); ``params`` fp32 in ReferenceVAE order;
    ``beta`` a 0-d fp32 device tensor; ``rng_state`` int64 [seed, counter] on the device, used and
    advanced when ``eps`` is None; ``row_offset`` is this process's first global row (DDP).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if x.requires_grad:
        # d(-ELBO)/dx has a direct term -logits (x is the BCE target) and the kernels do not keep logits.
        raise NotImplementedError("the fused kernels give no gradient w.r.t. x; use ReferenceVAE for that")
    plan = Plan(x.shape[0], x.shape[1], tuple(hidden_dims), latent_dim, ACT_CODES[activation], x.dtype)
    if eps is not None:
        if eps.shape != (x.shape[0], latent_dim):
            raise ValueError(f"eps must be (B, Z) = {(x.shape[0], latent_dim)}, got {tuple(eps.shape)}")
        eps = eps.to(torch.float32).contiguous()
    if plan.layout()["size"] >= 2**31:
        raise ValueError("batch too large for 32-bit workspace offsets; split it")
    return FusedNegativeElbo.apply(x.contiguous(), eps, rng_state, beta, plan, row_offset, *params)


class EngineStep:
    """The engine's whole training step as 2L + 2 launches over persistent buffers (no autograd, no aten op).

    ``params``/``adam``: flat fp32 parameters and Adam state (the model's parameters are views of
    ``adam.params``); ``grad`` (P,) fp32 the step's gradient; ``weights``/``biases``: the tensors the kernels read (views of ``adam.lowp`` in bf16).
    ``data`` (N, D) uint8 resident; ``batches`` (steps, B) int64; ``cursor`` int64 [1]; ``rng_state`` int64
    [seed, counter]; ``beta`` () fp32; ``loss_acc`` (B,) fp32; ``grad_weight`` (B,) fp32 = 1/B;
    ``binarize`` None or (epoch_base int64 () device tensor, key_lo, key_hi) (``row_noise.key_words``).
    """

    def __init__(self, plan: Plan, *, weights, biases, adam: AdamBuffers, grad, data, batches, cursor, rng_state,
                 beta, loss_acc, grad_weight, binarize: tuple | None) -> None:  # fmt: skip
        self.plan, self.weights, self.biases, self.adam = plan, list(weights), list(biases), adam
        self.data, self.batches, self.cursor, self.rng_state = data, batches, cursor, rng_state
        self.beta, self.loss_acc, self.grad_weight, self.binarize = beta, loss_acc, grad_weight, binarize
        self.grad = grad  # (P,) fp32: the step's gradient, written before Adam reads it back
        self.buf = Buffers(plan, adam.params.device)

    def __call__(self) -> None:
        plan, buf = self.plan, self.buf
        source = (self.data, self.batches, self.cursor, self.binarize)
        run_forward(plan, buf, self.weights, self.biases, x=None, eps=None, rng_state=self.rng_state,
                    source=source, step=self.adam.step)  # fmt: skip
        finalize = LossFinalize(buf.rec_partials, buf.kl, self.beta, buf.loss, self.loss_acc)
        run_backward(plan, buf, self.weights, x=None, eps=None, rng_used=self.rng_state, grad_out=self.grad_weight,
                     beta=self.beta, finalize=finalize, grad_flat=self.grad, adam=self.adam, advance=(self.cursor, self.rng_state))  # fmt: skip
