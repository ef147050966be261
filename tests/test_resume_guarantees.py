"""What a resume guarantees (issue 28): a stop on an epoch's last step loses none of its metrics, a
checkpoint is sealed as a whole, the data is the run's own, and train() leaves global state as it was.

The reference for every resumed run is the same run uninterrupted; tampering is done as a forger would,
with and without recomputing the checksums, so that the checks behind the seal run too."""

import hashlib
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from fastvae import TrainConfig, train
from fastvae.checkpoint import list_checkpoints, seal_checkpoint
from fastvae.errors import FastVAEError, Preempted
from fastvae.trainer import _EagerStep

TIMING = ("seconds", "samples_per_s")  # the only fields of a metrics line that may differ between runs


def _cfg(tmp_path, data, name="run", **kw):
    base = dict(data=data if not isinstance(data, os.PathLike) else str(data), hidden_dims=(16,), latent_dim=2,
                epochs=3, batch_size=500, device="cpu", out=str(tmp_path / name), progress=False,
                backend="torch", threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _lines(run):
    """metrics.jsonl as written, timing fields left out."""
    path = run / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def _signal_during_step(monkeypatch, step, sig=signal.SIGTERM):
    """Deliver ``sig`` to this process while the optimizer step ``step`` (1-based) runs."""
    real = _EagerStep.step

    def step_with_signal(self, i, s):
        if s + 1 == step:
            os.kill(os.getpid(), sig)  # handled at once: the trainer's handler only sets a flag
        real(self, i, s)

    monkeypatch.setattr(_EagerStep, "step", step_with_signal)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_npz):
    """Uninterrupted runs: one step per epoch (batch 500 of 500), and two (batch 250)."""
    root = tmp_path_factory.mktemp("straight")
    for batch in (500, 250):
        train(_cfg(root, tiny_npz, f"b{batch}", batch_size=batch))
    return root


# ---- item 1: a stop on an epoch's last step -------------------------------------------------------------
@pytest.mark.parametrize(
    "batch, stop_at, sig",
    [(500, 1, signal.SIGTERM), (500, 2, signal.SIGINT), (500, 3, signal.SIGTERM), (250, 2, signal.SIGTERM),
     (250, 3, signal.SIGTERM)],
    ids=["1-per-epoch-first", "1-per-epoch-ctrl-c", "1-per-epoch-last-of-run", "2-per-epoch-end", "mid-epoch"],
)  # fmt: skip
def test_a_stop_on_any_step_resumes_to_the_uninterrupted_metrics(
    tmp_path, tiny_npz, straight, monkeypatch, batch, stop_at, sig
):
    """Every epoch's line, train_loss included, and the weights as in the uninterrupted run."""
    _signal_during_step(monkeypatch, stop_at, sig)
    with pytest.raises(Preempted, match=f"after step {stop_at};"):
        train(_cfg(tmp_path, tiny_npz, batch_size=batch))
    monkeypatch.undo()
    run, ref = tmp_path / "run", straight / f"b{batch}"
    assert len(_lines(run)) == (stop_at - 1) * batch // 500  # the stopped epoch's end is not done yet
    res = train(_cfg(tmp_path, tiny_npz, batch_size=batch, resume=True))
    assert _lines(run) == _lines(ref) and len(_lines(ref)) == 3
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in res.metrics] == _lines(ref)
    a, b = load_file(run / "model.safetensors"), load_file(ref / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_the_redone_epoch_end_still_resumes_exactly(tmp_path, tiny_npz, straight, monkeypatch):
    """Stopped after epoch 2's last step; the resume writes epoch 2's line, then dies before its checkpoint.
    The next resume redoes that end from the stop's checkpoint: the line is replaced, not duplicated."""
    _signal_during_step(monkeypatch, 2)
    with pytest.raises(Preempted):
        train(_cfg(tmp_path, tiny_npz))
    monkeypatch.undo()

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastvae.checkpoint.save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, tiny_npz, resume=True))
    monkeypatch.undo()
    assert len(_lines(tmp_path / "run")) == 2  # epoch 2's line is on disk, its checkpoint is not
    train(_cfg(tmp_path, tiny_npz, resume=True))
    assert _lines(tmp_path / "run") == _lines(straight / "b500")


