"""N reference VAEs of one architecture trained as ONE batched computation (the CPU path of a sweep).

:class:`ModelStack` stacks the parameters of N :class:`~fastvae.model.ReferenceVAE` models into (N, ...)
tensors (``torch.func.stack_module_state``) and evaluates every model's objective on its own batch in one
``torch.func.vmap`` over ``functional_call`` of the model's own :meth:`~fastvae.model.ReferenceVAE.objective`
(so the loss is written once, in ``fastvae.objective``). Each member module keeps its parameters as views
of the stack, so it always holds the current weights: it is evaluated, saved and checkpointed as the
single-model trainer would.

:class:`StackedAdam` is Adam (Kingma & Ba, 2014, as ``torch.optim.Adam`` computes it) on the stacked
tensors: one update for all N models with an (N,) learning rate and per-model step counts; a model that
is not active (it diverged) keeps its weights and moments.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

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
    """N models as (N, ...) parameter tensors; ``models[i]``'s parameters are views of row i."""

    def __init__(self, models: list[ReferenceVAE]) -> None:
        check_same_architecture(models)
        params, _ = torch.func.stack_module_state(models)  # new leaf tensors, requires_grad
        self.params: dict[str, Tensor] = params
        with torch.no_grad():
            for i, m in enumerate(models):
                for name, p in m.named_parameters():
                    p.data = params[name].data[i]  # the module reads (and a load writes) the stack
        self.models = models
        self.n = len(models)
        base = copy.deepcopy(models[0]).to("meta")  # the shape of the computation, holding no weights
        self._call = _ObjectiveCall(base)
        self._batched = torch.func.vmap(self._one, in_dims=(0, 0, 0, 0, None))

    def _one(self, params: dict[str, Tensor], x: Tensor, eps: Tensor, beta: Tensor, free_bits: float):
        named = {f"vae.{k}": v for k, v in params.items()}
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


def per_model_sq_norm(grads: dict[str, Tensor]) -> Tensor:
    """(N,) each model's squared gradient norm (a non-finite one marks a diverged step)."""
    return sum(g.detach().double().pow(2).flatten(1).sum(1) for g in grads.values())


class StackedAdam:
    """Adam on stacked (N, ...) tensors, as ``torch.optim.Adam`` (betas (0.9, 0.999), eps 1e-8, no weight
    decay) computes it for each model: m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2,
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    def __init__(
        self, params: dict[str, Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        self.params = params
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.exp_avg = {k: torch.zeros_like(p, requires_grad=False) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p, requires_grad=False) for k, p in params.items()}
        n = next(iter(params.values())).shape[0]
        self.steps = torch.zeros(n, dtype=torch.float32, device=next(iter(params.values())).device)

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor], lr: Tensor, active: Tensor) -> None:
        """One update of every active model: ``lr`` (N,) learning rates, ``active`` (N,) bool."""
        self.steps += active.to(self.steps.dtype)
        t = self.steps
        bc1 = 1 - self.beta1**t  # (N,)
        bc2_sqrt = (1 - self.beta2**t).sqrt()
        step_size = lr.to(t.dtype) / bc1
        for name, p in self.params.items():
            view = (-1,) + (1,) * (p.dim() - 1)  # (N, 1, ...): a per-model scalar
            on = active.view(view)
            g = grads[name]
            m = self.exp_avg[name].lerp(g, 1 - self.beta1)
            v = self.exp_avg_sq[name] * self.beta2 + (1 - self.beta2) * g * g
            denom = v.sqrt() / bc2_sqrt.view(view) + self.eps
            new_p = p - step_size.view(view) * m / denom
            self.exp_avg[name].copy_(torch.where(on, m, self.exp_avg[name]))
            self.exp_avg_sq[name].copy_(torch.where(on, v, self.exp_avg_sq[name]))
            p.copy_(torch.where(on, new_p, p))

    def member_optimizer(self, i: int, model: nn.Module, lr: float) -> torch.optim.Adam:
        """A ``torch.optim.Adam`` over model i's parameters holding its moments and step count (copies): what
        the single-model trainer checkpoints, so a member's checkpoint is an ordinary one."""
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(self.beta1, self.beta2), eps=self.eps)
        for name, p in model.named_parameters():
            opt.state[p] = {
                "step": self.steps[i].detach().clone(),
                "exp_avg": self.exp_avg[name][i].clone(),
                "exp_avg_sq": self.exp_avg_sq[name][i].clone(),
            }
        return opt

    @torch.no_grad()
    def load_member(self, i: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Copy model i's moments and step count from ``opt`` (restored from its checkpoint) into the stack."""
        for name, p in model.named_parameters():
            st = opt.state.get(p, {})
            if "exp_avg" not in st:  # a checkpoint at step 0 holds no moments
                continue
            self.exp_avg[name][i].copy_(st["exp_avg"])
            self.exp_avg_sq[name][i].copy_(st["exp_avg_sq"])
            self.steps[i] = float(st["step"])
