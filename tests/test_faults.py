"""Families of bad input and faults, generated: each ends in a correct result or one clear error line.

Families (each test generates variants beyond a fixed list):
- data files: valid archives cut at any byte, bytes flipped, .npy bytes under an .npz name and the
  reverse, FIFOs and directories given as files; label arrays of any shape and dtype;
- run files: config.json with any key removed or retyped (sealed with a fresh checksum, so the checks
  behind it run, or not sealed); state.json with any key removed or retyped and tampered step
  counters; optimizer state tensors of any other shape (checksums recomputed); weights without a
  recorded checksum; run files that are directories or FIFOs;
- command lines: sizes, seeds, temperatures and importance-sample counts past any sane range; output
  paths that are folders, under a file, or in a missing folder; a full disk during writes.
"""

import errno
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from fastvae import ReferenceVAE, TrainConfig, train
from fastvae.checkpoint import (
    config_checksum,
    list_checkpoints,
    load_checkpoint,
    restore_latest,
    seal_checkpoint,
)
from fastvae.cli import main
from fastvae.data import load_dataset
from fastvae.errors import FastVAEError
from fastvae.images import MAX_GRID_PIXELS, grid_array
from fastvae.runs import load_model, read_run_config

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def one_line_exit_2(capsys, argv, allow_success=False):
    capsys.readouterr()  # hypothesis runs many examples in one test call: start clean
    code = main([str(a) for a in argv])
    if allow_success and code == 0:
        return None
    text = capsys.readouterr().err
    err = text.strip().splitlines()
    errors = [line for line in err if line.startswith("fastvae: error:")]
    # progress lines of a training may come first; the error is one line, the last, with no traceback
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in text, (code, err)
    return errors[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("faults") / "run"
    train(TrainConfig(data=str(tiny_npz), hidden_dims=(16,), latent_dim=2, epochs=1, batch_size=50, device="cpu",
                      out=str(out), progress=False, backend="torch", checkpoint_every=4))  # fmt: skip
    return out


def _copy(run_dir):
    """A fresh copy of the trained run (hypothesis runs many examples inside one test call)."""
    dst = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


@pytest.fixture
def run_copy(run_dir):
    return _copy(run_dir)


# ---- data files -------------------------------------------------------------------------------------
def _npz_bytes(n=20):
    buf = io.BytesIO()
    x = np.random.default_rng(0).integers(0, 256, (n, 4, 4)).astype(np.uint8)
    np.savez(buf, x_train=x, x_test=x[:5], y_train=np.arange(n) % 3, y_test=np.arange(5) % 3)
    return buf.getvalue()


@SETTINGS
@given(
    cut=st.integers(0, 2000),
    flips=st.lists(st.integers(0, 4000), max_size=4),
    suffix=st.sampled_from([".npz", ".npy"]),
)
def test_damaged_array_files_load_or_fail_clearly(tmp_path, cut, flips, suffix):
    data = bytearray(_npz_bytes())
    data = data[: min(cut, len(data))] if cut < len(data) else data
    for i in flips:
        if i < len(data):
            data[i] ^= 0xFF
    path = tmp_path / f"d{suffix}"
    path.write_bytes(bytes(data))
    try:
        ds = load_dataset(str(path))
    except FastVAEError as exc:
        assert "\n" not in str(exc)
    else:
        assert ds.x_train.dtype in (np.uint8, np.float32) and len(ds.x_test) >= 1


def test_npy_bytes_under_an_npz_name_and_the_reverse(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 9)).astype(np.uint8)
    np.save(tmp_path / "a.npy", x)
    os.replace(tmp_path / "a.npy", tmp_path / "a.npz")
    assert load_dataset(str(tmp_path / "a.npz")).data_shape == (9,)  # the content decides
    (tmp_path / "b.npy").write_bytes(_npz_bytes())
    assert load_dataset(str(tmp_path / "b.npy")).data_shape == (4, 4)
    with zipfile.ZipFile(tmp_path / "c.npz", "w") as z:
        z.writestr("x.npy", b"not an array")
    with pytest.raises(FastVAEError, match="not a readable NumPy file|not an array"):
        load_dataset(str(tmp_path / "c.npz"))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_files_are_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "data.npz"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(FastVAEError, match="not a regular file|is a directory"):
        load_dataset(str(path))