# ---- item 2: a checkpoint is sealed as a whole ----------------------------------------------------------
@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory, tiny_npz):
    root = tmp_path_factory.mktemp("sealed")
    train(_cfg(root, tiny_npz, epochs=2, keep_checkpoints=1))
    return root / "run"


@pytest.fixture
def one_ckpt(sealed_run, tmp_path):
    """A copy of the sealed run, and its only checkpoint (no older one to fall back on)."""
    run = tmp_path / "run"
    shutil.copytree(sealed_run, run, ignore=shutil.ignore_patterns(".lock"))
    (ck,) = list_checkpoints(run)
    return run, ck


def _refused(tmp_path, tiny_npz, match):
    with pytest.raises(FastVAEError, match=match) as exc:
        train(_cfg(tmp_path, tiny_npz, epochs=3, resume=True))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def _edit_state(ck, fn):
    state = json.loads((ck / "state.json").read_text())
    fn(state)
    (ck / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def test_an_empty_optimizer_file_is_refused_even_with_its_checksums_recomputed(tmp_path, tiny_npz, one_ckpt):
    """The probe's case: fresh Adam moments would resume silently (test -ELBO 309 against 294)."""
    run, ck = one_ckpt
    data = save({})
    (ck / "optimizer.safetensors").write_bytes(data)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["optimizer.safetensors"] = hashlib.sha256(data).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))  # the checksum updated, the seal not
    _refused(tmp_path, tiny_npz, "manifest.json: does not match its seal")
    seal_checkpoint(ck)  # a forger who recomputes every checksum: the check behind the seal
    _refused(tmp_path, tiny_npz, r"no optimizer state for parameter\(s\) \[0, 1, 2, 3\] after 2 steps")


def test_an_edited_epoch_loss_is_refused(tmp_path, tiny_npz, one_ckpt):
    _, ck = one_ckpt
    _edit_state(ck, lambda s: s.update(epoch_loss=s["epoch_loss"] + 1.0))
    _refused(tmp_path, tiny_npz, r"state.json: checksum mismatch")


@pytest.mark.parametrize("edit", ["value", "cut", "deleted"])
def test_an_edited_metrics_file_is_refused(tmp_path, tiny_npz, one_ckpt, edit):
    run, _ = one_ckpt
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if edit == "value":
        rec = json.loads(lines[0])
        rec["test_neg_elbo"] -= 1.0
        path.write_text(json.dumps(rec) + "\n" + "".join(lines[1:]))
    elif edit == "cut":
        path.write_text(lines[0])
    else:
        path.unlink()
    _refused(tmp_path, tiny_npz, r"metrics.jsonl: its first 2 lines do not match the checksum in checkpoint")


def test_lines_after_the_checkpoint_are_dropped_not_refused(tmp_path, tiny_npz, one_ckpt, straight):
    """A line written after the checkpoint (a crash between the two) belongs to steps that are redone."""
    run, _ = one_ckpt
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "step": 3, "train_loss": 1.0}\n{"cut sho')
    train(_cfg(tmp_path, tiny_npz, epochs=3, resume=True))
    assert _lines(run) == _lines(straight / "b500")


@pytest.mark.parametrize("fault", ["added file", "no manifest", "seal edited", "renamed step"])
def test_a_checkpoint_that_is_not_the_sealed_one_is_refused(tmp_path, tiny_npz, one_ckpt, fault):
    run, ck = one_ckpt
    if fault == "added file":
        (ck / "notes.txt").write_text("x")
        match = "notes.txt: not part of the sealed checkpoint"
    elif fault == "no manifest":  # the format of fastvae before sealed checkpoints
        (ck / "manifest.json").unlink()
        match = "no manifest.json .*before sealed checkpoints.*cannot be verified"
    elif fault == "seal edited":
        manifest = json.loads((ck / "manifest.json").read_text())
        manifest["seal"] = "0" * 64
        (ck / "manifest.json").write_text(json.dumps(manifest))
        match = "does not match its seal"
    else:  # a resealed state that claims another step than its folder's
        _edit_state(ck, lambda s: s.update(step=1))
        seal_checkpoint(ck)
        match = "step 1 does not match the checkpoint folder"
    _refused(tmp_path, tiny_npz, f"no usable checkpoint to resume from .*{match}")


# ---- item 3: the data is the run's own ------------------------------------------------------------------
def _strokes(seed, n=600):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 8, 8)) > 0.7).astype(np.uint8) * 255


