"""Training: Adam on the model's objective, with atomic checkpoints, exact resume and DDP.

A run reads as three phases: setup (data, model, optimizer, resume), epochs of steps, and the end of
each epoch (evaluate, one metrics line, checkpoint). A step is either the device-resident engine
(``fastvae.engine``) or the eager step below; both sit behind the same ``step()``.

Everything random in a run is keyed: the epoch's shuffle by the epoch, and the reparameterization and
binarization noise of a sample by its run-wide id (epoch * N + data index, ``fastvae.schedules``). So a
resumed run, and a run on N ranks, see exactly the noise and batches of one uninterrupted process, and end
with the same parameters (bit-identical for a resumed CPU run).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastvae import checkpoint as ckpt
from fastvae import objective as objectives
from fastvae._version import __version__
from fastvae.backends import make_model, resolve_backend, set_threads
from fastvae.config import TrainConfig, VAEConfig
from fastvae.data import DeviceData, label_classes, load_dataset
from fastvae.distributed import DistInfo, setup, teardown
from fastvae.engine import TrainStep, make_optimizer, set_matmul_precision
from fastvae.errors import FastVAEError, Preempted
from fastvae.evaluate import elbo_stats
from fastvae.runs import (
    append_metrics,
    data_digest,
    metrics_record,
    prepare_run_dir,
    read_run_config,
    restore_metrics,
    write_images,
)
from fastvae.schedules import epoch_permutation, kl_beta, sample_ids, scheduled_lr, step_noise

# The engine reads its loss back (one host sync) every this many steps, and checks it is finite.
ENGINE_CHECK_EVERY = 100
# What --resume must not change: each one alters the batches, the noise or the updates of later steps.
RESUME_FIXED = ("preset", "data", "image_size", "grayscale", "seed", "batch_size", "lr", "lr_schedule", "binarize", "kl_warmup_steps",
                "kl_warmup_epochs", "free_bits", "dtype", "backend", "hidden_dims", "latent_dim", "activation",
                "likelihood", "beta")  # fmt: skip
# The time limit is looked at every this many steps (a clock read is cheap, but not free on a GPU loop).
TIME_CHECK_EVERY = 50


@dataclass
class RunResult:
    out: Path
    model: torch.nn.Module
    metrics: list[dict[str, Any]]
    step: int
    rank: int = 0


class Divergence(FastVAEError):
    """A non-finite loss or gradient."""

    @classmethod
    def at(cls, where: str, run_dir: Path, lr: float) -> Divergence:
        """``where``: what went non-finite and when; the rest of the message is the same advice."""
        return cls(
            f"{where}; the last checkpoint in {run_dir / ckpt.CHECKPOINT_DIR} is intact: lower --lr (now {lr:g}), "
            "use --kl-warmup-steps, or check the data for extreme values"
        )


class _Timer:
    """Elapsed seconds between start() and stop(): CUDA events on a GPU, the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            b = torch.cuda.Event(enable_timing=True)
            b.record()
            b.synchronize()
            return self._a.elapsed_time(b) / 1000.0
        return time.perf_counter() - self._t


def _figure_line(model_cfg, stats) -> str:
    """The epoch line's test figure: the -ELBO for a VAE, the reconstruction NLL for the autoencoder."""
    if model_cfg.is_ae:
        return f"test rec NLL {stats.rec:.3f} nats (autoencoder: no KL)"
    return f"test -ELBO {stats.neg_elbo:.3f} nats  (KL {stats.kl:.2f}, {stats.active_units} active)"


def _model_kind(m) -> str:
    """What the start line adds about the objective and the labels (nothing for the plain VAE)."""
    parts = [f"{m.classes} labels"] if m.conditional else []
    objective = objectives.of(m)
    if objective.multi:
        parts.append(objective.label)
    return "".join(f", {p}" for p in parts)


