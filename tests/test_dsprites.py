"""The procedural dSprites: factor order, the rendering rule, the cache, the data hook, the .npz keys,
and the commands on a run trained on it (a tiny grid stands in for dsprites-small)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastvae import dsprites
from fastvae.errors import FastVAEError

TINY = dsprites.Grid("dsprites-tiny-test", ((0, 1, 2), (0, 5), (0, 10), (0, 31), (0, 16)))  # 48 images


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """dsprites-small replaced by a 48-image grid, cached under tmp_path."""
    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(dsprites.GRIDS, "dsprites-small", TINY)
    return TINY


def test_grid_sizes_and_factor_order():
    full, small = dsprites.GRIDS["dsprites"], dsprites.GRIDS["dsprites-small"]
    assert len(full) == 737_280 and len(small) == 3 * 6 * 40 * 8 * 8
    # posY fastest, then posX, orientation, scale, shape (the original's order)
    assert full.classes(np.array([1, 32, 32 * 32, 40 * 32 * 32, 6 * 40 * 32 * 32])).tolist() == [
        [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]  # fmt: skip
    rows = np.array([0, 7, 12_345, len(small) - 1])
    assert small.index(small.classes(rows)).tolist() == rows.tolist()
    assert set(small.classes(np.arange(64))[:, 4].tolist()) == set(range(0, 32, 4))
    vals = full.values(full.classes(np.array([len(full) - 1])))[0]
    assert vals == pytest.approx([3.0, 1.0, 2 * np.pi * 39 / 40, 1.0, 1.0])


def test_square_follows_the_written_rule():
    # square, scale 1, angle 0, centre 64 * (0.2 + 0.6 * pos) = (32, 32) at pos 0.5 (not a grid value:
    # shift the classes instead); half side 0.8 * 10 px: pixel centres x + 0.5 within 8 px of the centre
    img = dsprites.render(np.array([[0, 5, 0, 0, 0]]))[0]
    cx = cy = 64 * 0.2
    cols = np.flatnonzero(np.abs(np.arange(64) + 0.5 - cx) <= 8.0)
    rows = np.flatnonzero(np.abs(np.arange(64) + 0.5 - cy) <= 8.0)
    expected = np.zeros((64, 64), bool)
    expected[np.ix_(rows, cols)] = True
    assert (img == expected).all()


def test_rotations_and_positions():
    r = dsprites.render
    # a square turned by a quarter turn (class 10 of 40) is the same square
    assert (r(np.array([[0, 3, 10, 7, 20]])) == r(np.array([[0, 3, 0, 7, 20]]))).all()
    # an ellipse turned by a quarter turn about the image centre's diagonal: its transpose (posX = posY)
    e0, e90 = r(np.array([[1, 5, 0, 9, 9], [1, 5, 10, 9, 9]]))
    assert e0.sum() > 0 and (e90 == e0.T).all() and not (e0 == e0.T).all()
    # a heart: its lobes above its centre at angle 0 (the tip points down), below it after a half turn
    # (class 20), with the same area to within its edge pixels
    h0, h180 = r(np.array([[2, 5, 0, 0, 31], [2, 5, 20, 0, 31]]))
    cy = 64 * 0.8 - 0.5  # row of the centre for posY 1
    assert np.nonzero(h0)[0].mean() < cy - 0.5 and np.nonzero(h180)[0].mean() > cy + 0.5
    assert abs(int(h0.sum()) - int(h180.sum())) <= 0.1 * h0.sum()
    # posX moves the shape right by 64 * 0.6 px over its range, posY down
    a, b, d = r(np.array([[2, 5, 0, 0, 0], [2, 5, 0, 31, 0], [2, 5, 0, 0, 31]]))
    assert np.nonzero(b)[1].mean() - np.nonzero(a)[1].mean() == pytest.approx(38.4, abs=0.5)
    assert np.nonzero(d)[0].mean() - np.nonzero(a)[0].mean() == pytest.approx(38.4, abs=0.5)
    assert np.nonzero(d)[1].mean() == pytest.approx(np.nonzero(a)[1].mean(), abs=0.5)


def test_cache_round_trip_and_damaged_file(tiny):
    packed = dsprites.packed_images("dsprites-small")
    assert packed.shape == (48, 512) and packed.dtype == np.uint8
    expected = dsprites.render(tiny.classes(np.arange(48)))
    assert (np.unpackbits(packed, axis=1).reshape(48, 64, 64).astype(bool) == expected).all()
    path = dsprites._cache_path(tiny)
    assert path.is_file()
    path.write_bytes(b"not numpy")
    assert (dsprites.packed_images("dsprites-small") == packed).all()  # re-rendered, replaced


def test_load_dataset_hook(tiny):
    from fastvae.data import load_array, load_dataset

    d = load_dataset("dsprites-small")
    assert d.x_train.shape == (43, 64, 64) and d.x_test.shape == (5, 64, 64) and d.x_train.dtype == np.uint8
    assert set(np.unique(d.x_train).tolist()) == {0, 255}
    train, test = dsprites.split_rows(tiny)
    assert d.y_test.tolist() == tiny.classes(test)[:, 0].tolist()  # label = the shape class
    assert (load_array("dsprites-small") == d.x_test).all()
    fd = dsprites.load_factor_data("dsprites-small")
    assert (fd.factors_test == tiny.classes(test)).all()


def test_npz_has_the_original_keys(tiny, tmp_path):
    path = dsprites.write_npz(tmp_path / "d.npz", "dsprites-small")
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["imgs", "latents_classes", "latents_values", "metadata"]
        assert f["imgs"].shape == (48, 64, 64) and f["imgs"].max() == 1
        assert f["latents_classes"].shape == (48, 6) and (f["latents_classes"][:, 0] == 0).all()
        assert f["latents_values"][:, 1].tolist() == (tiny.classes(np.arange(48))[:, 0] + 1).tolist()
        meta = json.loads(str(f["metadata"]))
    assert meta["latents_names"] == ["color", "shape", "scale", "orientation", "posX", "posY"]


def test_bad_input_is_one_line(monkeypatch):
    import fastvae.limits

    monkeypatch.setattr(fastvae.limits, "available_bytes", lambda: 1 << 20)
    with pytest.raises(FastVAEError, match="dsprites-small") as e:
        dsprites.load_factor_data("dsprites")
    assert "\n" not in str(e.value)
    with pytest.raises(FastVAEError, match="unknown factor 'colour'"):
        dsprites.factor_index("colour")
    assert dsprites.factor_index("POSX") == 3
    with pytest.raises(FastVAEError, match="unknown dSprites grid"):
        dsprites.grid("dsprites-large")


@pytest.mark.slow  # ~15 s alone, ~50 s on a shared 2-core machine: train, disentangle, traverse, edit
def test_commands_on_a_dsprites_run(tiny, tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from fastvae.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--data", "dsprites-small", "--hidden-dims", "8", "--latent-dim", "3",
                 "--batch-size", "8", "--max-steps", "3", "--device", "cpu", "--out", run, "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["disentangle", run, "-n", "40", "--n-test", "20", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["mig"] <= 1.0 and 0.0 <= out["sap"] <= 1.0
    assert [r["factor"] for r in out["factors"]] == list(dsprites.FACTORS) and len(out["kl_per_dim"]) == 3
    png = str(tmp_path / "t.png")
    assert main(["traverse", run, "-n", "40", "--steps", "4", "--out", png, "--device", "cpu"]) == 0
    assert (tmp_path / "t.png").stat().st_size > 0
    assert main(["edit", run, "--factor", "posX", "--image", "1", "--strength", "-1,1", "--measure", "3",
                 "--out", str(tmp_path / "e.png"), "--device", "cpu"]) == 0  # fmt: skip
    assert "posX" in capsys.readouterr().out
    assert main(["edit", run, "--factor", "colour", "--image", "1", "--out", str(tmp_path / "e.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_disentangle_refuses_a_run_without_factor_labels(tmp_path, capsys):
    from fastvae.cli import main
    from fastvae.config import VAEConfig
    from fastvae.model import ReferenceVAE
    from fastvae.runs import save_model

    save_model(ReferenceVAE(VAEConfig((1, 28, 28), (8,), 2)), tmp_path / "mnist-run")
    assert main(["disentangle", str(tmp_path / "mnist-run")]) == 2
    err = capsys.readouterr().err
    assert "no factor labels" in err and err.count("\n") == 1
    base = ["edit", str(tmp_path / "mnist-run"), "--image", "0", "--out", str(tmp_path / "e.png")]
    assert main(base) == 2
    assert "needs --attribute" in capsys.readouterr().err
    assert main([*base, "--factor", "posX", "--attribute", "label=0->1"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main([*base, "--factor", "posX"]) == 2  # an MNIST run: no factor labels
    assert "no factor labels" in capsys.readouterr().err
