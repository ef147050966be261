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
