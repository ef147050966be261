"""The VAE toolkit: interpolation, manifold, latent maps, anomaly scores, beta / warm-up / free bits,
and the Gaussian decoder, each checked against an independent computation."""

import csv
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest
import torch

from fastvae import FusedVAE, ReferenceVAE, TrainConfig, VAEConfig, load_model, train
from fastvae.toolkit import anomaly_scores, interpolate, manifold, most_active_dims, project_2d, roc_auc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("tk") / "run"
    train(TrainConfig(data=str(tiny_npz), hidden_dims=(64,), latent_dim=3, epochs=12, batch_size=50, lr=5e-3,
                      device="cpu", out=str(out), progress=False, backend="torch"))  # fmt: skip
    return out


def test_interpolation_is_the_decoded_straight_line(tiny_config):
    torch.manual_seed(0)
    model = ReferenceVAE(tiny_config)
    xa, xb = torch.rand(36), torch.rand(36)
    out = interpolate(model, xa, xb, steps=5)
    mu = model.encode(torch.stack([xa, xb]))[0]
    for i, t in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        expected = torch.sigmoid(model.decode(((1 - t) * mu[0] + t * mu[1])[None]))[0]
        torch.testing.assert_close(out[i], expected)


def test_manifold_grid_follows_the_normal_quantiles(tiny_config):
    model = ReferenceVAE(tiny_config)
    images, vals = manifold(model, n=4, dims=(0, 2), edge=0.05)
    q = [NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, 4)]
    np.testing.assert_allclose(vals.numpy(), q, atol=1e-5)
    z = torch.zeros(1, 3)
    z[0, 0], z[0, 2] = q[::-1][1], q[3]  # row 1 (second from the top), column 3
    torch.testing.assert_close(images[1 * 4 + 3], torch.sigmoid(model.decode(z))[0])
    assert most_active_dims([0.1, 3.0, 0.0, 2.0]) == [1, 3]


def test_projection_matches_numpy_pca():
    mu = torch.randn(200, 5) * torch.tensor([5.0, 1.0, 3.0, 0.1, 0.1])
    coords, axes = project_2d(mu)
    x = mu.double().numpy() - mu.double().numpy().mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    ref = x @ vt[:2].T
    for j in range(2):  # principal axes are defined up to sign
        c = coords[:, j].double().numpy()
        assert min(np.abs(c - ref[:, j]).max(), np.abs(c + ref[:, j]).max()) < 1e-4
    assert "principal components" in axes
    assert torch.equal(project_2d(mu[:, :2])[0], mu[:, :2])


def test_roc_auc_against_pairwise_count():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.integers(2, 8, 30).astype(float)  # with ties
    pairs = [(1.0 if y > x else 0.5 if y == x else 0.0) for x in a for y in b]
    assert roc_auc(a, b) == pytest.approx(np.mean(pairs))


def test_anomaly_scores_separate_noise_and_scrambled_images(trained, tiny_npz):
    model = load_model(trained)
    x = torch.from_numpy(np.load(tiny_npz)["x_test"].reshape(100, 64)).float() / 255
    x = x[x.sum(1) > 0]  # scrambling an empty image changes nothing
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(len(x), 64, generator=gen)
    scrambled = x[:, torch.randperm(64, generator=gen)]
    normal_elbo, normal_iw = anomaly_scores(model, x, k=50)
    for odd in (noise, scrambled):
        odd_elbo, odd_iw = anomaly_scores(model, odd, k=50)
        assert roc_auc(normal_elbo, odd_elbo) > 0.95
        assert roc_auc(normal_iw, odd_iw) > 0.95
        assert odd_iw.mean() > normal_iw.mean() + 5
    assert normal_iw.mean() < normal_elbo.mean()  # the IW bound is the tighter one (on average)


