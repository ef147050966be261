"""The command line, run as a user would: real processes, exit codes and stderr."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def fastvae(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastvae", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


def assert_clean_error(proc, fragment):
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastvae: error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = fastvae(
        "train",
        "--data",
        tiny_npz,
        "--epochs",
        2,
        "--batch-size",
        50,
        "--hidden-dims",
        "32",
        "--latent-dim",
        4,
        "--device",
        "cpu",
        "--out",
        out,
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "test -ELBO" in proc.stdout
    return out


@pytest.mark.slow
def test_eval_json_and_sample(run_dir, tmp_path):
    proc = fastvae("eval", run_dir, "--iw", 20, "--limit", 30, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n"] == 30 and res["iw_k"] == 20 and res["iw_nll"] < res["test_neg_elbo"] + 1.0
    png = tmp_path / "s.png"
    proc = fastvae("sample", run_dir, "-n", 16, "--seed", 3, "--out", png, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "/no/such/run"], "no such run directory"),
        (["sample", "/no/such/run", "--out", "x.png"], "no such run directory"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--lr", "abc"], "--lr"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--batch-size", "-3"], "--batch-size"),
        (["train", "--preset", "huge"], "unknown preset"),
        (["train", "--hidden-dims", "0"], "--hidden-dims"),
        (["train", "--data", "/no/such.npy"], "no such data file"),
        (["train", "--device", "tpu"], "device"),
        (["train", "--resume", "--overwrite", "--out", "x"], "exclude"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, fragment, tmp_path):
    assert_clean_error(fastvae(*args, cwd=tmp_path), fragment)


def test_bad_data_values(tmp_path):
    p = tmp_path / "bad.npy"
    np.save(p, np.full((20, 4), 2.0, np.float32))
    assert_clean_error(fastvae("train", "--data", p, "--device", "cpu", "--out", tmp_path / "r"), "[0, 1]")


@pytest.mark.slow
def test_existing_run_and_missing_output_folder(run_dir, tmp_path, tiny_npz):
    proc = fastvae("train", "--data", tiny_npz, "--out", run_dir, "--device", "cpu")
    assert_clean_error(proc, "already holds a run")
    proc = fastvae("sample", run_dir, "--out", tmp_path / "nope" / "x.png", "--device", "cpu")
    assert_clean_error(proc, "does not exist")


@pytest.mark.slow
def test_tampered_weights_are_refused(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    w = copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    assert_clean_error(fastvae("eval", copy, "--iw", 0, "--device", "cpu"), "checksum mismatch")
    w.write_bytes(bytes(data[: len(data) // 2]))
    assert_clean_error(fastvae("eval", copy, "--iw", 0, "--device", "cpu"), "checksum mismatch")


def test_eval_default_k_is_the_cpu_default_on_a_cpu(run_dir):
    """k = 5000 over the test split took ~23 min on a 2-core CPU: the CPU default is 500, and said so."""
    proc = fastvae("eval", run_dir, "--limit", 5, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["iw_k"] == 500
