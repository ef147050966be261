"""ONNX export of the encoder and the scorer, their torch-free runtimes, and the shared IW math."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch.distributions import Bernoulli, Normal, kl_divergence

from fastvae import TrainConfig, load_model, train
from fastvae.errors import FastVAEError
from fastvae.export import Encoder, Scorer, export_parts, keyed_noise
from fastvae.export import onnx_export as ox
from fastvae.model import iw_log_weights, iw_nll
from fastvae.runs import load_run

K = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("parts") / "run"
    train(TrainConfig(data=str(tiny_npz), hidden_dims=(32,), latent_dim=4, epochs=3, batch_size=50, lr=5e-3,
                      device="cpu", out=str(out), progress=False, backend="torch"))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def parts(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    res = export_parts(run_dir, d, "all", iw=K)
    return {r.part: r.path for r in res}


def _ref64(run_dir, x: torch.Tensor, eps: torch.Tensor, eps_iw: torch.Tensor):
    """-ELBO, rec, KL and IW NLL in float64 with torch.distributions: independent of the model's own math."""
    m = load_model(run_dir).double()
    x = x.double()
    with torch.no_grad():
        mu, logvar = m.encode(x)
        q = Normal(mu, torch.exp(0.5 * logvar))
        prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
        z = mu + q.scale * eps.double()
        rec = -Bernoulli(logits=m.decode(z)).log_prob(x).sum(-1)
        kl = kl_divergence(q, prior).sum(-1)
        zk = mu[:, None] + q.scale[:, None] * eps_iw.double()  # (B, K, Z)
        lik = Bernoulli(logits=m.decode(zk)).log_prob(x[:, None]).sum(-1)
        log_w = (
            lik
            + Normal(0.0, 1.0).log_prob(zk).sum(-1)
            - Normal(mu[:, None], q.scale[:, None]).log_prob(zk).sum(-1)
        )
        iw = -(torch.logsumexp(log_w, 1) - math.log(eps_iw.shape[1]))
    return {"neg_elbo": rec + kl, "rec": rec, "kl": kl, "iw_nll": iw}


def test_keyed_noise_in_numpy_is_fastvae_noise_bit_for_bit():
    from fastvae import evaluate, noise

    assert (keyed_noise.EVAL_SALT, keyed_noise.IW_SALT) == (evaluate.EVAL_SALT, evaluate.IW_SALT)
    rows = np.array([0, 1, 2, 999, 2**33 + 5, 10**15])
    for seed, width, col0 in [(0, 4, 0), (7, 300, 0), (123, 5, 41)]:
        ref = noise.row_normal(seed, 17, torch.from_numpy(rows), width, col0).numpy()
        assert np.array_equal(keyed_noise.row_normal(seed, 17, rows, width, col0), ref)
    assert keyed_noise.mix(3, 9) == noise.mix(3, 9)


