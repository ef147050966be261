"""Run directories: making one, its metrics file and images, and loading a finished run back.

Files of a run (``fastvae.checkpoint`` writes them atomically)::

    config.json            model config, training config, fastvae version, weights checksum
    model.safetensors      the latest weights
    metrics.jsonl          one JSON object per epoch
    samples.png, reconstructions.png
    checkpoints/step-<N>/  model.safetensors, optimizer.safetensors, state.json, manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastvae import checkpoint as ckpt
from fastvae._version import __version__
from fastvae.backends import make_model
from fastvae.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_state_into, load_tensors, read_json
from fastvae.config import TrainConfig, VAEConfig, describe_data
from fastvae.data import Dataset, DeviceData, is_in_memory, label_classes, load_array, load_dataset
from fastvae.distributed import DistInfo
from fastvae.errors import FastVAEError
from fastvae.evaluate import eval_rows
from fastvae.images import save_grid
from fastvae.toolkit import SAMPLE_ROWS, prior_samples

IMAGE_FILES = ("samples.png", "reconstructions.png")


def read_run_config(run_dir: str | os.PathLike) -> tuple[VAEConfig, dict[str, Any]]:
    """(model config, the whole config.json) of a run directory, its checksum and both sections checked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FastVAEError(f"{run_dir}: no such run directory")
    path = run_dir / CONFIG_FILE
    doc = read_json(path, "run config")
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise FastVAEError(f"{path}: not a fastvae run config (no 'model' section)")
    if doc.get("config_sha256") != ckpt.config_checksum(doc):
        what = (
            "has no checksum" if "config_sha256" not in doc else "does not match its checksum (it was edited)"
        )
        raise FastVAEError(f"{path}: {what}; refusing an unverified run config")
    try:
        config = VAEConfig.from_dict(doc["model"])
        if not isinstance(doc.get("train", {}), dict):
            raise FastVAEError("the 'train' section is not an object")
        TrainConfig.from_dict(doc.get("train", {}))
    except TypeError as exc:
        raise FastVAEError(f"{path}: bad config ({exc})") from None
    except FastVAEError as exc:
        raise FastVAEError(f"{path}: {exc}") from None
    return config, doc


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "torch"):
    """Rebuild the trained model of a run directory (weights checked against the recorded checksum)."""
    run_dir = Path(run_dir)
    config, doc = read_run_config(run_dir)
    model = make_model(config, backend=backend, device=torch.device(device))
    tensors = load_tensors(run_dir / WEIGHTS_FILE, doc.get("weights_sha256"))
    load_state_into(model, tensors, run_dir / WEIGHTS_FILE)
    model.to(device).eval()
    return model


