"""MIG and SAP against hand-computed cases and disentanglement_lib's known answers (codes = factors,
constant codes, duplicated codes, independent noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

from fastvae.disentangle import histogram_discretize, mig, sap  # noqa: E402
from fastvae.errors import FastVAEError  # noqa: E402


def _factors(n: int = 3000, classes: tuple[int, ...] = (10, 10, 10), seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return np.stack([rng.randint(0, c, n) for c in classes], axis=1)


def test_histogram_discretize_matches_the_digitize_rule():
    # 20 evenly spread values on 20 bins: bin edges linspace(0, 19, 21)[:-1], so value v falls in bin v + 1
    codes = np.arange(20.0)[:, None]
    assert histogram_discretize(codes, 20)[:, 0].tolist() == list(range(1, 21))


def test_mig_hand_computed():
    # y0, y1: the 4 combinations of two bits; z0 = y0, z1 = y0 AND y1 (discrete codes, no binning)
    y = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    z = np.stack([y[:, 0], y[:, 0] & y[:, 1]], axis=1)
    ln2 = math.log(2)
    h_z1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    i_z1 = h_z1 - 0.5 * ln2  # H(z1) - H(z1 | y): z1 is fixed when the other bit is 0, a coin when it is 1
    gap0 = (ln2 - i_z1) / ln2  # factor 0: z0 carries all of it, z1 i_z1
    gap1 = (i_z1 - 0.0) / ln2  # factor 1: z1 carries i_z1, z0 nothing
    r = mig(z, y, discretize=False)
    assert r.score == pytest.approx((gap0 + gap1) / 2, abs=1e-12)
    assert r.top.tolist() == [0, 1]
    assert r.entropy == pytest.approx([ln2, ln2], abs=1e-12)


def test_mig_codes_equal_to_factors_is_one():
    y = _factors()
    assert 0.9 <= mig(y.astype(np.float64), y).score <= 1.0


def test_mig_constant_codes_is_zero():
    y = _factors()
    assert mig(np.zeros((len(y), 3)), y).score == pytest.approx(0.0, abs=1e-12)


def test_mig_duplicated_codes_is_zero():
    y = _factors()
    z = np.hstack([y, y]).astype(np.float64)
    assert 0.0 <= mig(z, y).score <= 0.1


def test_mig_independent_noise_is_near_zero():
    y = _factors()
    z = np.random.RandomState(1).randn(len(y), 5)
    assert 0.0 <= mig(z, y).score <= 0.1


def test_mig_refuses_constant_factor_and_bad_shapes():
    y = _factors()
    y[:, 1] = 3
    with pytest.raises(FastVAEError, match="constant"):
        mig(np.random.RandomState(0).randn(len(y), 3), y)
    with pytest.raises(FastVAEError, match="2-D"):
        mig(np.zeros(10), np.zeros((10, 2)))


def test_sap_continuous_hand_computed():
    # the 4 combinations of two bits, twice: z0 = y0 (r^2 1 with y0, 0 with y1); z1 = y0 + y1 (r^2 1/2 each)
    y = np.array([[0, 0], [0, 1], [1, 0], [1, 1]] * 2)
    z = np.stack([y[:, 0], y[:, 0] + y[:, 1]], axis=1).astype(np.float64)
    r = sap(z, y, continuous=True)
    assert r.matrix == pytest.approx(np.array([[1.0, 0.0], [0.5, 0.5]]), abs=1e-12)
    assert r.score == pytest.approx(0.5, abs=1e-12)  # gaps: 1 - 1/2 and 1/2 - 0


@pytest.mark.parametrize(
    "codes, lo, hi",
    [
        (lambda y: y.astype(np.float64), 0.9, 1.0),
        (lambda y: np.zeros(y.shape), 0.0, 0.2),
        (lambda y: np.hstack([y, y]).astype(np.float64), 0.0, 0.2),
    ],
    ids=["identity", "constant", "duplicated"],
)
def test_sap_continuous_known_answers(codes, lo, hi):
    y = _factors()
    assert lo <= sap(codes(y), y, continuous=True).score <= hi


def test_sap_discrete_two_binary_factors():
    # a linear SVM on the right latent is exact (accuracy 1); on the other, independent one it is a coin
    # (balanced accuracy about 1/2): the gap is about 1/2 for each factor
    y = _factors(2000, (2, 2))
    z = y + 0.01 * np.random.RandomState(2).randn(*y.shape)
    yt = _factors(2000, (2, 2), seed=3)
    zt = yt + 0.01 * np.random.RandomState(4).randn(*yt.shape)
    r = sap(z, y, zt, yt)
    assert r.matrix[0, 0] == 1.0 and r.matrix[1, 1] == 1.0
    assert 0.4 <= r.score <= 0.6
    with pytest.raises(FastVAEError, match="test sample"):
        sap(z, y)


def test_missing_extra_is_one_line(monkeypatch):
    import sys

    for name in ("sklearn", "sklearn.metrics"):
        monkeypatch.setitem(sys.modules, name, None)  # import then raises ImportError
    with pytest.raises(FastVAEError, match=r"pip install 'fastvae-engine\[metrics\]'"):
        mig(np.zeros((4, 2)), np.array([[0], [1], [0], [1]]))
