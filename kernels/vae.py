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
cursor, RNG counter and loss accumulator advance inside them.

Extensions, through the same kernels (issue 16):
    conditional VAE: the label is a per-row bias of the first encoder and decoder layers (``LabelIn``) and
                     its weights two more groups of the weight-gradient launch: no extra launch;
    K samples per row (objective "elbo" with k > 1, or "iwae"): the decoder side runs on B K rows (row
                     i K + j is sample j of row i); one small kernel reduces the K samples of each row into
                     the objective and the normalised weights: +1 launch in the engine's step. The autograd path (FusedVAE in a user's
loop with any torch optimizer) adds one small kernel that sums the loss for the forward's return value and
writes gradients instead of applying Adam.

Why one ``torch.autograd.Function`` for the whole step and not one per layer: the weight gradients of
all layers are computed by a single grouped launch that needs every layer's saved activations at once,
and the activations live in one workspace so that the launch's descriptor table holds shape-only
offsets (built once, valid under CUDA-graph replay). Under torch.compile this Function is a graph break;
the engine does not use autograd at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch
import triton

from fastvae import objective as objectives
from fastvae.config import VAEConfig
from fastvae.kernels.activations import ACT_CODES
from fastvae.kernels.bernoulli_output import bernoulli_output_forward, finalize_loss
from fastvae.kernels.heuristics import (
    Tiles,
    dot_precision,
    gather_tiles,
    latent_pad,
    latent_tiles,
    layer_tiles,
    weighted_tiles,
    wgrad_tiles,
)
from fastvae.kernels.latent import latent_backward
from fastvae.kernels.linear_act import (
    Gather,
    LabelIn,
    LatentIn,
    LossFinalize,
    layer_backward_input,
    layer_forward,
)
from fastvae.kernels.weight_grad import AdamBuffers, GradGroup, grouped_weight_grads

T = TypeVar("T")


@dataclass(frozen=True)
class ByLayer(Generic[T]):
    """Per-layer items by name, from a flat list in ReferenceVAE order: L encoder layers, the encoder head
    (mu | logvar), L decoder layers, the output layer. Launchers read ``w.dec[i]``, not ``w[L + 1 + i]``."""

    enc: tuple[T, ...]
    head: T
    dec: tuple[T, ...]
    out: T

    @classmethod
    def split(cls, items: Sequence[T]) -> ByLayer[T]:
        n = (len(items) - 2) // 2  # L hidden layers on each side
        if len(items) != 2 * n + 2 or n < 1:
            raise ValueError(f"expected 2L + 2 per-layer items (L >= 1), got {len(items)}")
        return cls(tuple(items[:n]), items[n], tuple(items[n + 1 : 2 * n + 1]), items[2 * n + 1])


class ParamSlot(NamedTuple):
    """One layer's parameters in the flat parameter vector: the weight's (out, in) shape and the element
    offsets of its weight and bias."""

    shape: tuple[int, ...]
    w: int
    b: int


