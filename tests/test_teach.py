"""The teaching tools: the classifier-judged quality scores, attribute editing and ``fastvae compare``."""

import numpy as np
import pytest
import torch

from fastvae import ReferenceVAE, VAEConfig, train
from fastvae.cli import main
from fastvae.data import load_dataset, unit_float
from fastvae.edit import attribute_direction, edit
from fastvae.quality import frechet_distance, gaussian_stats, judge, load_classifier

TINY_MNIST = {"data": "mnist", "hidden_dims": (32,), "latent_dim": 2, "max_steps": 40, "batch_size": 100,
              "device": "cpu", "progress": False, "backend": "torch", "eval_batch_size": 2000}  # fmt: skip


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory):
    """The classifier trained once for this module, in a private cache folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTVAE_CACHE", str(tmp_path_factory.mktemp("cache")))
    mnist = load_dataset("mnist")
    clf, acc = load_classifier(mnist)
    yield mnist, clf, acc
    mp.undo()


def test_frechet_distance_equals_the_closed_form_for_commuting_covariances():
    """For S_a = Q diag(a) Q^T and S_b = Q diag(b) Q^T: |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a, b = (
        torch.rand(6, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(6, generator=g, dtype=torch.float64),
    )
    mu_a, mu_b = (
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    got = frechet_distance((mu_a, q @ torch.diag(a) @ q.T), (mu_b, q @ torch.diag(b) @ q.T))
    want = ((mu_a - mu_b) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert got == pytest.approx(want.item(), rel=1e-10)
    assert frechet_distance(
        (mu_a, q @ torch.diag(a) @ q.T), (mu_a, q @ torch.diag(a) @ q.T)
    ) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.slow
def test_scores_separate_real_digits_from_noise_and_scrambled_digits(judge_cache):
    mnist, clf, acc = judge_cache
    assert acc >= 0.95
    real = torch.from_numpy(unit_float(mnist.x_test))
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    reference = gaussian_stats(clf.features(real[perm[:5000]]).detach())
    g = torch.Generator().manual_seed(1)
    held_out = real[perm[5000:]]
    noise = torch.rand(5000, 784, generator=g)
    scrambled = torch.stack([x[torch.randperm(784, generator=g)] for x in held_out])  # same ink, no digit
    s_real, s_noise, s_scr = (judge(clf, x, reference) for x in (held_out, noise, scrambled))
    assert s_real.mnist_fd < 2.0
    assert min(s_noise.mnist_fd, s_scr.mnist_fd) > 50 * s_real.mnist_fd
    assert s_real.confidence > 0.95 and s_real.entropy_bits > 3.3
    assert max(s_noise.entropy_bits, s_scr.entropy_bits) < s_real.entropy_bits - 0.5  # a few classes only
    load_classifier(mnist)  # the cached judge is the same network
    cached, _ = load_classifier(mnist)
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), clf.state_dict().values()))


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_attribute_direction_recovers_a_known_linear_attribute(model):
    """x = A z + noise; the attribute is z_0 > 0. Moving codes along the recovered direction must move
    decoded images along A e_0 (the attribute's true direction in data space): cosine >= 0.9."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 3, generator=g)
    z = torch.randn(4000, 3, generator=g)
    x = z @ a.T + 0.05 * torch.randn(4000, 16, generator=g)
    torch.manual_seed(0)
    cfg = VAEConfig(input_dim=16, hidden_dims=(64,), latent_dim=3, activation="tanh", likelihood="gaussian")
    net = ReferenceVAE(cfg.replace(model=model))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(800):
        idx = torch.randint(4000, (200,), generator=g)
        loss = net.objective(x[idx]).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    direction = attribute_direction(net, x, z[:, 0] > 0)
    moves = torch.stack([(s[2] - s[1]) for s in (edit(net, x[i], direction, [1.0]) for i in range(50))])
    true = a[:, 0]
    cos = torch.nn.functional.cosine_similarity(moves.mean(0), true, dim=0)
    assert cos >= 0.9, cos
    wrong = attribute_direction(net, x, z[:, 1] > 0)  # another attribute points elsewhere
    moves_wrong = torch.stack([(s[2] - s[1]) for s in (edit(net, x[i], wrong, [1.0]) for i in range(50))])
    assert torch.nn.functional.cosine_similarity(moves_wrong.mean(0), true, dim=0).abs() < 0.6


def cli(argv) -> int:
    return main([str(a) for a in argv])


def fails_cleanly(capsys, argv, match):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastvae: error:") and match in err[0], err


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ae = train(out=str(root / "ae"), model="ae", **TINY_MNIST).out
    vae = train(out=str(root / "vae"), **TINY_MNIST).out
    return ae, vae


def test_compare_and_quality_run_end_to_end(tmp_path, capsys, judge_cache, mnist_runs, tiny_npz):
    ae, vae = mnist_runs
    out, tab = tmp_path / "cmp.png", tmp_path / "cmp.md"
    assert main(["compare", str(ae), str(vae), "--out", str(out), "--table", str(tab), "-n", "300",
                 "--names", "AE,VAE", "--device", "cpu"]) == 0  # fmt: skip
    text = tab.read_text()
    assert out.stat().st_size > 10_000 and "| AE | AE | 2 | n/a |" in text and "| VAE | VAE | 2 |" in text
    assert "MNIST-FD" in text and "judge's test accuracy" in text
    assert main(["quality", str(vae), "-n", "200", "--device", "cpu"]) == 0
    assert "prior samples" in capsys.readouterr().out
    other = train(out=str(tmp_path / "strokes"), data=str(tiny_npz), hidden_dims=(8,), latent_dim=2, max_steps=5,
                  batch_size=50, device="cpu", progress=False, backend="torch").out  # fmt: skip
    assert main(["quality", str(other), "--device", "cpu"]) == 0
    assert "unavailable" in capsys.readouterr().out
    fails_cleanly(capsys, ["compare", ae, "--out", out], "at least two")
    fails_cleanly(capsys, ["compare", ae, tmp_path / "nope", "--out", out], "no such run directory")
    fails_cleanly(capsys, ["compare", ae, other, "--out", out], "same data")
    fails_cleanly(capsys, ["compare", ae, vae, "--names", "a", "--out", out], "--names")


def test_edit_runs_end_to_end_and_fails_cleanly(tmp_path, capsys, mnist_runs, tiny_npz):
    _, vae = mnist_runs
    out = tmp_path / "edit.png"
    assert cli(["edit", vae, "--image", "3", "--attribute", "label=3->8", "--strength", "-1,1,2", "--out", out,
                 "--device", "cpu"]) == 0  # fmt: skip
    from PIL import Image

    assert Image.open(out).size == (3 * (5 * 30 + 2), 3 * 32)  # a strip of 2 + 3 images, 3x scale
    ink = unit_float(load_dataset("mnist").x_test).sum(1)
    thick = ink > np.median(ink)
    csv = tmp_path / "attrs.csv"
    csv.write_text("thick,other\n" + "".join(f"{int(t)},x\n" for t in thick))
    npy = tmp_path / "attrs.npy"
    np.save(npy, np.where(thick, 1, -1))  # CelebA's 1/-1
    for f in (csv, npy):
        assert cli(["edit", vae, "--image", "0", "--attributes", f, "--attribute", "thick", "--out", out,
                     "--device", "cpu"]) == 0  # fmt: skip
    base = ["edit", vae, "--image", "0", "--out", out, "--device", "cpu"]
    fails_cleanly(capsys, [*base, "--attribute", "label=3"], "expected label=A->B")
    fails_cleanly(capsys, [*base, "--attribute", "label=3->42"], "no test image is labelled 42")
    fails_cleanly(capsys, [*base, "--attribute", "label=3->8", "--strength", "1,x"], "--strength")
    fails_cleanly(capsys, [*base, "--attributes", csv, "--attribute", "smiling"], "no column 'smiling'")
    fails_cleanly(capsys, [*base, "--attributes", csv, "--attribute", "other"], "not a boolean")
    short = tmp_path / "short.csv"
    short.write_text("thick\n1\n0\n")
    fails_cleanly(capsys, [*base, "--attributes", short, "--attribute", "thick"], "2 rows")
    fails_cleanly(capsys, ["edit", vae, "--image", "99999", "--attribute", "label=3->8", "--out", out],
                  "not a test image index")  # fmt: skip
    unlabelled = train(out=str(tmp_path / "strokes"), data=str(tiny_npz), hidden_dims=(8,), latent_dim=2,
                       max_steps=5, batch_size=50, device="cpu", progress=False, backend="torch").out  # fmt: skip
    capsys.readouterr()
    fails_cleanly(capsys, ["edit", unlabelled, "--image", "0", "--attribute", "label=1->2", "--out", out],
                  "no test labels")  # fmt: skip
