import hashlib

import numpy as np
import pytest
import torch

from fastvae.data import DeviceData, load_array, load_dataset, mnist_path
from fastvae.errors import FastVAEError


def test_bundled_mnist_is_intact_and_licensed():
    d = load_dataset("mnist")
    assert d.x_train.shape == (60000, 28, 28) and d.x_test.shape == (10000, 28, 28)
    assert hashlib.sha256(d.x_test.tobytes()).hexdigest().startswith("6d87418db22cc802")
    assert list(d.y_train[:5]) == [5, 0, 4, 1, 9]
    readme = (mnist_path().parent / "README.md").read_text()
    assert "Creative Commons" in readme and "LeCun" in readme


def test_device_data_scales_uint8_to_unit_interval():
    x = np.array([[0, 255], [128, 1]], dtype=np.uint8)
    dd = DeviceData(x, "cpu")
    torch.testing.assert_close(
        dd.batch(torch.tensor([1, 0])), torch.tensor([[128 / 255, 1 / 255], [0.0, 1.0]])
    )


def test_single_array_file_holds_out_a_test_split(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.random.default_rng(0).random((50, 4)).astype(np.float32))
    d = load_dataset(str(p))
    assert (len(d.x_train), len(d.x_test)) == (45, 5)


BAD_ARRAYS = {
    "empty": (np.zeros((0, 4), np.float32), "empty"),
    "one-dimensional": (np.zeros(10, np.float32), "at least 2 dimensions"),
    "nan": (np.array([[0.5, np.nan]] * 3, np.float32), "NaN"),
    "inf": (np.array([[0.5, np.inf]] * 3, np.float64), "NaN or infinite"),
    "above one": (np.array([[0.5, 1.5]] * 3, np.float32), r"\[0, 1\]"),
    "negative": (np.array([[-0.5, 0.5]] * 3, np.float32), r"\[0, 1\]"),
    "int out of range": (np.array([[0, 300]] * 3, np.int32), "0..255"),
    "strings": (np.array([["a", "b"]] * 3), "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_data_file_gives_one_clear_error_naming_the_file(tmp_path, case):
    arr, fragment = BAD_ARRAYS[case]
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    with pytest.raises(FastVAEError, match=fragment) as exc:
        load_dataset(str(p))
    assert str(p) in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(FastVAEError, match="not a readable NumPy file"):
        load_dataset(str(junk))
    with pytest.raises(FastVAEError, match="no such data file"):
        load_array(str(tmp_path / "missing.npy"))
    txt = tmp_path / "x.csv"
    txt.write_text("1,2\n")
    with pytest.raises(FastVAEError, match="unsupported file type"):
        load_dataset(str(txt))


def test_gaussian_likelihood_accepts_any_finite_values(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.array([[-3.0, 7.0]] * 10, np.float32))
    assert load_dataset(str(p), likelihood="gaussian").x_train.shape == (9, 2)


# ---- data from anywhere: every form through the same validation ------------------------------------------
def _imgs(n=20, shape=(6, 5), seed=0):
    return (np.random.default_rng(seed).random((n, *shape)) * 255).astype(np.uint8)


def test_array_tensor_pair_and_dataset_give_the_same_split():
    x = _imgs()
    from_array = load_dataset(x)
    from_tensor = load_dataset(torch.from_numpy(x))
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.arange(20) % 3)
    from_ds = load_dataset(ds, progress=False)
    for d in (from_tensor, from_ds):
        np.testing.assert_array_equal(d.x_train, from_array.x_train)
        np.testing.assert_array_equal(d.x_test, from_array.x_test)
    assert (len(from_array.x_train), len(from_array.x_test)) == (18, 2)
    assert from_ds.y_test.tolist() == [0, 1]  # scalar labels of (x, y) items are kept
    pair = load_dataset((x[:15], torch.from_numpy(x[15:])))
    assert pair.x_train.shape == (15, 6, 5) and pair.x_test.shape == (5, 6, 5)


class _Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(2 + i % 2)


BAD_IN_MEMORY = {
    "nan tensor": (torch.tensor([[0.5, float("nan")]] * 3), r"data: 3 value\(s\) are NaN"),
    "out of range array": (np.full((3, 2), 2.0, np.float32), r"data: values must lie in \[0, 1\]"),
    "one-dimensional": (np.zeros(5, np.float32), "data: expected shape"),
    "train part": (
        (np.zeros(3, np.float32), np.zeros((2, 2), np.float32)),
        r"data\[x_train\]: expected shape",
    ),
    "pair shapes": ((np.zeros((3, 2), np.float32), np.zeros((2, 3), np.float32)), "differ in sample shape"),
    "triple": ((1, 2, 3), "a \\(train, test\\) pair"),
    "number": (3.5, "unsupported data of type float"),
    "ragged dataset": (_Ragged(), r"data: item 1 has shape \(3,\), item 0 has \(2,\)"),
    "empty dataset": (torch.utils.data.TensorDataset(torch.zeros(0, 2)), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_IN_MEMORY))
def test_bad_in_memory_data_gives_one_clear_error(case):
    data, fragment = BAD_IN_MEMORY[case]
    with pytest.raises(FastVAEError, match=fragment) as exc:
        load_dataset(data, progress=False)
    assert "\n" not in str(exc.value)


def _write_png(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_with_class_subfolders_gives_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(10):
            _write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
    d = load_dataset(str(tmp_path), progress=False)
    assert d.x_train.shape == (18, 8, 6, 3) and d.x_test.shape == (2, 8, 6, 3) and d.x_train.dtype == np.uint8
    assert sorted(np.concatenate([d.y_train, d.y_test]).tolist()) == [0] * 10 + [1] * 10  # shuffled, all kept
    grey = load_dataset(str(tmp_path), image_size=(4, 4), grayscale=True, progress=False)
    assert grey.x_train.shape == (18, 4, 4)


def test_flat_image_folder_needs_one_size_or_image_size(tmp_path):
    for i in range(5):
        _write_png(tmp_path / f"{i}.png", np.full((7, 7), 40 * i, np.uint8))
    d = load_dataset(tmp_path, progress=False)
    assert d.data_shape == (7, 7) and d.y_train is None  # all greyscale: read as greyscale
    _write_png(tmp_path / "odd.png", np.zeros((9, 9), np.uint8))
    with pytest.raises(FastVAEError, match=r"odd.png: 9x9 pixels.*--image-size"):
        load_dataset(tmp_path, progress=False)
    assert load_dataset(tmp_path, image_size=(5, 5), progress=False).data_shape == (5, 5)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FastVAEError, match="broken.png: not a readable image"):
        load_dataset(tmp_path, image_size=(5, 5), progress=False)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(FastVAEError, match="no PNG or JPEG images"):
        load_dataset(str(tmp_path))


# --- issue 28: one reader for training and the runtime, 16-bit PNGs, decompression bombs, truncated
# archives, Dataset items, dict / NpzFile data, class names.


def png16(path, arr):
    """A 16-bit PNG (greyscale (H, W) or RGB (H, W, 3)) written byte by byte, not by Pillow: the
    reference the reader is checked against."""
    import struct
    import zlib

    arr = np.asarray(arr, np.uint16)
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    rows = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))  # fmt: skip


