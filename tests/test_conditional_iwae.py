"""The conditional VAE and the K-sample objectives outside the kernels (issue 16): the reference objective
against torch.distributions, configs, keyed training noise, training with resume and DDP, evaluation,
and the command line."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastvae import ReferenceVAE, VAEConfig
from fastvae.config import TrainConfig
from fastvae.errors import FastVAEError
from fastvae.trainer import train

D = torch.distributions
CFG = VAEConfig(input_dim=12, hidden_dims=(7, 5), latent_dim=3, activation="tanh")


def _by_hand(model, x, y, eps, beta):
    """The objective row by row from torch.distributions: the IWAE bound or the mean of K ELBOs."""
    cfg = model.config
    out = []
    for i in range(len(x)):
        yi = None if y is None else y[i : i + 1]
        mu, logvar = model.encode(x[i : i + 1], yi)
        q = D.Normal(mu[0], torch.exp(0.5 * logvar[0]))
        terms = []
        for j in range(cfg.k):
            z = mu[0] + q.stddev * eps[i, j]
            log_px = D.Bernoulli(logits=model.decode(z[None], yi)[0]).log_prob(x[i]).sum()
            if cfg.objective == "iwae":
                terms.append(log_px - beta * (q.log_prob(z).sum() - D.Normal(0.0, 1.0).log_prob(z).sum()))
            else:
                terms.append(-log_px + beta * D.kl_divergence(q, D.Normal(0.0, 1.0)).sum())
        t = torch.stack(terms)
        out.append(-(torch.logsumexp(t, 0) - math.log(cfg.k)) if cfg.objective == "iwae" else t.mean())
    return torch.stack(out)


@pytest.mark.parametrize(
    "changes",
    [
        dict(objective="iwae", k=4),
        dict(k=3),
        dict(classes=3),
        dict(classes=4, objective="iwae", k=2, beta=0.5),
    ],
    ids=["iwae-k4", "elbo-k3", "conditional", "conditional-iwae"],
)
def test_reference_objective_equals_torch_distributions(changes):
    torch.manual_seed(0)
    cfg = CFG.replace(**changes)
    model = ReferenceVAE(cfg).double()
    x = torch.rand(5, 12, dtype=torch.float64).round()
    y = torch.randint(0, cfg.classes, (5,)) if cfg.conditional else None
    eps = torch.randn(5, cfg.k, 3, dtype=torch.float64)
    got = model.objective(x, eps if cfg.k > 1 or cfg.objective == "iwae" else eps[:, 0], y=y).loss
    torch.testing.assert_close(got, _by_hand(model, x, y, eps, cfg.beta), rtol=1e-10, atol=1e-10)


def test_the_conditional_model_is_a_concatenation():
    """[x, onehot(y)] @ [W | W_y]^T + b: a label changes the first layers by the label weight's column."""
    torch.manual_seed(1)
    model = ReferenceVAE(CFG.replace(classes=4)).double()
    x = torch.rand(3, 12, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    mu, _ = model.encode(x, y)
    pre = x @ model.encoder[0].weight.T + model.encoder[0].bias + model.encoder_label.weight.T[y]
    h = torch.tanh(model.encoder[1](torch.tanh(pre)))
    torch.testing.assert_close(mu, model.head(h)[:, :3])
    assert CFG.replace(classes=4).n_parameters == sum(p.numel() for p in model.parameters())


def test_configs_validate_the_new_options():
    with pytest.raises(FastVAEError, match="objective must be one of"):
        VAEConfig(objective="vae")
    with pytest.raises(FastVAEError, match="k must be"):
        VAEConfig(k=0)
    with pytest.raises(FastVAEError, match="autoencoder"):
        VAEConfig(model="ae", k=2)
    with pytest.raises(FastVAEError, match="free bits"):
        TrainConfig(preset="iwae-k5", free_bits=0.1)
    cfg = TrainConfig(preset="iwae", objective="iwae", k=7, conditional=True)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.model_config(classes=10).classes == 10
    assert (again.model_config().objective, again.model_config().k) == ("iwae", 7)
    assert TrainConfig(preset="iwae-k50").model_config().k == 50


def test_k_sample_training_noise_extends_the_one_sample_draw():
    from fastvae.schedules import step_noise

    ids = torch.tensor([3, 10, 11])
    x = torch.rand(3, 5)
    _, one = step_noise(7, ids, x, 4, False)
    _, many = step_noise(7, ids, x, 4, False, k=3)
    assert many.shape == (3, 3, 4) and torch.equal(many[:, 0], one)
    assert not torch.equal(many[:, 1], many[:, 2])


def _strokes(path, n, n_train):
    """Strokes whose label is their orientation (0: horizontal, 1: vertical, 2: both), as a .npz split."""
    rng = np.random.default_rng(0)
    x = np.zeros((n, 8, 8), dtype=np.float32)
    y = rng.integers(0, 3, n)
    for i in range(n):
        r, c = rng.integers(1, 7, size=2)
        if y[i] != 1:
            x[i, r - 1 : r + 2, :] = 1
        if y[i] != 0:
            x[i, :, c - 1 : c + 2] = 1
    x = (x * 255).astype(np.uint8)
    np.savez(path, x_train=x[:n_train], x_test=x[n_train:], y_train=y[:n_train], y_test=y[n_train:])
    return path


@pytest.fixture(scope="module")
def labelled_npz(tmp_path_factory):
    return _strokes(tmp_path_factory.mktemp("labelled") / "strokes.npz", 400, 320)


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), preset="iwae", hidden_dims=(16,), latent_dim=3, batch_size=32, device="cpu",
                progress=False, out=str(tmp_path / "run"), conditional=True, objective="iwae", k=3, lr=3e-3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("engine", [False, True], ids=["eager", "engine"])
