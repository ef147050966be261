"""Training: Adam on the mean per-sample -ELBO, with atomic checkpoints, exact resume and DDP.

Everything random in a run is keyed by (seed, counter): the epoch's shuffle by the epoch, the
reparameterization and binarization noise by the optimizer step, drawn for the global batch and sliced by
each rank's rows. So a resumed run, and a run on N ranks, see exactly the noise and batches of one
uninterrupted process, and end with the same parameters (bit-identical for a resumed CPU run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import fastvae
from fastvae import checkpoint as ckpt
from fastvae.backends import BACKENDS, make_model, resolve_backend
from fastvae.config import VAEConfig, preset
from fastvae.data import DeviceData, load_dataset
from fastvae.distributed import DistInfo, setup, teardown
from fastvae.engine import DTYPES, TrainStep, make_optimizer, set_matmul_precision
from fastvae.errors import FastVAEError
from fastvae.evaluate import elbo_stats, eval_batch
from fastvae.images import save_grid
from fastvae.noise import keyed_generator

# Training settings that come with a preset unless given explicitly.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "pytorch-example": {"batch_size": 128, "binarize": False},
    "paper": {"batch_size": 100, "binarize": False},
    "iwae": {"batch_size": 100, "binarize": True},  # dynamically binarized MNIST, as in the IWAE paper
}
SHUFFLE_SALT = 7_000_003
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything a run needs; stored in the run's config.json."""

    preset: str = "pytorch-example"
    data: str = "mnist"  # "mnist" (bundled) or a .npy/.npz file
    epochs: int = 10
    batch_size: int | None = None  # global batch; None: the preset's (128, or 100 for paper/iwae)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "constant", or "cosine": lr * (1 + cos(pi * step / total_steps)) / 2
    seed: int = 0
    device: str = "auto"
    out: str | None = None  # default runs/<preset>-<timestamp>
    backend: str = "auto"
    binarize: bool | None = None  # dynamic binarization, re-drawn every batch; None: the preset's
    max_steps: int | None = None  # stop after this many optimizer steps
    time_limit: float | None = None  # stop (evaluate, save) after this many seconds of training
    checkpoint_every: int | None = None  # also checkpoint every N steps (always at each epoch end)
    keep_checkpoints: int = 3
    resume: bool = False  # continue the run in `out` if there is one (else start it: torchrun restarts)
    overwrite: bool = False
    kl_warmup_steps: int = 0  # beta rises linearly from 0 to its value over this many steps
    kl_warmup_epochs: int = 0  # the same in epochs (used when kl_warmup_steps is 0)
    free_bits: float = 0.0  # per-dimension KL floor in nats (batch-averaged, Kingma et al. 2016)
    eval_batch_size: int = 1000
    progress: bool = True
    # fp32 | tf32 | bf16 (bf16: fp32 master weights, bf16 compute; needs the CUDA engine)
    dtype: str = "fp32"
    # Run the step through fastvae.engine (batches, noise and schedule on the device; eps drawn in-kernel
    # by the fused backend); None: on for CUDA in a single process.
    engine: bool | None = None
    # Capture that step in a CUDA graph; None: whenever the engine runs on CUDA.
    cuda_graph: bool | None = None
    # Model overrides of the preset (None keeps the preset's value).
    hidden_dims: tuple[int, ...] | None = None
    latent_dim: int | None = None
    activation: str | None = None
    likelihood: str | None = None
    beta: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded only

    def __post_init__(self) -> None:
        preset(self.preset)  # validates the name
        defaults = PRESET_TRAINING.get(self.preset, {})
        if self.batch_size is None:
            self.batch_size = defaults.get("batch_size", 128)
        if self.binarize is None:
            self.binarize = defaults.get("binarize", False)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        _check_int("kl_warmup_steps", self.kl_warmup_steps, 0)
        _check_int("kl_warmup_epochs", self.kl_warmup_epochs, 0)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        if self.time_limit is not None and (not _finite(self.time_limit) or self.time_limit <= 0):
            raise FastVAEError(f"time_limit must be a number of seconds > 0, got {self.time_limit!r}")
        if self.checkpoint_every is not None:
            _check_int("checkpoint_every", self.checkpoint_every, 1)
        if not _finite(self.lr) or self.lr <= 0:
            raise FastVAEError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not _finite(self.free_bits) or self.free_bits < 0:
            raise FastVAEError(f"free_bits must be a finite number >= 0, got {self.free_bits!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FastVAEError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.backend not in BACKENDS:
            raise FastVAEError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise FastVAEError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise FastVAEError("--resume and --overwrite exclude each other")
        self.model_config()  # validates the overrides

    def model_config(self, data_shape: tuple[int, ...] | None = None) -> VAEConfig:
        changes = {
            k: getattr(self, k)
            for k in ("hidden_dims", "latent_dim", "activation", "likelihood", "beta")
            if getattr(self, k) is not None
        }
        if data_shape is not None:
            changes["input_dim"] = tuple(data_shape)
        return preset(self.preset).replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["hidden_dims"] is not None:
            d["hidden_dims"] = list(d["hidden_dims"])
        return d


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(name: str, v: object, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise FastVAEError(f"{name} must be an integer >= {lo}, got {v!r}")


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


# The CUDA engine reads its loss back (one host sync) every this many steps, and checks it is finite.
ENGINE_CHECK_EVERY = 100


def _check_engine_loss(engine, run_sum, step: int, epoch: int, run_dir: Path, cfg) -> None:
    value = engine.read_loss()
    if not math.isfinite(value):
        where = (
            f"non-finite loss within the {ENGINE_CHECK_EVERY} steps before step {step} (epoch {epoch + 1})"
        )
        raise Divergence.at(where, run_dir, cfg.lr)
    run_sum += value


def epoch_permutation(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    g = keyed_generator(seed + SHUFFLE_SALT, epoch, device)
    return torch.randperm(n, generator=g, device=device)


def step_noise(
    seed: int, step: int, global_batch: int, rows: slice, z_dim: int, x: torch.Tensor, binarize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(binarized x, eps) for this rank's ``rows`` of the global batch of ``step``."""
    g = keyed_generator(seed, step, x.device)
    eps = torch.randn(global_batch, z_dim, generator=g, device=x.device)[rows]  # (B, Z)
    if binarize:
        u = torch.rand(global_batch, x.shape[1], generator=g, device=x.device)[rows]  # (B, D)
        x = (u < x).to(x.dtype)
    return x, eps


def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate for ``step`` (0-based) of a run of ``total_steps``."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    return cfg.lr


def kl_beta(warmup_steps: int, beta: float, step: int) -> float:
    """KL weight at ``step`` (0-based): linear from beta / warmup_steps up to beta, then constant."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)


def prepare_run_dir(cfg: TrainConfig, info: DistInfo) -> tuple[Path, bool]:
    """The run directory, and whether this run resumes one. Every rank decides before the barrier, so
    no rank can see files that rank 0 writes after it."""
    out = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    has_run = out.exists() and any((out / f).exists() for f in (ckpt.CONFIG_FILE, ckpt.CHECKPOINT_DIR))
    if out.exists() and not out.is_dir():
        raise FastVAEError(f"{out}: exists and is not a directory")
    if not cfg.resume and has_run:
        if not cfg.overwrite:
            raise FastVAEError(f"{out}: already holds a run; pass --resume to continue it or --overwrite")
        if info.is_main:
            import shutil

            for name in (ckpt.CHECKPOINT_DIR,):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (
                ckpt.CONFIG_FILE,
                ckpt.WEIGHTS_FILE,
                ckpt.METRICS_FILE,
                "samples.png",
                "reconstructions.png",
            ):
                (out / name).unlink(missing_ok=True)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    info.barrier()
    return out, cfg.resume and bool(ckpt.list_checkpoints(out))  # killed before a checkpoint: start over


def _restore(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the newest checkpoint that verifies; older ones are tried if the newest is broken."""
    errors = []
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        try:
            model_t, opt_sd, state = ckpt.load_checkpoint(path)
            ckpt.load_state_into(model, model_t, path / ckpt.WEIGHTS_FILE)
            opt.load_state_dict(opt_sd)
            return state
        except FastVAEError as exc:
            errors.append(str(exc))
    detail = f" ({errors[0]})" if errors else ""
    raise FastVAEError(f"{run_dir}: no usable checkpoint to resume from{detail}")


def _trim_metrics(run_dir: Path, epochs_done: int) -> list[dict[str, Any]]:
    """Keep the metrics of epochs the checkpoint covers (a later line may come from a lost epoch)."""
    path = run_dir / ckpt.METRICS_FILE
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if rec.get("epoch", math.inf) <= epochs_done:
            kept.append(rec)
    ckpt.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


def _append_metrics(run_dir: Path, rec: dict[str, Any]) -> None:
    with open(run_dir / ckpt.METRICS_FILE, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


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


def write_images(model: torch.nn.Module, test: DeviceData, run_dir: Path, seed: int, binarize: bool) -> None:
    shape = model.config.data_shape
    g = keyed_generator(seed, 0, next(model.parameters()).device)
    save_grid(model.sample(64, generator=g).float().cpu().numpy(), shape, run_dir / "samples.png")
    with torch.no_grad():
        x = eval_batch(test, 0, min(8, len(test)), seed, binarize)
        mu, _ = model.encode(x)
        recon = model.mean_output(model.decode(mu))
    both = torch.cat([x, recon]).float().cpu().numpy()
    save_grid(both, shape, run_dir / "reconstructions.png", ncol=len(x))


def train(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train a VAE; see :class:`TrainConfig` for the settings (keyword overrides are applied to it)."""
    cfg = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    info = setup(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        teardown(info)


def _train(cfg: TrainConfig, info: DistInfo) -> RunResult:
    device = info.device
    backend = resolve_backend(cfg.backend, device)
    if cfg.batch_size % info.world_size:
        raise FastVAEError(f"batch_size {cfg.batch_size} must divide evenly over {info.world_size} ranks")
    model_cfg = cfg.model_config()
    data = load_dataset(cfg.data, model_cfg.likelihood)
    model_cfg = cfg.model_config(data.data_shape)
    n_train = len(data.x_train)
    steps_per_epoch = n_train // cfg.batch_size  # the last partial batch is dropped; reshuffled each epoch
    if steps_per_epoch == 0:
        raise FastVAEError(f"batch_size {cfg.batch_size} exceeds the {n_train} training samples")
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.kl_warmup_steps or cfg.kl_warmup_epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    use_engine = cfg.engine if cfg.engine is not None else (device.type == "cuda" and not info.enabled)
    use_graph = cfg.cuda_graph if cfg.cuda_graph is not None else (use_engine and device.type == "cuda")
    if use_engine and info.enabled:
        raise FastVAEError(
            "the device-resident engine runs in a single process; under torchrun use --no-engine"
        )
    if use_graph and (device.type != "cuda" or not use_engine):
        raise FastVAEError(
            "--cuda-graph needs a CUDA device and the engine in a single process (not torchrun)"
        )
    if cfg.dtype == "bf16" and not use_graph:
        raise FastVAEError("--dtype bf16 runs on the CUDA engine only (a single CUDA process)")
    set_matmul_precision(cfg.dtype)
    run_dir, resuming = prepare_run_dir(cfg, info)
    torch.manual_seed(cfg.seed)  # parameter initialization
    model = make_model(model_cfg, backend=backend, device=device)
    opt = make_optimizer(model, cfg.lr, cuda_graph=use_graph)
    doc = {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "fastvae_version": fastvae.__version__}
    # epoch_loss / epoch_seconds / epoch_steps: what the next metrics line averages over
    step, metrics, epoch_loss, epoch_seconds, epoch_steps = 0, [], 0.0, 0.0, 0
    if resuming:
        old_model, _ = ckpt.read_run_config(run_dir)
        if old_model != model_cfg:
            raise FastVAEError(f"{run_dir}: the run was trained with a different model config; cannot resume")
        state = _restore(run_dir, model, opt)
        step, epoch_loss, epoch_seconds = state["step"], state["epoch_loss"], state["epoch_seconds"]
        epoch_steps = state["epoch_steps"]
        if info.is_main:
            tqdm.write(f"fastvae: resuming {run_dir} from step {step}", file=sys.stderr)
            metrics = _trim_metrics(run_dir, step // steps_per_epoch)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    elif info.is_main:
        ckpt.atomic_write_json(run_dir / ckpt.CONFIG_FILE, doc)

    train_data = DeviceData(data.x_train, device)
    test_data = DeviceData(data.x_test, device)
    local_b = cfg.batch_size // info.world_size
    rows = slice(info.rank * local_b, (info.rank + 1) * local_b)
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    params = [p for p in model.parameters()]
    engine = None
    if use_engine:  # batches, noise and schedule on the device; replayed as a CUDA graph when use_graph
        engine = TrainStep(model, opt, train_data, cfg.batch_size, binarize=cfg.binarize, dtype=cfg.dtype,
                           cuda_graph=use_graph)  # fmt: skip
    timer = _Timer(device)
    say = (lambda s: tqdm.write(s, file=sys.stderr)) if info.is_main else (lambda s: None)
    if info.is_main and step == 0:
        n_params = sum(p.numel() for p in params)
        say(
            f"fastvae: {model_cfg.preset or 'custom'} {model_cfg.flat_dim}-{'-'.join(map(str, model_cfg.hidden_dims))}"
            f"-{model_cfg.latent_dim} ({n_params:,} parameters), backend {backend}, device {device}, "
            f"{info.world_size} rank(s), batch {cfg.batch_size}, {total_steps} steps -> {run_dir}"
        )

    def save(step_now: int) -> None:
        if info.is_main:
            state = {
                "epoch_loss": epoch_loss,
                "epoch_seconds": epoch_seconds,
                "epoch_steps": epoch_steps,
                "epoch": step_now // steps_per_epoch,
                "torch_rng": torch.get_rng_state().tolist(),
                "fastvae_version": fastvae.__version__,
                "config": doc,
            }
            ckpt.save_checkpoint(run_dir, step_now, model, opt, state, cfg.keep_checkpoints)
        info.barrier()

    model.train()
    planned_steps = total_steps
    deadline = None if cfg.time_limit is None else time.monotonic() + cfg.time_limit
    while step < total_steps:
        epoch = step // steps_per_epoch
        perm = epoch_permutation(cfg.seed, epoch, n_train, device)
        first, last = step % steps_per_epoch, min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = tqdm(
            range(first, last),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and info.is_main),
            leave=False,
            file=sys.stderr,
        )
        timer.start()
        run_sum = torch.zeros((), dtype=torch.float64, device=device)
        if engine is not None:
            engine.load_epoch(perm)
            engine.cursor.fill_(first)
        for i in bar:
            if deadline is not None and i > first and (i - first) % 50 == 0 and time.monotonic() > deadline:
                total_steps = step  # out of time: end here, evaluate and save as at the end of a run
                break
            if (
                cfg.lr_schedule != "constant"
            ):  # the schedule's total is the planned run, not a time-limit stop
                lr_now = scheduled_lr(cfg, step, planned_steps)
                if engine is not None:
                    engine.set_lr(lr_now)  # written into the device tensor the graph reads
                else:
                    for group in opt.param_groups:
                        group["lr"] = lr_now
            if engine is not None:  # one replay: batch, noise and schedule read on the device
                if warmup:
                    engine.set_beta(kl_beta(warmup, model_cfg.beta, step))
                engine.step()
            else:
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size][rows]
                x, eps = step_noise(cfg.seed, step, cfg.batch_size, rows, model_cfg.latent_dim,
                                    train_data.batch(idx), cfg.binarize)  # fmt: skip
                objective, nelbo = net(
                    x, eps, beta=kl_beta(warmup, model_cfg.beta, step), free_bits=cfg.free_bits
                )
                opt.zero_grad(set_to_none=True)
                objective.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
                if not (torch.isfinite(objective) and torch.isfinite(gnorm)):
                    what = "loss" if not torch.isfinite(objective) else "gradient"
                    raise Divergence.at(
                        f"non-finite {what} at step {step + 1} (epoch {epoch + 1})", run_dir, cfg.lr
                    )
                opt.step()
                run_sum += nelbo.detach().double().sum()
            step += 1
            epoch_steps += 1
            checkpoint_now = (
                bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step % steps_per_epoch
            )
            if engine is not None and (checkpoint_now or (i - first + 1) % ENGINE_CHECK_EVERY == 0):
                _check_engine_loss(engine, run_sum, step, epoch, run_dir, cfg)  # the engine's one host sync
            if cfg.progress and info.is_main and (i - first) % (ENGINE_CHECK_EVERY if engine else 25) == 0:
                bar.set_postfix(loss=f"{run_sum.item() / ((i - first + 1) * local_b):.2f}")
            if checkpoint_now:
                epoch_seconds_now = epoch_seconds + timer.stop()
                epoch_loss_now = epoch_loss + info.all_reduce_sum(run_sum.clone()).item()
                epoch_loss, epoch_seconds, run_sum = epoch_loss_now, epoch_seconds_now, run_sum.zero_()
                save(step)
                timer.start()
        if engine is not None:
            _check_engine_loss(engine, run_sum, step, epoch, run_dir, cfg)  # what is left of this epoch
        bar.close()
        epoch_seconds += timer.stop()
        epoch_loss += info.all_reduce_sum(run_sum).item()
        if step % steps_per_epoch == 0 or step == total_steps:
            stats = elbo_stats(
                model,
                test_data,
                seed=cfg.seed,
                batch_size=cfg.eval_batch_size,
                binarize=cfg.binarize,
                dist=info,
            )
            rec = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": epoch_loss / (epoch_steps * cfg.batch_size),
                "test_loss": stats.loss,
                "test_rec": stats.rec,
                "test_kl": stats.kl,
                "kl_per_dim": [round(k, 5) for k in stats.kl_per_dim],
                "active_units": stats.active_units,
                "seconds": epoch_seconds,
                "samples_per_s": epoch_steps * cfg.batch_size / max(epoch_seconds, 1e-9),
                "beta": kl_beta(warmup, model_cfg.beta, step - 1),
                "lr": scheduled_lr(cfg, step - 1, planned_steps),
            }
            metrics.append(rec)
            if info.is_main:
                _append_metrics(run_dir, rec)
                say(
                    f"epoch {epoch + 1:3d}  step {step:7d}  train {rec['train_loss']:.3f}  test {stats.loss:.3f} nats  "
                    f"(KL {stats.kl:.2f}, {stats.active_units} active)  {epoch_seconds:.1f}s  "
                    f"{rec['samples_per_s']:,.0f} samples/s"
                )
            epoch_loss, epoch_seconds, epoch_steps = 0.0, 0.0, 0
            save(step)
    if info.is_main:
        ckpt.write_weights(
            run_dir, model, {**doc, "final_test_loss": metrics[-1]["test_loss"] if metrics else None}
        )
        write_images(model, test_data, run_dir, cfg.seed, cfg.binarize)
    info.barrier()
    return RunResult(run_dir, model, metrics, step, info.rank)