def test_16bit_pngs_keep_their_high_byte_in_training_and_the_runtime(tmp_path):
    from fastvae.export.runtime import read_inputs

    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, (6, 5, 7), dtype=np.uint16)
    v[0, 0, :3] = (0, 65535, 200 * 257)  # both ends, and an 8-bit value stored as 16 bits
    for i, img in enumerate(v):
        png16(tmp_path / "grey" / f"{i}.png", img)
    want = (v >> 8).astype(np.uint8)  # the high byte, computed from the raw values
    assert want[0, 0, :3].tolist() == [0, 255, 200]
    np.testing.assert_array_equal(read_inputs(tmp_path / "grey"), want)  # files sorted by name
    d = load_dataset(tmp_path / "grey", progress=False)
    got = np.concatenate([d.x_train, d.x_test])
    order = np.random.default_rng(0).permutation(6)  # the folder's fixed split shuffle (seed 0)
    np.testing.assert_array_equal(got, want[order])
    assert (got == 255).mean() < 0.05  # the old reader clipped ~all of them to 255
    rgb = rng.integers(0, 65536, (2, 3, 4, 3), dtype=np.uint16)
    for i, img in enumerate(rgb):
        png16(tmp_path / "rgb" / f"{i}.png", img)
    np.testing.assert_array_equal(read_inputs(tmp_path / "rgb"), (rgb >> 8).astype(np.uint8))