def save_model(model: torch.nn.Module, run_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a fastvae model (``ReferenceVAE``/``FusedVAE``, e.g. trained in your own loop) to ``run_dir``
    as a run directory: ``model.safetensors`` and a sealed ``config.json``. ``load_model``, ``export_decoder``
    and the CLI's ``sample``/``export`` read it back. Returns the directory."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, VAEConfig):
        raise FastVAEError(
            f"model: expected a fastvae model (ReferenceVAE or FusedVAE), got {type(model).__name__}"
        )
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FastVAEError(f"{run_dir}: exists and is not a directory")
    if (run_dir / CONFIG_FILE).exists() and not overwrite:
        raise FastVAEError(f"{run_dir}: already holds a run; pass overwrite=True to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)

    doc = {"model": config.to_dict(), "fastvae_version": __version__, "saved_by": "save_model"}
    ckpt.write_weights(run_dir, model, doc)
    return run_dir


@dataclass
class Run:
    """A finished run, loaded for use: its model, configs and the test split it is evaluated on."""

    path: Path
    model: torch.nn.Module
    config: VAEConfig
    doc: dict[str, Any]  # the whole config.json
    test: DeviceData  # the test split, resident on the model's device
    labels: Any  # test labels (numpy) or None
    seed: int
    binarized: bool  # trained (and so evaluated) on dynamically binarized data

    def test_images(self, start: int = 0, stop: int | None = None, *, raw: bool = False) -> torch.Tensor:
        """Test rows start..stop as float (R, D) on the model's device, as the run evaluates them
        (binarized by the row rule when it trains so); ``raw`` keeps the grey levels."""
        stop = len(self.test) if stop is None else min(stop, len(self.test))
        rows = torch.arange(start, stop, device=self.test.x.device)
        return eval_rows(self.test, rows, self.seed, self.binarized and not raw)

    def read_samples(self, source: Any) -> np.ndarray:
        """Samples (N, ...) for this run's model from ``source`` (any form ``fastvae.data.load_array``
        takes), read as the run reads its own data; one clear line when their shape is not the model's."""
        cfg = self.config
        arr = load_array(source, cfg.likelihood, **_read_options(self.doc.get("train", {})))
        if arr.shape[1:] != cfg.data_shape and arr.reshape(len(arr), -1).shape[1] != cfg.flat_dim:
            raise FastVAEError(
                f"{describe_data(source)}: samples have shape {arr.shape[1:]}, the model expects {cfg.data_shape}"
            )
        return arr

    def test_labels(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """Labels of test rows start..stop on the model's device for a conditional VAE, else None."""
        stop = len(self.test) if stop is None else min(stop, len(self.test))
        return self.test.labels(torch.arange(start, stop, device=self.test.x.device))


def _read_options(train_cfg: dict[str, Any]) -> dict[str, Any]:
    """How a run reads images (its recorded image size and colour mode): its own data and data it scores."""
    size = train_cfg.get("image_size")
    return {"image_size": tuple(size) if size else None, "grayscale": bool(train_cfg.get("grayscale", False))}


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", data: Any = None) -> Run:
    """Load a run for evaluation or the toolkit; ``data`` (any form ``fastvae.train`` takes) replaces the
    run's own data set (same sample shape). A run trained on in-memory data needs it passed again."""
    device = torch.device(device)
    config, doc = read_run_config(run_dir)
    model = load_model(run_dir, device)
    train_cfg = doc.get("train", {})
    source = data if data is not None else train_cfg.get("data", "mnist")
    if isinstance(source, str) and is_in_memory(source):
        raise FastVAEError(
            f"{run_dir}: trained on in-memory data {source}; pass the same data again (data= in the API, "
            "or --data FILE after saving it with numpy.save)"
        )
    dataset = load_dataset(source, config.likelihood, progress=False, **_read_options(train_cfg))
    if dataset.data_shape != config.data_shape:
        raise FastVAEError(
            f"{describe_data(source)}: samples have shape {dataset.data_shape}, the model expects {config.data_shape}"
        )
    if config.conditional:
        classes = label_classes(dataset)
        if classes > config.classes:
            raise FastVAEError(
                f"{describe_data(source)}: labels up to {classes - 1}, the model knows {config.classes} classes"
            )
    test = DeviceData(dataset.x_test, device, dataset.y_test if config.conditional else None)
    return Run(
        Path(run_dir), model, config, doc, test, dataset.y_test,
        int(train_cfg.get("seed", 0)), bool(train_cfg.get("binarize", False)),
    )  # fmt: skip


def prepare_run_dir(cfg: TrainConfig, info: DistInfo, hold: list[Any]) -> tuple[Path, bool]:
    """The run directory, and whether this run resumes one. Rank 0 locks it and appends the lock to
    ``hold`` (closing it releases the lock). Every rank decides before the barrier, so no rank can see
    files that rank 0 writes after it."""
    out = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise FastVAEError(f"{out}: exists and is not a directory")
    has_run = out.exists() and any((out / f).exists() for f in (ckpt.CONFIG_FILE, ckpt.CHECKPOINT_DIR))
    if not cfg.resume and has_run and not cfg.overwrite:
        raise FastVAEError(
            f"{out}: already holds a run; continue it with resume=True (--resume), replace it with "
            "overwrite=True (--overwrite), or choose another out"
        )
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        hold.append(_lock(out))  # before --overwrite deletes anything: never another live training's files
        if not cfg.resume and has_run:
            shutil.rmtree(out / ckpt.CHECKPOINT_DIR, ignore_errors=True)
            shutil.rmtree(out / "images", ignore_errors=True)
            for name in (ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE, ckpt.METRICS_FILE, *IMAGE_FILES):
                (out / name).unlink(missing_ok=True)
    info.barrier()
    return out, cfg.resume and bool(ckpt.list_checkpoints(out))  # killed before a checkpoint: start over


def data_digest(data: Dataset, labelled: bool) -> str:
    """BLAKE2b of what a run trains and evaluates on: x_train and x_test (and, for a conditional run, their
    labels) as loaded, each array's dtype, shape and bytes. Computed once at the start of a run (MNIST's 55 MB:
    0.5 s on a loaded 2-core machine); a resume compares it, so data rewritten under the same path is refused."""
    h = hashlib.blake2b(digest_size=32)
    parts = [data.x_train, data.x_test, *((data.y_train, data.y_test) if labelled else ())]
    for a in parts:
        a = np.ascontiguousarray(a) if a is not None else np.zeros(0)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()


LOCK_FILE = ".lock"


def _lock(run_dir: Path) -> Any:
    """An exclusive lock on the run directory for this process's lifetime, or one clear error: two
    trainings into one directory would interleave metrics and overwrite each other's weights."""
    import fcntl

    f = open(run_dir / LOCK_FILE, "a+")  # held open on purpose: the lock lives as long as the file
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FastVAEError(f"{run_dir}: another training is writing to this run directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def metrics_record(run_dir: Path) -> tuple[int, str]:
    """(lines, SHA-256) of metrics.jsonl as it is now: a checkpoint records them, so that a resume can
    tell the lines it covers from lines edited or written after it."""
    path = run_dir / ckpt.METRICS_FILE
    data = path.read_bytes() if path.exists() else b""
    return data.count(b"\n"), ckpt.sha256(data)


def restore_metrics(run_dir: Path, state: dict[str, Any], source: Path) -> list[dict[str, Any]]:
    """Cut metrics.jsonl back to the lines the checkpoint ``source`` (its ``state``) covers, after checking
    them against its checksum (later lines may come from steps that are redone); its records."""
    path, n = run_dir / ckpt.METRICS_FILE, state["metrics_lines"]
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise FastVAEError(f"{path}: cannot read the metrics ({exc.strerror})") from None
    lines = data.splitlines(keepends=True)[:n]
    if ckpt.sha256(b"".join(lines)) != state["metrics_sha256"]:  # fewer lines, or other bytes
        raise FastVAEError(
            f"{path}: its first {n} lines do not match the checksum in checkpoint {source.name} (the file was "
            "edited, cut or replaced); restore it, or start a new run"
        )
    try:
        records = [json.loads(line) for line in lines]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FastVAEError(f"{path}: a line is not valid JSON ({exc})") from None
    ckpt.atomic_write_bytes(path, b"".join(lines))
    return records


def append_metrics(run_dir: Path, rec: dict[str, Any]) -> None:
    with open(run_dir / ckpt.METRICS_FILE, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def write_images(
    model: torch.nn.Module,
    test: DeviceData,
    run_dir: Path,
    seed: int,
    binarize: bool,
    epoch: int | None = None,
) -> None:
    """samples.png and reconstructions.png in the run directory, or with ``epoch`` in its images/ folder as
    samples-epoch-NNN.png and reconstructions-epoch-NNN.png (the same prior draws every epoch)."""
    shape = model.config.data_shape
    names = IMAGE_FILES
    if epoch is not None:
        (run_dir / "images").mkdir(exist_ok=True)
        names = tuple(f"images/{n[:-4]}-epoch-{epoch:03d}.png" for n in IMAGE_FILES)
    c = min(model.config.classes, SAMPLE_ROWS)  # a conditional grid: one row per label, at most 10 rows
    n, ncol = (SAMPLE_ROWS * c, SAMPLE_ROWS) if model.config.conditional else (64, 8)
    save_grid(prior_samples(model, n, seed).float().cpu().numpy(), shape, run_dir / names[0], ncol=ncol)
    with torch.no_grad():
        rows = torch.arange(min(8, len(test)), device=test.x.device)
        x, y = eval_rows(test, rows, seed, binarize), test.labels(rows)
        mu, _ = model.encode(x, y)
        recon = model.mean_output(model.decode(mu, y))
    both = torch.cat([x, recon]).float().cpu().numpy()
    save_grid(both, shape, run_dir / names[1], ncol=len(x))