def test_conditional_iwae_training_resumes_exactly(tmp_path, labelled_npz, engine):
    """3 epochs straight against 2 + a resumed third: the same weights, bit for bit (the eager step, and
    the engine's step run eagerly on the CPU)."""
    straight = train(_cfg(tmp_path, labelled_npz, epochs=3, out=str(tmp_path / "a"), engine=engine))
    assert (
        straight.model.config.classes == 3
        and straight.metrics[-1]["test_objective"] < straight.metrics[0]["test_objective"]
    )
    train(_cfg(tmp_path, labelled_npz, epochs=2, out=str(tmp_path / "b"), engine=engine))
    resumed = train(
        _cfg(tmp_path, labelled_npz, epochs=3, out=str(tmp_path / "b"), resume=True, engine=engine)
    )
    assert resumed.step == straight.step
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) >= {"encoder_label.weight", "decoder_label.weight"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_another_objective_is_refused(tmp_path, labelled_npz):
    train(_cfg(tmp_path, labelled_npz, epochs=1, max_steps=3))
    with pytest.raises(FastVAEError, match=r"different k 4 \(the run has 3\)"):
        train(_cfg(tmp_path, labelled_npz, epochs=1, k=4, resume=True))


def test_conditional_needs_labels(tmp_path, tiny_npz):
    with pytest.raises(FastVAEError, match="no labels"):
        train(_cfg(tmp_path, tiny_npz, epochs=1))


def test_conditional_evaluation_is_batch_invariant(tmp_path, labelled_npz):
    from fastvae.evaluate import elbo_stats, importance_weighted_nll
    from fastvae.runs import load_run

    train(_cfg(tmp_path, labelled_npz, epochs=1, max_steps=4))
    run = load_run(tmp_path / "run")
    assert run.test.y is not None
    a = elbo_stats(run.model, run.test, seed=1, batch_size=80)
    b = elbo_stats(run.model, run.test, seed=1, batch_size=7)
    assert (a.neg_elbo, a.objective) == (b.neg_elbo, b.objective)
    assert importance_weighted_nll(run.model, run.test, 20, batch_size=80) == importance_weighted_nll(
        run.model, run.test, 20, batch_size=9
    )
    # the labels matter: the same images scored under shifted labels give another bound
    shifted = load_run(tmp_path / "run")
    shifted.test.y = (shifted.test.y + 1) % 3
    assert elbo_stats(shifted.model, shifted.test, seed=1).neg_elbo != a.neg_elbo


def _cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "fastvae", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, labelled_npz):
    out = tmp_path_factory.mktemp("cvae") / "run"
    rc, _, err = _cli("train", "--data", labelled_npz, "--preset", "iwae-k5", "--conditional", "--hidden-dims",
                      "16", "--latent-dim", "3", "--batch-size", "32", "--max-steps", "5", "--device", "cpu",
                      "--quiet", "--out", out)  # fmt: skip
    assert rc == 0, err
    return out