def test_runtime_reads_a_folder_as_training_does(tmp_path):
    """Class subfolders, JPEGs and PNGs alike: the runtime's reader returns the images training reads,
    in ImageFolder's order, each equal to Pillow's own decoding of that file."""
    from PIL import Image

    from fastvae.export.runtime import read_inputs

    rng = np.random.default_rng(2)
    files = []
    for cls in ("b", "a"):
        for i in range(3):
            f = tmp_path / cls / (f"{i}.jpg" if i == 1 else f"{i}.png")
            _write_png(f, rng.integers(0, 256, (5, 4), dtype=np.uint8))
            files.append(f)
    got = read_inputs(tmp_path)
    order = sorted(files, key=lambda f: (f.parent.name, f.name))
    want = np.stack([np.asarray(Image.open(f).convert("L")) for f in order])
    np.testing.assert_array_equal(got, want)
    d = load_dataset(tmp_path, progress=False)
    perm = np.random.default_rng(0).permutation(6)
    np.testing.assert_array_equal(np.concatenate([d.x_train, d.x_test]), want[perm])
    assert d.classes == ("a", "b")
    np.testing.assert_array_equal(np.concatenate([d.y_train, d.y_test]), np.array([0] * 3 + [1] * 3)[perm])
    assert read_inputs(tmp_path, data_shape=(5, 4, 3)).shape == (6, 5, 4, 3)  # a colour model's reading


@pytest.mark.parametrize("limit", [25, 12])  # Pillow warns above the limit and refuses above twice it
def test_decompression_bomb_is_one_line(tmp_path, monkeypatch, limit):
    from PIL import Image

    from fastvae.export.runtime import read_inputs

    for i in range(2):
        _write_png(tmp_path / f"{i}.png", np.zeros((5, 6), np.uint8))  # 30 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    for read in (lambda: load_dataset(tmp_path, progress=False), lambda: read_inputs(tmp_path)):
        with pytest.raises(FastVAEError, match=r"0.png: too large to decode safely .*MAX_IMAGE_PIXELS") as e:
            read()
        assert "\n" not in str(e.value)


def test_truncated_npz_inputs_and_labels_are_one_line(tmp_path):
    from fastvae.export.runtime import read_inputs, read_labels

    path = tmp_path / "in.npz"
    np.savez(path, x=np.zeros((50, 30), np.uint8), y=np.arange(50))
    whole = path.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30, 40):
        path.write_bytes(whole[:cut])
        for read in (lambda: read_inputs(path), lambda: read_labels(path, 50), lambda: load_dataset(path)):
            with pytest.raises(FastVAEError, match="in.npz: not a readable NumPy file") as e:
                read()
            assert "\n" not in str(e.value)
    path.write_bytes(whole)
    np.testing.assert_array_equal(read_labels(path, 50), np.arange(50))
    np.savez(path, x=np.zeros((50, 30), np.uint8))
    with pytest.raises(FastVAEError, match="no labels array y_test or y"):
        read_labels(path, 50)  # never the inputs read as labels


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_dataset_of_mixed_dtypes_is_refused_not_cast_to_zero():
    u8 = np.full((2, 2), 200, np.uint8)
    f = np.full((2, 2), 0.5, np.float32)
    for items in ([u8, f, f], [f, u8, u8]):
        with pytest.raises(FastVAEError, match="item 1 is .*item 0 is .*one kind") as e:
            load_dataset(_Items(items), progress=False)
        assert "\n" not in str(e.value)
    # one kind, two widths: widened, every value kept (float64 0.1 is not float32 0.1)
    items = [np.full((2, 2), 0.25, np.float32)] + [np.full((2, 2), 0.1, np.float64)] * 19
    d = load_dataset(_Items(items), likelihood="gaussian", progress=False)
    np.testing.assert_allclose(np.concatenate([d.x_train, d.x_test])[1:], 0.1, rtol=1e-7)
    ints = [np.full((2,), 3, np.int8)] + [np.full((2,), 200, np.int64)] * 9
    got = load_dataset(_Items(ints), progress=False)
    assert got.x_train[0].tolist() == [3, 3] and got.x_train[1:].max() == 200 and got.x_train.dtype == np.uint8


