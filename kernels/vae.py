"""The fused VAE step: forward and hand-written backward of the per-sample -ELBO as one autograd.Function.

Launches for an encoder/decoder with L hidden layers each (forward + backward):
    forward : L-1 encoder layers, 1 latent (head + reparam + KL + first decoder layer),
              L-1 decoder layers, 1 output (GEMM + BCE + dlogits)                        -> 2L + 1
    backward: 1 output-layer input gradient, L-1 decoder input gradients, 1 latent backward,
              L-1 encoder input gradients, 1 grouped weight gradient (+1 split-K sum when B > 512)
                                                                                          -> 2L + 1 (+1)
so 6 launches for the 1-hidden-layer presets at B <= 512 (7 above), 10 (11) for ``iwae``.

Why one ``torch.autograd.Function`` for the whole step and not one per layer: the weight gradients of
all layers are computed by a single grouped launch that needs every layer's saved activations at once,
and the activations live in one workspace so that the launch's descriptor table holds shape-only
offsets (built once, valid under CUDA-graph replay). Per-layer Functions could not share that launch.
We use autograd.Function rather than ``torch.library.triton_op``: the engine captures the step in a
CUDA graph (which replays these launches as they are), not with torch.compile; under torch.compile this
Function is a graph break.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastvae.kernels.activations import ACT_CODES
from fastvae.kernels.bernoulli_output import bernoulli_output_forward
from fastvae.kernels.latent import latent_backward, latent_forward
from fastvae.kernels.linear_act import linear_act_forward, linear_backward_input
from fastvae.kernels.weight_grad import GradGroup, grouped_weight_grads


@dataclass(frozen=True)
class Plan:
    """The static structure of a step: widths, activation, and where each buffer lives in the workspace."""

    batch: int
    d: int
    enc: tuple[int, ...]  # encoder hidden widths
    z: int
    act: int

    @property
    def dec(self) -> tuple[int, ...]:
        return tuple(reversed(self.enc))

    def layout(self) -> dict[str, int]:
        """Element offsets of each (B, width) activation and gradient in the workspace, and its size."""
        b, off, out = self.batch, 0, {}
        names = [(f"h{i}", w) for i, w in enumerate(self.enc)] + [("z", self.z)]
        names += [(f"hd{i}", w) for i, w in enumerate(self.dec)] + [("dlogits", self.d)]
        names += [(f"dh{i}", w) for i, w in enumerate(self.enc)] + [("dmulv", 2 * self.z)]
        names += [(f"dhd{i}", w) for i, w in enumerate(self.dec)]
        for name, w in names:
            out[name] = off
            off += b * w
        out["size"] = off
        return out

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


class FusedNegativeElbo(torch.autograd.Function):
    """(x (B, D), eps (B, Z) or None, rng_state, beta, plan, row_offset, *params) -> (loss (B,), kl (B,))."""

    @staticmethod
    def forward(ctx, x, eps, rng_state, beta, plan: Plan, row_offset: int, *params):
        b, L = plan.batch, len(plan.enc)
        lay = plan.layout()
        ws = torch.empty(lay["size"], dtype=x.dtype, device=x.device)
        view = lambda name, w: ws[lay[name] : lay[name] + b * w].view(b, w)
        aux = torch.empty(b * (2 * plan.z + 2), dtype=torch.float32, device=x.device)
        mulv = aux[: b * 2 * plan.z].view(b, 2 * plan.z)  # fp32 [mu | logvar]
        kl, loss = aux[b * 2 * plan.z : b * (2 * plan.z + 1)], aux[b * (2 * plan.z + 1) :]
        rng_used = torch.empty(2, dtype=torch.int64, device=x.device) if eps is None else None
        w = params[0::2]
        bias = params[1::2]

        h = x
        for i in range(L - 1):
            linear_act_forward(h, w[i], bias[i], plan.act, out=view(f"h{i}", plan.enc[i]))
            h = view(f"h{i}", plan.enc[i])
        # the encoder's last hidden layer, then the latent kernel from it
        h_last = view(f"h{L - 1}", plan.enc[-1])
        linear_act_forward(h, w[L - 1], bias[L - 1], plan.act, out=h_last)
        hd = view("hd0", plan.dec[0])
        latent_forward(
            h_last, w[L], bias[L], eps, rng_state, rng_used if rng_used is not None else rng_state,
            w[L + 1], bias[L + 1], plan.act, row_offset, mulv, view("z", plan.z), kl, hd,
        )  # fmt: skip
        for i in range(1, L):
            nxt = view(f"hd{i}", plan.dec[i])
            linear_act_forward(hd, w[L + 1 + i], bias[L + 1 + i], plan.act, out=nxt)
            hd = nxt
        bernoulli_output_forward(
            hd, w[-1], bias[-1], x, kl, beta, loss, view("dlogits", plan.d), rng_state, rng_used
        )

        ctx.plan, ctx.row_offset = plan, row_offset
        ctx.save_for_backward(x, eps, rng_used, beta, ws, mulv, *params)
        ctx.mark_non_differentiable(kl)
        return loss, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl):
        x, eps, rng_used, beta, ws, mulv, *params = ctx.saved_tensors
        plan: Plan = ctx.plan
        b, L = plan.batch, len(plan.enc)
        lay = plan.layout()
        view = lambda name, w: ws[lay[name] : lay[name] + b * w].view(b, w)
        w = params[0::2]
        s = grad_loss if grad_loss.stride(0) in (0, 1) else grad_loss.contiguous()  # mean() gives stride 0

        # decoder, output side first: dhd_{L-1} = (s * dlogits) W_out * act'(hd_{L-1})
        linear_backward_input(view("dlogits", plan.d), w[-1], view(f"hd{L - 1}", plan.dec[-1]), plan.act,
                              out=view(f"dhd{L - 1}", plan.dec[-1]), row_scale=s)  # fmt: skip
        for i in range(L - 1, 0, -1):
            linear_backward_input(view(f"dhd{i}", plan.dec[i]), w[L + 1 + i], view(f"hd{i - 1}", plan.dec[i - 1]),
                                  plan.act, out=view(f"dhd{i - 1}", plan.dec[i - 1]))  # fmt: skip
        latent_backward(
            view("dhd0", plan.dec[0]), w[L + 1], mulv, eps, rng_used, s, beta, w[L], view(f"h{L - 1}", plan.enc[-1]),
            plan.act, ctx.row_offset, view("dmulv", 2 * plan.z), view(f"dh{L - 1}", plan.enc[-1]),
        )  # fmt: skip
        for i in range(L - 1, 0, -1):
            linear_backward_input(view(f"dh{i}", plan.enc[i]), w[i], view(f"h{i - 1}", plan.enc[i - 1]), plan.act,
                                  out=view(f"dh{i - 1}", plan.enc[i - 1]))  # fmt: skip

        flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=x.device)
        grouped_weight_grads(plan.grad_groups(), ws, x, s, flat)
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
    plan = Plan(x.shape[0], x.shape[1], tuple(hidden_dims), latent_dim, ACT_CODES[activation])
    if eps is not None:
        if eps.shape != (x.shape[0], latent_dim):
            raise ValueError(f"eps must be (B, Z) = {(x.shape[0], latent_dim)}, got {tuple(eps.shape)}")
        eps = eps.to(torch.float32).contiguous()
    if plan.layout()["size"] >= 2**31:
        raise ValueError("batch too large for 32-bit workspace offsets; split it")
    return FusedNegativeElbo.apply(x.contiguous(), eps, rng_state, beta, plan, row_offset, *params)
