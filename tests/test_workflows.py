"""fastvae.workflows, the library half of the CLI: each task on a run directory, called directly and checked
against float64 math written out here (closed-form KL, Bernoulli log-likelihood, log-mean-exp of the
importance weights) and numpy's pairwise count for the ROC AUC."""

import csv
import math

import numpy as np
import pytest
import torch

from fastvae import TrainConfig, VAEConfig, train
from fastvae.errors import FastVAEError
from fastvae.evaluate import EVAL_SALT, IW_SALT
from fastvae.noise import row_normal
from fastvae.runs import load_run
from fastvae.workflows import (
    default_iw,
    evaluate_run,
    grid_columns,
    interpolate_run,
    manifold_dims,
    sample_run,
    score_labels,
    score_run,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("wf") / "run"
    train(TrainConfig(data=str(tiny_npz), hidden_dims=(16,), latent_dim=3, max_steps=30, batch_size=50, lr=5e-3,
                      device="cpu", out=str(out), progress=False, backend="torch"))  # fmt: skip
    return load_run(out, "cpu")


def _terms64(model, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, logvar, z = mu + sigma * eps) in float64, from the model's encoder."""
    with torch.no_grad():
        mu, logvar = (t.double() for t in model.encode(x.float()))
    return mu, logvar, mu + torch.exp(0.5 * logvar) * eps.double()


def _log_px_z(model, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) of a Bernoulli decoder, float64: sum x log p + (1 - x) log(1 - p) over the logits."""
    with torch.no_grad():
        logits = model.decode(z.float()).double()
    x = x.double().flatten(1)  # one row per z
    return (x * logits - torch.nn.functional.softplus(logits)).sum(-1)


def _neg_elbo64(model, x: torch.Tensor, rows: torch.Tensor, seed: int = 0) -> np.ndarray:
    """Per-row -ELBO: -log p(x|z) with the row's keyed eps, plus the closed-form KL."""
    eps = row_normal(seed, EVAL_SALT, rows, model.config.latent_dim)
    mu, logvar, z = _terms64(model, x, eps)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)
    return (kl - _log_px_z(model, x, z)).numpy()


