"""Nothing lost: checkpoints, exact resume after SIGKILL, divergence, and loading errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvae import ReferenceVAE, TrainConfig, load_model, train
from fastvae.checkpoint import config_checksum, list_checkpoints, load_checkpoint
from fastvae.errors import FastVAEError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# MNIST, a 784-64-8 net, 240 steps of 64 with a checkpoint every 40: a few seconds on 2 CPU cores
RUN_ARGS = ["train", "--hidden-dims", "64", "--latent-dim", "8", "--batch-size", "64", "--max-steps", "240",
            "--checkpoint-every", "40", "--device", "cpu", "--quiet", "--keep-checkpoints", "2"]  # fmt: skip


def _fastvae(args, env=ENV, **kw):
    return subprocess.Popen([sys.executable, "-m", "fastvae", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


def _wait_for(pred, timeout=120.0):
    t = time.time()
    while not pred():
        if time.time() - t > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _finish(_fastvae([*RUN_ARGS, "--out", out]))
    return load_file(out / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["while training", "during a checkpoint write"])
def test_sigkill_then_resume_gives_exactly_the_uninterrupted_parameters(tmp_path, uninterrupted, moment):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    env = {**ENV, "FASTVAE_CHECKPOINT_PAUSE": "0.5"} if moment != "while training" else ENV
    proc = _fastvae([*RUN_ARGS, "--out", out], env=env)
    if moment == "while training":
        _wait_for(lambda: ckdir.is_dir() and any(p.name.startswith("step-") for p in ckdir.iterdir()))
    else:  # a half-written checkpoint folder exists after a complete one
        _wait_for(
            lambda: ckdir.is_dir() and len(list(ckdir.glob("step-*"))) >= 1 and any(ckdir.glob(".step-*"))
        )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # it really was cut short
    for ck in list_checkpoints(out):  # whatever is there verifies
        load_checkpoint(ck)
    _, err = _finish(_fastvae([*RUN_ARGS, "--out", out, "--resume"]))
    assert "resuming" in err
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    assert len(list_checkpoints(out)) == 2  # the last K kept
    assert not list(ckdir.glob(".step-*"))  # leftovers of the killed write are gone


def _small(tmp_path, data, **kw):
    base = dict(data=str(data), hidden_dims=(32,), latent_dim=4, epochs=2, batch_size=50, device="cpu",
                out=str(tmp_path / "run"), progress=False, backend="torch", checkpoint_every=5)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_checkpoint_holds_everything_to_resume(tmp_path, tiny_npz):
    train(_small(tmp_path, tiny_npz))
    cks = list_checkpoints(tmp_path / "run")
    assert [c.name for c in cks] == [
        "step-000000010",
        "step-000000015",
        "step-000000020",
    ]  # every 5 steps, last 3
    model_t, opt_sd, state = load_checkpoint(cks[-1])
    assert state["step"] == 20 and state["epoch"] == 2 and state["config"]["model"]["latent_dim"] == 4
    assert len(state["torch_rng"]) > 0 and opt_sd["state"][0]["exp_avg"].shape == (32, 64)
    assert set(model_t) == set(ReferenceVAE(_small(tmp_path, tiny_npz).model_config((8, 8))).state_dict())


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_npz, monkeypatch):
    calls = {"n": 0}
    real = ReferenceVAE.forward

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        objective, nelbo = real(self, *a, **kw)
        return (objective * float("nan") if calls["n"] == 8 else objective), nelbo

    monkeypatch.setattr(ReferenceVAE, "forward", poisoned)
    with pytest.raises(FastVAEError, match=r"non-finite loss at step 8 .*lower --lr") as exc:
        train(_small(tmp_path, tiny_npz))
    assert "\n" not in str(exc.value)
    cks = list_checkpoints(tmp_path / "run")
    assert [c.name for c in cks] == ["step-000000005"]
    model_t, _, state = load_checkpoint(cks[0])
    assert state["step"] == 5 and all(torch.isfinite(t).all() for t in model_t.values())


def test_loading_rejects_mismatched_or_unknown_config(tmp_path, tiny_npz):
    train(_small(tmp_path, tiny_npz, epochs=1))
    run = tmp_path / "run"
    doc = json.loads((run / "config.json").read_text())

    def write(d, seal=True):  # sealed: as if written by fastvae, so the checks behind the checksum run
        (run / "config.json").write_text(
            json.dumps({**d, "config_sha256": config_checksum(d)} if seal else d)
        )

    bad = {**doc, "model": {**doc["model"], "latent_dim": 5}}
    write(bad, seal=False)
    with pytest.raises(FastVAEError, match="does not match its checksum"):
        load_model(run)
    write(bad)
    with pytest.raises(FastVAEError, match="do not match the config"):
        load_model(run)
    bad = {**doc, "model": {**doc["model"], "dropout": 0.5}}
    write(bad)
    with pytest.raises(FastVAEError, match="unknown config key"):
        load_model(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(FastVAEError, match="not valid JSON"):
        load_model(run)


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, tiny_npz):
    train(_small(tmp_path, tiny_npz, epochs=1, checkpoint_every=3, keep_checkpoints=3))
    run = tmp_path / "run"
    newest = list_checkpoints(run)[-1]
    opt = newest / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated
    with pytest.raises(FastVAEError, match="checksum mismatch"):
        load_checkpoint(newest)
    res = train(_small(tmp_path, tiny_npz, epochs=2, checkpoint_every=3, keep_checkpoints=3, resume=True))
    assert res.step == 20


def test_resume_without_a_run_starts_one(tmp_path, tiny_npz):
    res = train(_small(tmp_path, tiny_npz, epochs=1, resume=True))
    assert res.step == 10 and Path(res.out, "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_checkpoints_and_resumes_exactly(tmp_path, uninterrupted, sig):
    """A cluster's SIGTERM (or Ctrl-C): the step finishes, a checkpoint is written, one line says how to
    resume, the exit status is 128 + signal, and --resume ends bit-identical to an uninterrupted run."""
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    proc = _fastvae([*RUN_ARGS, "--out", out])
    _wait_for(lambda: ckdir.is_dir() and any(p.name.startswith("step-") for p in ckdir.iterdir()))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("fastvae: error: stopped by") and "--resume" in lines[-1], err
    assert "Traceback" not in err
    step = int(lines[-1].split("after step ")[1].split(";")[0])
    assert step < 240 and list_checkpoints(out)[-1].name == f"step-{step:09d}"
    _finish(_fastvae([*RUN_ARGS, "--out", out, "--resume"]))
    resumed = load_file(out / "model.safetensors")
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


@pytest.mark.slow
def test_two_trainings_cannot_share_a_run_directory(tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "FASTVAE_CHECKPOINT_PAUSE": "0.5"}  # keeps the first one busy for a while
    first = _fastvae([*RUN_ARGS, "--out", out], env=env)
    _wait_for(lambda: (out / ".lock").exists() and (out / "config.json").exists())
    second = _fastvae([*RUN_ARGS, "--out", out, "--resume"])
    _, err = second.communicate(timeout=120)
    first.kill()
    first.wait()
    assert second.returncode == 2 and err.strip().splitlines() == [
        f"fastvae: error: {out}: another training is writing to this run directory"
    ]


@pytest.mark.parametrize(
    "change", [{"lr": 0.01}, {"seed": 1}, {"batch_size": 25}, {"binarize": True}, {"free_bits": 0.1}]
)
def test_resume_refuses_settings_that_break_exact_resume(tmp_path, tiny_npz, change):
    train(_small(tmp_path, tiny_npz, epochs=1))
    with pytest.raises(FastVAEError, match=f"different {next(iter(change))}"):
        train(_small(tmp_path, tiny_npz, epochs=2, resume=True, **change))


def test_resume_of_a_finished_run_keeps_its_metrics(tmp_path, tiny_npz):
    """A run that ended mid-epoch (max_steps): resuming it again changes nothing on record."""
    first = train(_small(tmp_path, tiny_npz, epochs=3, max_steps=15))
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    again = train(_small(tmp_path, tiny_npz, epochs=3, max_steps=15, resume=True))
    assert again.metrics == first.metrics and len(again.metrics) == 2
    assert (
        json.loads((tmp_path / "run" / "config.json").read_text())["final_test_neg_elbo"]
        == doc["final_test_neg_elbo"]
        is not None
    )


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.8])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(tmp_path, delay):
    """SIGINT while modules import, parse or set up: exit 130 (or the preemption's 130), no traceback."""
    proc = _fastvae([*RUN_ARGS, "--out", tmp_path / "run"])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    assert err.strip().splitlines()[-1].startswith("fastvae: error:")