def test_free_bits_objective_and_fused_fallback(capfd):
    cfg = VAEConfig(input_dim=50, hidden_dims=(33,), latent_dim=5)
    torch.manual_seed(0)
    ref = ReferenceVAE(cfg)
    x, eps = torch.rand(37, 50), torch.randn(37, 5)
    objective, nelbo = ref(x, eps, beta=0.5, free_bits=0.2)
    mu, logvar = ref.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    rec = torch.nn.functional.binary_cross_entropy_with_logits(ref.decode(z), x, reduction="none").sum(-1)
    kl_d = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).mean(0)
    torch.testing.assert_close(objective, rec.mean() + 0.5 * torch.clamp(kl_d, min=0.2).sum())
    torch.testing.assert_close(nelbo, rec + (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum(-1))
    fused = FusedVAE(cfg)
    fused.load_state_dict(ref.state_dict())
    fo, _ = fused(x, eps, beta=0.5, free_bits=0.2)
    torch.testing.assert_close(fo, objective)
    assert "free bits" in capfd.readouterr().err


def test_kl_warmup_and_per_dim_kl_in_metrics(tmp_path, tiny_npz):
    res = train(TrainConfig(data=str(tiny_npz), hidden_dims=(16,), latent_dim=3, epochs=3, batch_size=50, beta=2.0,
                            kl_warmup_epochs=2, device="cpu", out=str(tmp_path / "r"), progress=False))  # fmt: skip
    assert [m["beta"] for m in res.metrics] == [1.0, 2.0, 2.0]
    for m in res.metrics:
        assert len(m["kl_per_dim"]) == 3 and m["active_units"] == sum(k > 0.01 for k in m["kl_per_dim"])
        assert m["test_kl"] == pytest.approx(sum(m["kl_per_dim"]), abs=1e-3)


def test_gaussian_decoder_recovers_a_known_likelihood():
    """Probabilistic PCA data x = W z + 0.3 e has log p(x) in closed form; the trained Gaussian VAE's
    IW estimate must come close to it from above."""
    torch.manual_seed(0)
    w = torch.tensor([[2.0], [-1.0], [0.5], [1.0]])
    x = torch.randn(3000, 1) @ w.T + 0.3 * torch.randn(3000, 4)
    true = -torch.distributions.MultivariateNormal(torch.zeros(4), w @ w.T + 0.09 * torch.eye(4)).log_prob(
        x[2500:]
    )
    model = ReferenceVAE(VAEConfig(input_dim=4, hidden_dims=(32,), latent_dim=1, activation="tanh",
                                   likelihood="gaussian"))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        loss = model.negative_elbo(x[torch.randint(0, 2500, (100,), generator=g)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    iw = model.importance_weighted_bound(x[2500:], 500, generator=g).mean().item()
    assert true.mean().item() - 0.05 < iw < true.mean().item() + 0.15, (iw, true.mean().item())
    assert model.sample(3).shape == (3, 4)  # the Gaussian mean


@pytest.mark.slow
def test_gaussian_training_on_grayscale_mnist_via_cli(tmp_path):
    out = tmp_path / "g"
    proc = subprocess.run([sys.executable, "-m", "fastvae", "train", "--likelihood", "gaussian", "--max-steps", "30",
                           "--device", "cpu", "--quiet", "--out", str(out), "--hidden-dims", "64", "--latent-dim", "4"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model = load_model(out)
    assert model.config.likelihood == "gaussian" and "output_logvar" in model.state_dict()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastvae", *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
def test_commands_end_to_end(trained, tiny_npz, tmp_path):
    for cmd, out in (("interpolate", "i.png"), ("manifold", "m.png"), ("latents", "l.png")):
        extra = ["--a", 0, "--b", 5] if cmd == "interpolate" else []
        proc = _cli(cmd, trained, *extra, "--out", tmp_path / out, "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / out).read_bytes()[:4] == b"\x89PNG"
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).random((7, 8, 8)).astype(np.float32))
    proc = _cli("score", trained, "--data", noise, "--iw", 10, "--out", tmp_path / "s.csv", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [int(r["index"]) for r in rows] == list(range(7)) and float(rows[0]["iw_nll_k10"]) > 0
    bad = _cli("interpolate", trained, "--a", 0, "--b", 10**6, "--device", "cpu")
    assert bad.returncode == 2 and "not a test image index" in bad.stderr and "Traceback" not in bad.stderr
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 5), np.float32))
    bad = _cli("score", trained, "--data", wrong, "--device", "cpu")
    assert bad.returncode == 2 and "model expects" in bad.stderr
