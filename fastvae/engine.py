"""The high-throughput training step: everything on the device, optionally captured as one CUDA graph.

One step = gather the batch by index from the resident data set, (binarize), forward, backward, fused
Adam, and add the loss to a device accumulator. Every input that changes between steps lives in a device
tensor that the step reads (the epoch's permutation, the step cursor, the learning rate, the KL weight,
the in-kernel RNG counter of FusedVAE), so the step can be captured once with ``torch.cuda.graph`` and
replayed: new batch, new noise and the current schedule values every replay, and no host sync unless the
loss is read. On the CPU (and for the tests) the same step runs eagerly.

Choices:
- The first ``WARMUP_STEPS`` steps run eagerly on a side stream (CUDA graphs need the optimizer state and
  the autograd buffers to exist before capture); they are real training steps.
- Under DDP the engine is not used (the trainer runs the eager step there): capturing DDP's
  all-reduce would tie the graph to NCCL's capture support, which this engine does not rely on.
- bf16: fp32 master weights; the batch is cast to bf16 and the fused kernels compute in bf16 with fp32
  accumulation, loss and KL; the reference model runs under ``torch.autocast``.
- A FusedVAE trained with ``torch.optim.Adam`` over resident uint8 data takes the fused step
  (``fastvae.kernels.vae.FusedStep``): no autograd and no aten op, 2L + 2 Triton kernels (6 for
  ``pytorch-example``, 10 for ``iwae``). The first gathers the batch from the uint8 data by index and
  binarizes it by the row rule of ``fastvae.noise`` (the same draw as the autograd step), the last applies Adam in its epilogue to a flat parameter buffer (the model's parameters become
  views of it; the optimizer's state entries become views of the flat moments, so its state_dict and a
  checkpoint resume keep working), and the kernels advance the cursor, the RNG counter, the Adam step and
  the loss accumulator. Any other model or optimizer takes the autograd step below.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from fastvae.config import DTYPES
from fastvae.data import DeviceData
from fastvae.fused import FusedVAE
from fastvae.noise import binarize as binarize_rows
from fastvae.schedules import TRAIN_BINARIZE_SALT, step_noise

WARMUP_STEPS = 3


def set_matmul_precision(dtype: str) -> None:
    """fp32: IEEE fp32 matmuls (PyTorch's default); tf32: TF32 for fp32 matmuls and fused-kernel dots."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"


class TrainStep:
    """A training step over a resident data set, eager or CUDA-graph replayed.

    ``load_epoch(perm)`` installs an epoch's order; ``step()`` runs the next batch of it; ``loss_acc``
    accumulates the per-sample -ELBO on the device until ``read_loss()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data: DeviceData,
        batch_size: int,
        *,
        binarize: bool = False,
        dtype: str = "fp32",
        cuda_graph: bool | None = None,
        seed: int = 0,
        free_bits: float = 0.0,
    ) -> None:
        self.model, self.opt, self.batch_size = model, optimizer, batch_size
        self.binarize, self.dtype, self.seed, self.free_bits = binarize, dtype, seed, free_bits
        self.device = next(model.parameters()).device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        set_matmul_precision(dtype)
        dev = self.device
        self.n_rows = len(data)
        self.steps_per_epoch = len(data) // batch_size
        # (steps, B) row indices of the epoch's batches, rewritten in place by load_epoch
        self.batches = torch.zeros(self.steps_per_epoch, batch_size, dtype=torch.int64, device=dev)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=dev)  # batch index within the epoch
        # epoch * N: with a row's data index, the run-wide sample id its training noise is keyed by
        self.epoch_base = torch.zeros((), dtype=torch.int64, device=dev)
        self.beta = torch.tensor(float(model.config.beta), device=dev)  # KL weight, rewritten in place
        # d(mean loss)/d(per-sample loss): backward from this static vector needs no mean or ones kernel
        self.grad_weight = torch.full((batch_size,), 1.0 / batch_size, device=dev)
        self.loss_acc = torch.zeros(batch_size, dtype=torch.float32, device=dev)  # (B,) summed over steps
        self.steps_run = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        # the one decision for the kernels (FusedVAE.plan_for): a Plan, or why they cannot run this model
        compute = torch.bfloat16 if dtype == "bf16" else torch.float32
        fused = isinstance(model, FusedVAE)
        self.plan = model.plan_for(batch_size, compute, free_bits=free_bits) if fused else "not a FusedVAE"
        whole = self.plan if isinstance(self.plan, str) else model.plan_for(batch_size, compute, step=True)
        self._fused = (
            self._fused_step(data, whole) if _engine_can_run(whole, model, optimizer, data) else None
        )
        # The autograd step reads the data as float once (MNIST: 188 MB): a batch is one gather, not
        # gather + convert + scale. The fused step reads the uint8 data itself.
        self.x = data.batch(torch.arange(len(data), device=dev)) if self._fused is None else None
        # a conditional model's labels (N,), resident: the step gathers them by the same index as x
        self.y = data.y if model.config.conditional else None

    def _fused_step(self, data: DeviceData, plan):
        """Flat parameters and Adam state shared with the model and the optimizer, and the fused step."""
        from fastvae.kernels.row_noise import key_words
        from fastvae.kernels.vae import FusedStep
        from fastvae.kernels.weight_grad import AdamBuffers

        model, dev, cfg = self.model, self.device, self.model.config
        params = [p for name, p in model.named_parameters() if name != "output_logvar"]
        assert [tuple(p.shape) for p in params] == plan.param_shapes()
        total = sum(p.numel() for p in params)
        f32 = dict(dtype=torch.float32, device=dev)
        flat, m, v, grad = (torch.zeros(total, **f32) for _ in range(4))
        group = self.opt.param_groups[0]
        state0 = self.opt.state.get(params[0], {})
        step = torch.tensor(float(state0["step"]) if "step" in state0 else 0.0, **f32)
        o = 0
        for p in params:
            n, st = p.numel(), self.opt.state.get(p, {})
            flat[o : o + n].copy_(p.detach().flatten())
            if "exp_avg" in st:  # resuming: keep the restored moments
                m[o : o + n].copy_(st["exp_avg"].flatten())
                v[o : o + n].copy_(st["exp_avg_sq"].flatten())
            p.data = flat[o : o + n].view_as(p)
            # the optimizer's state is views of the flat buffers: its state_dict sees every fused update
            self.opt.state[p] = {
                "step": step,
                "exp_avg": m[o : o + n].view_as(p),
                "exp_avg_sq": v[o : o + n].view_as(p),
            }
            o += n
        from fastvae.kernels.adam import HYPER_SIZE  # here: Triton is an optional extra

        self.hyper = torch.zeros(HYPER_SIZE, dtype=torch.float64, device=dev)
        beta1, beta2 = group["betas"]
        self.hyper.copy_(torch.tensor([float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"]],
                                      dtype=torch.float64))  # fmt: skip
        lowp = flat.to(plan.dtype) if plan.dtype != torch.float32 else None
        src, views, o = (lowp if lowp is not None else flat), [], 0
        for p in params:
            views.append(src[o : o + p.numel()].view_as(p))
            o += p.numel()
        self.flat_params, self.grad = flat, grad
        core, labels = views[: plan.n_core], views[plan.n_core :]
        return FusedStep(
            plan, weights=core[0::2], biases=core[1::2], label_weights=tuple(labels) if labels else None,
            labels=data.y if cfg.conditional else None, adam=AdamBuffers(flat, m, v, self.hyper, step, lowp),
            grad=grad, data=data.x, batches=self.batches, cursor=self.cursor, rng_state=model.rng_state,
            beta=self.beta, loss_acc=self.loss_acc, grad_weight=self.grad_weight,
            binarize=(self.epoch_base, *key_words(self.seed, TRAIN_BINARIZE_SALT)) if self.binarize else None,
        )  # fmt: skip

    # ---- schedule inputs (written outside the graph, read inside it) ----------------------------
    def load_epoch(self, perm: torch.Tensor, epoch: int = 0, first: int = 0) -> None:
        """Install epoch ``epoch``'s order ``perm``, starting at its batch ``first`` (a resumed epoch)."""
        n = self.steps_per_epoch * self.batch_size
        self.batches.copy_(perm[:n].view(self.steps_per_epoch, self.batch_size))
        self.cursor.fill_(first)
        self.epoch_base.fill_(epoch * self.n_rows)

    def set_lr(self, lr: float) -> None:
        if self._fused is not None:
            self.hyper[0].fill_(lr)
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def set_beta(self, beta: float) -> None:
        self.beta.fill_(beta)

    def read_loss(self) -> float:
        """Sum of per-sample -ELBO since the last read (one host sync)."""
        value = self.loss_acc.double().sum().item()
        self.loss_acc.zero_()
        return value

    # ---- the step ----------------------------------------------------------------------------------
    def _body(self) -> None:
        if self._fused is not None:
            self._fused()  # the whole step: 2L + 2 kernels, no autograd
            return
        # Python only: the backward allocates fresh gradients (from the graph's pool when captured), so
        # no zeroing kernel and no per-parameter accumulate kernel run.
        self.opt.zero_grad(set_to_none=True)
        idx = torch.index_select(self.batches, 0, self.cursor).view(-1)  # (B,)
        x = torch.index_select(self.x, 0, idx)  # (B, D) float in [0, 1]
        ids = self.epoch_base + idx  # (B,) schedules.sample_ids: epoch * N + data index
        y = None if self.y is None else torch.index_select(self.y, 0, idx)  # (B,) labels, conditional only
        model, cfg = self.model, self.model.config
        if not isinstance(self.plan, str):  # the kernels under autograd
            if self.binarize:
                x = binarize_rows(x, self.seed, TRAIN_BINARIZE_SALT, ids)
            x = x.to(self.plan.dtype)
            loss = model.fused_terms(x, self.plan, y=y, beta=self.beta).loss  # eps drawn in-kernel
        else:
            x, eps = step_noise(self.seed, ids, x, cfg.latent_dim, self.binarize, cfg.k)  # eps (B[, K], Z)
            ctx = (
                torch.autocast(self.device.type, dtype=torch.bfloat16)
                if self.dtype == "bf16"
                else nullcontext()
            )
            with ctx:
                loss = model.objective(x, eps, y=y, beta=self.beta, free_bits=self.free_bits).loss.float()
        loss.backward(self.grad_weight)  # the gradient of loss.mean()
        self.opt.step()
        self.cursor += 1
        self.loss_acc += loss.detach()

    def step(self) -> None:
        if not self.cuda_graph:
            self._body()
        elif self._graph is not None:
            self._graph.replay()
        elif self.steps_run < WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._body()
            self._graph.replay()  # capture records, it does not run: run this step now
        self.steps_run += 1


def _engine_can_run(plan, model: torch.nn.Module, opt: torch.optim.Optimizer, data: DeviceData) -> bool:
    """Can the step run as the fused kernel sequence (FusedStep)? The model's kernels can (``plan``, from
    ``FusedVAE.plan_for(..., step=True)``), over uint8 resident data (with its labels when conditional), with
    plain Adam over exactly its parameters in one group."""
    if isinstance(plan, str) or not data.scaled or data.x.dtype != torch.uint8:
        return False
    if model.config.conditional and getattr(data, "y", None) is None:
        return False
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    g = opt.param_groups[0]
    if g.get("amsgrad") or g.get("maximize") or g.get("differentiable"):
        return False
    mine = {id(p) for n, p in model.named_parameters() if n != "output_logvar"}
    return {id(p) for p in g["params"]} == mine


def make_optimizer(model: torch.nn.Module, lr: float, cuda_graph: bool) -> torch.optim.Optimizer:
    """Fused Adam; capturable with a tensor learning rate when the step is replayed from a CUDA graph."""
    if cuda_graph:
        device = next(model.parameters()).device
        return torch.optim.Adam(
            model.parameters(), lr=torch.tensor(lr, device=device), fused=True, capturable=True
        )
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
