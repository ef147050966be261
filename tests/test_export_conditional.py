"""A conditional VAE's ONNX parts take labels y (issue 16): decoder (z, y), encoder (x, y), scorer (x, eps
[, eps_iw], y), checked against the float64 PyTorch model; the torch-free sampler's --label."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fastvae.config import TrainConfig
from fastvae.export.encode import Encoder
from fastvae.export.onnx_export import export_parts
from fastvae.export.sample import Sampler
from fastvae.export.score import Scorer
from fastvae.runs import load_model
from fastvae.trainer import train

CLASSES = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, 300)
    x = np.zeros((300, 6, 6), np.uint8)
    for i, label in enumerate(y):  # the label decides where the bright row is
        x[i, 2 * label : 2 * label + 2] = 255
    data = tmp_path_factory.mktemp("cdata") / "rows.npz"
    np.savez(data, x_train=x[:240], x_test=x[240:], y_train=y[:240], y_test=y[240:])
    out = tmp_path_factory.mktemp("crun") / "run"
    train(TrainConfig(data=str(data), hidden_dims=(16,), latent_dim=2, epochs=2, batch_size=40, lr=5e-3,
                      device="cpu", progress=False, out=str(out), conditional=True))  # fmt: skip
    return out, data


@pytest.fixture(scope="module")
def parts(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cparts")
    res = export_parts(run_dir[0], d, "all", iw=4, int8=False)
    return {r.part: r.path for r in res}


@pytest.mark.slow
def test_parts_take_labels_and_record_classes(parts):
    for part, path in parts.items():
        s = {"decoder": Sampler, "encoder": Encoder, "scorer": Scorer}[part](path)
        assert s.classes == CLASSES and s.session.get_inputs()[-1].name == "y", part


def test_decoder_and_encoder_equal_the_float64_model(run_dir, parts):
    model = load_model(run_dir[0]).double()
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(9, 2, generator=g), torch.randint(0, CLASSES, (9,), generator=g)
    with torch.no_grad():
        ref = torch.sigmoid(model.decode(z.double(), y)).numpy()
    got = Sampler(parts["decoder"]).decode(z.numpy(), y.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-5)
    x = torch.rand(9, 36, generator=g)
    with torch.no_grad():
        mu, logvar = model.encode(x.double(), y)
    got_mu, got_lv = Encoder(parts["encoder"]).encode(x.numpy(), y.numpy())
    np.testing.assert_allclose(got_mu, mu.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_lv, logvar.numpy(), rtol=1e-5, atol=1e-5)
    # the label is an input, not ignored: another label decodes another image
    other = Sampler(parts["decoder"]).decode(z.numpy(), ((y + 1) % CLASSES).numpy())
    assert np.abs(other - got).max() > 1e-3


def test_scorer_bounds_minus_log_p_x_given_y(run_dir, parts):
    from fastvae.evaluate import elbo_terms_by_row, iw_bound_by_row

    model = load_model(run_dir[0])
    with np.load(run_dir[1]) as f:
        x = torch.from_numpy(f["x_test"][:20].reshape(20, -1).astype(np.float32) / 255)
        y = torch.from_numpy(f["y_test"][:20])
    rows = torch.arange(20)
    scores = Scorer(parts["scorer"]).score(x.numpy(), 0, y=y.numpy())
    np.testing.assert_allclose(
        scores["neg_elbo"], elbo_terms_by_row(model, x, rows, 0, y).neg_elbo, rtol=1e-5
    )
    np.testing.assert_allclose(scores["iw_nll"], iw_bound_by_row(model, x, rows, 4, 0, y), rtol=1e-5)


def test_sampler_label_cli_without_torch(parts, tmp_path, no_torch_env):
    cmd = [sys.executable, "-m", "fastvae.export.sample", str(parts["decoder"]), "-n", "6", "--seed", "1"]
    proc = subprocess.run([*cmd, "--label", "2", "--npy", str(tmp_path / "s.npy")], capture_output=True,
                          text=True, env=no_torch_env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = Sampler(parts["decoder"]).sample(6, 1, label=2)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), want)
    bad = subprocess.run([*cmd, "--label", "3", "--out", str(tmp_path / "s.png")], capture_output=True,
                         text=True, env=no_torch_env, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "label must be an integer in 0..2" in bad.stderr
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln not in ("NO_TORCH", "TORCH_LOADED")]
    assert len(lines) == 1 and "NO_TORCH" in proc.stderr and "NO_TORCH" in bad.stderr


def test_labels_are_checked_before_the_graph(parts):
    from fastvae.errors import FastVAEError

    s = Sampler(parts["decoder"])
    z = np.zeros((2, 2), np.float32)
    with pytest.raises(FastVAEError, match="needs labels"):
        s.decode(z)
    with pytest.raises(FastVAEError, match="in 0..2"):
        s.decode(z, np.array([0, 5]))
    with pytest.raises(FastVAEError, match="2 integers"):
        s.decode(z, np.array([0.5, 1.0]))


def test_encoder_cli_with_truncated_labels_or_inputs_is_one_line(run_dir, parts, tmp_path, no_torch_env):
    with np.load(run_dir[1]) as f:
        x, y = f["x_test"][:20], f["y_test"][:20]
    np.savez(tmp_path / "in.npz", x=x)
    np.savez(tmp_path / "labels.npz", y=y)
    np.savez(tmp_path / "both.npz", x=x, y=y)
    cmd = [sys.executable, "-m", "fastvae.export.encode", str(parts["encoder"])]
    ok = subprocess.run([*cmd, str(tmp_path / "in.npz"), "--labels", str(tmp_path / "labels.npz"), "--out",
                         str(tmp_path / "mu.npy")], capture_output=True, text=True, env=no_torch_env, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    np.testing.assert_allclose(np.load(tmp_path / "mu.npy"), Encoder(parts["encoder"]).encode(x, y)[0], atol=1e-6)
    for name in ("labels.npz", "both.npz"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) - 40])
    for args in (["in.npz", "--labels", "labels.npz"], ["both.npz"]):
        bad = subprocess.run([*cmd, *(str(tmp_path / a) if a.endswith(".npz") else a for a in args), "--out",
                              str(tmp_path / "b.npy")], capture_output=True, text=True, env=no_torch_env, timeout=120)  # fmt: skip
        lines = [ln for ln in bad.stderr.strip().splitlines() if ln not in ("NO_TORCH", "TORCH_LOADED")]
        assert bad.returncode == 2 and len(lines) == 1 and "not a readable NumPy file" in lines[0], bad.stderr
        assert "NO_TORCH" in bad.stderr
    assert not (tmp_path / "b.npy").exists()


def test_encoder_cli_takes_labels_from_class_subfolders(run_dir, parts, tmp_path, no_torch_env):
    """A folder in class subfolders is labelled as training labels it: the i-th sorted subfolder is y = i."""
    from PIL import Image

    with np.load(run_dir[1]) as f:
        x, y = f["x_test"][:12], f["y_test"][:12]
    order = np.argsort(y, kind="stable")  # the folder's order: by class, then by name
    for j, i in enumerate(order):
        (tmp_path / "imgs" / f"class{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(tmp_path / "imgs" / f"class{y[i]}" / f"{j:03d}.png")
    cmd = [sys.executable, "-m", "fastvae.export.encode", str(parts["encoder"]), str(tmp_path / "imgs")]
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "mu.npy")], capture_output=True, text=True,
                        env=no_torch_env, timeout=120)  # fmt: skip
    assert ok.returncode == 0 and "NO_TORCH" in ok.stderr, ok.stderr
    want = Encoder(parts["encoder"]).encode(x[order], y[order])[0]
    np.testing.assert_allclose(np.load(tmp_path / "mu.npy"), want, atol=1e-6)
