"""The reference VAE in plain PyTorch: the definition every fast backend is checked against.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2013). The encoder gives q(z|x) = N(mu, diag
exp(logvar)); z = mu + exp(0.5 logvar) * eps with eps ~ N(0, I) (the reparameterization trick); the
decoder gives p(x|z), Bernoulli (logits) or Gaussian (mean, learned per-pixel log-variance); the prior
is N(0, I).

With ``config.model == "ae"`` the same networks form a deterministic autoencoder: z = mu(x) (no noise),
the loss is -log p(x|z) alone (no KL), and ``sample`` still decodes z ~ N(0, I), which is the comparison
the VAE is taught with: nothing asks an autoencoder's codes to fill N(0, I).

With ``config.classes = C > 0`` it is a conditional VAE (Sohn et al., 2015): the encoder reads [x, onehot(y)]
and the decoder [z, onehot(y)] for a label y in 0..C-1, written plainly as a concatenation (the fused
kernels add the label weight's column y as a per-row bias instead, see ``kernels/linear_act.py``).

With ``config.k = K > 1`` each row draws K latent samples. ``config.objective`` "elbo" averages the K
single-sample ELBOs (the IWAE paper's "VAE, k = K" baseline); "iwae" trains on the K-sample
importance-weighted bound -log (1/K) sum_j p(x|z_j) p(z_j) / q(z_j|x) (Burda et al., 2015).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvae import objective as objectives
from fastvae.config import VAEConfig
from fastvae.errors import FastVAEError
from fastvae.objective import Terms, iw_log_weights, iw_nll, kl_per_dim  # noqa: F401 (kl_per_dim: its old home)

LOG_2PI = math.log(2.0 * math.pi)
_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}
# importance_weighted_bound decodes IW_GROUP rows x IW_DRAWS draws at once: 8 x 512 = 4096 rows of 784
# logits is 13 MB of fp32, so any k and batch fit in memory.
IW_DRAWS = 512
IW_GROUP = 8
# Evaluation runs the networks on blocks of exactly this many rows (see fixed_row_blocks).
FIXED_ROWS = 256


class ReferenceVAE(nn.Module):
    """An MLP VAE whose four core methods read like the paper.

    Parameters (their ``state_dict`` keys are shared by every backend):
    ``encoder.{i}`` hidden layers, ``head`` (H -> 2Z, giving [mu | logvar]), ``decoder.{i}`` hidden
    layers (the encoder's widths mirrored), ``output`` (H -> D), and for the Gaussian likelihood
    ``output_logvar`` (D,), a per-pixel log-variance shared by all samples (a per-sample variance lets
    the decoder shrink it without bound on flat image regions; a per-pixel one is stable and is what
    the papers' continuous experiments use). A conditional VAE adds ``encoder_label`` (H_0, C) and
    ``decoder_label`` (H_0', C), bias-free: the label columns of the first encoder and decoder layers, kept
    apart so that the other keys and shapes are those of the unconditional model.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.flat_dim, *config.hidden_dims)
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], 2 * config.latent_dim)
        dec_widths = (config.latent_dim, *reversed(config.hidden_dims))
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec_widths[:-1], dec_widths[1:]))
        self.output = nn.Linear(dec_widths[-1], config.flat_dim)
        if config.likelihood == "gaussian":
            self.output_logvar = nn.Parameter(torch.zeros(config.flat_dim))
        if config.conditional:
            self.encoder_label = nn.Linear(config.classes, widths[1], bias=False)
            self.decoder_label = nn.Linear(config.classes, dec_widths[1], bias=False)
        self._act = _ACTIVATIONS[config.activation]

    # ---- the model -------------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q(z|x) (q(z|x, y) for a conditional VAE, labels ``y`` (B,)): returns (mu, logvar), each (B, Z)."""
        h = x.flatten(1)  # (B, D)
        for i, layer in enumerate(self.encoder):
            h = self._act(self._first(layer, h, y, "encoder_label") if i == 0 else layer(h))  # (B, H)
        mu, logvar = self.head(h).chunk(2, dim=-1)
        return mu, logvar

    def _first(self, layer: nn.Linear, h: Tensor, y: Tensor | None, label: str) -> Tensor:
        """The first layer of a network: on [h, onehot(y)] with weight [W | W_label] when conditional."""
        if not self.config.conditional:
            if y is not None:
                raise FastVAEError("labels were given to an unconditional model")
            return layer(h)
        onehot = self.onehot(y, h.shape[0]).to(
            h.dtype
        )  # (B, C); shape[0], not len(): stays symbolic in an export
        weight = torch.cat([layer.weight, getattr(self, label).weight], 1)  # (H, D + C)
        return F.linear(torch.cat([h, onehot], 1), weight, layer.bias)

    def onehot(self, y: Tensor | None, rows: int) -> Tensor:
        """(rows, C) one-hot labels, checked: ``y`` (rows,) integers in 0..C-1."""
        c = self.config.classes
        if y is None:
            raise FastVAEError(f"a conditional model needs labels y in 0..{c - 1}")
        if y.shape != (rows,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise FastVAEError(f"labels must be {rows} integers, got {tuple(y.shape)} {y.dtype}")
        # the range check is a host sync: skipped inside a CUDA-graph capture and while tracing an export
        # (the data loader, and the ONNX runtime's callers, check the labels themselves)
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if rows and not tracing and not (y.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= c:
                raise FastVAEError(f"labels must be in 0..{c - 1}, got {lo}..{hi}")
        return (y[:, None] == torch.arange(c, device=y.device)).to(torch.int64)  # no sync, unlike F.one_hot

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
        """z = mu + sigma * eps: the noise is an input, so gradients reach mu and logvar."""
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """p(x|z) (p(x|z, y) when conditional): Bernoulli logits (or the Gaussian mean), (B, D)."""
        h = z
        for i, layer in enumerate(self.decoder):
            h = self._act(self._first(layer, h, y, "decoder_label") if i == 0 else layer(h))
        return self.output(h)

    def objective(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor | None = None,
        free_bits: float = 0.0,
    ) -> Terms:
        """The training objective, per sample, with its parts: ``fastvae.objective.of(config)`` (ELBO(k),
        IWAE(k) or Reconstruction), whose ``terms`` are the one place the loss is written.

        ``loss`` (B,) is -log p(x|z) + beta * KL(q(z|x) || N(0, I)) for one reparameterized draw (``eps``
        (B, Z), or (B, K, Z) for ``config.k`` = K samples; drawn when None); its batch mean is what training
        minimizes. ``y`` (B,): the labels of a conditional VAE. ``beta`` overrides ``config.beta`` (KL
        warm-up passes the scheduled value, possibly as a device tensor). With ``free_bits`` > 0 each
        latent dimension's batch-mean KL is floored at that many nats (Kingma et al., 2016): the batch mean
        of ``loss`` equals rec.mean() + beta * sum_d max(KL_d, floor).

        With K > 1 samples, objective "elbo" averages rec over the samples (the KL is in closed form);
        "iwae" gives -log (1/K) sum_j exp(log w_j) with log w_j = -rec_j - beta (log q(z_j|x) - log p(z_j)).
        """
        beta = self.config.beta if beta is None else beta
        return objectives.of(self.config).terms(self, x, eps, y=y, beta=beta, free_bits=free_bits)

    def negative_elbo(
        self, x: Tensor, eps: Tensor | None = None, *, y: Tensor | None = None, beta: float | None = None
    ) -> Tensor:
        """Per-sample -log p(x|z) + beta * KL in nats, (B,): :meth:`objective`'s loss (``beta`` = 1 gives
        the -ELBO itself; None takes ``config.beta``)."""
        return self.objective(x, eps, y=y, beta=beta).loss

    def forward(
        self,
        x: Tensor,
        eps: Tensor | None = None,
        *,
        y: Tensor | None = None,
        beta: float | Tensor | None = None,
        free_bits: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Training step for DDP and plain loops: (mean objective, a scalar; per-sample rec +
        config.beta * KL (B,), detached, the figure the trainer reports; for the IWAE objective the bound
        itself)."""
        o = self.objective(x, eps, y=y, beta=beta, free_bits=free_bits)
        return o.loss.mean(), objectives.of(self.config).report(o, self.config.beta).detach()

    # ---- pieces ----------------------------------------------------------------------------------
    def elbo_terms(
        self, x: Tensor, eps: Tensor | None = None, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(-log p(x|z) (B,), KL per latent dimension (B, Z)) for one reparameterized draw; for the
        autoencoder, -log p(x|mu(x)) and zeros (``eps`` is ignored)."""
        t = objectives.single_draw(self.config).terms(self, x, eps, y=y)
        return t.rec, t.kl_per_dim

    def reconstruction_nll(self, x: Tensor, out: Tensor) -> Tensor:
        """-log p(x|z) summed over features, (B,), from the decoder's output ``out`` (B, D)."""
        x = x.flatten(1)
        if self.config.likelihood == "bernoulli":
            # BCE with logits, never sigmoid then BCE: the latter clamps log(0) and loses precision.
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        logvar = self.output_logvar
        return 0.5 * (LOG_2PI + logvar + (x - out).pow(2) * torch.exp(-logvar)).sum(-1)

    def mean_output(self, out: Tensor) -> Tensor:
        """The decoder's expected x: probabilities (Bernoulli) or the mean (Gaussian)."""
        return torch.sigmoid(out) if self.config.likelihood == "bernoulli" else out

    # ---- use -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        temperature: float = 1.0,
        y: Tensor | None = None,
    ) -> Tensor:
        """n samples of E[x|z] (E[x|z, y] for labels ``y`` (n,)) with z ~ N(0, temperature^2 I):
        probabilities (n, D) for Bernoulli."""
        p = next(self.parameters())
        z = temperature * torch.randn(n, self.config.latent_dim, generator=generator, device=p.device)
        return self.mean_output(self.decode(z.to(p.dtype), y))

    @torch.no_grad()
    def importance_weighted_bound(
        self,
        x: Tensor,
        k: int,
        *,
        generator: torch.Generator | None = None,
        noise: Callable[[int, int], Tensor] | None = None,
        row_offset: int = 0,
        y: Tensor | None = None,
    ) -> Tensor:
        """-log p(x) (-log p(x|y) with labels ``y`` (B,)) estimated with k importance samples from q(z|x) (Burda et al., 2015), (B,) nats.

        log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x); the bound tightens as k grows and k = 5000
        is the NLL figure the IWAE paper reports. ``noise(start, c)`` gives the (c, B, Z) standard
        normals of draws start .. start + c (evaluation keys them by row); without it they come from
        ``generator``.

        Any k fits in memory: the decoder runs on blocks of ``IW_DRAWS`` draws of ``IW_GROUP`` rows.
        Every block has the same shape and a (row, draw) pair always sits at the same place in it
        (rows aligned by ``row_offset + i``, the row's index in its data set), and each row's k
        log-weights are reduced once in float64: so a row's result depends neither on the batch it
        came in nor on the memory schedule (see :func:`fixed_row_blocks`).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.config.is_ae:
            raise FastVAEError(
                "the importance-weighted bound is undefined for an autoencoder (no q(z|x) to sample)"
            )
        x = x.flatten(1)
        b, z_dim = x.shape[0], self.config.latent_dim
        # labels ride along as one float column (exact for any label < 2^24) so they are blocked with x
        xy = x if y is None else torch.cat([x, self.onehot(y, len(x)).argmax(1, keepdim=True).to(x.dtype)], 1)
        split = (lambda t: (t, None)) if y is None else (lambda t: (t[:, :-1], t[:, -1].long()))  # noqa: E731
        encode = lambda xb: torch.cat(self.encode(*split(xb)), -1)  # noqa: E731
        mu, logvar = fixed_row_blocks(encode, xy, offset=row_offset).chunk(2, -1)  # (B, Z) each
        std = torch.exp(0.5 * logvar)
        log_w = torch.empty(b, k, dtype=torch.float64, device=x.device)
        draws = min(IW_DRAWS, k)
        for start in range(0, k, draws):
            c = min(draws, k - start)
            if noise is None:
                eps = torch.randn(c, b, z_dim, generator=generator, device=x.device, dtype=mu.dtype)
            else:
                eps = noise(start, c).to(device=x.device, dtype=mu.dtype)
            eps = eps.transpose(0, 1)  # (B, c, Z)
            z = mu[:, None] + std[:, None] * eps  # (B, c, Z)
            log_ratio = functools.partial(iw_log_weights, z=z, eps=eps, logvar=logvar[:, None])
            z = F.pad(z, (0, 0, 0, draws - c))  # (B, draws, Z): every block holds `draws` draws per row

            def log_lik(zb: Tensor, xyb: Tensor) -> Tensor:  # (G, draws, Z), (G, D [+ 1]) -> (G, draws)
                g = len(zb)
                xb, yb = split(xyb)
                yb = None if yb is None else yb.repeat_interleave(draws)
                out = self.decode(zb.reshape(g * draws, z_dim), yb)
                return -self.reconstruction_nll(xb.repeat_interleave(draws, 0), out).view(g, draws)

            lik = fixed_row_blocks(log_lik, z, xy, rows=IW_GROUP, offset=row_offset)[:, :c]
            log_w[:, start : start + c] = log_ratio(lik)
        return iw_nll(log_w).to(mu.dtype)


def fixed_row_blocks(
    fn: Callable[..., Tensor], *tensors: Tensor, rows: int = FIXED_ROWS, offset: int = 0
) -> Tensor:
    """``fn`` over blocks of exactly ``rows`` rows of ``tensors``, results concatenated. Row i sits at
    position (offset + i) % rows of its block and the gaps are zero rows, so with ``offset`` the index of
    row 0 in its data set, every row is computed at the same place in a same-shaped block however the data
    is batched. That makes results bit-identical across batchings: BLAS libraries choose their kernels,
    and so their summation order, by the row count and a row's place in the tile (measured on this CPU: a
    50 -> 33 layer gave other bits for the same row in batches of 333 and 1000, and of 256 at a shifted
    start)."""
    n, out = len(tensors[0]), []
    lead = offset % rows
    for start in range(-lead, n, rows):
        lo, hi = max(start, 0), min(start + rows, n)
        block = [
            F.pad(t[lo:hi], (0, 0) * (t.dim() - 1) + (lo - start, start + rows - hi)) for t in tensors
        ]  # zero rows before (alignment) and after (the tail)
        out.append(fn(*block)[lo - start : hi - start])
    return torch.cat(out) if out else fn(*tensors)