@dataclass(frozen=True)
class Plan:
    """The static structure of a step: widths, activation, dtype, and where each buffer lives."""

    batch: int
    d: int
    enc: tuple[int, ...]  # encoder hidden widths
    z: int
    act: int
    dtype: torch.dtype = torch.float32
    classes: int = 0  # label classes of a conditional VAE (0: unconditional)
    k: int = 1  # latent samples per row
    iw: bool = False  # the importance-weighted objective

    @classmethod
    def of(cls, config: VAEConfig, batch: int, dtype: torch.dtype = torch.float32) -> Plan:
        """The plan of ``config``'s model for ``batch`` rows computed in ``dtype``: its objective's samples
        and kernel flag (``fastvae.objective``). ``FusedVAE.plan_for`` decides whether the kernels run it."""
        obj = objectives.of(config)
        if obj.kernel_iw is None:
            raise ValueError(f"the fused kernels do not cover the {obj.name!r} objective")
        return cls(batch, config.flat_dim, tuple(config.hidden_dims), config.latent_dim, ACT_CODES[config.activation],
                   dtype, config.classes, obj.k, obj.kernel_iw)  # fmt: skip

    @property
    def dec(self) -> tuple[int, ...]:
        return tuple(reversed(self.enc))

    @property
    def rows(self) -> int:
        """Decoder-side rows: B K."""
        return self.batch * self.k

    @property
    def multi(self) -> bool:
        """The per-row objective reduces K samples (k > 1 or IW): the finalize kernel and row weights."""
        return self.k > 1 or self.iw

    @property
    def zp(self) -> int:
        return latent_pad(self.z)

    # The tiling rules live in heuristics.py (their one place); these name the plan's inputs to them.
    def tiles(self, width: int, decoder: bool = False) -> Tiles:
        """Tiles of a layer of ``width`` features over the encoder's B rows or the decoder's B K rows."""
        return layer_tiles(self.rows if decoder else self.batch, width, self.dtype)

    def weighted_tiles(self, width: int, tiles: Tiles) -> Tiles:
        """The output layer's input gradient with K-sample row weights (``heuristics.weighted_tiles``)."""
        return weighted_tiles(tiles, self.multi)

    def latent_tiles(self, width: int, small_k: bool = False, decoder: bool = False) -> Tiles:
        """Tiles of the kernels that also carry latent-width work (``heuristics.latent_tiles``)."""
        return latent_tiles(self.tiles(width, decoder), self.zp, small_k)

    def layout(self) -> dict[str, int]:
        """Element offsets of each (rows, width) activation and gradient in the workspace, and its size: B
        rows on the encoder side, B K on the decoder side."""
        b, bk, off, out = self.batch, self.rows, 0, {}
        names = [("x", self.d, b)] + [(f"h{i}", w, b) for i, w in enumerate(self.enc)] + [("z", self.z, bk)]
        names += [(f"hd{i}", w, bk) for i, w in enumerate(self.dec)] + [("dlogits", self.d, bk)]
        names += [(f"dh{i}", w, b) for i, w in enumerate(self.enc)] + [("dmulv", 2 * self.z, b)]
        names += [(f"dhd{i}", w, bk) for i, w in enumerate(self.dec)]
        for name, w, rows in names:
            out[name] = off
            off += rows * w
        out["size"] = off
        return out

    def partial_counts(self) -> dict[str, int]:
        """Feature tiles of the kernels that emit per-tile partial sums (the next kernel sums them)."""
        return {
            "head": triton.cdiv(self.enc[-1], self.tiles(self.enc[-1]).cols),
            "rec": triton.cdiv(self.d, self.tiles(self.d, decoder=True).cols),
            "dz": triton.cdiv(self.dec[0], self.tiles(self.dec[0], decoder=True).cols),
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
        if self.classes:  # encoder_label, decoder_label: bias-free, registered last
            shapes += [(self.enc[0], self.classes), (self.dec[0], self.classes)]
        return shapes

    def param_slots(self) -> tuple[ByLayer[ParamSlot], tuple[int, ...]]:
        """Each layer's slot in the flat parameter vector, by name, and the label weights' offsets
        (encoder_label, decoder_label; empty when unconditional)."""
        shapes, offs, o = self.param_shapes(), [], 0
        for s in shapes:
            offs.append(o)
            o += int(torch.Size(s).numel())
        n = self.n_core
        slots = [ParamSlot(shapes[j], offs[j], offs[j + 1]) for j in range(0, n, 2)]  # (weight, bias) pairs
        return ByLayer.split(slots), tuple(offs[n:])

    def grad_groups(self) -> tuple[GradGroup, ...]:
        lay, (p, label_offs) = self.layout(), self.param_slots()
        last, b, bk = len(self.enc) - 1, self.batch, self.rows
        groups = []
        for i, (shape, w, bias) in enumerate(p.enc):  # encoder layers: a is x (None) for the first
            a = None if i == 0 else lay[f"h{i - 1}"]
            groups.append(GradGroup(lay[f"dh{i}"], a, *shape, w, bias, m=b))
        groups.append(GradGroup(lay["dmulv"], lay[f"h{last}"], *p.head.shape, p.head.w, p.head.b, m=b))
        for i, (shape, w, bias) in enumerate(p.dec):  # decoder layers: a is z for the first
            a = lay["z"] if i == 0 else lay[f"hd{i - 1}"]
            groups.append(GradGroup(lay[f"dhd{i}"], a, *shape, w, bias, m=bk))
        # output layer: dy is dlogits, stored unscaled by grad_output
        groups.append(GradGroup(lay["dlogits"], lay[f"hd{last}"], *p.out.shape, p.out.w, p.out.b, True, m=bk))
        if self.classes:  # label weights: a = onehot(y), for the decoder's rows the label of row r // K
            (enc_label, dec_label), c = label_offs, self.classes
            groups.append(GradGroup(lay["dh0"], 0, self.enc[0], c, enc_label, -1, m=b, label_div=1))
            groups.append(GradGroup(lay["dhd0"], 0, self.dec[0], c, dec_label, -1, m=bk, label_div=self.k))
        return tuple(groups)

    def grad_shapes(self) -> tuple[tuple[int, int], ...]:
        """(n, k) of every weight-gradient group (the weight-gradient tiles are chosen from them)."""
        return tuple((g.n, g.k) for g in self.grad_groups())

    @property
    def n_core(self) -> int:
        """Parameters that come in (weight, bias) pairs; the label weights follow them."""
        return 2 * (2 * len(self.enc) + 2)


class Buffers:
    """The workspace (compute dtype) and the fp32 statistics and partial sums of one step."""

    def __init__(self, plan: Plan, device: torch.device | str) -> None:
        b, bk, z, zp = plan.batch, plan.rows, plan.z, plan.zp
        self.plan, self.lay = plan, plan.layout()
        self.ws = torch.empty(self.lay["size"], dtype=plan.dtype, device=device)
        t = plan.partial_counts()
        f32 = dict(dtype=torch.float32, device=device)
        self.mulv = torch.empty(b, 2 * z, **f32)  # [mu | logvar]
        self.kl = torch.empty(bk, **f32)  # per decoder row: the closed-form KL, or log q - log p (IW)
        self.loss = torch.empty(b, **f32)
        self.head_partials = torch.empty(t["head"], b, 2 * zp, **f32)
        self.rec_partials = torch.empty(t["rec"], bk, **f32)
        self.dz_partials = torch.empty(t["dz"], bk, zp, **f32)
        self.labels = torch.empty(b, dtype=torch.int32, device=device) if plan.classes else None
        if plan.multi:  # the K-sample reduction's outputs
            self.rec = torch.empty(b, **f32)
            self.kl_rows = torch.empty(b, **f32)
            self.weights = torch.empty(bk, **f32)  # normalised per-sample weights
            self.row_scale = torch.empty(bk, **f32)  # grad_output x weight, for the output layer's dW

    def view(self, name: str, width: int) -> torch.Tensor:
        rows = (
            self.plan.rows if name in ("z", "dlogits") or name.startswith(("hd", "dhd")) else self.plan.batch
        )
        o = self.lay[name]
        return self.ws[o : o + rows * width].view(rows, width)

    def samples(self) -> tuple | None:
        """The K-sample outputs finalize_loss writes (None for one sample of the ELBO)."""
        p = self.plan
        return (p.k, p.iw, self.rec, self.kl_rows, self.weights) if p.multi else None


def run_forward(
    plan: Plan,
    buf: Buffers,
    w: ByLayer[torch.Tensor],
    b: ByLayer[torch.Tensor],
    *,
    x: torch.Tensor | None,
    eps: torch.Tensor | None,
    rng_state: torch.Tensor,
    row_offset: int = 0,
    source: tuple | None = None,
    step: torch.Tensor | None = None,
    label_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward launches (2L + 1); returns the x the output kernel compared against. ``source``: (data,
    batches, cursor, binarize, labels or None) to gather the batch (and its labels) into the workspace (the
    engine), else ``x`` is read (and ``buf.labels`` holds the caller's labels). ``label_weights``: the
    conditional VAE's (encoder_label, decoder_label) weights. ``w``/``b``: the weights and biases by layer."""
    L, v, prec = len(plan.enc), buf.view, dot_precision(plan.dtype)
    gather, label_data = None, None
    if source is not None:
        data, batches, cursor, binarize, label_data = source
        x = v("x", plan.d)
        gather = Gather(data, batches, cursor, x, binarize)
    enc_label = dec_label = None
    if label_weights is not None:
        enc_label = LabelIn(label_weights[0], buf.labels, label_data if gather is not None else None)
        dec_label = LabelIn(label_weights[1], buf.labels)
    a = x
    for i in range(L):
        head = (w.head, buf.head_partials) if i == L - 1 else None
        out = v(f"h{i}", plan.enc[i])
        tiles = plan.latent_tiles(plan.enc[i]) if head else plan.tiles(plan.enc[i])
        if i == 0 and gather is not None:
            tiles = gather_tiles(tiles)
        layer_forward(
            w=w.enc[i], b=b.enc[i], out=out, act=plan.act, precision=prec, tiles=tiles,
            a=a if (i > 0 or gather is None) else None, gather=gather if i == 0 else None, head=head,
            step=step if i == 0 else None, zdim=plan.z, row_offset=row_offset, label=enc_label if i == 0 else None,
        )  # fmt: skip
        a = out
    latent = LatentIn(buf.head_partials, b.head, eps, rng_state, buf.mulv, v("z", plan.z), buf.kl)
    for i in range(L):
        out = v(f"hd{i}", plan.dec[i])
        first = i == 0
        layer_forward(
            w=w.dec[i], b=b.dec[i], out=out, act=plan.act,
            tiles=plan.latent_tiles(plan.dec[i], small_k=True, decoder=True) if first
            else plan.tiles(plan.dec[i], decoder=True),
            precision=prec, a=a if i > 0 else None, latent=latent if first else None, zdim=plan.z,
            row_offset=row_offset, label=dec_label if first else None, samples=plan.k, iw=plan.iw,
        )  # fmt: skip
        a = out
    bernoulli_output_forward(hd=a, w=w.out, b=b.out, x=x, dlogits=v("dlogits", plan.d),
                             rec_partials=buf.rec_partials, tiles=plan.tiles(plan.d, decoder=True), precision=prec,
                             samples=plan.k)  # fmt: skip
    return x


def run_backward(
    plan: Plan,
    buf: Buffers,
    w: ByLayer[torch.Tensor],
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
    """Backward launches (2L + 1, +1 with split-K): gradients into ``grad_flat`` or Adam into ``adam``.
    ``finalize``: fuse the one-sample loss into the first kernel (the engine); K samples were reduced by
    finalize_loss, whose weights scale each decoder row here."""
    L, v, prec = len(plan.enc), buf.view, dot_precision(plan.dtype)
    dz = (w.dec[0], buf.dz_partials)
    row_weights = (buf.weights, buf.row_scale, plan.k) if plan.multi else None
    # output layer: dhd_{L-1} = (s * dlogits) W_out * act'(hd_{L-1})
    layer_backward_input(
        dy=v("dlogits", plan.d), w=w.out, h=v(f"hd{L - 1}", plan.dec[-1]), act=plan.act,
        out=v(f"dhd{L - 1}", plan.dec[-1]), precision=prec, row_scale=grad_out, row_weights=row_weights,
        tiles=plan.weighted_tiles(plan.dec[-1], plan.latent_tiles(plan.dec[-1], decoder=True) if L == 1
                                  else plan.tiles(plan.dec[-1], decoder=True)),
        dz=dz if L == 1 else None, finalize=finalize,
    )  # fmt: skip
    for i in range(L - 1, 0, -1):
        layer_backward_input(
            dy=v(f"dhd{i}", plan.dec[i]), w=w.dec[i], h=v(f"hd{i - 1}", plan.dec[i - 1]), act=plan.act,
            out=v(f"dhd{i - 1}", plan.dec[i - 1]), precision=prec,
            tiles=plan.latent_tiles(plan.dec[i - 1], decoder=True) if i == 1
            else plan.tiles(plan.dec[i - 1], decoder=True),
            dz=dz if i == 1 else None,
        )  # fmt: skip
    t = plan.latent_tiles(plan.enc[-1], small_k=True)
    latent_backward(
        dz_partials=buf.dz_partials, mulv=buf.mulv, eps=eps, rng_state=rng_used, grad_out=grad_out, beta=beta,
        w_head=w.head, h=v(f"h{L - 1}", plan.enc[-1]), act=plan.act, row_offset=row_offset,
        dmulv=v("dmulv", 2 * plan.z), dh=v(f"dh{L - 1}", plan.enc[-1]), block_m=t.rows, block_n=t.cols,
        warps=t.warps, precision=prec, samples=plan.k, iw_weights=buf.weights if plan.iw else None,
    )  # fmt: skip
    for i in range(L - 1, 0, -1):
        layer_backward_input(
            dy=v(f"dh{i}", plan.enc[i]), w=w.enc[i], h=v(f"h{i - 1}", plan.enc[i - 1]), act=plan.act,
            out=v(f"dh{i - 1}", plan.enc[i - 1]), tiles=plan.tiles(plan.enc[i - 1]), precision=prec,
        )  # fmt: skip
    grouped_weight_grads(
        groups=plan.grad_groups(), ws=buf.ws, x=x, grad_out=buf.row_scale if plan.multi else grad_out,
        batch=plan.rows, tiles=wgrad_tiles(plan.dtype, plan.rows, plan.grad_shapes(), plan.classes > 0), precision=prec, out=grad_flat, adam=adam,
        advance=advance, x_offset=buf.lay["x"], labels=buf.labels,
    )  # fmt: skip


class FusedObjective(torch.autograd.Function):
    """(x (B, D), eps (B K, Z) or None, labels (B,) int32 or None, rng_state, beta, plan, row_offset, *params)
    -> (loss (B,), kl (B,), rec (B,) for K samples per row)."""

    @staticmethod
    def forward(ctx, x, eps, labels, rng_state, beta, plan: Plan, row_offset: int, *params):
        buf = Buffers(plan, x.device)
        if labels is not None:
            buf.labels.copy_(labels)
        n = plan.n_core
        weights, biases, label_w = ByLayer.split(params[0:n:2]), ByLayer.split(params[1:n:2]), params[n:]
        rng_used = torch.empty(2, dtype=torch.int64, device=x.device) if eps is None else None
        run_forward(plan, buf, weights, biases, x=x, eps=eps, rng_state=rng_state, row_offset=row_offset,
                    label_weights=tuple(label_w) if label_w else None)  # fmt: skip
        finalize_loss(rec_partials=buf.rec_partials, kl=buf.kl, beta=beta, loss=buf.loss,
                      rng_state=rng_state if eps is None else None, rng_used=rng_used,
                      samples=buf.samples())  # fmt: skip
        ctx.plan, ctx.row_offset, ctx.buf = plan, row_offset, buf
        ctx.save_for_backward(x, eps, rng_used, beta, *params)
        outs = (buf.loss, buf.kl_rows, buf.rec) if plan.multi else (buf.loss, buf.kl)
        ctx.mark_non_differentiable(*outs[1:])
        ctx.set_materialize_grads(False)  # no zeros kernel for the unused kl gradient
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        x, eps, rng_used, beta, *params = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * (7 + len(params))
        plan: Plan = ctx.plan
        s = grad_loss if grad_loss.stride(0) in (0, 1) else grad_loss.contiguous()  # mean() gives stride 0
        flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=x.device)
        w = ByLayer.split(params[0 : plan.n_core : 2])
        run_backward(plan, ctx.buf, w, x=x, eps=eps, rng_used=rng_used, grad_out=s,
                     beta=beta, row_offset=ctx.row_offset, grad_flat=flat)  # fmt: skip
        grads, o = [], 0
        for p in params:
            grads.append(flat[o : o + p.numel()].view(p.shape))
            o += p.numel()
        return (None,) * 7 + tuple(grads)


def fused_objective(
    x: torch.Tensor,
    params: list[torch.Tensor],
    plan: Plan,
    beta: torch.Tensor,
    rng_state: torch.Tensor,
    eps: torch.Tensor | None = None,
    row_offset: int = 0,
    *,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample objective (B,) (the ELBO, or the IWAE bound for ``plan.iw``), KL (B,) and, for K samples
    per row, the mean -log p(x|z_j) (B,) (else None: rec = loss - beta KL) of a Bernoulli MLP VAE through the
    fused kernels, for ``plan`` (``Plan.of``, or ``FusedVAE.plan_for``).

    ``x`` (B, D) contiguous in the plan's compute dtype; ``params`` fp32 in ReferenceVAE order (the label
    weights last for ``plan.classes`` > 0, with ``labels`` (B,) in 0..classes-1); ``beta`` a 0-d fp32 device
    tensor; ``rng_state`` int64 [seed, counter] on the device, used and advanced when ``eps`` is None (else
    eps is (B, Z), or (B, K, Z) for K samples); ``row_offset`` is this process's first global row (DDP); for
    ``plan.iw`` the KL is the mean log q - log p.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if x.requires_grad:
        # d(-ELBO)/dx has a direct term -logits (x is the BCE target) and the kernels do not keep logits.
        raise NotImplementedError("the fused kernels give no gradient w.r.t. x; use ReferenceVAE for that")
    b, k, latent_dim = x.shape[0], plan.k, plan.z
    if (b, x.shape[1], x.dtype) != (plan.batch, plan.d, plan.dtype):
        raise ValueError(
            f"x must be {(plan.batch, plan.d)} {plan.dtype} for this plan, got {tuple(x.shape)} {x.dtype}"
        )
    if eps is not None:
        if eps.shape not in ((b, k, latent_dim), (b * k, latent_dim)) or (eps.dim() == 2 and k > 1):
            want = (b, latent_dim) if k == 1 else (b, k, latent_dim)
            raise ValueError(f"eps must be {want}, got {tuple(eps.shape)}")
        eps = eps.reshape(b * k, latent_dim).to(torch.float32).contiguous()
    if (labels is None) != (plan.classes == 0):
        raise ValueError("labels go with classes > 0 (a conditional VAE), and only then")
    if labels is not None:
        if labels.shape != (b,):
            raise ValueError(f"labels must be (B,) = ({b},), got {tuple(labels.shape)}")
        labels = labels.to(torch.int32)
    if plan.layout()["size"] >= 2**31:
        raise ValueError("batch too large for 32-bit workspace offsets; split it")
    out = FusedObjective.apply(x.contiguous(), eps, labels, rng_state, beta, plan, row_offset, *params)
    return (out[0], out[1], out[2]) if plan.multi else (out[0], out[1], None)


class FusedStep:
    """The engine's whole training step as 2L + 2 launches over persistent buffers (no autograd, no aten op);
    2L + 3 for K samples per row (the K-sample reduction).

    ``params``/``adam``: flat fp32 parameters and Adam state (the model's parameters are views of
    ``adam.params``); ``grad`` (P,) fp32 the step's gradient; ``weights``/``biases``: the tensors the kernels
    read (views of ``adam.lowp`` in bf16); ``label_weights``: (encoder_label, decoder_label) of a conditional
    VAE, with ``labels`` (N,) int64 resident, indexed like ``data``.
    ``data`` (N, D) uint8 resident; ``batches`` (steps, B) int64; ``cursor`` int64 [1]; ``rng_state`` int64
    [seed, counter]; ``beta`` () fp32; ``loss_acc`` (B,) fp32; ``grad_weight`` (B,) fp32 = 1/B;
    ``binarize`` None or (epoch_base int64 () device tensor, key_lo, key_hi) (``row_noise.key_words``).
    """

    def __init__(self, plan: Plan, *, weights, biases, adam: AdamBuffers, grad, data, batches, cursor, rng_state,
                 beta, loss_acc, grad_weight, binarize: tuple | None, label_weights: tuple | None = None,
                 labels: torch.Tensor | None = None) -> None:  # fmt: skip
        # the kernels' tensors by layer, built once (the step replays them every call)
        self.plan, self.weights, self.biases = plan, ByLayer.split(list(weights)), ByLayer.split(list(biases))
        self.adam = adam
        self.data, self.batches, self.cursor, self.rng_state = data, batches, cursor, rng_state
        self.beta, self.loss_acc, self.grad_weight, self.binarize = beta, loss_acc, grad_weight, binarize
        self.label_weights, self.labels = label_weights, labels
        self.grad = grad  # (P,) fp32: the step's gradient, written before Adam reads it back
        self.buf = Buffers(plan, adam.params.device)

    def __call__(self) -> None:
        plan, buf = self.plan, self.buf
        source = (self.data, self.batches, self.cursor, self.binarize, self.labels)
        run_forward(plan, buf, self.weights, self.biases, x=None, eps=None, rng_state=self.rng_state,
                    source=source, step=self.adam.step, label_weights=self.label_weights)  # fmt: skip
        finalize = None
        if plan.multi:  # the K samples of each row reduced in their own kernel
            finalize_loss(rec_partials=buf.rec_partials, kl=buf.kl, beta=self.beta, loss=buf.loss, rng_state=None,
                          rng_used=None, samples=buf.samples(), loss_acc=self.loss_acc)  # fmt: skip
        else:
            finalize = LossFinalize(buf.rec_partials, buf.kl, self.beta, buf.loss, self.loss_acc)
        run_backward(plan, buf, self.weights, x=None, eps=None, rng_used=self.rng_state, grad_out=self.grad_weight,
                     beta=self.beta, finalize=finalize, grad_flat=self.grad, adam=self.adam, advance=(self.cursor, self.rng_state))  # fmt: skip