def test_iw_helpers_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g).double()
    eps = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * eps
    lik = torch.randn(5, 7, generator=g, dtype=torch.float64)
    q = Normal(mu[:, None], torch.exp(0.5 * logvar)[:, None])
    ref = lik + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    got = iw_log_weights(lik, z, eps, logvar[:, None])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    direct = -torch.log(torch.exp(ref).mean(1))
    torch.testing.assert_close(iw_nll(got), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_parts_graph_metadata(parts):
    for part, path in parts.items():
        m = onnx.load(str(path))
        assert not Path(str(path) + ".data").exists()
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 18
        assert all(i.type.tensor_type.shape.dim[0].dim_param for i in m.graph.input)  # dynamic batch
        meta = {p.key: p.value for p in m.metadata_props}
        assert meta["part"] == part and meta["latent_dim"] == "4" and float(meta["test_elbo"]) > 0
    m = onnx.load(str(parts["scorer"]))
    assert [i.name for i in m.graph.input] == ["x", "eps", "eps_iw"]
    assert [o.name for o in m.graph.output] == ["neg_elbo", "rec", "kl", "iw_nll"]
    assert {p.key: p.value for p in m.metadata_props}["iw_k"] == str(K)


def test_encoder_matches_float64_pytorch_and_reference_evaluator(run_dir, parts):
    from onnx.reference import ReferenceEvaluator

    x = load_run(run_dir).test_images(0, 37).float()
    with torch.no_grad():
        mu64, logvar64 = (t.numpy() for t in load_model(run_dir).double().encode(x.double()))
    mu, logvar = Encoder(parts["encoder"], threads=1).encode(x.numpy())
    np.testing.assert_allclose(mu, mu64, atol=1e-5)
    np.testing.assert_allclose(logvar, logvar64, atol=1e-5)
    got = ReferenceEvaluator(onnx.load(str(parts["encoder"]))).run(None, {"x": x.numpy()[:5]})
    np.testing.assert_allclose(got[0], mu64[:5], atol=1e-5)
    u8 = (x.numpy() * 255).round().astype(np.uint8).reshape(-1, 8, 8)  # images as pixels: /255 inside
    np.testing.assert_allclose(Encoder(parts["encoder"]).encode(u8)[0], mu, atol=1e-6)


def test_scorer_matches_float64_distributions_and_fastvae_evaluation(run_dir, parts):
    from fastvae.evaluate import elbo_terms_by_row, iw_bound_by_row
    from fastvae.noise import row_normal

    run = load_run(run_dir)
    x = run.test_images(0, 50).float()
    rows = torch.arange(50)
    scorer = Scorer(parts["scorer"], threads=1)
    got = scorer.score(x.numpy())
    eps = row_normal(run.seed, keyed_noise.EVAL_SALT, rows, 4)
    eps_iw = row_normal(run.seed, keyed_noise.IW_SALT, rows, K * 4).view(50, K, 4)
    ref = _ref64(run_dir, x, eps, eps_iw)
    for name in ("neg_elbo", "rec", "kl", "iw_nll"):
        np.testing.assert_allclose(got[name], ref[name].numpy(), rtol=1e-5, atol=1e-4, err_msg=name)
    # the scores of a run's test images are those of its own evaluation
    np.testing.assert_allclose(
        got["neg_elbo"], elbo_terms_by_row(run.model, x, rows, run.seed).neg_elbo, rtol=1e-5
    )
    np.testing.assert_allclose(got["iw_nll"], iw_bound_by_row(run.model, x, rows, K, run.seed), rtol=1e-5)


def test_scorer_is_batch_invariant_and_seeded(parts, run_dir):
    x = load_run(run_dir).test_images(0, 40).float().numpy()
    s = Scorer(parts["scorer"])
    whole = s.score(x, seed=3)
    split = [s.score(x[:13], seed=3), s.score(x[13:], seed=3, row_offset=13)]
    for name in whole:
        np.testing.assert_array_equal(whole[name][13:], split[1][name])
        np.testing.assert_allclose(whole[name][:13], split[0][name], rtol=1e-6)
    assert not np.allclose(s.score(x, seed=4)["neg_elbo"], whole["neg_elbo"])


@pytest.mark.slow
def test_int8_scorer_both_ranges(run_dir, tmp_path):
    for rr in (False, True):
        res = ox.export_scorer(run_dir, tmp_path / f"s{rr}.onnx", int8=True, reduce_range=rr)
        meta = res.metadata
        assert meta["int8_reduce_range"] == str(rr).lower()
        assert abs(float(meta["int8_test_elbo_change"])) < 1.0 and float(meta["int8_max_score_error"]) < 5
        assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(res.path)).graph.node)
        x = load_run(run_dir).test_images(0, 20).float().numpy()
        assert np.isfinite(Scorer(res.path).score(x)["neg_elbo"]).all()


