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
