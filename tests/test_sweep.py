"""fastvae.sweep and the batched reference path: N models as one computation, each equal to its own run."""

import csv
import json
import signal

import pytest
import torch

from fastvae import ReferenceVAE, TrainConfig, VAEConfig, load_model, train
from fastvae.batched import ModelStack, StackedAdam
from fastvae.cli import main
from fastvae.errors import FastVAEError, Preempted
from fastvae.sweeps import _Sweep, bytes_per_model, parse_seeds, sweep

# float32 rounding differs between vmap-ed and single-model kernels (other BLAS blockings): measured on the
# 2-core EPYC, the largest parameter difference is ~3e-7 after 20 steps (6e-6 after 50 steps of 8 models).
PARITY_ATOL = 2e-5


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), hidden_dims=(16,), latent_dim=3, epochs=2, batch_size=50, device="cpu",
                out=str(tmp_path / "sweep"), progress=False, backend="torch", threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _models(config, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(ReferenceVAE(config))
    return out


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("lrs", [[1e-2, 1e-3, 3e-4], [1e-3, 1e-3, 1e-3]])  # per-model rows; one slice
def test_stacked_adam_equals_torch_adam_per_model(tiny_config, lrs):
    """Per-model lr, a model switched off half-way (it keeps weights and moments), against torch.optim.Adam."""
    models = _models(tiny_config, [0, 1, 2])
    refs = _models(tiny_config, [0, 1, 2])
    stack = ModelStack(models)
    adam = StackedAdam(stack.params, row=stack.row)
    opts = [torch.optim.Adam(r.parameters(), lr=lr, fused=True) for r, lr in zip(refs, lrs)]  # as the trainer
    gen = torch.Generator().manual_seed(5)
    for t in range(6):
        active = torch.tensor([True, t < 3 or t == 5, True])  # model 1 off for steps 4-5, back for 6
        # transposed in memory, as vmap's weight gradients come back
        grads = {k: torch.randn(p.shape[::-1], generator=gen).permute(*range(p.dim() - 1, -1, -1))
                 for k, p in stack.params.items()}  # fmt: skip
        adam.step(grads, torch.tensor(lrs), active)
        for i, (r, opt) in enumerate(zip(refs, opts)):
            if not active[i]:
                continue
            for name, p in r.named_parameters():
                p.grad = stack.row(name, grads[name], i).clone(memory_format=torch.contiguous_format)
            opt.step()
    for m, r in zip(models, refs):
        # the same fused kernel, but a row of the stack starts at another alignment than a model's own tensor,
        # so the kernel's vector/tail split (and FMA use) differs: measured 3e-8 after 6 steps
        assert _max_diff(m, r) < 1e-6
    assert adam.steps.tolist() == [6, 4, 6]
    for name, p in refs[1].named_parameters():  # the moments of the model switched off after 3 steps
        moment = stack.row(name, adam.exp_avg[name], 1)
        torch.testing.assert_close(moment, opts[1].state[p]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_stack_terms_equal_each_models_objective(tiny_config):
    cfg = VAEConfig(input_dim=(1, 6, 6), hidden_dims=(17,), latent_dim=3, activation="tanh", k=2)
    models = _models(cfg, [3, 4])
    stack = ModelStack(models)
    x, eps = torch.rand(2, 5, 36).round(), torch.randn(2, 5, 2, 3)
    beta = torch.tensor([0.5, 4.0])
    loss, rec, kl = stack.terms(x, eps, beta, 0.0)
    for i, m in enumerate(_models(cfg, [3, 4])):
        t = m.objective(x[i], eps[i], beta=float(beta[i]))
        torch.testing.assert_close(loss[i], t.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl[i], t.kl, rtol=1e-5, atol=1e-5)


def test_stack_refuses_mixed_architectures(tiny_config):
    other = VAEConfig(input_dim=(1, 6, 6), hidden_dims=(9,), latent_dim=3, activation="tanh")
    with pytest.raises(FastVAEError, match="hidden_dims"):
        ModelStack([ReferenceVAE(tiny_config), ReferenceVAE(other)])


def test_each_model_follows_its_single_train_run(tmp_path, tiny_npz):
    """Own seed (init, data order, noise), beta with KL warm-up, lr with a cosine schedule: each member ends
    where ``fastvae.train`` with its settings ends."""
    kw = dict(kl_warmup_steps=7, lr_schedule="cosine", binarize=True)
    result = sweep(_cfg(tmp_path, tiny_npz, **kw), betas=[0.5, 2.0], seeds=[0, 1], lrs=[3e-3])
    assert [r["status"] for r in result.rows] == ["done"] * 4
    for j, (beta, seed) in enumerate([(0.5, 1), (2.0, 0)]):
        single = train(
            _cfg(tmp_path, tiny_npz, beta=beta, seed=seed, lr=3e-3, out=str(tmp_path / f"one{j}"), **kw)
        )
        i = next(i for i, r in enumerate(result.rows) if (r["beta"], r["seed"]) == (beta, seed))
        assert _max_diff(single.model, result.models[i]) < PARITY_ATOL
        assert result.rows[i]["test_neg_elbo"] == pytest.approx(single.metrics[-1]["test_neg_elbo"], abs=1e-3)
        member = load_model(result.out / result.rows[i]["name"])
        assert _max_diff(member, result.models[i]) == 0


@pytest.mark.parametrize(
    "kw", [dict(objective="iwae", k=3), dict(likelihood="gaussian", free_bits=0.1), dict(model="ae")]
)
def test_other_objectives_follow_their_single_runs(tmp_path, tiny_npz, kw):
    grid = dict(seeds=[0, 1]) if kw.get("model") == "ae" else dict(betas=[0.5, 1.0], seeds=[1])
    result = sweep(_cfg(tmp_path, tiny_npz, epochs=1, **kw), **grid)
    single = train(_cfg(tmp_path, tiny_npz, epochs=1, seed=1, out=str(tmp_path / "one"), **kw,
                        **({} if kw.get("model") == "ae" else dict(beta=1.0))))  # fmt: skip
    assert _max_diff(single.model, result.models[1]) < PARITY_ATOL
    line = json.loads((result.out / result.rows[1]["name"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["train_loss"] == pytest.approx(single.metrics[-1]["train_loss"], rel=1e-5)


def test_sweep_folder_and_commands_on_a_member(tmp_path, tiny_npz, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", "--data", str(tiny_npz), "--beta", "0.5,4", "--seeds", "0-1", "--lr", "1e-3",
                 "--epochs", "1", "--batch-size", "50", "--hidden-dims", "16", "--latent-dim", "3",
                 "--device", "cpu", "--out", str(out), "--quiet", "--threads", "1"])  # fmt: skip
    assert code == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["grid"] == {"beta": [0.5, 4.0], "seed": [0, 1], "lr": [1e-3]}
    assert [m["status"] for m in record["members"]] == ["done"] * 4
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 4 and all(float(r["test_neg_elbo"]) > 0 for r in rows)
    assert (out / "summary.md").read_text().count("\n") == 6
    assert (out / "rate-distortion.png").stat().st_size > 1000
    member = out / record["members"][3]["name"]
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "samples.png", "checkpoints"):
        assert (member / name).exists(), name
    assert main(["eval", str(member), "--iw", "5", "--limit", "20"]) == 0
    assert main(["sample", str(member), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()


def test_sigterm_then_resume_equals_an_uninterrupted_sweep(tmp_path, tiny_npz, monkeypatch):
    grid = dict(betas=[1.0, 3.0], seeds=[2])
    whole = sweep(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "whole")), **grid)
    real_step = _Sweep._step

    def step_then_signal(self, epoch, idx):
        real_step(self, epoch, idx)
        if self.step == 12:  # the 13th step, inside epoch 2
            self.stop.signum = signal.SIGTERM

    monkeypatch.setattr(_Sweep, "_step", step_then_signal)
    with pytest.raises(Preempted, match="--resume"):
        sweep(_cfg(tmp_path, tiny_npz), **grid)
    monkeypatch.setattr(_Sweep, "_step", real_step)
    with pytest.raises(FastVAEError, match="already holds a sweep"):
        sweep(_cfg(tmp_path, tiny_npz), **grid)
    with pytest.raises(FastVAEError, match="another grid"):
        sweep(_cfg(tmp_path, tiny_npz, resume=True), betas=[1.0], seeds=[2])
    with pytest.raises(FastVAEError, match="different batch_size 25"):
        sweep(_cfg(tmp_path, tiny_npz, resume=True, batch_size=25), **grid)
    resumed = sweep(_cfg(tmp_path, tiny_npz, resume=True), **grid)
    for a, b in zip(whole.models, resumed.models):
        assert _max_diff(a, b) == 0  # CPU, the same computation: bit-identical
    assert [r["test_neg_elbo"] for r in whole.rows] == [r["test_neg_elbo"] for r in resumed.rows]
    lines = (resumed.out / resumed.rows[0]["name"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_a_diverging_model_stops_alone(tmp_path, tiny_npz, monkeypatch, capsys):
    grid = dict(betas=[1.0], seeds=[0, 1])
    clean = sweep(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "clean")), **grid)
    real_terms = ModelStack.terms

    def poisoned(self, x, eps, beta, free_bits=0.0):
        loss, rec, kl = real_terms(self, x, eps, beta, free_bits)
        if poisoned.calls == 4:  # model 1's loss turns NaN at step 5
            loss = loss.clone()
            loss[1, 0] = float("nan")
        poisoned.calls += 1
        return loss, rec, kl

    poisoned.calls = 0
    monkeypatch.setattr(ModelStack, "terms", poisoned)
    result = sweep(_cfg(tmp_path, tiny_npz), **grid)
    assert [r["status"] for r in result.rows] == ["done", "diverged"]
    assert "diverged: non-finite loss at step 5" in capsys.readouterr().err
    assert _max_diff(clean.models[0], result.models[0]) == 0  # the other model is untouched
    stopped = load_model(result.out / result.rows[1]["name"])
    assert all(torch.isfinite(p).all() for p in stopped.parameters())
    record = json.loads((result.out / "sweep.json").read_text())
    assert record["members"][1]["message"].startswith("non-finite loss at step 5")


def test_memory_check_names_the_largest_n_that_fits(tmp_path, tiny_npz, monkeypatch):
    cfg = _cfg(tmp_path, tiny_npz)
    per = bytes_per_model(cfg.model_config((8, 8)), cfg.batch_size)
    monkeypatch.setattr("fastvae.sweeps.free_bytes", lambda device=None: int(3.5 * per))
    with pytest.raises(FastVAEError, match="at most 3 models fit"):
        sweep(cfg, betas=[1.0, 2.0], seeds=[0, 1])
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--beta", "1,x"], "--beta: expected comma-separated numbers"),
        (["--seeds", "3-1"], "seeds: bad range"),
        (["--beta", "1,1"], "repeats"),
        (["--lr", "0"], "lr must be"),
    ],
)
def test_bad_grids_get_one_line(tmp_path, tiny_npz, capsys, args, fragment):
    code = main(["sweep", "--data", str(tiny_npz), "--out", str(tmp_path / "x"), "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kw", [dict(conditional=True), dict(time_limit=5.0), dict(dtype="bf16")])
def test_settings_the_sweep_does_not_take_are_refused(tmp_path, tiny_npz, kw):
    with pytest.raises(FastVAEError, match="fastvae sweep does not take"):
        sweep(_cfg(tmp_path, tiny_npz, **kw), betas=[1.0])


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 0-1") == [5, 0, 1]


@pytest.mark.slow  # three processes: ~25 s on the shared 2-core machine
def test_real_sigterm_lock_and_resume_through_the_cli(tmp_path, tiny_npz):
    """The process: a second sweep into the same folder is refused by the lock; SIGTERM exits 128 + 15 with the
    resume line after checkpointing every model; --resume finishes."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "sw"
    args = [sys.executable, "-m", "fastvae", "sweep", "--data", str(tiny_npz), "--beta", "1,2", "--epochs", "500",
            "--batch-size", "50", "--hidden-dims", "16", "--latent-dim", "3", "--device", "cpu", "--quiet",
            "--checkpoint-every", "3", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FASTVAE_CHECKPOINT_PAUSE": "0.05"}
    first = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    member = out / "beta2-seed0-lr0.001" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (member.is_dir() and any(p.name.startswith("step-") for p in member.iterdir())):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    second = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another training is writing" in second.stderr
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastvae: error: stopped by SIGTERM after step") and "--resume" in last
    step = int(last.split("after step ")[1].split(";")[0])
    done = subprocess.run([*args, "--resume", "--max-steps", str(step + 4)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "sweep.json").read_text())
    assert [m["status"] for m in record["members"]] == ["done", "done"] and record["step"] == step + 4


@pytest.mark.slow  # torchrun with 2 ranks and a single-process reference: ~30 s on the shared 2-core machine
def test_torchrun_splits_the_models_over_ranks(tmp_path, tiny_npz):
    """Two ranks train the grid's models round-robin with no gradient traffic: each model ends as in one
    process (up to the rounding of its stack's size), and rank 0 writes one sweep.json and summary."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["sweep", "--data", str(tiny_npz), "--beta", "0.5,1,4", "--epochs", "1", "--batch-size", "50",
              "--hidden-dims", "16", "--latent-dim", "3", "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "fastvae", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastvae",
           *common, "--out", str(tmp_path / "two")]  # fmt: skip
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "[rank 1]" in two.stderr
    record = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert record["ranks"] == 2 and [m["status"] for m in record["members"]] == ["done"] * 3
    assert len(list(csv.DictReader((tmp_path / "two" / "summary.csv").open()))) == 3
    for m in record["members"]:
        a = load_file(tmp_path / "one" / m["name"] / "model.safetensors")
        b = load_file(tmp_path / "two" / m["name"] / "model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < PARITY_ATOL


def test_a_beta_sweep_on_known_factors_reports_mig_and_sap(tmp_path, monkeypatch):
    """On dSprites the summary gains MIG and SAP per model (each that of the member's own saved model) and
    a MIG / SAP / reconstruction against beta plot."""
    pytest.importorskip("sklearn")
    from fastvae import dsprites
    from fastvae.disentangle import disentanglement
    from tests.test_dsprites import TINY

    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(dsprites.GRIDS, "dsprites-small", TINY)
    cfg = TrainConfig(data="dsprites-small", hidden_dims=(16,), latent_dim=3, epochs=1, batch_size=8,
                      device="cpu", out=str(tmp_path / "sweep"), progress=False, backend="torch", threads=1)  # fmt: skip
    result = sweep(cfg, betas=[1.0, 4.0], seeds=[0])
    for row in result.rows:
        model = load_model(str(tmp_path / "sweep" / row["name"]))
        expected = disentanglement(model, grid="dsprites-small")
        assert row["mig"] == pytest.approx(expected.mig.score) and row["sap"] == pytest.approx(expected.sap.score)
    table = (tmp_path / "sweep" / "summary.md").read_text()
    assert table.splitlines()[0].endswith("| active units | MIG | SAP |")
    with open(tmp_path / "sweep" / "summary.csv") as f:
        assert [float(r["mig"]) for r in csv.DictReader(f)] == pytest.approx([r["mig"] for r in result.rows])
    assert (tmp_path / "sweep" / "mig-against-beta.png").stat().st_size > 0