def test_bad_input(run_dir, parts, tmp_path):
    with pytest.raises(FastVAEError, match="not a encoder"):
        Encoder(parts["scorer"])
    with pytest.raises(FastVAEError, match="a fastvae decoder, not a scorer"):
        Scorer(parts["decoder"])
    with pytest.raises(FastVAEError, match="applies to the scorer only"):
        export_parts(run_dir, tmp_path / "e.onnx", "encoder", iw=3)
    with pytest.raises(FastVAEError, match="unknown part"):
        export_parts(run_dir, tmp_path / "e.onnx", "everything")
    with pytest.raises(FastVAEError, match="give a folder"):
        export_parts(run_dir, tmp_path / "all.onnx", "all")
    s = Scorer(parts["scorer"])
    with pytest.raises(FastVAEError, match=r"shape \(N, 64\)"):
        s.score(np.zeros((2, 63), np.float32))
    with pytest.raises(FastVAEError, match=r"\[0, 1\]"):
        s.score(np.full((2, 64), 3.0, np.float32))
    with pytest.raises(FastVAEError, match="NaN"):
        s.score(np.full((2, 64), np.nan, np.float32))
    assert not list(tmp_path.iterdir())  # nothing half-written


def _cli(module, args, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_clis_read_png_folders_and_npz_without_torch(run_dir, parts, tmp_path, no_torch_env):
    env = no_torch_env
    x = load_run(run_dir).test_images(0, 5, raw=True).float().numpy()
    u8 = (x * 255).round().astype(np.uint8).reshape(5, 8, 8)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, img in enumerate(u8):
        Image.fromarray(img).save(pngs / f"{i:03d}.png")
    np.savez(tmp_path / "in.npz", x=u8)
    p = _cli("fastvae.export.encode", [parts["encoder"], pngs, "--out", tmp_path / "mu.npy"], env)
    assert p.returncode == 0 and "NO_TORCH" in p.stderr, p.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "mu.npy"), Encoder(parts["encoder"]).encode(u8)[0], atol=1e-6
    )
    p = _cli("fastvae.export.score", [parts["scorer"], tmp_path / "in.npz", "--out", tmp_path / "s.csv"], env)
    assert p.returncode == 0 and "NO_TORCH" in p.stderr, p.stderr
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "index,neg_elbo,rec,kl,iw_nll" and len(lines) == 6
    want = Scorer(parts["scorer"]).score(u8)["neg_elbo"]
    np.testing.assert_allclose([float(r.split(",")[1]) for r in lines[1:]], want, rtol=1e-5)
    bad = _cli(
        "fastvae.export.score", [parts["scorer"], tmp_path / "missing.npy", "--out", tmp_path / "t.csv"], env
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") <= 2 and "no such file" in bad.stderr


@pytest.mark.slow
def test_fastvae_export_cli_all_parts(run_dir, tmp_path):
    from fastvae.cli import main

    assert main(["export", str(run_dir), "--part", "all", "--iw", "3", "--out", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "scorer.onnx",
    ]
    assert (
        main(["export", str(run_dir), "--part", "encoder", "--iw", "3", "--out", str(tmp_path / "e.onnx")])
        == 2
    )


def test_encoder_cli_reads_class_folders_jpegs_and_16bit_pngs(parts, tmp_path, no_torch_env):
    """The torch-free encoder reads a folder as training does (issue 28): class subfolders, JPEGs, and
    16-bit PNGs by their high byte, each compared with an independent decoding of its file."""
    from tests.test_data import png16

    rng = np.random.default_rng(7)
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    want = []
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "a" / "0.png")
    want.append(np.asarray(Image.open(folder / "a" / "0.png")))
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "a" / "1.jpg")
    want.append(np.asarray(Image.open(folder / "a" / "1.jpg").convert("L")))
    v = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    png16(folder / "b" / "2.png", v)
    want.append((v >> 8).astype(np.uint8))
    p = _cli("fastvae.export.encode", [parts["encoder"], folder, "--out", tmp_path / "mu.npy"], no_torch_env)
    assert p.returncode == 0 and "NO_TORCH" in p.stderr, p.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "mu.npy"), Encoder(parts["encoder"]).encode(np.stack(want))[0], atol=1e-6
    )