LABELS = st.one_of(
    st.builds(lambda n: np.arange(n), st.integers(0, 30)),
    st.builds(lambda n: np.zeros((n, 2), np.int64), st.integers(1, 30)),
    st.builds(lambda n: np.array(["a"] * n), st.integers(1, 30)),
    st.builds(lambda n: np.full(n, 0.5), st.integers(1, 30)),
    st.builds(lambda n: np.full(n, np.nan), st.integers(1, 30)),
    st.builds(lambda n: np.ones(n, bool), st.integers(1, 30)),
)


@SETTINGS
@given(y_train=LABELS, y_test=LABELS)
def test_label_arrays_of_any_shape_and_type(tmp_path, y_train, y_test):
    x = np.zeros((20, 4), np.uint8)
    path = tmp_path / "l.npz"
    np.savez(path, x_train=x, x_test=x[:5], y_train=y_train, y_test=y_test)
    try:
        ds = load_dataset(str(path))
    except FastVAEError as exc:
        assert "labels" in str(exc)
    else:
        assert ds.y_train.shape == (20,) and ds.y_test.shape == (5,) and ds.y_train.dtype == np.int64


# ---- run files --------------------------------------------------------------------------------------
JUNK = st.sampled_from([None, "x", "false", -5, 10**12, 1.5, float("nan"), [], {}, [1, 2], True])


@SETTINGS
@given(section=st.sampled_from(["model", "train"]), index=st.integers(0, 100), value=JUNK, seal=st.booleans(),
       delete=st.booleans())  # fmt: skip
def test_edited_run_configs_are_refused_or_still_valid(run_dir, section, index, value, seal, delete):
    run_copy = _copy(run_dir)
    path = run_copy / "config.json"
    doc = json.loads(path.read_text())
    sect = doc[section]
    key = sorted(sect)[index % len(sect)]
    if delete:
        sect.pop(key, None)
    else:
        sect[key] = value
    body = {k: v for k, v in doc.items() if k != "config_sha256"}
    path.write_text(json.dumps({**body, "config_sha256": config_checksum(body)} if seal else body))
    try:
        model = load_model(run_copy)
    except FastVAEError as exc:
        assert "\n" not in str(exc)
    else:  # accepted: then it is a valid config that rebuilds a working model
        config, doc2 = read_run_config(run_copy)
        TrainConfig.from_dict(doc2.get("train", {}))
        assert torch.isfinite(model.decode(torch.zeros(1, config.latent_dim))).all()


STATE_KEYS = ["step", "epoch_steps", "epoch_loss", "epoch_seconds", "torch_rng", "optimizer", "metrics_lines",
              "metrics_sha256"]  # fmt: skip


@SETTINGS
@given(key=st.sampled_from(STATE_KEYS), value=JUNK, delete=st.booleans(), reseal=st.booleans())
def test_tampered_checkpoint_state_never_passes_silently(run_dir, key, value, delete, reseal):
    """Any edit is refused by the seal; resealed (every checksum recomputed), by the checks behind it,
    except a plausible number for a running total, which only the seal can tell from the real one."""
    run_copy = _copy(run_dir)
    ck = list_checkpoints(run_copy)[-1]
    state = json.loads((ck / "state.json").read_text())
    if delete:
        del state[key]
    else:
        state[key] = value
    (ck / "state.json").write_text(json.dumps(state))
    if reseal:
        seal_checkpoint(ck)
    try:
        load_checkpoint(ck)
    except FastVAEError as exc:
        assert "\n" not in str(exc)
    else:
        assert reseal and not delete and key in ("epoch_loss", "epoch_seconds", "metrics_lines")
        assert math.isfinite(value) and (key == "epoch_loss" or value >= 0)  # a Gaussian loss may be < 0