BAD_ITEMS = {
    "dict items": ([{"image": np.zeros(3), "label": 1}] * 4, r"item 0 is a dict \('image', 'label'\)"),
    "string labels": ([(np.zeros(3), "seven")] * 4, r"item 0's label is 'seven' \(str\); labels must be int"),
    "one-hot labels": ([(np.zeros(3), np.eye(3)[0])] * 4, r"item 0's label has shape \(3,\).*argmax"),
    "None after a label": ([(np.zeros(3), 1), (np.zeros(3), None)] * 2, "item 1 has no label, item 0 has one"),
    "label after None": ([(np.zeros(3), None), (np.zeros(3), 2)] * 2, "item 1 has a label, item 0 has none"),
    "fractional label": ([(np.zeros(3), 0.5)] * 4, r"label is 0.5 \(float\)"),
    "string samples": ([np.array(["a", "b"])] * 4, "item 0 holds <U1 values; samples must be numbers"),
    "huge label": ([(np.zeros(3), 2**70)] * 4, "label 1180591620717411303424 does not fit in 64 bits"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_dataset_items_give_one_clear_error(case):
    items, fragment = BAD_ITEMS[case]
    with pytest.raises(FastVAEError, match=fragment) as e:
        load_dataset(_Items(items), progress=False)
    assert "\n" not in str(e.value)


def test_dataset_labels_kept_when_integral():
    items = [(np.full(3, i / 10), lab) for i, lab in enumerate([1, np.int64(2), torch.tensor(0), 3.0, True] * 2)]
    d = load_dataset(_Items(items), progress=False)
    assert np.concatenate([d.y_train, d.y_test]).tolist() == [1, 2, 0, 3, 1] * 2
    none = load_dataset(_Items([(np.zeros(3), None)] * 4), progress=False)
    assert none.y_train is None  # no item labelled: unlabelled data


def test_dict_and_npzfile_data(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 3, 2), dtype=np.uint8),
        "x_test": rng.integers(0, 256, (4, 3, 2), dtype=np.uint8),
        "y_train": rng.integers(0, 3, 12),
        "y_test": rng.integers(0, 3, 4),
    }
    np.savez(tmp_path / "d.npz", **arrays)
    as_dict = load_dataset(dict(arrays), progress=False)
    with np.load(tmp_path / "d.npz") as f:
        as_npz = load_dataset(f, progress=False)
    for d in (as_dict, as_npz):
        for k, v in arrays.items():
            np.testing.assert_array_equal(getattr(d, k), v)
    torchy = load_dataset({k: torch.from_numpy(v) for k, v in arrays.items()}, progress=False)
    np.testing.assert_array_equal(torchy.y_test, arrays["y_test"])
    np.testing.assert_array_equal(load_array(dict(arrays)), arrays["x_test"])  # as eval / score read it
    one = load_dataset({"x": arrays["x_train"]}, progress=False)
    assert len(one.x_train) + len(one.x_test) == 12 and one.y_train is None
    bad = {
        "no x_test": ({"x_train": arrays["x_train"], "y": arrays["y_train"]}, "expected one array, or x_train"),
        "string labels": ({**arrays, "y_test": np.array(["a"] * 4)}, r"\[y_test\]: labels must be integers"),
        "label count": ({**arrays, "y_test": arrays["y_train"]}, r"expected 4 labels"),
        "int keys": ({0: arrays["x_train"]}, "needs string keys"),
        "raw bytes member": ({"x": b"not an array"}, r"not an array \(raw bytes\)"),
        "nested dict": (({"x": arrays["x_train"]}, arrays["x_test"]), "taken only as the whole data"),
    }
    for name, (data, fragment) in bad.items():
        with pytest.raises(FastVAEError, match=fragment) as e:
            load_dataset(data, progress=False)
        assert "\n" not in str(e.value), name


def test_resolve_label_names_and_integers():
    from fastvae.data import resolve_label

    names = ["one", "seven", "zero"]
    assert [resolve_label(s, names) for s in ("one", "seven", "zero", "2", None)] == [0, 1, 2, 2, None]
    assert resolve_label("7", [str(i) for i in range(1, 11)]) == 6  # the class "7", not index 7
    assert resolve_label("10", [str(i) for i in range(1, 11)]) == 9
    assert resolve_label("4", None) == 4 and resolve_label(3, names) == 3
    for text, classes, fragment in (
        ("eight", names, r"neither a class of this run \(one, seven, zero\) nor an integer"),
        ("eight", None, "neither an integer"),
        ("-1", names, ">= 0"),
        ("1", "abc", "not a list of names"),
    ):
        with pytest.raises(FastVAEError, match=fragment):
            resolve_label(text, classes)


