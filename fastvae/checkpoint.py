"""Run directories and checkpoints: safetensors only (never unpickled), written atomically, verified.

A run directory holds::

    config.json            model config, training config, fastvae version, weights checksum
    model.safetensors      the latest weights
    metrics.jsonl          one JSON object per epoch
    samples.png, reconstructions.png
    checkpoints/step-<N>/  model.safetensors, optimizer.safetensors, state.json (counters, RNG, the
                           metrics lines it covers), manifest.json (the seal)

Every file is written to a temporary name in the same folder, fsync'ed and renamed into place, and a
checkpoint folder is renamed into place only when complete, so a crash (SIGKILL included) at any moment
leaves either the previous checkpoint or the new one, never a broken one.

A checkpoint is sealed as a whole: manifest.json lists the SHA-256 of every other file of its folder and
carries a checksum of that list. A resume verifies the seal, that the folder holds exactly the listed
files, and each file, before it believes any of them; state.json in turn holds the line count and SHA-256
of metrics.jsonl as of the checkpoint. Checksums catch corruption and edits, not a forger who recomputes
every one of them: the checks behind the seal (shapes, types, optimizer state for every parameter at the
checkpoint's step) still run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fastvae.atomic import atomic_write_bytes, fsync_dir
from fastvae.errors import FastVAEError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
# The manifest's format: a checkpoint without one (fastvae before the seal) cannot be verified.
MANIFEST_FORMAT = "fastvae-checkpoint/2"
# Test hook: seconds to pause inside each checkpoint write (tests kill the process in that window).
PAUSE_ENV = "FASTVAE_CHECKPOINT_PAUSE"
# The optimizer state tensors that must match their parameter's shape and dtype (Adam's and SGD's).
PER_PARAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _write_pause() -> float:
    """Seconds of the test hook's pause, read when a checkpoint is written (never at import)."""
    raw = os.environ.get(PAUSE_ENV, "") or "0"
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 <= value < 3600):
        raise FastVAEError(f"{PAUSE_ENV}={raw!r}: expected a number of seconds in [0, 3600)")
    return value


def check_regular_file(path: Path, what: str) -> None:
    """A readable regular file, or one FastVAEError line (a FIFO or device would block a read forever)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FastVAEError(f"{path}: missing {what}") from None
    except OSError as exc:
        raise FastVAEError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise FastVAEError(f"{path}: {what} is {kind}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    # copies: the fused engine's parameters and Adam moments are views of flat buffers (and its step count
    # one tensor shared by every parameter), which safetensors refuses to save as they are
    return save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path, what: str) -> Any:
    check_regular_file(path, what)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise FastVAEError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FastVAEError(
            f"{path}: {what} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None


def read_verified(path: Path, expected_sha256: str | None, what: str) -> bytes:
    """The bytes of a file whose SHA-256 is ``expected_sha256``: a missing checksum is an error too, since
    an unverified file could be anything (zeroed weights load without complaint)."""
    check_regular_file(path, what)
    if not isinstance(expected_sha256, str):
        raise FastVAEError(f"{path}: no checksum is recorded for it, so it cannot be verified")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FastVAEError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if sha256(data) != expected_sha256:
        raise FastVAEError(f"{path}: checksum mismatch (the file is truncated or was modified)")
    return data


def load_tensors(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its SHA-256 (see ``read_verified``)."""
    data = read_verified(path, expected_sha256, "weights file")
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
CHECKSUM_KEYS = ("config_sha256", "weights_sha256")


def config_checksum(doc: dict[str, Any]) -> str:
    """SHA-256 of a run config's content (its checksum fields left out), in canonical JSON."""
    body = {k: v for k, v in doc.items() if k not in CHECKSUM_KEYS}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_run_config(run_dir: Path, doc: dict[str, Any]) -> None:
    """config.json, sealed with the checksum of its own content: an edited model or training section
    (relu made tanh, "binarize": "false") is refused on load instead of silently changing the run."""
    atomic_write_json(run_dir / CONFIG_FILE, {**doc, "config_sha256": config_checksum(doc)})