@SETTINGS
@given(which=st.sampled_from(["exp_avg", "exp_avg_sq", "step"]), shape=st.lists(st.integers(0, 3), max_size=3),
       index=st.integers(0, 5))  # fmt: skip
def test_optimizer_state_of_another_shape_is_refused_not_a_crash(run_dir, which, shape, index):
    """Tensors shaped (1, ...) or (0,) crashed torch's fused Adam with SIGSEGV; now one clear error."""
    run_copy = _copy(run_dir)
    cks = list_checkpoints(run_copy)
    ck = cks[-1]
    opt_path = ck / "optimizer.safetensors"
    tensors = load(opt_path.read_bytes())
    name = f"state.{index}.{which}"
    if name not in tensors:
        return
    if list(tensors[name].shape) == shape:
        shape = [*shape, 1]
    tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    opt_path.write_bytes(save(tensors))
    seal_checkpoint(ck)  # checksums recomputed: the shape checks behind the seal must catch it
    for older in cks[:-1]:
        shutil.rmtree(older)  # no fallback: the tampered one is the only checkpoint
    config, _ = read_run_config(run_copy)
    model = ReferenceVAE(config)
    opt = torch.optim.Adam(model.parameters(), fused=True)
    with pytest.raises(FastVAEError, match="optimizer state|no usable checkpoint"):
        restore_latest(run_copy, model, opt)


def test_weights_without_a_recorded_checksum_do_not_load(run_copy):
    path = run_copy / "config.json"
    doc = json.loads(path.read_text())
    doc.pop("weights_sha256")
    body = {k: v for k, v in doc.items() if k != "config_sha256"}
    path.write_text(json.dumps({**body, "config_sha256": config_checksum(body)}))
    with pytest.raises(FastVAEError, match="no checksum"):
        load_model(run_copy)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_run_files_that_are_not_files(run_copy, name, kind):
    path = run_copy / name
    path.unlink()
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    with pytest.raises(FastVAEError, match="directory|not a regular file"):
        load_model(run_copy)


def test_checkpoints_that_is_a_file(run_copy, tiny_npz, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "checkpoints").write_text("x")
    line = one_line_exit_2(capsys, ["train", "--data", tiny_npz, "--out", run_copy, "--resume", "--hidden-dims", "16",
                                    "--latent-dim", "2", "--epochs", "1", "--batch-size", "50", "--device", "cpu",
                                    "--quiet"])  # fmt: skip
    assert "not a directory" in line


# ---- command lines ------------------------------------------------------------------------------------
HUGE = st.sampled_from(["1e12", "10000000000", str(2**64), "-1", "nan", "inf", "1e39", "0x10", "", " "])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from([("sample", "-n"), ("sample", "--seed"), ("sample", "--temperature"),
                             ("manifold", "-n"), ("interpolate", "--steps"), ("eval", "--iw"), ("score", "--iw")]),
       value=HUGE)  # fmt: skip
def test_out_of_range_numbers_give_one_line(run_dir, tmp_path, capsys, flag, value):
    cmd, name = flag
    extra = {
        "sample": ["--out", tmp_path / "s.png"],
        "interpolate": ["--a", "0", "--b", "1"],
        "score": ["--data", "mnist"],
    }
    ok_for = {("sample", "--seed"): lambda v: v.isdigit() and int(v) < 2**63}  # a big seed is a valid seed
    allowed = ok_for.get(flag, lambda v: False)(value)
    one_line_exit_2(
        capsys, [cmd, run_dir, *extra.get(cmd, []), name, value, "--device", "cpu"], allow_success=allowed
    )