def _iw_nll64(model, x: torch.Tensor, rows: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """-log (1/k sum_j p(x, z_j) / q(z_j|x)), draw j of row r the row's keyed noise columns j*Z..(j+1)*Z."""
    z_dim = model.config.latent_dim
    eps = row_normal(seed, IW_SALT, rows, k * z_dim).view(len(rows), k, z_dim).double()
    mu, logvar, _ = _terms64(model, x, torch.zeros(len(x), z_dim))
    std = torch.exp(0.5 * logvar)[:, None]
    z = mu[:, None] + std * eps  # (B, k, Z)
    normal = torch.distributions.Normal
    log_q = normal(mu[:, None], std).log_prob(z).sum(-1)
    log_px = _log_px_z(model, x.repeat_interleave(k, 0), z.view(-1, z_dim)).view(len(x), k)
    log_p = normal(0.0, 1.0).log_prob(z).sum(-1) + log_px
    return (math.log(k) - torch.logsumexp(log_p - log_q, 1)).numpy()


# ---- score ---------------------------------------------------------------------------------------------------
def test_score_run_scores_the_file_and_the_held_out_reference(run, tmp_path):
    rng = np.random.default_rng(1)
    noise = rng.random((9, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    res = score_run(
        run, tmp_path / "noise.npy", iw=0, out=tmp_path / "s.csv", reference=True, reference_limit=40
    )
    x = torch.from_numpy(noise.reshape(9, -1))
    np.testing.assert_allclose(res.neg_elbo, _neg_elbo64(run.model, x, torch.arange(9)), rtol=1e-5, atol=1e-4)
    assert np.isnan(res.iw_nll).all() and res.figure == "-ELBO"
    ref_x = run.test_images(0, 40, raw=True)
    np.testing.assert_allclose(
        res.reference, _neg_elbo64(run.model, ref_x, torch.arange(40)), rtol=1e-5, atol=1e-4
    )
    s, r = res.neg_elbo[:, None], res.reference[None, :]
    assert res.auc == pytest.approx(((s > r) + 0.5 * (s == r)).mean())  # P(scored > reference), ties half
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["index"]) for row in rows] == list(range(9))
    np.testing.assert_allclose([float(row["neg_elbo"]) for row in rows], res.neg_elbo, atol=1e-4)


def test_score_run_iw_bound_is_the_log_mean_exp_of_the_weights(run, tmp_path):
    x = run.test_images(0, 6, raw=True)
    res = score_run(run, x.numpy().reshape(6, 8, 8), iw=5)
    np.testing.assert_allclose(res.iw_nll, _iw_nll64(run.model, x, torch.arange(6), 5), rtol=1e-5, atol=1e-4)
    assert res.figure == "IW NLL (k=5)" and res.reference is None and res.auc is None


def test_score_run_refuses_a_shape_the_model_does_not_take(run):
    with pytest.raises(FastVAEError, match="model expects"):
        score_run(run, np.zeros((3, 5), np.float32))


def test_score_labels_resolve_and_range_check(tmp_path):
    plain = VAEConfig(input_dim=4, hidden_dims=(3,), latent_dim=2)
    cond = VAEConfig(input_dim=4, hidden_dims=(3,), latent_dim=2, classes=3)
    assert score_labels(plain, "x.npy", None, 2) is None
    with pytest.raises(FastVAEError, match="applies to a conditional VAE"):
        score_labels(plain, "x.npy", "y.npy", 2)
    with pytest.raises(FastVAEError, match="give --labels"):
        score_labels(cond, "x.npy", None, 2)
    np.save(tmp_path / "y.npy", np.array([0, 2, 1]))
    assert score_labels(cond, "x.npy", tmp_path / "y.npy", 3).tolist() == [0, 2, 1]
    np.save(tmp_path / "bad.npy", np.array([0, 3, 1]))
    with pytest.raises(FastVAEError, match=r"labels must be in 0\.\.2, got 0\.\.3"):
        score_labels(cond, "x.npy", tmp_path / "bad.npy", 3)


# ---- eval ----------------------------------------------------------------------------------------------------
def test_default_iw_by_device():
    assert default_iw("cpu") == 500 and default_iw(torch.device("cuda", 0)) == 5000


def test_evaluate_run_figures_and_record(run):
    seen = []
    ev = evaluate_run(run, iw=4, limit=12, on_elbo=lambda r: seen.append(r.iw_nll))
    x, rows = run.test_images(0, 12), torch.arange(12)
    assert seen == [None]  # called once, before the IW bound
    assert ev.stats.neg_elbo == pytest.approx(_neg_elbo64(run.model, x, rows).mean(), abs=1e-4)
    assert ev.iw_nll == pytest.approx(_iw_nll64(run.model, x, rows, 4).mean(), abs=1e-4)
    d = ev.as_dict()
    assert list(d) == ["n", "test_neg_elbo", "test_objective", "test_rec", "test_kl", "active_units", "objective",
                       "k", "conditional", "iw_k", "iw_nll"]  # fmt: skip
    assert (d["n"], d["iw_k"], d["objective"], d["k"], d["conditional"]) == (12, 4, "elbo", 1, False)
    assert "iw_k" not in evaluate_run(run, iw=0, limit=3).as_dict()


# ---- sample, manifold, interpolate ---------------------------------------------------------------------------
def test_grid_columns():
    assert grid_columns(30, label_rows=False) == 6  # ceil(sqrt(30))
    assert grid_columns(36, label_rows=False) == 6 and grid_columns(37, label_rows=False) == 7
    assert grid_columns(30, label_rows=True) == 10  # one label per row
    assert grid_columns(30, label_rows=True, ncol=4) == 4


def test_sample_run_draws_the_seeded_prior_and_writes_the_grid(run, tmp_path):
    res = sample_run(run, 5, seed=3, temperature=0.5, out=tmp_path / "s.png")
    z = 0.5 * torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.sigmoid(run.model.decode(z)).numpy()
    np.testing.assert_allclose(res.images, expected, atol=1e-6)
    assert (res.ncol, res.label, res.label_rows) == (3, None, False)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FastVAEError, match="applies to a conditional VAE"):
        sample_run(run, 2, label=1)