def write_weights(run_dir: Path, model: torch.nn.Module, doc: dict[str, Any]) -> None:
    """Write model.safetensors, then config.json with its checksum (the order keeps them consistent)."""
    data = tensors_to_bytes(model.state_dict())
    atomic_write_bytes(run_dir / WEIGHTS_FILE, data)
    write_run_config(run_dir, {**doc, "weights_sha256": sha256(data)})


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
        for name, data in ((WEIGHTS_FILE, model_bytes), (OPTIMIZER_FILE, opt_bytes)):
            atomic_write_bytes(tmp / name, data)
            pause = _write_pause()
            if pause:  # fault injection for the tests: hold the write open so a kill lands mid-write
                time.sleep(pause)
        atomic_write_json(tmp / STATE_FILE, {**state, "step": step, "optimizer": opt_meta})
        seal_checkpoint(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # leftovers of a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _manifest_seal(files: dict[str, str]) -> str:
    """The manifest's own checksum: SHA-256 of its format and file list in canonical JSON."""
    body = {"format": MANIFEST_FORMAT, "files": files}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal_checkpoint(folder: Path) -> None:
    """Write ``folder``/manifest.json: the SHA-256 of every other file in the folder, and the seal."""
    files = {p.name: sha256(p.read_bytes()) for p in sorted(folder.iterdir()) if p.name != MANIFEST_FILE}
    atomic_write_json(folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": files,
                                               "seal": _manifest_seal(files)})  # fmt: skip