def test_folder_class_names_are_recorded_and_taken_by_label(tmp_path):
    """A conditional run on a folder of class subfolders records their names; ``--label seven`` draws
    exactly what ``--label 1`` draws (classes sorted: one, seven, zero); an unknown name is one line."""
    import json

    from fastvae.cli import main
    from fastvae.config import TrainConfig
    from fastvae.trainer import train

    rng = np.random.default_rng(4)
    for c, cls in enumerate(("zero", "one", "seven")):
        for i in range(12):
            img = np.zeros((4, 4), np.uint8)
            img[c] = rng.integers(128, 256, 4)
            _write_png(tmp_path / "data" / cls / f"{i}.png", img)
    run = tmp_path / "run"
    train(TrainConfig(data=str(tmp_path / "data"), hidden_dims=(8,), latent_dim=2, epochs=1, batch_size=8,
                      device="cpu", progress=False, out=str(run), conditional=True))  # fmt: skip
    doc = json.loads((run / "config.json").read_text())
    assert doc["classes"] == ["one", "seven", "zero"] and doc["model"]["classes"] == 3
    outs = {}
    for label in ("seven", "1"):
        out = tmp_path / f"{label}.png"
        argv = ["sample", str(run), "-n", "4", "--seed", "5", "--label", label, "--device", "cpu", "--out", str(out)]
        assert main(argv) == 0
        outs[label] = out.read_bytes()
    assert outs["seven"] == outs["1"]
    assert main(["sample", str(run), "-n", "4", "--label", "zero", "--out", str(tmp_path / "z.png")]) == 0
    assert (tmp_path / "z.png").read_bytes() != outs["1"]
    assert main(["manifold", str(run), "-n", "3", "--label", "zero", "--out", str(tmp_path / "m.png")]) == 0
    assert main(["interpolate", str(run), "--a", "0", "--b", "1", "--steps", "3", "--label", "seven",
                 "--out", str(tmp_path / "i.png")]) == 0  # fmt: skip


def test_unknown_class_name_is_one_line(tmp_path, capsys):
    from fastvae.cli import main
    from fastvae.config import TrainConfig
    from fastvae.trainer import train

    for cls in ("cat", "dog"):
        for i in range(6):
            _write_png(tmp_path / "data" / cls / f"{i}.png", np.full((3, 3), 40 * i, np.uint8))
    run = tmp_path / "run"
    train(TrainConfig(data=str(tmp_path / "data"), hidden_dims=(4,), latent_dim=2, epochs=1, batch_size=4,
                      device="cpu", progress=False, out=str(run), conditional=True))  # fmt: skip
    capsys.readouterr()  # training's own lines
    assert main(["sample", str(run), "-n", "2", "--label", "cow", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastvae: error: --label 'cow' is neither a class of this run (cat, dog) nor an integer label"]
    assert main(["sample", str(run), "-n", "2", "--label", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "in 0..1" in capsys.readouterr().err


def test_train_takes_a_dict_and_an_npzfile(tmp_path):
    import fastvae

    rng = np.random.default_rng(5)
    arrays = {"x_train": rng.integers(0, 256, (16, 3, 3), dtype=np.uint8),
              "x_test": rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)}  # fmt: skip
    np.savez(tmp_path / "d.npz", **arrays)
    kw = dict(hidden_dims=(4,), latent_dim=2, epochs=1, batch_size=8, device="cpu", progress=False)
    fastvae.train(data=dict(arrays), out=str(tmp_path / "a"), **kw)
    with np.load(tmp_path / "d.npz") as f:
        fastvae.train(data=f, out=str(tmp_path / "b"), **kw)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()  # the same data, the same run
    with pytest.raises(FastVAEError, match="expected one array, or x_train and x_test"):
        fastvae.train(data={"x_train": arrays["x_train"], "x_val": arrays["x_test"]}, out=str(tmp_path / "c"),
                      **kw)  # fmt: skip
