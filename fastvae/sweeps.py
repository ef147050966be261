"""``fastvae.sweep``: train a grid of VAEs of one architecture (beta x seed x lr) as one batched computation.

Every model is trained exactly as ``fastvae.train`` would train it alone with its own seed (initialization,
data order and noise, keyed as ``fastvae.schedules`` keys them), beta (and KL warm-up) and learning rate (and
schedule); the N models' steps run together through :class:`fastvae.batched.ModelStack` and
:class:`fastvae.batched.StackedAdam`. The output folder holds one ordinary run directory per model (config.json,
model.safetensors, metrics.jsonl, images, checkpoints: every command works on it), ``sweep.json``, the
summary table (``summary.md``, ``summary.csv``) and the rate-distortion plot (``rate-distortion.png``).

A model whose loss or gradient goes non-finite stops alone (its weights are those of its last finite step);
the others go on. SIGTERM / SIGINT checkpoint every model and raise :class:`Preempted`; ``resume=True``
continues all of them exactly, from the newest step every model has a checkpoint of.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastvae import checkpoint as ckpt
from fastvae import objective as objectives
from fastvae._version import __version__
from fastvae.atomic import atomic_write_bytes
from fastvae.backends import make_model, set_threads
from fastvae.batched import ModelStack, StackedAdam, per_model_finite
from fastvae.config import TrainConfig
from fastvae.data import DeviceData, load_dataset
from fastvae.distributed import DistInfo, setup, teardown
from fastvae.errors import FastVAEError, Preempted
from fastvae.evaluate import elbo_stats
from fastvae.limits import free_bytes, human_bytes
from fastvae.runs import (
    _lock,
    append_metrics,
    data_digest,
    metrics_record,
    prepare_run_dir,
    read_run_config,
    restore_metrics,
    write_images,
)
from fastvae.schedules import epoch_permutation, kl_beta, sample_ids, scheduled_lr, step_noise
from fastvae.trainer import RESUME_FIXED, _StopSignals

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "fastvae-sweep/1"
MAX_MODELS = 4096
# Settings a sweep takes from its grid, not from the base config.
GRID_FIELDS = ("beta", "seed", "lr")


@dataclass
class Member:
    """One model of the grid: its settings, run directory and state."""

    name: str
    cfg: TrainConfig
    status: str = "training"  # "training" | "done" | "diverged"
    message: str = ""

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]  # the summary table, one row per model
    models: list[torch.nn.Module]
    step: int


def parse_values(text: str, what: str) -> list[float]:
    """ "0.25,0.5,1" -> [0.25, 0.5, 1.0] (one clear error for anything else)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FastVAEError(f"{what}: expected comma-separated numbers, got {text!r:.60}") from None
    if not values:
        raise FastVAEError(f"{what}: expected at least one value, got {text!r:.60}")
    return values