@pytest.mark.slow
def test_cli_label_commands(cli_run, tmp_path):
    rc, out, err = _cli("sample", cli_run, "-n", 6, "--label", 2, "--out", tmp_path / "s.png")
    assert rc == 0 and "of label 2" in out, err
    rc, out, err = _cli("sample", cli_run, "-n", 30, "--out", tmp_path / "grid.png")
    assert rc == 0 and "row r: label r % C" in out, err
    rc, _, err = _cli("manifold", cli_run, "-n", 3, "--label", 1, "--out", tmp_path / "m.png")
    assert rc == 0, err
    rc, _, err = _cli("interpolate", cli_run, "--a", 0, "--b", 1, "--label", 0, "--out", tmp_path / "i.png")
    assert rc == 0, err
    rc, out, err = _cli("eval", cli_run, "--iw", 5, "--json")
    assert rc == 0 and '"conditional": true' in out and '"objective": "iwae"' in out, err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("sample", "{run}", "--label", "3", "--out", "x.png"), "--label must be in 0..2"),
        (("manifold", "{run}", "-n", "3", "--out", "x.png"), "give --label"),
        (("compare", "{run}", "{run}", "--out", "c.png"), "not defined for a conditional VAE"),
        (("edit", "{run}", "--image", "0", "--attribute", "label=0->1"), "not defined for a conditional VAE"),
        (("interpolate", "{run}", "--a", "0", "--b", "1", "--label", "3"), "--label must be in 0..2"),
        (("score", "{run}", "--data", "{data}", "--iw", "0"), "give --labels"),
        (("train", "--data", "{tiny}", "--conditional", "--max-steps", "1", "--out", "t"), "no labels"),
        (("train", "--preset", "iwae-k5", "--free-bits", "0.5", "--out", "t"), "free bits"),
        (("train", "--k", "0", "--out", "t"), "--k"),
    ],
)
def test_cli_bad_input_gives_one_line(cli_run, tiny_npz, labelled_npz, tmp_path, args, fragment):
    args = [a.format(run=cli_run, tiny=tiny_npz, data=labelled_npz) for a in args]
    rc, _, err = _cli(*args, cwd=tmp_path)
    assert rc != 0 and fragment in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_label_on_an_unconditional_run_is_refused(tmp_path, tiny_npz):
    out = tmp_path / "plain"
    rc, _, err = _cli("train", "--data", tiny_npz, "--hidden-dims", "8", "--latent-dim", "2", "--max-steps", "2",
                      "--device", "cpu", "--quiet", "--out", out)  # fmt: skip
    assert rc == 0, err
    for args in (("sample", out, "--label", 1), ("manifold", out, "-n", 2, "--label", 1),
                 ("interpolate", out, "--a", 0, "--b", 1, "--label", 1)):  # fmt: skip
        rc, _, err = _cli(*args, "--out", tmp_path / "x.png")
        assert rc != 0 and "applies to a conditional VAE" in err and "Traceback" not in err, args


