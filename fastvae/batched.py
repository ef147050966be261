"""N reference VAEs of one architecture trained as ONE batched computation (the CPU path of a sweep).

:class:`ModelStack` stacks the parameters of N :class:`~fastvae.model.ReferenceVAE` models into (N, ...)
tensors (``torch.func.stack_module_state``) and evaluates every model's objective on its own batch in one
``torch.func.vmap`` over ``functional_call`` of the model's own :meth:`~fastvae.model.ReferenceVAE.objective`
(so the loss is written once, in ``fastvae.objective``). Each member module keeps its parameters as views
of the stack, so it always holds the current weights: it is evaluated, saved and checkpointed as the
single-model trainer would.

:class:`StackedAdam` is Adam (Kingma & Ba, 2014) on the stacked tensors, computed by torch's fused
Adam kernel (as ``torch.optim.Adam(fused=True)``): one call per distinct learning rate, per-model step
counts; a model that is not active (it diverged) keeps its weights and moments.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

from fastvae.errors import FastVAEError
from fastvae.model import ReferenceVAE

# VAEConfig fields that may differ between the models of one stack: they are per-model arguments.
PER_MODEL_FIELDS = ("beta",)


class _ObjectiveCall(nn.Module):
    """``functional_call`` calls ``forward``: this forward is the model's ``objective`` and its terms."""

    def __init__(self, vae: ReferenceVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, x: Tensor, eps: Tensor, beta: Tensor, free_bits: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        t = self.vae.objective(x, eps, beta=beta, free_bits=free_bits)
        return t.loss, t.rec, t.kl


def check_same_architecture(models: list[nn.Module]) -> None:
    """Every model a ReferenceVAE whose config equals the first one's up to ``PER_MODEL_FIELDS``."""
    if not models:
        raise FastVAEError("a model stack needs at least one model")
    if not all(type(m) is ReferenceVAE for m in models):
        raise FastVAEError("a model stack holds reference models (ReferenceVAE) only")
    shape = lambda m: {k: v for k, v in m.config.to_dict().items() if k not in PER_MODEL_FIELDS}  # noqa: E731
    first = shape(models[0])
    for i, m in enumerate(models[1:], 1):
        diff = sorted(k for k, v in shape(m).items() if first.get(k) != v)
        if diff:
            raise FastVAEError(
                f"model {i} differs from model 0 in {', '.join(diff)}: one stack, one architecture"
            )
    if models[0].config.conditional:
        raise FastVAEError("a model stack does not train conditional VAEs yet (their label check reads data)")


class ModelStack:
    """N models as (N, ...) parameter tensors; ``models[i]``'s parameters are views of row i.

    A weight matrix (out, in) is stacked transposed, as (N, in, out) contiguous (``transposed`` names them;
    :meth:`row` gives model i's tensor in its own layout): the vmap-ed linear layers then multiply by it and
    produce its gradient with no transposing copy, and fused Adam reads weights, moments and gradients in one
    layout. (Stacked as (N, out, in), two 5 MB transposing copies per weight and step cost more than the
    matrix products saved, on a 2-core EPYC.)"""

    def __init__(self, models: list[ReferenceVAE]) -> None:
        check_same_architecture(models)
        params, _ = torch.func.stack_module_state(models)  # new leaf tensors, requires_grad
        self.transposed = {k for k, p in params.items() if p.dim() == 3}
        params = {k: p.detach().transpose(1, 2).contiguous().requires_grad_() if k in self.transposed else p
                  for k, p in params.items()}  # fmt: skip
        self.params: dict[str, Tensor] = params
        with torch.no_grad():
            for i, m in enumerate(models):
                for name, p in m.named_parameters():
                    p.data = self.row(
                        name, params[name].data, i
                    )  # the module reads (and a load writes) the stack
        self.models = models
        self.n = len(models)
        base = copy.deepcopy(models[0]).to("meta")  # the shape of the computation, holding no weights
        self._call = _ObjectiveCall(base)
        self._batched = torch.func.vmap(self._one, in_dims=(0, 0, 0, 0, None))

    def row(self, name: str, stacked: Tensor, i: int) -> Tensor:
        """Model i's tensor ``name`` (a view) of a stacked parameter, moment or gradient, in the model's layout."""
        return stacked[i].T if name in self.transposed else stacked[i]

    def _one(self, params: dict[str, Tensor], x: Tensor, eps: Tensor, beta: Tensor, free_bits: float):
        named = {f"vae.{k}": v.T if k in self.transposed else v for k, v in params.items()}
        return torch.func.functional_call(self._call, named, (x, eps, beta, free_bits))

    def terms(
        self, x: Tensor, eps: Tensor, beta: Tensor, free_bits: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, rec, KL), each (N, B): model i's objective on its own batch ``x[i]`` (B, D) with noise
        ``eps[i]`` and KL weight ``beta[i]`` ((N,) tensor)."""
        return self._batched(self.params, x, eps, beta, free_bits)

    def gradients(self, loss_mean: Tensor, active: Tensor) -> dict[str, Tensor]:
        """d loss_mean[i] / d params[i] for every model i (the models share no parameter, so one backward of
        the sum gives each its own gradient); an inactive model's loss is left out."""
        total = torch.where(active, loss_mean, torch.zeros_like(loss_mean)).sum()
        grads = torch.autograd.grad(total, list(self.params.values()))
        return dict(zip(self.params, grads))


def per_model_finite(grads: dict[str, Tensor]) -> Tensor:
    """(N,) whether each model's gradient is finite: a NaN or inf anywhere makes its model's sum non-finite
    (one read of each gradient, no conversion)."""
    total = sum(g.detach().flatten(1).sum(1) for g in grads.values())
    return torch.isfinite(total)


def _like(g: Tensor, p: Tensor) -> Tensor:
    """``g`` laid out in memory as ``p`` is (a copy only when it is not)."""
    return g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def _rows_of(d: dict[str, Tensor], rows: list[int], names: list[str]) -> list[Tensor]:
    return [d[k][i] for i in rows for k in names]


class StackedAdam:
    """Adam on stacked (N, ...) tensors, computed as ``torch.optim.Adam(fused=True)`` (what the single-model
    trainer uses) computes it for each model: the models of one learning rate are one fused Adam call, on one
    slice of each stacked tensor when they are consecutive rows with one step count (a sweep orders its grid
    so), else on each model's rows. (An elementwise
    update with an (N, 1, ...) lr on the stacked tensors took 10x fused Adam's time on a 2-core EPYC: six
    passes over memory instead of one.) A model that is not active (it diverged) keeps its weights, moments
    and count."""

    def __init__(
        self,
        params: dict[str, Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        row: Callable[[str, Tensor, int], Tensor] | None = None,
    ):
        """``params``: stacked (N, ...) leaves; ``row(name, stacked, i)``: model i's tensor in its own layout
        (:meth:`ModelStack.row`; default ``stacked[i]``)."""
        self.params = params
        self._row = row or (lambda name, t, i: t[i])
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.exp_avg = {k: torch.zeros_like(p, requires_grad=False) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p, requires_grad=False) for k, p in params.items()}
        first = next(iter(params.values()))
        # (N, P): fused Adam increments each parameter's own count, so every (model, tensor) has its own
        self._counts = torch.zeros(first.shape[0], len(params), dtype=torch.float32, device=first.device)

    @property
    def steps(self) -> Tensor:
        """(N,) each model's step count."""
        return self._counts[:, 0]

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor], lr: Tensor, active: Tensor) -> None:
        """One update of every active model: ``lr`` (N,) learning rates, ``active`` (N,) bool. Gradients may
        have any layout: fused Adam walks a gradient's memory as its parameter's, so one laid out otherwise is
        copied into the parameter's layout first (a mismatch silently pairs the wrong elements)."""
        groups: dict[float, list[int]] = {}
        for i, (rate, on) in enumerate(zip(lr.tolist(), active.tolist())):
            if on:
                groups.setdefault(rate, []).append(i)
        names = list(self.params)
        grads = {k: _like(grads[k], p) for k, p in self.params.items()}
        for rate, rows in groups.items():
            lo, hi = rows[0], rows[-1] + 1
            same = bool((self._counts[lo:hi] == self._counts[lo]).all())
            if rows == list(range(lo, hi)) and same:  # a block of rows (the usual case): one slice per tensor
                counts = [self._counts[lo, j].clone() for j in range(len(names))]
                self._adam([self.params[k][lo:hi] for k in names], [grads[k][lo:hi] for k in names],
                           [self.exp_avg[k][lo:hi] for k in names], [self.exp_avg_sq[k][lo:hi] for k in names],
                           counts, rate)  # fmt: skip
                self._counts[lo:hi] = torch.stack(counts)
                continue
            pick = functools.partial(_rows_of, rows=rows, names=names)  # views: updated in place
            counts = [self._counts[i, j] for i in rows for j in range(len(names))]
            self._adam(
                pick(self.params), pick(grads), pick(self.exp_avg), pick(self.exp_avg_sq), counts, rate
            )

    def _adam(self, params, grads, exp_avgs, exp_avg_sqs, counts, lr: float) -> None:
        adam(params, grads, exp_avgs, exp_avg_sqs, [], counts, fused=True, amsgrad=False, beta1=self.beta1,
             beta2=self.beta2, lr=lr, weight_decay=0.0, eps=self.eps, maximize=False)  # fmt: skip

    def member_optimizer(self, i: int, model: nn.Module, lr: float) -> torch.optim.Adam:
        """A ``torch.optim.Adam`` over model i's parameters holding its moments and step count (copies): what
        the single-model trainer checkpoints, so a member's checkpoint is an ordinary one."""
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(self.beta1, self.beta2), eps=self.eps)
        for name, p in model.named_parameters():
            opt.state[p] = {
                "step": self.steps[i].detach().clone(),
                "exp_avg": self._row(name, self.exp_avg[name], i).contiguous(),
                "exp_avg_sq": self._row(name, self.exp_avg_sq[name], i).contiguous(),
            }
        return opt

    @torch.no_grad()
    def load_member(self, i: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Copy model i's moments and step count from ``opt`` (restored from its checkpoint) into the stack."""
        for name, p in model.named_parameters():
            st = opt.state.get(p, {})
            if "exp_avg" not in st:  # a checkpoint at step 0 holds no moments
                continue
            self._row(name, self.exp_avg[name], i).copy_(st["exp_avg"])
            self._row(name, self.exp_avg_sq[name], i).copy_(st["exp_avg_sq"])
            self._counts[i] = float(st["step"])