@pytest.mark.parametrize("flag", ["--latent-dim", "--hidden-dims"])
def test_models_past_memory_are_refused_before_allocating(tiny_npz, tmp_path, capsys, flag):
    line = one_line_exit_2(capsys, ["train", "--data", tiny_npz, "--out", tmp_path / "r", flag, str(10**11),
                                    "--device", "cpu", "--quiet"])  # fmt: skip
    assert "more than the" in line and "available" in line


def _out_paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir(exist_ok=True)
    return {
        "a folder": tmp_path / "adir",
        "under a file": tmp_path / "afile" / "x.png",
        "in a missing folder": tmp_path / "missing" / "x.png",
    }


@pytest.mark.parametrize("where", ["a folder", "under a file", "in a missing folder"])
@pytest.mark.parametrize("cmd", ["sample", "score", "interpolate", "manifold"])
def test_unwritable_outputs_give_one_line(run_dir, tmp_path, capsys, where, cmd):
    out = _out_paths(tmp_path)[where]
    extra = {"score": ["--data", "mnist", "--iw", "0"], "interpolate": ["--a", "0", "--b", "1"]}.get(cmd, [])
    one_line_exit_2(capsys, [cmd, run_dir, *extra, "--out", out])


def test_train_out_that_is_a_file(tiny_npz, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line_exit_2(
        capsys, ["train", "--data", tiny_npz, "--out", tmp_path / "f", "--device", "cpu", "--quiet"]
    )


@pytest.mark.parametrize("cmd", ["sample", "train"])
def test_a_full_disk_gives_one_line_and_keeps_earlier_files(
    run_copy, tiny_npz, tmp_path, capsys, monkeypatch, cmd
):
    import fastvae.atomic

    real = fastvae.atomic.atomic_write_bytes
    calls = {"n": 0}

    def full(path, data):
        calls["n"] += 1
        if calls["n"] > (3 if cmd == "train" else 0):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    for mod in ("fastvae.atomic", "fastvae.checkpoint", "fastvae.images"):
        monkeypatch.setattr(f"{mod}.atomic_write_bytes", full)
    if cmd == "sample":
        line = one_line_exit_2(capsys, ["sample", run_copy, "--out", tmp_path / "s.png", "--device", "cpu"])
    else:
        line = one_line_exit_2(capsys, ["train", "--data", tiny_npz, "--out", tmp_path / "r", "--hidden-dims", "16",
                                        "--latent-dim", "2", "--epochs", "2", "--batch-size", "50", "--device", "cpu",
                                        "--quiet", "--checkpoint-every", "3"])  # fmt: skip
    assert "No space left on device" in line


def test_malformed_test_hook_is_one_line(tiny_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTVAE_CHECKPOINT_PAUSE", "soon")
    line = one_line_exit_2(capsys, ["train", "--data", tiny_npz, "--out", tmp_path / "r", "--hidden-dims", "8",
                                    "--latent-dim", "2", "--epochs", "1", "--batch-size", "50", "--device", "cpu",
                                    "--quiet"])  # fmt: skip
    assert "FASTVAE_CHECKPOINT_PAUSE" in line


@pytest.mark.parametrize("shape", [(40, 3_000_000), (5, 7), (3, 28, 28, 3), (2, 3, 5, 5), (1, 1_000_003)])
def test_grids_have_a_sane_size_for_any_data_shape(shape):
    """A non-square flat sample once became a 48,000,036 x 52 px strip (11 GB)."""
    n, rest = shape[0], shape[1:]
    d = math.prod(rest)
    x = np.random.default_rng(0).random((min(n, 4), d), dtype=np.float32)
    img = grid_array(x, rest, ncol=8)
    h, w = img.shape[:2]
    assert h * w <= MAX_GRID_PIXELS * 1.01 and max(h, w) < 20 * min(h, w) + 40, img.shape


def test_score_without_importance_samples_writes_no_nan_column(run_dir, tmp_path, capsys):
    data, out = tmp_path / "x.npy", tmp_path / "s.csv"
    np.save(data, np.random.default_rng(0).integers(0, 256, (7, 8, 8)).astype(np.uint8))
    assert (
        main(["score", str(run_dir), "--data", str(data), "--iw", "0", "--out", str(out), "--device", "cpu"])
        == 0
    )
    lines = out.read_text().splitlines()
    assert lines[0] == "index,neg_elbo" and len(lines) == 8 and "nan" not in out.read_text().lower()


def test_files_get_the_umask_mode(run_dir):
    mode = (Path(run_dir) / "config.json").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# ---- the torch-free sampler ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder_onnx(run_dir, tmp_path_factory):
    from fastvae.export import export_decoder

    path = tmp_path_factory.mktemp("onnx") / "decoder.onnx"
    export_decoder(run_dir, path)
    return path


META = st.sampled_from(["-3", "0", "1e9", "abc", "[]", "[0]", "[-1, 4]", '"x"', "[8, 8]", "[64]", "[3, 3]", "2", "7",
                        "99999999999", "[1e3]", "null"])  # fmt: skip


@SETTINGS
@given(key=st.sampled_from(["latent_dim", "data_shape"]), value=META)
def test_forged_decoder_metadata_is_checked_against_the_graph(decoder_onnx, key, value):
    import onnx

    from fastvae.export import Sampler

    model = onnx.load(str(decoder_onnx))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    forged = Path(tempfile.mkdtemp()) / "forged.onnx"
    onnx.save(model, str(forged))
    try:
        s = Sampler(forged)
    except FastVAEError as exc:
        assert "\n" not in str(exc)
    else:  # accepted only when the forged value says what the graph really is
        assert (s.latent_dim, math.prod(s.data_shape)) == (2, 64)
        assert s.sample(3, seed=0).shape == (3, 64)


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--seed", str(2**64)], ["-n", "100000000000"],
                                  ["--temperature", "1e39"], ["--temperature", "inf"], ["--threads", "0"]])  # fmt: skip
