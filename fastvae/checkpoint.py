"""Run directories and checkpoints: safetensors only (never unpickled), written atomically, verified.

A run directory holds::

    config.json            model config, training config, fastvae version, weights checksum
    model.safetensors      the latest weights
    metrics.jsonl          one JSON object per epoch
    samples.png, reconstructions.png
    checkpoints/step-<N>/  model.safetensors, optimizer.safetensors, state.json (counters, RNG, checksums)

Every file is written to a temporary name in the same folder, fsync'ed and renamed into place, and a
checkpoint folder is renamed into place only when complete, so a crash (SIGKILL included) at any moment
leaves either the previous checkpoint or the new one, never a broken one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fastvae.errors import FastVAEError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Test hook: seconds to pause inside each checkpoint write (tests kill the process in that window).
_WRITE_PAUSE = float(os.environ.get("FASTVAE_CHECKPOINT_PAUSE", "0") or 0)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FastVAEError(f"{path}: missing {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FastVAEError(
            f"{path}: {what} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its SHA-256 when one was recorded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FastVAEError(f"{path}: missing weights file") from None
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise FastVAEError(f"{path}: checksum mismatch (the file is truncated or was modified)")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise FastVAEError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """``module.load_state_dict`` that reports mismatches as one FastVAEError line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}")
        raise FastVAEError(f"{source}: weights do not match the config ({'; '.join(parts)})")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise FastVAEError(
                f"{source}: weights do not match the config ({k} has shape {tuple(v.shape)}, "
                f"the config needs {tuple(own[k].shape)})"
            )
        if not torch.isfinite(v).all():
            raise FastVAEError(f"{source}: weight {k} holds NaN or infinite values")
    module.load_state_dict(tensors)


# ---- run directory ----------------------------------------------------------------------------------
def write_weights(run_dir: Path, model: torch.nn.Module, doc: dict[str, Any]) -> None:
    """Write model.safetensors, then config.json with its checksum (the order keeps them consistent)."""
    data = tensors_to_bytes(model.state_dict())
    atomic_write_bytes(run_dir / WEIGHTS_FILE, data)
    atomic_write_json(run_dir / CONFIG_FILE, {**doc, "weights_sha256": sha256(data)})


# ---- training checkpoints -------------------------------------------------------------------------
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"state.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step-<step>/ atomically and keep only the newest ``keep`` checkpoints."""
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:09d}.", dir=root))
    try:
        model_bytes = tensors_to_bytes(model.state_dict())
        opt_tensors, opt_meta = optimizer_to_tensors(opt)
        opt_bytes = tensors_to_bytes(opt_tensors)
        for name, data in ((WEIGHTS_FILE, model_bytes), ("optimizer.safetensors", opt_bytes)):
            atomic_write_bytes(tmp / name, data)
            if _WRITE_PAUSE:  # fault injection for the tests: hold the write open so a kill lands mid-write
                time.sleep(_WRITE_PAUSE)
        doc = {
            **state,
            "step": step,
            "optimizer": opt_meta,
            "sha256": {WEIGHTS_FILE: sha256(model_bytes), "optimizer.safetensors": sha256(opt_bytes)},
        }
        atomic_write_json(tmp / "state.json", doc)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # leftovers of a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model tensors, optimizer state_dict, state.json) of one checkpoint folder, all verified."""
    state = read_json(ckpt / "state.json", "checkpoint state")
    sums = state.get("sha256", {})
    model_t = load_tensors(ckpt / WEIGHTS_FILE, sums.get(WEIGHTS_FILE))
    opt_t = load_tensors(ckpt / "optimizer.safetensors", sums.get("optimizer.safetensors"))
    return model_t, optimizer_from_tensors(opt_t, state["optimizer"]), state


def restore_latest(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the newest checkpoint that verifies; older ones are tried if the newest is broken."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            model_t, opt_sd, state = load_checkpoint(path)
            load_state_into(model, model_t, path / WEIGHTS_FILE)
            opt.load_state_dict(opt_sd)
            return state
        except FastVAEError as exc:
            errors.append(str(exc))
    detail = f" ({errors[0]})" if errors else ""
    raise FastVAEError(f"{run_dir}: no usable checkpoint to resume from{detail}")
