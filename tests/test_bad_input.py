"""Bad input, tried systematically (hypothesis): every case is a correct result or one clear error.

Cases tried:
- data files (.npy / .npz): shapes with 0 to 4 dimensions and sizes 0 to 6; dtypes uint8, int8, int16,
  int64, bool, float16, float32, float64, complex64, unicode; values in and out of [0, 1] and 0..255,
  negative, NaN, +-inf, huge (1e30, float64 max); .npz with one array, several arrays, x_train/x_test
  pairs whose sample shapes disagree; truncated and non-NumPy files. Checked for both likelihoods.
  Accepted data must be uint8 or finite float32, (N, ...) with N >= 1, and in [0, 1] for Bernoulli.
- model configs: input_dim, hidden_dims, latent_dim as ints, floats, bools, zeros, negatives, empty
  and nested tuples, strings; activation and likelihood as arbitrary text; beta as negative, NaN,
  inf, bool.
- CLI flags of `fastvae train`: every numeric flag given arbitrary text, integers out of range,
  floats, NaN and inf; --hidden-dims lists with zeros, negatives and junk; unknown presets and
  devices; --resume with --overwrite.
Each must end in either a valid object or FastVAEError / exit 2 with one line on stderr: never another
exception, a traceback, or a silently accepted bad value.
"""

import math
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastvae.cli import build_parser, train_config_from_args
from fastvae.config import VAEConfig
from fastvae.data import load_dataset
from fastvae.errors import FastVAEError

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

DTYPES = st.sampled_from(
    ["uint8", "int8", "int16", "int64", "bool", "float16", "float32", "float64", "complex64"]
)
SPECIAL = [0.0, 1.0, 0.5, -1.0, 2.0, 255.0, 256.0, 1e30, -1e30, float("nan"), float("inf"), -float("inf")]


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    if dtype.kind in "fc":
        elements = st.one_of(st.sampled_from(SPECIAL), st.floats(-2, 2, width=32))
        if dtype == np.float16:
            elements = st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, float("nan"), float("inf")])
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(info.min, -300), min(info.max, 300))
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _check_accepted(d, likelihood):
    for x in (d.x_train, d.x_test):
        assert x.ndim >= 2 and len(x) >= 1
        assert x.dtype in (np.uint8, np.float32)
        if x.dtype == np.float32:
            assert np.isfinite(x).all()
            if likelihood == "bernoulli":
                assert x.min() >= 0 and x.max() <= 1
    assert d.x_train.shape[1:] == d.x_test.shape[1:]


def _one_line(exc):
    assert str(exc) and "\n" not in str(exc)


@SETTINGS
@given(
    arr=arrays(), likelihood=st.sampled_from(["bernoulli", "gaussian"]), kind=st.sampled_from(["npy", "npz"])
)
def test_any_array_file_loads_correctly_or_fails_clearly(tmp_path, arr, likelihood, kind):
    path = tmp_path / f"data.{kind}"
    if kind == "npy":
        np.save(path, arr)
    else:
        np.savez(path, x_train=arr, x_test=arr[:1] if arr.ndim else arr)
    try:
        d = load_dataset(str(path), likelihood)
    except FastVAEError as exc:
        _one_line(exc)
        assert str(path) in str(exc)
        return
    _check_accepted(d, likelihood)
    src = arr.astype(np.float64)
    if arr.dtype != np.uint8 and arr.dtype != np.bool_ and kind == "npy":  # values kept, not rescaled
        n = len(d.x_train)
        np.testing.assert_allclose(d.x_train.astype(np.float64), src[:n], rtol=1e-3)


@SETTINGS
@given(
    n=st.integers(1, 5),
    extra=st.lists(st.sampled_from(["y", "labels", "x_test"]), max_size=2, unique=True),
    test_width=st.integers(1, 4),
)
def test_npz_layouts(tmp_path, n, extra, test_width):
    path = tmp_path / "d.npz"
    arrays_ = {"x": np.zeros((n, 3), np.float32)}
    for name in extra:
        arrays_[name] = np.zeros((n, test_width), np.float32)
    np.savez(path, **arrays_)
    try:
        d = load_dataset(str(path))
    except FastVAEError as exc:
        _one_line(exc)
        return
    _check_accepted(d, "bernoulli")


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 3), np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[:-7])
    for path in (cut, tmp_path / "pickled.npy"):
        if path.name == "pickled.npy":
            np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with pytest.raises(FastVAEError) as exc:
            load_dataset(str(path))
        _one_line(exc.value)


VALUES = st.one_of(
    st.integers(-3, 3), st.floats(allow_nan=True), st.booleans(), st.text(max_size=4), st.none(),
    st.lists(st.integers(-2, 500), max_size=3), st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
    st.lists(st.lists(st.integers(1, 3), max_size=2), max_size=2),
)  # fmt: skip


@SETTINGS
@given(
    input_dim=VALUES, hidden_dims=VALUES, latent_dim=VALUES, activation=st.one_of(st.text(max_size=5), VALUES),
    likelihood=st.one_of(st.sampled_from(["bernoulli", "gaussian"]), st.text(max_size=5)), beta=VALUES,
)  # fmt: skip
def test_any_config_is_valid_or_one_clear_error(
    input_dim, hidden_dims, latent_dim, activation, likelihood, beta
):
    try:
        cfg = VAEConfig(input_dim, hidden_dims, latent_dim, activation, likelihood, beta)
    except FastVAEError as exc:
        _one_line(exc)
        return
    assert cfg.flat_dim >= 1 and all(isinstance(h, int) and h >= 1 for h in cfg.hidden_dims)
    assert isinstance(cfg.latent_dim, int) and cfg.latent_dim >= 1
    assert cfg.activation in ("relu", "tanh") and math.isfinite(cfg.beta) and cfg.beta >= 0


TEXT = st.one_of(
    st.text(alphabet=string.printable, max_size=6),
    st.integers(-5, 10**6).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e-3", "0", "-0", "1.5", "", " ", "0x10", "1_000"]),
)
FLAGS = ["--epochs", "--batch-size", "--lr", "--seed", "--max-steps", "--checkpoint-every", "--keep-checkpoints",
         "--kl-warmup-steps", "--free-bits", "--hidden-dims", "--latent-dim", "--beta", "--preset", "--activation",
         "--likelihood", "--backend", "--device"]  # fmt: skip


@SETTINGS
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), TEXT), min_size=1, max_size=4), resume=st.booleans(),
       overwrite=st.booleans())  # fmt: skip
def test_any_train_flags_give_a_valid_config_or_one_line_exit_2(capsys, pairs, resume, overwrite):
    argv = ["train"] + [x for flag, value in pairs for x in (flag, value)]
    argv += ["--resume"] * resume + ["--overwrite"] * overwrite
    try:
        args = build_parser().parse_args(argv)
        cfg = train_config_from_args(args)
    except SystemExit as exc:
        assert exc.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastvae: error:"), err
        return
    except FastVAEError as exc:
        _one_line(exc)
        return
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and math.isfinite(cfg.lr) and cfg.lr > 0
    assert not (cfg.resume and cfg.overwrite)