def test_sampler_cli_bad_numbers(decoder_onnx, tmp_path, capsys, args):
    from fastvae.export.sample import main as sample_main

    try:
        code = sample_main([str(decoder_onnx), "--out", str(tmp_path / "g.png"), *args])
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fastvae: error:"), err


@pytest.mark.parametrize("where", ["a folder", "under a file", "in a missing folder"])
def test_sampler_cli_unwritable_outputs(decoder_onnx, tmp_path, capsys, where):
    from fastvae.export.sample import main as sample_main

    out = _out_paths(tmp_path)[where]
    for flag in ("--out", "--npy"):
        assert sample_main([str(decoder_onnx), flag, str(out)]) == 2
        assert capsys.readouterr().err.startswith("fastvae: error:")


def test_sampler_npy_writes_the_name_it_reports(decoder_onnx, tmp_path, capsys):
    from fastvae.export.sample import main as sample_main

    target = tmp_path / "samples"  # no .npy suffix: np.save alone would write samples.npy
    assert sample_main([str(decoder_onnx), "-n", "5", "--npy", str(target)]) == 0
    assert str(target) in capsys.readouterr().out and np.load(target).shape == (5, 64)


@pytest.mark.parametrize("flag", ["--free-bits", "--beta", "--lr"])
@pytest.mark.parametrize("value", ["1e308", "1e39", "3.5e38"])
def test_weights_past_float32_give_one_line(tiny_npz, tmp_path, capsys, flag, value):
    """Found by tests/probe_cli.py: --free-bits 1e308 overflowed when made a float32 device value."""
    one_line_exit_2(capsys, ["train", "--data", tiny_npz, "--out", tmp_path / "r", "--device", "cpu", "--quiet",
                             "--max-steps", "1", flag, value])  # fmt: skip


def test_sampler_threads_past_any_machine(decoder_onnx):
    from fastvae.export import Sampler

    with pytest.raises(FastVAEError, match="threads"):
        Sampler(decoder_onnx, threads=10**13)