def test_cli_scores_a_conditional_run_given_labels(cli_run, labelled_npz, tmp_path):
    """score --labels: -log p(x|y) per sample; the same images under other labels score otherwise."""
    with np.load(labelled_npz) as f:
        y = f["y_test"]
    np.save(tmp_path / "other.npy", (y + 1) % 3)
    scores = []
    for labels in (labelled_npz, tmp_path / "other.npy"):
        out = tmp_path / f"{len(scores)}.csv"
        rc, _, err = _cli(
            "score", cli_run, "--data", labelled_npz, "--labels", labels, "--iw", 2, "--out", out
        )
        assert rc == 0, err
        scores.append(np.loadtxt(out, delimiter=",", skiprows=1)[:, 1])
    assert len(scores[0]) == len(y) and not np.allclose(scores[0], scores[1])


# ---- labels in the data --------------------------------------------------------------------------------
def test_labels_load_with_the_data_and_stay_resident(tmp_path, labelled_npz):
    from fastvae.data import DeviceData, label_classes, load_dataset

    with np.load(labelled_npz) as f:
        y_train, y_test = f["y_train"], f["y_test"]
    data = load_dataset(str(labelled_npz))
    assert np.array_equal(data.y_train, y_train) and np.array_equal(data.y_test, y_test)
    assert data.y_train.dtype == np.int64 and label_classes(data) == int(max(y_train.max(), y_test.max())) + 1
    resident = DeviceData(data.x_test, "cpu", data.y_test)
    assert resident.y.dtype == torch.int64 and torch.equal(
        resident.y, torch.from_numpy(y_test.astype(np.int64))
    )
    assert torch.equal(
        resident.labels(torch.tensor([4, 0])), torch.from_numpy(y_test[[4, 0]].astype(np.int64))
    )
    assert DeviceData(data.x_test, "cpu").y is None  # unconditional: no labels on the device
    mnist = load_dataset("mnist")
    assert mnist.y_test.shape == (len(mnist.x_test),) and label_classes(mnist) == 10


@pytest.mark.parametrize(
    "y_train, fragment",
    [
        (np.zeros(5, np.int64), "expected 8 labels"),
        (np.full(8, 0.5), "labels must be integers"),
        (np.array([0, 1, -1, 0, 1, 0, 1, 0]), "labels must be >= 0"),
    ],
    ids=["length", "fractional", "negative"],
)
def test_bad_labels_are_one_clear_line(tmp_path, y_train, fragment):
    from fastvae.data import label_classes, load_dataset

    path = tmp_path / "bad.npz"
    x = np.zeros((8, 4, 4), np.uint8)
    np.savez(path, x_train=x, x_test=x[:2], y_train=y_train, y_test=np.zeros(2, np.int64))
    with pytest.raises(FastVAEError, match=fragment):
        label_classes(load_dataset(str(path)))


def test_run_configs_from_before_the_new_options_still_load():
    """A config.json written before issue 16 has no classes/objective/k or conditional keys."""
    model = CFG.to_dict()
    for key in ("classes", "objective", "k"):
        del model[key]
    assert VAEConfig.from_dict(model) == CFG
    train_doc = TrainConfig(preset="iwae").to_dict()
    for key in ("conditional", "objective", "k"):
        del train_doc[key]
    old = TrainConfig.from_dict(train_doc)
    assert not old.conditional and old.model_config().objective == "elbo" and old.model_config().k == 1
    with pytest.raises(FastVAEError, match="objective must be one of"):
        TrainConfig(objective="vae")
    with pytest.raises(FastVAEError, match="k must be"):
        TrainConfig(k=0)