def _checked_manifest(ckpt: Path) -> dict[str, str]:
    """The file checksums of a checkpoint's manifest, after checking its seal and that the folder holds
    exactly the files it lists (no file added, none missing)."""
    where = ckpt / MANIFEST_FILE
    if not where.exists() and (ckpt / STATE_FILE).exists():
        raise FastVAEError(
            f"{ckpt}: no {MANIFEST_FILE} (a checkpoint of a fastvae before sealed checkpoints); it cannot "
            "be verified, so it is not resumed from"
        )
    doc = read_json(where, "checkpoint manifest")
    files = doc.get("files") if isinstance(doc, dict) else None
    if (
        not isinstance(files, dict)
        or doc.get("format") != MANIFEST_FORMAT
        or not all(isinstance(v, str) for v in files.values())
    ):
        raise FastVAEError(f"{where}: not a {MANIFEST_FORMAT} manifest")
    if doc.get("seal") != _manifest_seal(files):
        raise FastVAEError(f"{where}: does not match its seal (the manifest was edited)")
    needed = {WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE}
    if set(files) != needed:
        raise FastVAEError(
            f"{where}: lists {', '.join(sorted(files)) or 'no files'}, not {', '.join(sorted(needed))}"
        )
    for name in sorted({p.name for p in ckpt.iterdir()} - needed - {MANIFEST_FILE}):
        raise FastVAEError(f"{ckpt / name}: not part of the sealed checkpoint (a file was added)")
    return files  # a listed file that is missing fails its own read


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.exists() and not root.is_dir():
        raise FastVAEError(f"{root}: exists and is not a directory")
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model tensors, optimizer state_dict, state.json) of one checkpoint folder, all verified: the
    manifest's seal first, then every file against it, then what each holds."""
    sums = _checked_manifest(ckpt)
    raw = read_verified(ckpt / STATE_FILE, sums[STATE_FILE], "checkpoint state")
    try:
        state = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FastVAEError(f"{ckpt / STATE_FILE}: checkpoint state is not valid JSON ({exc})") from None
    state = _checked_state(ckpt, state)
    model_t = load_tensors(ckpt / WEIGHTS_FILE, sums[WEIGHTS_FILE])
    opt_t = load_tensors(ckpt / OPTIMIZER_FILE, sums[OPTIMIZER_FILE])
    try:
        opt_sd = optimizer_from_tensors(opt_t, state["optimizer"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FastVAEError(f"{ckpt}: optimizer state does not parse ({exc})") from None
    return model_t, opt_sd, state


_RNG_BYTES = torch.get_rng_state().numel()  # 5056 for torch's Mersenne Twister
# state.json: key -> (accepted types, check, what it must be)
_STATE_SCHEMA: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "step": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "epoch_steps": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "epoch_loss": ((int, float), math.isfinite, "a finite number"),
    "epoch_seconds": ((int, float), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "torch_rng": (
        (list,),
        lambda v: len(v) == _RNG_BYTES and all(isinstance(b, int) and 0 <= b < 256 for b in v),
        "torch's CPU RNG state (a list of bytes)",
    ),
    "optimizer": ((dict,), lambda v: isinstance(v.get("param_groups"), list), "an object with param_groups"),
    "metrics_lines": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "metrics_sha256": ((str,), lambda v: len(v) == 64, "a SHA-256 hex digest"),
}


def _checked_state(ckpt: Path, state: Any) -> dict[str, Any]:
    """state.json with every key the resume reads present and of the right type, and its step equal to
    the one in the folder's name (a tampered counter would otherwise be believed)."""
    where = ckpt / "state.json"
    if not isinstance(state, dict):
        raise FastVAEError(f"{where}: expected a JSON object")
    for key, (types, ok, what) in _STATE_SCHEMA.items():
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, types) or not ok(v):
            raise FastVAEError(f"{where}: '{key}' must be {what}, got {v!r:.60}")
    if state["epoch_steps"] > state["step"]:
        raise FastVAEError(f"{where}: epoch_steps {state['epoch_steps']} exceeds the step {state['step']}")
    if ckpt.name != f"step-{state['step']:09d}":
        raise FastVAEError(f"{where}: step {state['step']} does not match the checkpoint folder {ckpt.name}")
    return state


def check_optimizer_state(opt_sd: dict[str, Any], params: list[torch.nn.Parameter], source: Path) -> None:
    """Every state tensor shaped and typed like its parameter: fused Adam does not check, and a tensor
    of another shape crashed the process (SIGSEGV) instead of raising."""
    state = opt_sd["state"]
    extra = sorted(set(state) - set(range(len(params))))
    if extra:
        raise FastVAEError(f"{source}: optimizer state for parameter(s) {extra[:4]} that the model lacks")
    for idx, entries in state.items():
        p = params[idx]
        for name, value in entries.items():
            if not torch.is_tensor(value):
                raise FastVAEError(f"{source}: optimizer state {idx}.{name} is not a tensor")
            if name in PER_PARAM_STATE and (value.shape != p.shape or value.dtype != p.dtype):
                raise FastVAEError(
                    f"{source}: optimizer state {idx}.{name} is {tuple(value.shape)} {value.dtype}, its parameter "
                    f"{tuple(p.shape)} {p.dtype}"
                )
            if name == "step" and (value.dim() != 0 or not torch.isfinite(value) or value.item() < 0):
                raise FastVAEError(f"{source}: optimizer state {idx}.step must be a 0-d finite count >= 0")


# float32 counts every integer up to here: Adam's step counter is exact below it.
_EXACT_COUNT = 2**24


def check_optimizer_progress(opt_sd: dict[str, Any], n_params: int, step: int, source: Path) -> None:
    """After ``step`` optimizer steps Adam holds state for every parameter, each counted ``step`` times:
    an empty or partial optimizer file would otherwise resume with fresh moments, silently."""
    state = opt_sd["state"]
    missing = [i for i in range(n_params) if i not in state]
    if step > 0 and missing:
        raise FastVAEError(
            f"{source}: no optimizer state for parameter(s) {missing[:4]} after {step} steps (the optimizer "
            "file is empty or partial)"
        )
    for idx, entries in state.items():
        count = entries.get("step")
        if torch.is_tensor(count) and step < _EXACT_COUNT and count.item() != step:
            raise FastVAEError(
                f"{source}: optimizer state {idx}.step counts {count.item():g} steps, the checkpoint {step}"
            )


def restore_latest(
    run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, *, at_most: int | None = None
) -> dict[str, Any]:
    """Load the newest checkpoint that verifies; older ones are tried if the newest is broken. ``at_most``:
    only checkpoints of that step or earlier (a sweep resumes all its models at one common step)."""
    errors = []
    paths = list_checkpoints(run_dir)
    if at_most is not None:
        paths = [p for p in paths if int(p.name.split("-")[1]) <= at_most]
    for path in reversed(paths):
        try:
            model_t, opt_sd, state = load_checkpoint(path)
            load_state_into(model, model_t, path / WEIGHTS_FILE)
            params = [p for g in opt.param_groups for p in g["params"]]
            check_optimizer_state(opt_sd, params, path)
            check_optimizer_progress(opt_sd, len(params), state["step"], path)
            try:
                opt.load_state_dict(opt_sd)
            except (ValueError, KeyError, TypeError) as exc:
                raise FastVAEError(f"{path}: optimizer state does not fit the model ({exc})") from None
            return state
        except FastVAEError as exc:
            errors.append(str(exc))
            print(f"fastvae: skipping a checkpoint that does not verify: {exc}", file=sys.stderr)
    detail = f" ({errors[0]})" if errors else ""
    raise FastVAEError(f"{run_dir}: no usable checkpoint to resume from{detail}")