def test_a_rewritten_data_file_is_refused(tmp_path):
    path = tmp_path / "data.npz"
    x = _strokes(0)
    np.savez(path, x_train=x[:500], x_test=x[500:])
    train(_cfg(tmp_path, path, epochs=1))
    y = x.copy()
    y[3, 4, 5] = 255 - y[3, 4, 5]  # one pixel: the same path, shape and dtype
    np.savez(path, x_train=y[:500], x_test=y[500:])
    msg = _refused_data(tmp_path, path)
    assert f"{path} is not the data the run was trained on" in msg
    np.savez(path, x_train=x[:500], x_test=x[500:])  # the original content again: resumes
    assert train(_cfg(tmp_path, path, epochs=2, resume=True)).step == 2


def test_another_in_memory_array_of_the_same_shape_is_refused(tmp_path):
    x = _strokes(1, 500)
    train(_cfg(tmp_path, x, epochs=1, batch_size=450))
    msg = _refused_data(tmp_path, _strokes(2, 500), batch_size=450)
    assert "<array (500, 8, 8) uint8> is not the data the run was trained on" in msg
    assert train(_cfg(tmp_path, x.copy(), epochs=2, batch_size=450, resume=True)).step == 2


def _refused_data(tmp_path, data, **kw):
    with pytest.raises(FastVAEError, match="--resume with different data content") as exc:
        train(_cfg(tmp_path, data, epochs=2, resume=True, **kw))
    assert "\n" not in str(exc.value)
    return str(exc.value)


# ---- item 20: global state ------------------------------------------------------------------------------
@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def test_train_restores_the_thread_count_and_returns_an_eval_model(tmp_path, tiny_npz, three_threads):
    res = train(_cfg(tmp_path, tiny_npz, epochs=1, threads=1))
    assert torch.get_num_threads() == three_threads
    assert not res.model.training and not any(m.training for m in res.model.modules())


def test_train_restores_the_thread_count_on_an_error(tmp_path, tiny_npz, three_threads):
    with pytest.raises(FastVAEError, match="exceeds the 500 training samples"):
        train(_cfg(tmp_path, tiny_npz, batch_size=501, threads=1))
    assert torch.get_num_threads() == three_threads


# ---- item 23: every differing setting named -------------------------------------------------------------
def test_a_conditional_run_resumed_without_conditional_names_the_fields(tmp_path):
    path = tmp_path / "labelled.npz"
    x, y = _strokes(3), np.arange(600) % 3
    np.savez(path, x_train=x[:500], x_test=x[500:], y_train=y[:500], y_test=y[500:])
    train(_cfg(tmp_path, path, epochs=1, conditional=True))
    with pytest.raises(FastVAEError) as exc:
        train(_cfg(tmp_path, path, epochs=2, resume=True))
    msg = str(exc.value)
    assert "--resume with a different conditional False (the run has True), classes 0 (the run has 3);" in msg
    with pytest.raises(FastVAEError) as exc:
        train(_cfg(tmp_path, path, epochs=2, resume=True, conditional=True, latent_dim=3, lr=0.002))
    assert "different lr 0.002 (the run has 0.001), latent_dim 3 (the run has 2);" in str(exc.value)