# ---- training: the engine's autograd step and DDP ------------------------------------------------------
@pytest.mark.parametrize(
    "changes", [dict(classes=3, objective="iwae", k=3), dict(k=2)], ids=["conditional-iwae-k3", "elbo-k2"]
)
def test_engine_step_with_labels_and_k_samples_equals_a_plain_loop(changes):
    """The engine's step (eager on the CPU, binarized, KL warm-up through set_beta) against Adam on the
    torch.distributions objective, eps of sample j of a row its columns j Z .. (j + 1) Z of the row noise
    keyed by epoch * N + index."""
    from fastvae.data import DeviceData
    from fastvae.engine import TrainStep, make_optimizer
    from fastvae.noise import row_normal, row_uniform
    from fastvae.schedules import TRAIN_BINARIZE_SALT, TRAIN_EPS_SALT

    cfg = CFG.replace(**changes)
    n, b, seed, epoch = 64, 16, 5, 1
    rng = np.random.default_rng(0)
    x_all = (rng.random((n, 12)) * 255).astype(np.uint8)
    y_all = rng.integers(0, 3, n)
    torch.manual_seed(0)
    model, twin = ReferenceVAE(cfg), ReferenceVAE(cfg)
    twin.load_state_dict(model.state_dict())
    data = DeviceData(x_all, "cpu", y_all if cfg.conditional else None)
    eng = TrainStep(model, make_optimizer(model, 1e-2, False), data, b, binarize=True, seed=seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    eng.load_epoch(perm, epoch=epoch)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for i, beta in enumerate((0.25, 0.5, 1.0)):
        eng.set_beta(beta)
        eng.step()
        idx = perm[i * b : (i + 1) * b]
        ids = epoch * n + idx
        probs = torch.from_numpy(x_all)[idx].float() / 255
        x = (row_uniform(seed, TRAIN_BINARIZE_SALT, ids, 12) < probs).float()
        eps = row_normal(seed, TRAIN_EPS_SALT, ids, cfg.k * 3).view(b, cfg.k, 3)
        y = torch.from_numpy(y_all)[idx] if cfg.conditional else None
        loss = _by_hand(twin, x, y, eps, beta)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_ranks_equal_one_process_conditional_iwae(tmp_path, labelled_npz):
    """2 ranks x 16 rows against 1 process x 32 rows: the labels and the K samples of a row follow it to
    whichever rank trains it (reference backend, gloo)."""
    from tests.test_distributed import ENV, params, torchrun

    args = ["train", "--data", labelled_npz, "--preset", "iwae", "--conditional", "--objective", "iwae", "--k", "3",
            "--hidden-dims", "16", "--latent-dim", "3", "--batch-size", "32", "--max-steps", "6",
            "--kl-warmup-steps", "4", "--device", "cpu", "--quiet", "--backend", "torch"]  # fmt: skip
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "fastvae", *map(str, args), "--out", str(single)], env=ENV,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ddp = tmp_path / "ddp"
    proc = torchrun(2, [*args, "--out", ddp])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    a, b = params(single), params(ddp)
    assert "encoder_label.weight" in b
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm()).item()
        assert rel < 1e-5, (k, rel)


# ---- evaluation and the toolkit, given the labels --------------------------------------------------------
def test_conditional_scores_equal_a_plain_loop():
    """anomaly_scores' -ELBO and IW bound of a conditional VAE: -log p(x|y) bounds, against
    torch.distributions row by row with the evaluation's keyed noise."""
    from fastvae.evaluate import EVAL_SALT, IW_SALT
    from fastvae.noise import row_normal
    from fastvae.toolkit import anomaly_scores

    torch.manual_seed(2)
    model = ReferenceVAE(CFG.replace(classes=4)).eval()
    x = torch.rand(7, 12).round()
    y = torch.tensor([0, 3, 1, 2, 2, 0, 1])
    k, seed = 6, 9
    nelbo, iw = anomaly_scores(model, x, k, seed=seed, batch_size=3, y=y)
    rows = torch.arange(7)
    eps1 = row_normal(seed, EVAL_SALT, rows, 3)
    eps_iw = row_normal(seed, IW_SALT, rows, k * 3).view(7, k, 3)
    want_elbo, want_iw = [], []
    with torch.no_grad():
        for i in range(7):
            mu, logvar = model.encode(x[i : i + 1], y[i : i + 1])
            q = D.Normal(mu[0], torch.exp(0.5 * logvar[0]))
            z = mu[0] + q.stddev * eps1[i]
            log_px = D.Bernoulli(logits=model.decode(z[None], y[i : i + 1])[0]).log_prob(x[i]).sum()
            want_elbo.append(-log_px + D.kl_divergence(q, D.Normal(0.0, 1.0)).sum())
            zs = mu[0] + q.stddev * eps_iw[i]  # (k, Z)
            log_w = (D.Bernoulli(logits=model.decode(zs, y[i].repeat(k))).log_prob(x[i]).sum(-1)
                     + D.Normal(0.0, 1.0).log_prob(zs).sum(-1) - q.log_prob(zs).sum(-1))  # fmt: skip
            want_iw.append(-(torch.logsumexp(log_w, 0) - math.log(k)))
    np.testing.assert_allclose(nelbo, torch.stack(want_elbo).numpy(), rtol=1e-5)
    np.testing.assert_allclose(iw, torch.stack(want_iw).numpy(), rtol=1e-5)