# ---- the two steps --------------------------------------------------------------------------------------
class _EagerStep:
    """One optimizer step from host-side indices: keyed noise, the model's objective (through DDP when
    distributed), backward, a finiteness check, Adam. The loss sum stays on the device until read."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        local_b = run.cfg.batch_size // run.info.world_size
        self.rows = slice(run.info.rank * local_b, (run.info.rank + 1) * local_b)  # this rank's share
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)

    def load_epoch(self, perm: torch.Tensor, epoch: int, first: int) -> None:
        self.perm, self.epoch = perm, epoch

    def set_lr(self, lr: float) -> None:
        for group in self.run.opt.param_groups:
            group["lr"] = lr

    def step(self, i: int, step: int) -> None:
        r, b = self.run, self.run.cfg.batch_size
        idx = self.perm[i * b : (i + 1) * b][self.rows]  # (B_local,) data indices
        x, eps = step_noise(r.cfg.seed, sample_ids(self.epoch, r.n_train, idx), r.train_data.batch(idx),
                            r.model_cfg.latent_dim, r.cfg.binarize, r.model_cfg.k)  # fmt: skip
        y = r.train_data.labels(idx)  # None unless conditional
        objective, report = r.net(x, eps, y=y, beta=r.beta_at(step), free_bits=r.cfg.free_bits)
        r.opt.zero_grad(set_to_none=True)
        objective.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(r.params, float("inf"))
        if not (torch.isfinite(objective) and torch.isfinite(gnorm)):
            what = "loss" if not torch.isfinite(objective) else "gradient"
            raise Divergence.at(
                f"non-finite {what} at step {step + 1} (epoch {self.epoch + 1})", r.run_dir, r.cfg.lr
            )
        r.opt.step()
        self.loss_sum += report.double().sum()

    def peek(self) -> float:
        """This rank's loss sum since the last read (a host sync: for the progress bar only)."""
        return self.loss_sum.item()

    def read_loss(self, step: int) -> float:
        """The per-sample loss summed over the steps since the last read, over every rank."""
        value = self.run.info.all_reduce_sum(self.loss_sum.clone()).item()
        self.loss_sum.zero_()
        return value


class _EngineStep:
    """The device-resident step (``fastvae.engine.TrainStep``), replayed as a CUDA graph on a GPU; its
    loss is read back, and checked, every ``ENGINE_CHECK_EVERY`` steps."""

    def __init__(self, run: _Run, cuda_graph: bool) -> None:
        self.run = run
        cfg = run.cfg
        self.engine = TrainStep(run.model, run.opt, run.train_data, cfg.batch_size, binarize=cfg.binarize,
                                dtype=cfg.dtype, cuda_graph=cuda_graph, seed=cfg.seed, free_bits=cfg.free_bits)  # fmt: skip
        self.host_sum, self.unread = 0.0, 0

    def load_epoch(self, perm: torch.Tensor, epoch: int, first: int) -> None:
        self.engine.load_epoch(perm, epoch, first)
        self.epoch = epoch

    def set_lr(self, lr: float) -> None:
        self.engine.set_lr(lr)  # written into the device tensor the graph reads

    def step(self, i: int, step: int) -> None:
        if self.run.warmup:
            self.engine.set_beta(self.run.beta_at(step))
        self.engine.step()
        self.unread += 1
        if self.unread == ENGINE_CHECK_EVERY:
            self._drain(step + 1)

    def _drain(self, step: int) -> None:
        value = self.engine.read_loss()
        if not math.isfinite(value):
            where = (
                f"non-finite loss within the {self.unread} steps before step {step} (epoch {self.epoch + 1})"
            )
            raise Divergence.at(where, self.run.run_dir, self.run.cfg.lr)
        self.host_sum, self.unread = self.host_sum + value, 0

    def peek(self) -> float:
        return self.host_sum  # what the last drain brought back: no extra sync

    def read_loss(self, step: int) -> float:
        self._drain(step)
        value, self.host_sum = self.host_sum, 0.0
        return value