def parse_seeds(text: str) -> list[int]:
    """ "0-3" -> [0, 1, 2, 3]; "0,5,7" and "0-1,9" too."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise FastVAEError(f"seeds: expected integers or ranges like 0-3, got {part!r:.40}") from None
        if b < a or b - a >= MAX_MODELS:
            raise FastVAEError(f"seeds: bad range {part!r:.40}")
        seeds.extend(range(a, b + 1))
    if not seeds:
        raise FastVAEError(f"seeds: expected at least one seed, got {text!r:.40}")
    return seeds


def member_name(beta: float | None, seed: int, lr: float) -> str:
    """The model's folder name, e.g. ``beta4-seed0-lr0.001`` (no beta part when the preset's is kept)."""
    return f"{'' if beta is None else f'beta{beta:g}-'}seed{seed}-lr{lr:g}"


def grid_members(base: TrainConfig, root: Path, betas, seeds, lrs) -> list[Member]:
    """The product beta x seed x lr, each a TrainConfig of its own (validated as ``fastvae.train``'s)."""
    betas = [base.beta] if betas is None else list(betas)
    seeds = [base.seed] if seeds is None else list(seeds)
    lrs = [base.lr] if lrs is None else list(lrs)
    # lr outermost: the models of one lr are consecutive rows, which Adam updates as one slice
    combos = [(b, s, lr) for lr, b, s in itertools.product(lrs, betas, seeds)]
    if len(combos) > MAX_MODELS:
        raise FastVAEError(f"a sweep of {len(combos)} models: at most {MAX_MODELS} per sweep")
    if len(set(combos)) != len(combos):
        raise FastVAEError("the grid repeats a (beta, seed, lr) combination")
    members = []
    for beta, seed, lr in combos:
        name = member_name(beta, seed, lr)
        cfg = dataclasses.replace(base, beta=beta, seed=seed, lr=lr, out=str(root / name), backend="torch",
                                  engine=False, cuda_graph=False)  # fmt: skip
        members.append(Member(name, cfg))
    return members


def sweep(
    config: TrainConfig | None = None,
    *,
    betas: list[float] | None = None,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    **overrides: Any,
) -> SweepResult:
    """Train every (beta, seed, lr) of the grid (None: the config's one value) as one batched computation;
    ``config.out`` (or ``out=``) is the sweep's folder. See the module docstring for what it writes."""
    cfg = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    threads = torch.get_num_threads()
    info = None
    try:
        set_threads(cfg.threads)
        info = setup(
            cfg.device
        )  # under torchrun, each rank trains its share of the grid (no gradient traffic)
        locks: list[Any] = []
        try:
            with _StopSignals() as stop:
                return _Sweep(cfg, info, stop, locks, (betas, seeds, lrs)).train()
        finally:
            for lock in locks:
                lock.close()
    finally:
        if info is not None:
            teardown(info)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def bytes_per_model(model_cfg, batch_size: int) -> int:
    """Memory one model of a sweep takes: fp32 parameters, gradients and Adam's two moments, plus the step's
    workspace (its batch, noise and the activations autograd keeps, about three copies of each row's widths)."""
    k = model_cfg.k
    widths = model_cfg.flat_dim * (1 + k) + 2 * sum(model_cfg.hidden_dims) * k + 4 * model_cfg.latent_dim * k
    return 16 * model_cfg.n_parameters + 4 * 3 * batch_size * widths


def check_sweep_fits(n: int, model_cfg, batch_size: int, device: torch.device) -> None:
    """One line naming the largest N that fits, before anything is allocated."""
    per, free = bytes_per_model(model_cfg, batch_size), free_bytes(device)
    if n * per > free:
        raise FastVAEError(
            f"a sweep of {n} models of {model_cfg.n_parameters:,} parameters at batch {batch_size} needs about "
            f"{human_bytes(n * per)}, more than the {human_bytes(free)} free on {device}; at most {free // per} "
            "models fit: use fewer --beta/--seeds/--lr values or a smaller --batch-size"
        )


def _check_supported(cfg: TrainConfig) -> None:
    """Settings of ``fastvae.train`` the batched path does not take: one line each, never ignored silently."""
    unsupported = {
        "conditional": cfg.conditional, "time_limit": cfg.time_limit is not None,
        "images_every": cfg.images_every is not None, "dtype": cfg.dtype != "fp32",
        "engine": bool(cfg.engine), "cuda_graph": bool(cfg.cuda_graph), "backend": cfg.backend == "triton",
    }  # fmt: skip
    for name, given in unsupported.items():
        if given:
            raise FastVAEError(
                f"fastvae sweep does not take {name}={getattr(cfg, name)!r} yet (it trains fp32 reference models, "
                "unconditional, on the batched path)"
            )


class _Sweep:
    def __init__(self, cfg: TrainConfig, info: DistInfo, stop: _StopSignals, locks: list[Any], grid) -> None:
        """Setup: the grid, the data (one copy for all models), the memory check, the run directories, the
        models (each initialized from its own seed, as ``fastvae.train`` does) and the stacked optimizer."""
        self.cfg, self.info, self.device, self.stop = cfg, info, info.device, stop
        _check_supported(cfg)
        self.root = (
            Path(cfg.out)
            if cfg.out
            else Path("runs") / f"sweep-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        self.grid = grid_members(cfg, self.root, *grid)
        self.members = self.grid[
            info.rank :: info.world_size
        ]  # this rank's models (all of them in one process)
        if not self.members:
            raise FastVAEError(
                f"{info.world_size} ranks for {len(self.grid)} models: use at most one rank per model"
            )
        data = load_dataset(cfg.data, cfg.model_config().likelihood, image_size=cfg.image_size,
                            grayscale=cfg.grayscale, progress=cfg.progress)  # fmt: skip
        self.model_cfgs = [m.cfg.model_config(data.data_shape, 0) for m in self.members]
        check_sweep_fits(len(self.members), self.model_cfgs[0], cfg.batch_size, self.device)
        self.n_train = len(data.x_train)
        self.spe = self.n_train // cfg.batch_size
        if self.spe == 0:
            raise FastVAEError(f"batch_size {cfg.batch_size} exceeds the {self.n_train} training samples")
        self.total_steps = self.spe * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.planned_steps = self.total_steps
        self.warmup = cfg.kl_warmup_steps or cfg.kl_warmup_epochs * self.spe
        self._prepare_root(locks)
        digest = data_digest(data, False)
        self.docs, resuming = [], []
        for m, mc in zip(self.members, self.model_cfgs):
            _, again = prepare_run_dir(m.cfg, DistInfo(device=self.device), locks)  # this rank's own model
            resuming.append(again)
            self.docs.append({"model": mc.to_dict(), "train": m.cfg.to_dict(), "fastvae_version": __version__,
                              "data_blake2b": digest})  # fmt: skip
        models = []
        for m, mc in zip(self.members, self.model_cfgs):
            torch.manual_seed(m.cfg.seed)  # parameter initialization, as fastvae.train
            models.append(make_model(mc, backend="torch", device=self.device))
        self.stack = ModelStack(models)
        self.adam = StackedAdam(self.stack.params, row=self.stack.row)
        self.train_data = DeviceData(data.x_train, self.device)
        self.test_data = DeviceData(data.x_test, self.device)
        n = len(self.members)
        self.step, self.metrics = 0, [[] for _ in range(n)]
        self.epoch_loss = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.epoch_seconds, self.epoch_steps = 0.0, 0
        self._start(resuming)

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.stack.models

    def _prepare_root(self, locks: list[Any]) -> None:
        root, cfg = self.root, self.cfg
        if root.exists() and not root.is_dir():
            raise FastVAEError(f"{root}: exists and is not a directory")
        record = root / SWEEP_FILE
        if record.exists() and not cfg.resume and not cfg.overwrite:
            raise FastVAEError(
                f"{root}: already holds a sweep; continue it with resume=True (--resume), replace it with "
                "overwrite=True (--overwrite), or choose another out"
            )
        self.info.barrier()  # every rank has looked before rank 0 writes anything
        if self.info.is_main:
            root.mkdir(parents=True, exist_ok=True)
            locks.append(_lock(root))
        if cfg.resume and record.exists():
            old = ckpt.read_json(record, "sweep record")
            names = [m["name"] for m in old.get("members", [])] if isinstance(old, dict) else None
            if names != [m.name for m in self.grid]:
                raise FastVAEError(
                    f"{record}: --resume with another grid ({len(names or [])} models recorded, {len(self.grid)} "
                    "asked for); an exact resume needs the sweep's own --beta/--seeds/--lr"
                )
            for m, rec in zip(self.grid, old["members"]):
                m.status, m.message = rec.get("status", "training"), rec.get("message", "")
        for m in self.members if cfg.resume else ():  # under torchrun only the end updates sweep.json: a
            doc = (
                ckpt.read_json(m.out / ckpt.CONFIG_FILE, "run config")
                if (m.out / ckpt.CONFIG_FILE).exists()
                else {}
            )
            if isinstance(doc, dict) and doc.get("diverged"):  # model's own config records its divergence
                m.status, m.message = "diverged", str(doc["diverged"])

    def _start(self, resuming: list[bool]) -> None:
        """Fresh: write every config.json. Resumed: restore every model at the newest step that all the
        models still training have a checkpoint of (a kill between two models' checkpoints leaves them one
        checkpoint apart)."""
        live = [i for i, m in enumerate(self.members) if m.status == "training"]
        steps = [self._latest_step(i) if resuming[i] else 0 for i in live]
        common = min(steps) if steps else 0
        if common == 0:  # a fresh start: nothing of an earlier attempt may be resumed from later
            for i, m in enumerate(self.members):
                shutil.rmtree(m.out / ckpt.CHECKPOINT_DIR, ignore_errors=True)
                (m.out / ckpt.METRICS_FILE).unlink(missing_ok=True)
                ckpt.write_run_config(m.out, self.docs[i])
            self._write_record()
            return
        for i, m in enumerate(self.members):
            if m.status != "training":
                continue
            self._check_same_recipe(i)
            opt = self.adam.member_optimizer(i, self.models[i], m.cfg.lr)
            state = ckpt.restore_latest(m.out, self.models[i], opt, at_most=common)
            if state["step"] != common:
                raise FastVAEError(f"{m.out}: no usable checkpoint at step {common}, where the sweep resumes")
            self.adam.load_member(i, self.models[i], opt)
            source = m.out / ckpt.CHECKPOINT_DIR / f"step-{common:09d}"
            self.metrics[i] = restore_metrics(m.out, state, source)
            self.epoch_loss[i] = state["epoch_loss"]
            self.epoch_seconds, self.epoch_steps = state["epoch_seconds"], state["epoch_steps"]
        self.step = common
        self.say(f"fastvae: resuming the sweep in {self.root} from step {common}")

    def _check_same_recipe(self, i: int) -> None:
        """Refuse a resume whose settings or data would not continue model i's recorded run exactly."""
        m = self.members[i]
        _, doc = read_run_config(m.out)
        old, new = doc.get("train", {}), m.cfg.to_dict()
        fixed = [*RESUME_FIXED, *(("epochs", "max_steps") if m.cfg.lr_schedule != "constant" else ())]
        changed = [f"{k} {new[k]!r} (the run has {old[k]!r})" for k in fixed if k in old and old[k] != new[k]]
        if doc.get("data_blake2b") != self.docs[i]["data_blake2b"]:
            changed.append("data content")
        if changed:
            raise FastVAEError(
                f"{m.out}: --resume with a different {', '.join(changed)}; an exact resume needs the sweep's own "
                "settings (start a new sweep to change them)"
            )

    def _latest_step(self, i: int) -> int:
        found = ckpt.list_checkpoints(self.members[i].out)
        return int(found[-1].name.split("-")[1]) if found else 0

    def say(self, line: str) -> None:
        tqdm.write(f"[rank {self.info.rank}] {line}" if self.info.enabled else line, file=sys.stderr)

    def _write_record(self) -> None:
        """sweep.json (rank 0): the grid and each model's status (under torchrun, other ranks' models are
        brought up to date at the end)."""
        if not self.info.is_main:
            return
        doc = {
            "format": SWEEP_FORMAT,
            "fastvae_version": __version__,
            "grid": {
                f: sorted({getattr(m.cfg, f) for m in self.grid}, key=lambda v: (v is None, v or 0))
                for f in GRID_FIELDS
            },  # fmt: skip
            "train": {k: v for k, v in self.cfg.to_dict().items() if k not in GRID_FIELDS},
            "step": self.step,
            "members": [
                {
                    "name": m.name,
                    "beta": m.cfg.beta,
                    "seed": m.cfg.seed,
                    "lr": m.cfg.lr,
                    "status": m.status,
                    "message": m.message,
                }
                for m in self.grid
            ],  # fmt: skip
            "ranks": self.info.world_size,
        }
        ckpt.atomic_write_json(self.root / SWEEP_FILE, doc)

    # ---- training ------------------------------------------------------------------------------------
    def _active(self) -> torch.Tensor:
        return torch.tensor([m.status == "training" for m in self.members], device=self.device)

    def train(self) -> SweepResult:
        cfg, mc = self.cfg, self.model_cfgs[0]
        if self.step == 0:
            self.say(
                f"fastvae: sweep of {len(self.members)} models {mc.flat_dim}-{'-'.join(map(str, mc.hidden_dims))}-"
                f"{mc.latent_dim} ({mc.n_parameters:,} parameters each), batched on {self.device}, batch "
                f"{cfg.batch_size}, {self.total_steps} steps -> {self.root}"
            )
        for m in self.models:
            m.train()
        if self.epoch_steps > 0 and (self.step % self.spe == 0 or self.step >= self.total_steps):
            self._end_epoch((self.step - 1) // self.spe)  # preempted after an epoch's last step
        while self.step < self.total_steps and self._active().any():
            self._epoch(self.step // self.spe)
        return self._finish()

    def _epoch(self, epoch: int) -> None:
        cfg, spe = self.cfg, self.spe
        first, last = self.step % spe, min(spe, self.total_steps - epoch * spe)
        perms = torch.stack(
            [epoch_permutation(m.cfg.seed, epoch, self.n_train, self.device) for m in self.members]
        )  # fmt: skip  (N, n): each model's own data order
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, file=sys.stderr)  # fmt: skip
        t0 = time.perf_counter()
        for i in bar:
            self._step(epoch, perms[:, i * cfg.batch_size : (i + 1) * cfg.batch_size])
            self.step += 1
            self.epoch_steps += 1
            if self.stop.signum is not None:
                bar.close()
                self.epoch_seconds += time.perf_counter() - t0
                self._preempt()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step % spe:
                self.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save()
            if not self._active().any():
                break
        bar.close()
        self.epoch_seconds += time.perf_counter() - t0
        if self.step % spe == 0 or self.step == self.total_steps or not self._active().any():
            self._end_epoch(epoch)

    def batch(self, epoch: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (N, B, D), eps (N, B, [K,] Z)): each model's batch and noise, as its single run draws them."""
        mc, xs, es = self.model_cfgs[0], [], []
        for m, rows in zip(self.members, idx):
            x, eps = step_noise(m.cfg.seed, sample_ids(epoch, self.n_train, rows), self.train_data.batch(rows),
                                mc.latent_dim, self.cfg.binarize, mc.k)  # fmt: skip
            xs.append(x.flatten(1))
            es.append(eps)
        return torch.stack(xs), torch.stack(es)

    def _step(self, epoch: int, idx: torch.Tensor) -> None:
        x, eps = self.batch(epoch, idx)
        beta = torch.tensor(
            [kl_beta(self.warmup, mc.beta, self.step) for mc in self.model_cfgs], device=self.device
        )
        # float64: Adam gets each lr as the exact Python float the single-model trainer gives it
        lr = torch.tensor([scheduled_lr(m.cfg, self.step, self.planned_steps) for m in self.members],
                          dtype=torch.float64)  # fmt: skip
        active = self._active()
        loss, rec, kl = self.stack.terms(x, eps, beta, self.cfg.free_bits)
        loss_mean = loss.mean(1)
        grads = self.stack.gradients(loss_mean, active)
        finite = torch.isfinite(loss_mean.detach()) & per_model_finite(grads)
        for i in torch.nonzero(active & ~finite).flatten().tolist():
            what = "loss" if not torch.isfinite(loss_mean[i]) else "gradient"
            self._diverged(i, f"non-finite {what} at step {self.step + 1} (epoch {epoch + 1})")
        active = active & finite
        self.adam.step(grads, lr, active)
        report_beta = torch.tensor([mc.beta for mc in self.model_cfgs], device=self.device)[:, None]
        t = objectives.Terms(loss.detach(), rec.detach(), kl.detach())
        figure = objectives.of(self.model_cfgs[0]).report(t, report_beta)  # (N, B)
        self.epoch_loss += torch.where(active, figure.double().sum(1), torch.zeros_like(self.epoch_loss))

    def _diverged(self, i: int, where: str) -> None:
        """Model i stops here, with the weights of its last finite step; the others go on."""
        m = self.members[i]
        m.status, m.message = "diverged", where
        others = sum(x.status == "training" for x in self.members)
        self.say(
            f"fastvae: {m.name} diverged: {where}; it stops with the weights of its last finite step "
            f"(lower its lr, or use --kl-warmup-steps); the other {others} model(s) go on"
        )
        final = self.metrics[i][-1]["test_neg_elbo"] if self.metrics[i] else None
        ckpt.write_weights(
            m.out, self.models[i], {**self.docs[i], "final_test_neg_elbo": final, "diverged": where}
        )
        self._write_record()

    def _preempt(self) -> None:
        import signal

        self._save()
        self._write_record()
        name = signal.Signals(self.stop.signum).name
        raise Preempted(
            f"stopped by {name} after step {self.step}; every model's checkpoint is saved under {self.root}: run "
            "the same command with --resume to continue exactly",
            self.stop.signum,
        )

    def _end_epoch(self, epoch: int) -> None:
        """Evaluate every model still training on the test split, one metrics line each, checkpoints."""
        cfg, samples = self.cfg, self.epoch_steps * self.cfg.batch_size
        lines = []
        for i, m in enumerate(self.members):
            if m.status != "training":
                continue
            stats = elbo_stats(self.models[i], self.test_data, seed=m.cfg.seed, batch_size=cfg.eval_batch_size,
                               binarize=cfg.binarize)  # fmt: skip
            self.models[i].train()
            rec = {
                "epoch": epoch + 1, "step": self.step,
                "train_loss": float(self.epoch_loss[i]) / max(samples, 1),
                "test_neg_elbo": stats.neg_elbo, "test_objective": stats.objective, "test_rec": stats.rec,
                "test_kl": stats.kl, "kl_per_dim": [round(k, 5) for k in stats.kl_per_dim],
                "active_units": stats.active_units, "seconds": self.epoch_seconds,
                "samples_per_s": samples / max(self.epoch_seconds, 1e-9),
                "beta": kl_beta(self.warmup, self.model_cfgs[i].beta, self.step - 1),
                "lr": scheduled_lr(m.cfg, self.step - 1, self.planned_steps),
            }  # fmt: skip
            self.metrics[i].append(rec)
            append_metrics(m.out, rec)
            lines.append((stats.neg_elbo, m.name))
        if lines:
            best, worst = min(lines), max(lines)
            self.say(
                f"epoch {epoch + 1:3d}  step {self.step:7d}  {len(lines)} models: test -ELBO {best[0]:.3f} "
                f"({best[1]}) .. {worst[0]:.3f} ({worst[1]})  {self.epoch_seconds:.1f}s  "
                f"{len(lines) * samples / max(self.epoch_seconds, 1e-9):,.0f} model-samples/s"
            )
        self.epoch_loss.zero_()
        self.epoch_seconds, self.epoch_steps = 0.0, 0
        self._save()
        self._write_record()

    def _save(self) -> None:
        """One ordinary checkpoint per model still training (what ``fastvae train`` writes)."""
        for i, m in enumerate(self.members):
            if m.status != "training":
                continue
            state = {
                "epoch_loss": float(self.epoch_loss[i]), "epoch_seconds": self.epoch_seconds,
                "epoch_steps": self.epoch_steps, "epoch": self.step // self.spe,
                "torch_rng": torch.get_rng_state().tolist(), "fastvae_version": __version__,
                "config": self.docs[i],
            }  # fmt: skip
            state["metrics_lines"], state["metrics_sha256"] = metrics_record(m.out)
            lr = scheduled_lr(m.cfg, max(self.step - 1, 0), self.planned_steps)
            opt = self.adam.member_optimizer(i, self.models[i], lr)
            ckpt.save_checkpoint(m.out, self.step, self.models[i], opt, state, self.cfg.keep_checkpoints)

    # ---- the end: final weights, the summary and the plot -------------------------------------------------
    def _finish(self) -> SweepResult:
        for i, m in enumerate(self.members):
            self.models[i].eval()
            if m.status != "training":
                continue
            m.status = "done"
            final = self.metrics[i][-1]["test_neg_elbo"] if self.metrics[i] else None
            ckpt.write_weights(m.out, self.models[i], {**self.docs[i], "final_test_neg_elbo": final})
            write_images(self.models[i], self.test_data, m.out, m.cfg.seed, self.cfg.binarize)
        rows = self._gather_rows(self.summary_rows())
        self._write_record()
        if self.info.is_main:
            self._write_summary(rows)
        if all(r["status"] == "diverged" for r in rows):
            raise FastVAEError(f"every model of the sweep in {self.root} diverged; see its sweep.json")
        return SweepResult(self.root, rows, self.models, self.step)

    def _gather_rows(self, own: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's summary rows, in grid order (the one collective of a sweep under torchrun); the
        grid's statuses are brought up to date from them."""
        if not self.info.enabled:
            return own
        import torch.distributed as dist

        parts: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(parts, own)
        by_name = {r["name"]: r for part in parts for r in part}
        for m in self.grid:
            m.status = by_name[m.name]["status"]
            m.message = by_name[m.name].get("message", "")
        return [by_name[m.name] for m in self.grid]

    def _write_summary(self, rows: list[dict[str, Any]]) -> None:
        write_summary(self.root, rows)
        if any(r["test_neg_elbo"] is not None for r in rows):
            try:
                from fastvae.plots import rate_distortion

                rate_distortion(rows, self.root / "rate-distortion.png")
                if any("mig" in r for r in rows):
                    from fastvae.plots import disentanglement_against_beta

                    disentanglement_against_beta(rows, self.root / "mig-against-beta.png")
            except FastVAEError as exc:  # matplotlib missing: the table is still there
                self.say(f"fastvae: no rate-distortion plot ({exc})")

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        for m, mc, metrics in zip(self.members, self.model_cfgs, self.metrics):
            last = metrics[-1] if metrics else {}
            rows.append({
                "name": m.name, "beta": mc.beta, "seed": m.cfg.seed, "lr": m.cfg.lr, "status": m.status,
                "step": last.get("step"), "test_neg_elbo": last.get("test_neg_elbo"),
                "test_rec": last.get("test_rec"), "test_kl": last.get("test_kl"),
                "active_units": last.get("active_units"),
            })  # fmt: skip
        if self.cfg.data in FACTOR_GRIDS:
            self._add_disentanglement(rows)
        return rows

    def _add_disentanglement(self, rows: list[dict[str, Any]]) -> None:
        """MIG and SAP of each finished model on data with known factors (``fastvae.disentangle``, the same
        seeded sample for every model), so a beta sweep reports disentanglement against beta."""
        from fastvae.disentangle import disentanglement

        for row, m, model in zip(rows, self.members, self.models):
            if m.status == "diverged":
                continue
            try:
                r = disentanglement(model, grid=self.cfg.data, device=self.device)
            except FastVAEError as exc:  # scikit-learn missing: the table keeps its other columns
                self.say(f"fastvae: no MIG/SAP in the sweep summary ({exc})")
                return
            row["mig"], row["sap"] = r.mig.score, r.sap.score


SUMMARY_COLUMNS = ("name", "beta", "seed", "lr", "status", "step", "test_neg_elbo", "test_rec", "test_kl",
                   "active_units")  # fmt: skip
FACTOR_COLUMNS = ("mig", "sap")  # on data with known factors (dSprites)
FACTOR_GRIDS = ("dsprites", "dsprites-small")


def _cell(column: str, v: Any) -> str:
    if v is None:
        return "-"
    if column.startswith("test_") or column in FACTOR_COLUMNS:
        return f"{v:.3f}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_summary(root: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv (every value as recorded) and summary.md (a table to read), both atomically."""
    factors = any("mig" in r for r in rows)
    columns = SUMMARY_COLUMNS + (FACTOR_COLUMNS if factors else ())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(root / "summary.csv", buf.getvalue().encode())
    head = ["model", "beta", "seed", "lr", "status", "step", "test -ELBO", "rec", "KL", "active units"]
    head += ["MIG", "SAP"] if factors else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    atomic_write_bytes(root / "summary.md", ("\n".join(lines) + "\n").encode())