def test_manifold_dims_are_the_two_largest_mean_kl(run):
    mu, logvar, _ = _terms64(run.model, run.test_images(0, 2000), torch.zeros(1))
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).mean(0).numpy()
    assert manifold_dims(run) == tuple(sorted(np.argsort(-kl)[:2].tolist()))


def test_interpolate_run_is_the_two_images_around_the_decoded_line(run):
    row = interpolate_run(run, 2, 7, 4)
    xa, xb = run.test_images(2, 3), run.test_images(7, 8)
    mu, _, _ = _terms64(run.model, torch.cat([xa, xb]), torch.zeros(2, 3))
    t = torch.linspace(0, 1, 4, dtype=torch.float64)[:, None]
    with torch.no_grad():
        line = torch.sigmoid(run.model.decode(((1 - t) * mu[0] + t * mu[1]).float()))
    torch.testing.assert_close(row[0], xa[0])
    torch.testing.assert_close(row[-1], xb[0])
    torch.testing.assert_close(row[1:-1], line, atol=1e-5, rtol=1e-5)
    with pytest.raises(FastVAEError, match=r"--b 100 is not a test image index \(0\.\.99\)"):
        interpolate_run(run, 0, 100)


# ---- export ------------------------------------------------------------------------------------------------
def test_int8_record_reads_the_export_metadata():
    from pathlib import Path

    from fastvae.export.onnx_export import ExportResult

    meta = {"part": "decoder", "quantization": "int8 dynamic (QInt8 weights)", "int8_reduce_range": "false",
            "int8_max_prob_error": "0.0123457", "int8_mean_prob_error": "1e-05", "int8_eval_samples": "1000",
            "int8_test_elbo_change": "-0.002000"}  # fmt: skip
    q = ExportResult(Path("d.onnx"), meta, 1e-6).int8
    assert q.reduce_range is False and q.elbo_change == -0.002
    assert q.errors == {"max prob error": 0.0123457, "mean prob error": 1e-05}
    encoder = {"int8_reduce_range": "true", "int8_max_mu_error": "0.5", "int8_mean_mu_error": "0.25"}
    q = ExportResult(Path("e.onnx"), encoder, 0.0, "encoder").int8
    assert (
        q.reduce_range is True
        and q.elbo_change is None
        and list(q.errors) == ["max mu error", "mean mu error"]
    )
    assert ExportResult(Path("d.onnx"), {"quantization": "none"}, 0.0).int8 is None


# ---- the CLI's share -----------------------------------------------------------------------------------------
def test_the_score_command_makes_one_library_call(run, tmp_path, capsys):
    """``fastvae score`` parses, calls one library function and prints: from the command's own frames (not
    main's set-up or the parser's) the one call into the rest of fastvae is ``workflows.score_run``, and
    the walk enters workflows.py once (the library never comes back through the CLI)."""
    import sys
    from pathlib import Path

    import fastvae
    from fastvae.cli import main

    root = str(Path(fastvae.__file__).parent)
    from_cli, workflow_entries = [], 0

    def profile(frame, event, arg) -> None:
        nonlocal workflow_entries
        name = frame.f_code.co_filename
        if event != "call" or not name.startswith(root) or frame.f_code.co_name == "<module>":
            return
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(root):
            caller = caller.f_back
        if caller is None or caller.f_code.co_filename == name:
            return
        workflow_entries += name.endswith("workflows.py")
        setup = caller.f_code.co_name in ("main", "build_parser") or caller.f_code.co_name.startswith("_add")
        if caller.f_code.co_filename.endswith("cli.py") and not setup:
            from_cli.append(f"{Path(name).name}:{frame.f_code.co_name}")

    np.save(tmp_path / "x.npy", run.test_images(0, 5, raw=True).numpy())
    args = ["score", str(run.path), "--data", str(tmp_path / "x.npy"), "--iw", "2", "--out", str(tmp_path / "s.csv"),
            "--plot", str(tmp_path / "p.png"), "--reference-limit", "20", "--device", "cpu"]  # fmt: skip
    sys.setprofile(profile)
    try:
        rc = main(args)
    finally:
        sys.setprofile(None)
    assert rc == 0, capsys.readouterr().err
    assert from_cli == ["workflows.py:score_run"] and workflow_entries == 1, (from_cli, workflow_entries)
    assert "ROC AUC" in capsys.readouterr().out
