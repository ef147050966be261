"""The contenders of ``fastvae bench``: each one is a whole training step doing the same work.

Same work for every contender: the model of the cell's config, the per-sample -ELBO (reconstruction +
beta * KL) averaged over the batch, Adam (lr 1e-3), the batch gathered by index from the data set
resident on the device, the reparameterization noise drawn on the device, the loss summed on the device,
and the batch cursor advanced on the device, wrapping within the epoch's (steps, B) index table so any
number of steps is valid (at B = 16384 on MNIST the table has 3 rows).

- ``eager``: the reference model, plain PyTorch, fused Adam (the fastest eager optimizer).
- ``eager+graph``: the same step, optimizer included, captured once as a CUDA graph and replayed
  (fused capturable Adam, as CUDA graphs need).
- ``compile``: the same step function under ``torch.compile(mode="max-autotune")``, forward, backward
  and optimizer inside the compiled function; Adam is the foreach implementation because dynamo refuses
  to trace the fused one (``_fused_adam`` is ``torch.compiler.disable``d), so inductor writes its own.
  Dynamo's counters (graphs, graph breaks, frames that fell back to eager, recompiles) are kept per cell.
- ``fastvae`` on CUDA: ``fastvae.engine.TrainStep`` over ``FusedVAE`` (fused Triton kernels in a CUDA
  graph), driven only through its public surface (``load_epoch``, ``step``, ``read_loss``,
  ``steps_per_epoch``).
- ``fastvae`` on a CPU: the step ``fastvae train`` itself runs there (``fastvae.trainer._EagerStep``): the
  data set resident as one uint8 tensor, the batch gathered by index from the epoch's permutation, the
  noise keyed by (seed, sample id), the reference model, fused Adam, a finiteness check every step, no
  DataLoader. It is what a CPU user of fastvae gets, so it is the CPU contender.
- ``examples-loop`` (CPU, the pytorch-example network in fp32): the pytorch/examples ``vae/main.py`` loop
  as its users run it, one DataLoader batch per step (``fastvae.bench.examples``); it is also timed as
  whole epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastvae import objective as objectives
from fastvae.config import VAEConfig
from fastvae.data import DeviceData
from fastvae.engine import TrainStep, make_optimizer, set_matmul_precision
from fastvae.model import ReferenceVAE

LR = 1e-3
# Steps a CUDA graph's step runs eagerly (side stream) before capture: Adam's state and autograd's
# buffers must exist before capture. Same count as fastvae.engine.WARMUP_STEPS.
GRAPH_WARMUP = 3
STEP_CONTENDERS = ("eager", "eager+graph", "compile", "fastvae")
CPU_CONTENDERS = ("examples-loop", "eager", "compile", "fastvae")
# The compile contender's torch.compile mode; fastvae.bench.gpu sets it per cell (a mode that compiles
# within its deadline) and records which one ran.
COMPILE_MODE = "max-autotune"


@dataclass
class Contender:
    """One contender of a cell: ``step()`` runs one whole training step (wrapping within the epoch)."""

    name: str
    step: Callable[[], None]
    read_loss: Callable[[], float]
    steps_per_epoch: int
    optimizer: str
    extra_bytes: int = 0  # device memory it holds that every contender holds too (its data copy)
    notes: dict[str, Any] = field(default_factory=dict)
    model: torch.nn.Module | None = None  # the trained module, where the contender has one to show


class WholeStep:
    """The reference model's whole training step over the resident data set.

    ``body()`` = zero grads (Python only), gather the batch, draw eps, forward, per-sample loss, add it to
    the (B,) accumulator, advance the cursor modulo the steps per epoch, backward of the batch mean, Adam.
    The loss is accumulated before ``backward()`` so no tensor that backward consumes outlives it (under
    ``torch.compile`` that would add a graph break).
    """

    def __init__(
        self, cfg: VAEConfig, x: torch.Tensor, batch: int, dtype: str, opt_kind: str, seed: int = 0
    ) -> None:
        dev = x.device
        torch.manual_seed(seed)
        self.model = ReferenceVAE(cfg).to(dev)
        self.opt = _adam(self.model, opt_kind)
        self.opt_kind, self.x, self.batch, self.dtype = opt_kind, x, batch, dtype
        self.latent = cfg.latent_dim
        self.objective = objectives.of(cfg)  # the model's own objective (fastvae.objective)
        self.steps_per_epoch = len(x) // batch
        g = torch.Generator(device="cpu").manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)[: self.steps_per_epoch * batch]
        self.batches = perm.view(self.steps_per_epoch, batch).to(dev)  # (steps, B) row indices
        self.cursor = torch.zeros(1, dtype=torch.int64, device=dev)
        self.beta = torch.tensor(float(cfg.beta), device=dev)
        self.loss_acc = torch.zeros(batch, dtype=torch.float32, device=dev)
        self._autocast = (
            (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
        )

    def body(self) -> None:
        xb = torch.index_select(self.x, 0, torch.index_select(self.batches, 0, self.cursor).view(-1))
        # (B, K, Z) noise drawn on the device
        eps = torch.randn(self.batch, self.objective.k, self.latent, device=self.x.device)
        with self._autocast():
            loss = self.objective.terms(self.model, xb, eps, beta=self.beta).loss.float()  # (B,) per-sample
        self.loss_acc += loss.detach()
        self.cursor.copy_(torch.remainder(self.cursor + 1, self.steps_per_epoch))  # wraps in the table
        loss.mean().backward()
        self.opt.step()

    def read_loss(self) -> float:
        value = self.loss_acc.double().sum().item()
        self.loss_acc.zero_()
        return value


def _adam(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """Adam(lr 1e-3) as each contender needs it: "fused", "fused-capturable" or "foreach" (compile)."""
    if kind == "fused":
        return make_optimizer(model, LR, cuda_graph=False)
    if kind == "fused-capturable":
        return make_optimizer(model, LR, cuda_graph=True)
    dev = next(model.parameters()).device
    if dev.type == "cuda":  # a tensor lr: the CUDA graphs of max-autotune need a capturable optimizer
        return torch.optim.Adam(
            model.parameters(), lr=torch.tensor(LR, device=dev), foreach=True, capturable=True
        )
    return torch.optim.Adam(model.parameters(), lr=LR, foreach=True)


def make_contender(
    name: str, cfg: VAEConfig, data: DeviceData, x: torch.Tensor, batch: int, dtype: str
) -> Contender:
    """Build ``name`` for one cell. ``x`` is the data set as float (N, D) on the device, shared."""
    set_matmul_precision(dtype if x.device.type == "cuda" else "fp32")
    if name == "fastvae":
        return _fastvae(cfg, data, batch, dtype) if x.device.type == "cuda" else _fastvae_cpu(cfg, data, batch)
    if name == "examples-loop":
        from fastvae.bench.examples import examples_step

        step, read_loss, per_epoch = examples_step(cfg, data, batch, dtype)
        return Contender("examples-loop", step, read_loss, per_epoch, "Adam (PyTorch's default)",
                         notes={"step": "pytorch/examples vae/main.py: one DataLoader batch per step"})  # fmt: skip
    opt_kind = {"eager": "fused", "eager+graph": "fused-capturable", "compile": "foreach"}[name]
    ws = WholeStep(cfg, x, batch, dtype, opt_kind)
    if name == "eager":

        def step() -> None:
            ws.opt.zero_grad(set_to_none=True)
            ws.body()

    elif name == "eager+graph":
        step = _graph_step(ws)
    else:
        step = _compiled_step(ws)
    notes = {
        "dynamo_config": "torch.compile defaults; Tensor.backward() is not traced (trace_autograd_ops=False)"
    }
    return Contender(name, step, ws.read_loss, ws.steps_per_epoch, f"Adam ({opt_kind})",
                     notes=notes if name == "compile" else {})  # fmt: skip


def _graph_step(ws: WholeStep) -> Callable[[], None]:
    """Eager for GRAPH_WARMUP steps on a side stream, then the whole step captured once and replayed."""
    state: dict[str, Any] = {"graph": None, "run": 0}

    def body() -> None:
        ws.opt.zero_grad(set_to_none=True)  # fresh grads from the graph's pool: no zeroing kernel
        ws.body()

    def step() -> None:
        if state["graph"] is not None:
            state["graph"].replay()
            return
        if state["run"] < GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream().wait_stream(side)
            state["run"] += 1
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        graph.replay()  # capture records without running: run this step now
        state["graph"] = graph

    return step


def _compiled_step(ws: WholeStep) -> Callable[[], None]:
    """The step function under torch.compile(max-autotune). ``Optimizer.zero_grad`` stays outside:
    dynamo skips it by design (a graph break) and it launches nothing (grads are set to None)."""
    compiled = torch.compile(ws.body, mode=COMPILE_MODE)

    def step() -> None:
        ws.opt.zero_grad(set_to_none=True)
        compiled()

    return step


def _fastvae(cfg: VAEConfig, data: DeviceData, batch: int, dtype: str) -> Contender:
    from fastvae.fused import FusedVAE

    dev = data.x.device
    torch.manual_seed(0)
    model = FusedVAE(cfg).to(dev)
    graph = dev.type == "cuda"
    engine = TrainStep(
        model, make_optimizer(model, LR, cuda_graph=graph), data, batch, dtype=dtype, cuda_graph=graph
    )
    g = torch.Generator(device="cpu").manual_seed(0)
    perm = torch.randperm(len(data), generator=g).to(dev)
    engine.load_epoch(perm)
    state = {"i": 0}

    def step() -> None:
        # TrainStep's cursor does not wrap: reinstall the epoch (a host-side cursor write, outside any
        # graph) after every steps_per_epoch steps, so any number of steps stays inside the table.
        if state["i"] == engine.steps_per_epoch:
            engine.load_epoch(perm)
            state["i"] = 0
        engine.step()
        state["i"] += 1

    x = getattr(engine, "x", None)  # its own float copy of the data set, when it keeps one
    extra = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
    opt = "Adam (fused, capturable)" if graph else "Adam (fused)"
    return Contender("fastvae", step, engine.read_loss, engine.steps_per_epoch, opt, extra_bytes=extra)


class _RunView:
    """What ``fastvae.trainer._EagerStep`` reads of a run, for one process with no KL warm-up: the bench
    times that very step rather than a copy of it."""

    def __init__(self, cfg: VAEConfig, data: DeviceData, batch: int) -> None:
        from types import SimpleNamespace

        from fastvae.backends import make_model
        from fastvae.distributed import DistInfo

        dev = data.x.device
        torch.manual_seed(0)
        self.model = self.net = make_model(cfg, backend="torch", device=dev)
        self.model_cfg, self.train_data, self.n_train, self.device = cfg, data, len(data), dev
        self.cfg = SimpleNamespace(batch_size=batch, seed=0, binarize=False, free_bits=0.0, lr=LR)
        self.info = DistInfo(device=dev)
        self.opt = make_optimizer(self.model, LR, cuda_graph=False)
        self.params = list(self.model.parameters())
        self.run_dir = Path("(fastvae bench)")

    def beta_at(self, step: int) -> float:
        return float(self.model_cfg.beta)


def _fastvae_cpu(cfg: VAEConfig, data: DeviceData, batch: int) -> Contender:
    """``fastvae train``'s CPU step; each epoch its own keyed permutation, as in training."""
    from fastvae.schedules import epoch_permutation
    from fastvae.trainer import _EagerStep

    run = _RunView(cfg, data, batch)
    stepper = _EagerStep(run)
    steps = len(data) // batch
    state = {"i": 0, "epoch": 0, "step": 0}
    stepper.load_epoch(epoch_permutation(0, 0, len(data), data.x.device), 0, 0)

    def step() -> None:
        if state["i"] == steps:  # the next epoch: a fresh permutation, as the trainer draws
            state["i"], state["epoch"] = 0, state["epoch"] + 1
            perm = epoch_permutation(0, state["epoch"], len(data), data.x.device)
            stepper.load_epoch(perm, state["epoch"], 0)
        stepper.step(state["i"], state["step"])
        state["i"] += 1
        state["step"] += 1

    notes = {"step": "fastvae train's CPU step (fastvae.trainer._EagerStep): resident data, keyed noise, "
                     "no DataLoader, reference model, fused Adam"}  # fmt: skip
    return Contender("fastvae", step, lambda: stepper.read_loss(state["step"]), steps, "Adam (fused)",
                     notes=notes, model=run.model)  # fmt: skip