# ---- the run: setup, epochs, epoch end -----------------------------------------------------------------
def train(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train a VAE; see :class:`TrainConfig` for the settings (keyword overrides are applied to it).

    SIGTERM or SIGINT (a cluster's preemption, Ctrl-C) ends the current step, writes a checkpoint and
    raises :class:`Preempted`; a second signal interrupts at once.

    torch's thread count is set for the run and restored afterwards (on an error too); the model comes
    back in eval mode."""
    cfg = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    threads = torch.get_num_threads()
    try:
        set_threads(cfg.threads)
        return _train(cfg)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> RunResult:
    info = setup(cfg.device)
    locks: list[Any] = []  # the run directory's lock, held while this training runs
    try:
        with _StopSignals() as stop:
            return _Run(cfg, info, stop, locks).train()
    finally:
        for lock in locks:
            lock.close()
        teardown(info)


class _StopSignals:
    """Turns the first SIGTERM / SIGINT into a request the step loop honours; a second one raises
    KeyboardInterrupt as usual. Installed only from the main thread (signals reach no other)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


class _Run:
    def __init__(self, cfg: TrainConfig, info: DistInfo, stop: _StopSignals, locks: list[Any]) -> None:
        """Setup: check the options against the device, load the data, build the model and optimizer,
        and restore the newest checkpoint when resuming."""
        self.cfg, self.info, self.device, self.stop = cfg, info, info.device, stop
        self.backend = resolve_backend(cfg.backend, self.device)
        if cfg.batch_size % info.world_size:
            raise FastVAEError(f"batch_size {cfg.batch_size} must divide evenly over {info.world_size} ranks")
        data = load_dataset(cfg.data, cfg.model_config().likelihood, image_size=cfg.image_size,
                            grayscale=cfg.grayscale, progress=cfg.progress and info.is_main)  # fmt: skip
        self.model_cfg = cfg.model_config(data.data_shape, label_classes(data) if cfg.conditional else 0)
        self.n_train = len(data.x_train)
        self.steps_per_epoch = self.n_train // cfg.batch_size  # the last partial batch is dropped
        if self.steps_per_epoch == 0:
            raise FastVAEError(f"batch_size {cfg.batch_size} exceeds the {self.n_train} training samples")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.planned_steps = self.total_steps  # the lr schedule's length, even when time runs out
        self.warmup = cfg.kl_warmup_steps or cfg.kl_warmup_epochs * self.steps_per_epoch
        use_engine, use_graph = self._step_kind()
        set_matmul_precision(cfg.dtype)
        self.run_dir, resuming = prepare_run_dir(cfg, info, locks)
        torch.manual_seed(cfg.seed)  # parameter initialization
        self.model = make_model(self.model_cfg, backend=self.backend, device=self.device)
        self.opt = make_optimizer(self.model, cfg.lr, cuda_graph=use_graph)
        self.doc = {
            "model": self.model_cfg.to_dict(),
            "train": cfg.to_dict(),
            "fastvae_version": __version__,
            "data_blake2b": data_digest(data, self.model_cfg.conditional),  # checked on --resume
        }
        if data.classes:  # a folder's class names: label i is classes[i] (``--label NAME``)
            self.doc["classes"] = list(data.classes)
        # epoch_loss / epoch_seconds / epoch_steps: what the next metrics line averages over
        self.step, self.metrics, self.epoch_loss, self.epoch_seconds, self.epoch_steps = 0, [], 0.0, 0.0, 0
        if resuming:
            self._resume()
        elif info.is_main:
            ckpt.write_run_config(self.run_dir, self.doc)
        labelled = self.model_cfg.conditional
        self.train_data = DeviceData(data.x_train, self.device, data.y_train if labelled else None)
        self.test_data = DeviceData(data.x_test, self.device, data.y_test if labelled else None)
        self.params = list(self.model.parameters())
        self.net = self.model
        if info.enabled:
            ids = [self.device] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.stepper = _EngineStep(self, use_graph) if use_engine else _EagerStep(self)
        self.timer = _Timer(self.device)

    def _step_kind(self) -> tuple[bool, bool]:
        """(use the engine, capture it in a CUDA graph), checked against the device and process count."""
        cfg, info, cuda = self.cfg, self.info, self.device.type == "cuda"
        use_engine = cfg.engine if cfg.engine is not None else (cuda and not info.enabled)
        use_graph = cfg.cuda_graph if cfg.cuda_graph is not None else (use_engine and cuda)
        if use_engine and info.enabled:
            raise FastVAEError(
                "the device-resident engine runs in a single process; under torchrun use --no-engine"
            )
        if use_graph and (not cuda or not use_engine):
            raise FastVAEError(
                "--cuda-graph needs a CUDA device and the engine in a single process (not torchrun)"
            )
        if cfg.dtype == "bf16" and not use_graph:
            raise FastVAEError("--dtype bf16 runs on the CUDA engine only (a single CUDA process)")
        return use_engine, use_graph

    def _resume(self) -> None:
        old_model, old_doc = read_run_config(self.run_dir)
        self._check_same_recipe(old_model, old_doc.get("train", {}))
        self._check_same_data(old_doc.get("data_blake2b"))
        state = ckpt.restore_latest(self.run_dir, self.model, self.opt)
        self.step, self.epoch_loss, self.epoch_seconds = (
            state["step"],
            state["epoch_loss"],
            state["epoch_seconds"],
        )
        self.epoch_steps = state["epoch_steps"]
        if self.info.is_main:
            tqdm.write(f"fastvae: resuming {self.run_dir} from step {self.step}", file=sys.stderr)
            source = self.run_dir / ckpt.CHECKPOINT_DIR / f"step-{self.step:09d}"
            self.metrics = restore_metrics(self.run_dir, state, source)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))

    def _check_same_recipe(self, old_model: VAEConfig, old: dict[str, Any]) -> None:
        """Refuse a resume whose settings would not continue the recorded run exactly: a changed lr, seed,
        batch, model or data would silently make a run that matches neither its record nor any fresh run.
        Every differing setting is named: the training settings, then the model's fields they imply."""
        fixed = [*RESUME_FIXED, "conditional"]
        if self.cfg.lr_schedule != "constant":  # the schedule's length is part of it
            fixed += ["epochs", "max_steps"]
        new = self.cfg.to_dict()
        changed = {k: (new[k], old[k]) for k in fixed if k in old and old[k] != new[k]}
        model_new, model_old = self.model_cfg.to_dict(), old_model.to_dict()
        for f in dataclasses.fields(VAEConfig):
            if f.compare and f.name not in changed and model_new[f.name] != model_old[f.name]:
                changed[f.name] = (model_new[f.name], model_old[f.name])
        if changed:
            parts = ", ".join(f"{k} {a!r} (the run has {b!r})" for k, (a, b) in changed.items())
            raise FastVAEError(
                f"{self.run_dir}: --resume with a different {parts}; an exact resume needs the run's own "
                "settings (start a new run to change them)"
            )

    def _check_same_data(self, old: Any) -> None:
        """Refuse a resume on data whose content differs from the run's (a file rewritten at the same path,
        another array of the same shape): the batches would silently differ from the recorded run's."""
        if old != self.doc["data_blake2b"]:
            why = (
                "the run records no data hash: an older fastvae"
                if old is None
                else "its content hash differs"
            )
            raise FastVAEError(
                f"{self.run_dir}: --resume with different data content: {self.cfg.data_label} is not the data "
                f"the run was trained on ({why}); an exact resume needs the run's own data"
            )

    def beta_at(self, step: int) -> float:
        return kl_beta(self.warmup, self.model_cfg.beta, step)

    def say(self, line: str) -> None:
        if self.info.is_main:
            tqdm.write(line, file=sys.stderr)

    def train(self) -> RunResult:
        if self.step == 0:
            m = self.model_cfg
            n_params = sum(p.numel() for p in self.params)
            self.say(
                f"fastvae: {m.preset or 'custom'} {m.flat_dim}-{'-'.join(map(str, m.hidden_dims))}-{m.latent_dim} "
                f"({n_params:,} parameters{_model_kind(m)}), backend {self.backend}, device {self.device}, {self.info.world_size} "
                f"rank(s), batch {self.cfg.batch_size}, {self.total_steps} steps -> {self.run_dir}"
            )
        self.model.train()
        if self._epoch_end_pending():  # stopped (SIGTERM) after an epoch's last step: end that epoch now
            self._end_epoch((self.step - 1) // self.steps_per_epoch)
        deadline = None if self.cfg.time_limit is None else time.monotonic() + self.cfg.time_limit
        while self.step < self.total_steps:
            self._epoch(self.step // self.steps_per_epoch, deadline)
        if self.info.is_main:
            final = self.metrics[-1]["test_neg_elbo"] if self.metrics else None
            ckpt.write_weights(self.run_dir, self.model, {**self.doc, "final_test_neg_elbo": final})
            write_images(self.model, self.test_data, self.run_dir, self.cfg.seed, self.cfg.binarize)
        self.info.barrier()
        self.model.eval()  # returned for use: sampling and encoding, not more training
        return RunResult(self.run_dir, self.model, self.metrics, self.step, self.info.rank)

    def _epoch_end_pending(self) -> bool:
        """Whether the checkpoint resumed from was written after the last step of an epoch (or of the run)
        but before that epoch's end: a preemption checkpoints at once, and the end (evaluation, metrics
        line) is done on resume, from the same parameters, as in an uninterrupted run."""
        done = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
        return self.epoch_steps > 0 and done

    def _epoch(self, epoch: int, deadline: float | None) -> None:
        """Steps of one epoch (or of its rest, when resumed), then the epoch's end."""
        cfg, spe = self.cfg, self.steps_per_epoch
        first, last = self.step % spe, min(spe, self.total_steps - epoch * spe)
        self.stepper.load_epoch(epoch_permutation(cfg.seed, epoch, self.n_train, self.device), epoch, first)
        show = cfg.progress and self.info.is_main
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False,
                   file=sys.stderr)  # fmt: skip
        self.timer.start()
        local_b = cfg.batch_size // self.info.world_size
        since = first  # the step of this epoch the stepper's loss sum starts at
        for i in bar:
            if deadline is not None and i > first and (i - first) % TIME_CHECK_EVERY == 0:
                if time.monotonic() > deadline:
                    self.total_steps = self.step  # out of time: evaluate and save as at the end of a run
                    break
            if cfg.lr_schedule != "constant":
                self.stepper.set_lr(scheduled_lr(cfg, self.step, self.planned_steps))
            self.stepper.step(i, self.step)
            self.step += 1
            self.epoch_steps += 1
            if self._stop_requested():
                bar.close()
                self._preempt()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step % spe:
                self._collect()
                self._save()
                self.timer.start()
                since = i + 1
            if show and (i - first + 1) % ENGINE_CHECK_EVERY == 0 and i + 1 > since:
                bar.set_postfix(loss=f"{self.stepper.peek() / ((i + 1 - since) * local_b):.2f}")
        bar.close()
        self._collect()
        if self.step % spe == 0 or self.step == self.total_steps:
            self._end_epoch(epoch)

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal: under DDP all ranks agree, so all stop at the same step."""
        if not self.info.enabled:
            return self.stop.signum is not None
        flag = torch.tensor([float(self.stop.signum or 0)], device=self.device)
        self.info.all_reduce_sum(flag)
        if flag.item() and self.stop.signum is None:
            self.stop.signum = signal.SIGTERM  # a peer was signalled
        return bool(flag.item())

    def _preempt(self) -> None:
        """Checkpoint the step just finished and stop with the command that resumes it."""
        self._collect()
        self._save()
        name = signal.Signals(self.stop.signum).name
        raise Preempted(
            f"stopped by {name} after step {self.step}; checkpoint saved in {self.run_dir / ckpt.CHECKPOINT_DIR}: "
            "run the same command with --resume to continue exactly",
            self.stop.signum,
        )

    def _collect(self) -> None:
        """Fold the steps since the last call into the epoch's loss and time."""
        self.epoch_seconds += self.timer.stop()
        self.epoch_loss += self.stepper.read_loss(self.step)

    def _end_epoch(self, epoch: int) -> None:
        """Evaluate on the test split, write one metrics line and a checkpoint."""
        cfg = self.cfg
        stats = elbo_stats(self.model, self.test_data, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                           binarize=cfg.binarize, dist=self.info)  # fmt: skip
        seconds, samples = self.epoch_seconds, self.epoch_steps * cfg.batch_size
        rec = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": self.epoch_loss / max(samples, 1),
            "test_neg_elbo": stats.neg_elbo,
            "test_objective": stats.objective,
            "test_rec": stats.rec,
            "test_kl": stats.kl,
            "kl_per_dim": [round(k, 5) for k in stats.kl_per_dim],
            "active_units": stats.active_units,
            "seconds": seconds,
            "samples_per_s": samples / max(seconds, 1e-9),
            "beta": self.beta_at(self.step - 1),
            "lr": scheduled_lr(cfg, self.step - 1, self.planned_steps),
        }
        self.metrics.append(rec)
        if self.info.is_main:
            append_metrics(self.run_dir, rec)
            self.say(
                f"epoch {epoch + 1:3d}  step {self.step:7d}  train {rec['train_loss']:.3f}  "
                f"{_figure_line(self.model_cfg, stats)}  "
                f"{seconds:.1f}s  {rec['samples_per_s']:,.0f} samples/s"
            )
        self.epoch_loss, self.epoch_seconds, self.epoch_steps = 0.0, 0.0, 0
        if self.info.is_main and cfg.images_every and (epoch + 1) % cfg.images_every == 0:
            self.model.eval()
            write_images(self.model, self.test_data, self.run_dir, cfg.seed, cfg.binarize, epoch=epoch + 1)
            self.model.train()
        self._save()

    def _save(self) -> None:
        if self.info.is_main:
            state = {
                "epoch_loss": self.epoch_loss,
                "epoch_seconds": self.epoch_seconds,
                "epoch_steps": self.epoch_steps,
                "epoch": self.step // self.steps_per_epoch,
                "torch_rng": torch.get_rng_state().tolist(),
                "fastvae_version": __version__,
                "config": self.doc,
            }
            state["metrics_lines"], state["metrics_sha256"] = metrics_record(self.run_dir)
            ckpt.save_checkpoint(
                self.run_dir, self.step, self.model, self.opt, state, self.cfg.keep_checkpoints
            )
        self.info.barrier()
