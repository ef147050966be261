"""A PyTorch user's hands (issue 19): in-memory data and image folders end to end, save_model and
export_decoder on an in-memory model, --threads, per-epoch images, and the missing-extra line."""

import json
import sys

import numpy as np
import pytest
import torch

import fastvae
from fastvae.cli import main
from fastvae.errors import DISTRIBUTION, FastVAEError, require
from fastvae.runs import load_run

TINY = dict(epochs=1, batch_size=10, hidden_dims=(8,), latent_dim=2, device="cpu", progress=False, threads=1)


def test_train_on_an_array_records_a_description_and_needs_the_data_again(tmp_path):
    x = (np.random.default_rng(0).random((60, 4, 4)) > 0.5).astype(np.float32)
    result = fastvae.train(data=x, out=str(tmp_path / "run"), images_every=1, **TINY)
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert doc["train"]["data"] == "<array (60, 4, 4) float32>"
    assert (tmp_path / "run" / "images" / "samples-epoch-001.png").is_file()
    assert result.model.config.data_shape == (4, 4)
    with pytest.raises(FastVAEError, match="in-memory data <array"):
        load_run(tmp_path / "run")
    assert len(load_run(tmp_path / "run", data=torch.from_numpy(x)).test) == 6
    with pytest.raises(FastVAEError, match="--resume with a different data"):
        fastvae.train(data=x[:50], out=str(tmp_path / "run"), resume=True, **{**TINY, "epochs": 2})


def test_cli_trains_and_evaluates_a_folder_of_images(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    out = str(tmp_path / "run")
    args = ["train", "--data", str(tmp_path / "imgs"), "--image-size", "6,5", "--grayscale", "--epochs", "1",
            "--batch-size", "9", "--hidden-dims", "8", "--latent-dim", "2", "--device", "cpu", "--quiet",
            "--threads", "1", "--out", out]  # fmt: skip
    assert main(args) == 0
    assert fastvae.load_model(out).config.data_shape == (6, 5)
    assert main(["eval", out, "--iw", "0", "--threads", "1"]) == 0
    assert "test -ELBO" in capsys.readouterr().out
    assert main([*args[:4], "--epochs", "1", "--out", str(tmp_path / "r2"), "--threads", "0"]) == 2


def test_save_model_round_trips_and_export_decoder_takes_a_model(tmp_path):
    model = fastvae.ReferenceVAE(fastvae.VAEConfig(input_dim=12, hidden_dims=(8,), latent_dim=3))
    fastvae.save_model(model, tmp_path / "m")
    back = fastvae.load_model(tmp_path / "m")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    with pytest.raises(FastVAEError, match="overwrite=True"):
        fastvae.save_model(model, tmp_path / "m")
    with pytest.raises(FastVAEError, match="expected a fastvae model"):
        fastvae.save_model(torch.nn.Linear(2, 2), tmp_path / "x")
    pytest.importorskip("onnxscript")
    from fastvae.export import Sampler, export_decoder

    export_decoder(model, tmp_path / "d.onnx")
    assert Sampler(tmp_path / "d.onnx").sample(5, seed=0).shape == (5, 12)


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(
        FastVAEError, match=rf"needs the optional package matplotlib: pip install '{DISTRIBUTION}\[plot\]'"
    ):
        require("matplotlib", "this figure")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    from fastvae.export.runtime import OnnxPart

    with pytest.raises(FastVAEError, match=r"\[export\]'.*-runtime"):
        OnnxPart("x.onnx")


def test_threads_default_and_flag(monkeypatch):
    from fastvae.backends import set_threads
    from fastvae.config import DEFAULT_THREADS, TrainConfig, default_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert default_threads() == DEFAULT_THREADS == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert default_threads() == 2
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(FastVAEError, match="threads must be an integer >= 1"):
            TrainConfig(threads=0)
    finally:
        torch.set_num_threads(before)