def test_conditional_toolkit_uses_the_labels():
    from fastvae.toolkit import interpolate, manifold, sample_labels

    torch.manual_seed(3)
    model = ReferenceVAE(CFG.replace(classes=3)).eval()
    assert sample_labels(model, 25, ncol=10).tolist() == [0] * 10 + [1] * 10 + [2] * 5  # row r: label r % C
    assert sample_labels(model, 4, 2).tolist() == [2] * 4
    x_a, x_b = torch.rand(12), torch.rand(12)
    path = interpolate(model, x_a, x_b, 3, labels=(1, 2), label=0)
    with torch.no_grad():
        mu_a = model.encode(x_a[None], torch.tensor([1]))[0][0]
        mu_b = model.encode(x_b[None], torch.tensor([2]))[0][0]
        mid = torch.sigmoid(model.decode(((mu_a + mu_b) / 2)[None], torch.tensor([0])))[0]
    torch.testing.assert_close(path[1], mid)
    images, vals = manifold(model, 2, (0, 1), label=1)  # top-left: dim 0 at its largest, dim 1 at its least
    with torch.no_grad():
        corner = torch.sigmoid(model.decode(torch.tensor([[vals[1], vals[0], 0.0]]), torch.tensor([1])))
    torch.testing.assert_close(images[:1], corner)
    for bad in (
        lambda: sample_labels(model, 2, 3),
        lambda: interpolate(model, x_a, x_b, 3, labels=(1, 2), label=5),
    ):
        with pytest.raises(FastVAEError, match=r"--label must be in 0\.\.2"):
            bad()


def test_quality_judges_a_conditional_vae_by_the_labels_it_draws(tmp_path, monkeypatch, capsys):
    """Prior samples drawn for labels r // 10 % C: their label agreement is the judge's by hand."""
    from fastvae.cli import main
    from fastvae.data import load_dataset
    from fastvae.noise import keyed_generator
    from fastvae.quality import ROWS, load_classifier, run_quality
    from fastvae.runs import load_run

    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "cache"))
    data = _strokes(tmp_path / "strokes.npz", 700, 400)  # a test split of 300: quality needs >= 200
    train(_cfg(tmp_path, data, objective="elbo", k=1, epochs=1, max_steps=10))
    run = load_run(tmp_path / "run")
    report = run_quality(run, 120, seed=0)
    clf, _ = load_classifier(load_dataset(str(data)), seed=0)
    y = torch.arange(120) // 10 % 3
    with torch.no_grad():
        x = torch.sigmoid(run.model.decode(torch.randn(120, 3, generator=keyed_generator(0, 0)), y))
        want = (clf(x).argmax(1) == y).double().mean().item()
    assert report.rows[ROWS[0]].label_agreement == pytest.approx(want)
    assert all(0 <= r.label_agreement <= 1 for r in report.rows.values())
    assert main(["quality", str(tmp_path / "run"), "-n", "120", "--device", "cpu"]) == 0
    assert "label agreement" in capsys.readouterr().out
