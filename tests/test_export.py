"""ONNX export and the torch-free sampler."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fastvae import TrainConfig, load_model, train
from fastvae.errors import FastVAEError
from fastvae.export import Sampler, export_decoder, export_parts
from fastvae.export import onnx_export as ox
from fastvae.runs import load_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("export") / "run"
    train(TrainConfig(data=str(tiny_npz), hidden_dims=(32,), latent_dim=4, epochs=3, batch_size=50, lr=5e-3,
                      device="cpu", out=str(out), progress=False, backend="torch"))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def onnx_path(run_dir, tmp_path_factory):
    return export_decoder(run_dir, tmp_path_factory.mktemp("onnx") / "decoder.onnx").path


@pytest.mark.slow
def test_export_graph_metadata_and_numbers(run_dir, onnx_path):
    m = onnx.load(str(onnx_path))
    assert not Path(str(onnx_path) + ".data").exists()  # one self-contained file
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, out.name) == ("z", "x_prob")
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = {p.key: p.value for p in m.metadata_props}
    assert (
        meta["latent_dim"] == "4"
        and json.loads(meta["data_shape"]) == [8, 8]
        and meta["likelihood"] == "bernoulli"
    )
    assert float(meta["test_elbo"]) > 0 and json.loads(meta["config"])["hidden_dims"] == [32]
    # a second, independent runtime: ONNX's pure-Python reference evaluator, against the PyTorch model
    from onnx.reference import ReferenceEvaluator

    model = load_model(run_dir)
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    (got,) = ReferenceEvaluator(m).run(None, {"z": z})
    with torch.inference_mode():
        ref = torch.sigmoid(model.decode(torch.from_numpy(z))).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_failed_check_deletes_the_file(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ox, "MAX_ABS_DIFF", -1.0)
    out = tmp_path / "bad.onnx"
    with pytest.raises(FastVAEError, match="differs from PyTorch"):
        export_decoder(run_dir, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int8_export_records_its_error_and_refuses_a_bad_one(run_dir, tmp_path, monkeypatch):
    res = export_decoder(run_dir, tmp_path / "q.onnx", int8=True)
    meta = res.metadata
    assert 0 < float(meta["int8_max_prob_error"]) < 0.5
    assert float(meta["int8_test_elbo_change"]) <= 1.0
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(res.path)).graph.node)
    monkeypatch.setattr(ox, "INT8_MAX_ELBO_INCREASE", -1e9)
    with pytest.raises(FastVAEError, match="worsens the test -ELBO"):
        export_decoder(run_dir, tmp_path / "refused.onnx", int8=True)
    assert not (tmp_path / "refused.onnx").exists()


def test_sampler_reproducible_chunked_and_matches_torch(run_dir, onnx_path):
    s = Sampler(onnx_path, threads=1)
    a, b, c = s.sample(2500, seed=3), s.sample(2500, seed=3), s.sample(10, seed=4)
    assert a.shape == (2500, 64) and np.array_equal(a, b) and not np.array_equal(a[:10], c)
    z = np.random.default_rng(3).standard_normal((2500, 4), dtype=np.float32)
    with torch.inference_mode():
        ref = torch.sigmoid(load_model(run_dir).decode(torch.from_numpy(z))).numpy()
    np.testing.assert_allclose(a, ref, atol=1e-5)  # chunks of 1024 rows, reassembled in order
    pix = s.sample(50, seed=1, bernoulli=True)
    assert set(np.unique(pix)) <= {0.0, 1.0}


def test_sampler_bad_input(onnx_path, tmp_path):
    with pytest.raises(FastVAEError, match="no such model file"):
        Sampler(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(FastVAEError, match="not a loadable ONNX model"):
        Sampler(junk)
    bare = onnx.load(str(onnx_path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(FastVAEError, match="not a fastvae decoder"):
        Sampler(tmp_path / "bare.onnx")
    s = Sampler(onnx_path)
    for n in (0, -3):
        with pytest.raises(FastVAEError, match="positive integer"):
            s.sample(n)
    with pytest.raises(FastVAEError, match=r"shape \(N, 4\)"):
        s.decode(np.zeros((3, 5), np.float32))


def _run_sampler(python, args, env=None, cwd=None):
    return subprocess.run([python, "-m", "fastvae.export.sample", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)  # fmt: skip


def test_sampler_cli_without_torch(onnx_path, tmp_path, no_torch_env):
    """Runs with torch made unimportable, and checks sys.modules afterwards."""
    env = no_torch_env
    png = tmp_path / "grid.png"
    proc = _run_sampler(sys.executable, [onnx_path, "-n", 16, "--seed", 0, "--out", png], env)
    assert proc.returncode == 0, proc.stderr
    assert "NO_TORCH" in proc.stderr and png.read_bytes()[:4] == b"\x89PNG"
    bad = _run_sampler(sys.executable, [onnx_path, "-n", 0, "--out", png], env)
    assert bad.returncode == 2 and bad.stderr.count("\n") <= 2 and "positive integer" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTVAE_SKIP_VENV") == "1", reason="FASTVAE_SKIP_VENV=1")
def test_sampler_in_a_venv_with_only_numpy_onnxruntime_pillow(run_dir, onnx_path, tmp_path):
    """The deployment story: a fresh venv, the runtime distribution (runtime/, fastvae-engine-runtime) built
    here and installed with its own dependencies only (numpy, onnxruntime, Pillow); pip check passes and the
    sampler, the encoder and the scorer run there."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"  # built by this interpreter (which has setuptools)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT / "runtime")], check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("fastvae_engine_runtime-*.whl")
    deps = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=600)
    if deps.returncode != 0:
        pytest.skip(f"no package registry reachable: {deps.stderr.strip().splitlines()[-1:]}")
    pip_check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)
    assert pip_check.returncode == 0, pip_check.stdout + pip_check.stderr
    check = subprocess.run([py, "-c", "import torch"], capture_output=True)
    assert check.returncode != 0  # torch really is absent
    png = tmp_path / "venv.png"
    proc = _run_sampler(
        py, [onnx_path, "-n", 8, "--seed", 1, "--out", png], cwd=tmp_path
    )  # not the repo root
    assert proc.returncode == 0, proc.stderr
    code = ("import sys, fastvae.export.sample as s; s.Sampler(sys.argv[1]).sample(4, 0);"
            "assert 'torch' not in sys.modules; print('ok')")  # fmt: skip
    out = subprocess.run([py, "-c", code, str(onnx_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
    # the encoder and the scorer (with IW) too, on a .npy of uint8 images
    enc, sc = (export_parts(run_dir, tmp_path / f"{p}.onnx", p, iw=4 if p == "scorer" else 0)[0].path
               for p in ("encoder", "scorer"))  # fmt: skip
    x = (load_run(run_dir).test_images(0, 9, raw=True).numpy() * 255).round().astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    for module, model, out_file in (("encode", enc, "mu.npy"), ("score", sc, "s.csv")):
        proc = subprocess.run([py, "-m", f"fastvae.export.{module}", str(model), str(tmp_path / "x.npy"), "--out",
                               str(tmp_path / out_file)], capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "mu.npy").shape == (9, 4)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "index,neg_elbo,rec,kl,iw_nll"
    code = ("import sys, numpy as np, fastvae.export as e; e.Scorer(sys.argv[1]).score(np.zeros((2, 64)));"
            "e.Encoder(sys.argv[2]).encode(np.zeros((2, 64))); assert 'torch' not in sys.modules; print('ok')")  # fmt: skip
    out = subprocess.run([py, "-c", code, str(sc), str(enc)], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
    # exporting is the full package's: one ImportError line (also a FastVAEError) says so
    code = ("from fastvae.errors import FastVAEError\ntry:\n    from fastvae.export import export_decoder\n"
            "except ImportError as exc:\n    assert isinstance(exc, FastVAEError)\n    print(exc)")  # fmt: skip
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.count("\n") == 1 and "full fastvae package" in out.stdout, out
