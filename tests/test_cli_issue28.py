"""Issue 28's CLI items: seeds past 64 bits, compare with an unlabelled run first, and --help text."""

import argparse
import re

import numpy as np
import pytest

from fastvae import train
from fastvae.cli import build_parser, main
from fastvae.config import MAX_SEED
from fastvae.errors import FastVAEError

TINY = {"hidden_dims": (8,), "latent_dim": 2, "max_steps": 3, "batch_size": 50, "device": "cpu",
        "progress": False, "backend": "torch"}  # fmt: skip


def fails_cleanly(capsys, argv, match):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastvae: error:") and match in err[0], err


@pytest.fixture(scope="module")
def strokes(tmp_path_factory):
    """Two data sets of the same shape and split sizes: one unlabelled, one with 3 label classes (each
    class a different stroke, so a classifier can learn it). 400 test images: quality needs 200."""
    rng = np.random.default_rng(0)
    n = 1000
    y = rng.integers(0, 3, n)
    x = np.zeros((n, 8, 8), np.float32)
    for i, c in enumerate(y):
        r = rng.integers(1, 7)
        if c == 0:
            x[i, r - 1 : r + 2, :] = 1
        elif c == 1:
            x[i, :, r - 1 : r + 2] = 1
        else:
            x[i, np.arange(8), np.arange(8)] = 1
    x = (x * 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("strokes")
    np.savez(root / "plain.npz", x_train=x[:600], x_test=x[600:])
    np.savez(root / "labelled.npz", x_train=x[:600], x_test=x[600:], y_train=y[:600], y_test=y[600:])
    plain = train(data=str(root / "plain.npz"), out=str(root / "plain"), **TINY).out
    labelled = train(data=str(root / "labelled.npz"), out=str(root / "labelled"), **TINY).out
    return plain, labelled


@pytest.mark.parametrize("seed", [str(2**64), str(MAX_SEED + 1), "-1"])
def test_quality_and_compare_refuse_a_seed_torch_cannot_take(capsys, strokes, tmp_path, seed):
    plain, labelled = strokes
    fails_cleanly(capsys, ["quality", labelled, "--seed", seed], "0..")
    fails_cleanly(capsys, ["compare", plain, labelled, "--seed", seed, "--out", tmp_path / "c.png"], "0..")


def test_quality_api_refuses_a_seed_past_64_bits(strokes):
    from fastvae.backends import resolve_device
    from fastvae.compare import compare_runs
    from fastvae.quality import run_quality
    from fastvae.runs import load_run

    run = load_run(strokes[1], resolve_device("cpu"))
    for bad in (2**64, -1, 1.5, True):
        with pytest.raises(FastVAEError, match="seed must be an integer"):
            run_quality(run, 200, seed=bad)
        with pytest.raises(FastVAEError, match="seed must be an integer"):
            compare_runs([str(p) for p in strokes], seed=bad)


def test_compare_with_an_unlabelled_run_first_reports_the_labelled_runs_scores(capsys, strokes, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "cache"))
    plain, labelled = strokes
    tab = tmp_path / "t.md"
    argv = ["compare", plain, labelled, "--names", "P,L", "-n", "200", "--device", "cpu",
            "--out", tmp_path / "c.png", "--table", tab]  # fmt: skip
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    text = tab.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "unavailable" in rows["P"] and "unavailable" not in rows["L"]
    # the floor sentence carries the labelled run's judge accuracy, a number in [0, 1]
    acc = float(re.search(r"judge's test accuracy is ([0-9]+\.[0-9]+)", text).group(1))
    from fastvae.data import load_dataset
    from fastvae.quality import load_classifier

    _, want = load_classifier(load_dataset(str(labelled.parent / "labelled.npz")))
    assert acc == pytest.approx(want, abs=1e-4)
    assert "\nP: " in text and "no labels" in text


# ---- --help ------------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_no_help_says_default_twice_or_default_none():
    """Every subcommand's --help: no '(default: None)', no option with two '(default: ...)' texts."""
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        text = " ".join(sub.format_help().split())  # one line: argparse wraps help text
        assert "(default: None)" not in text, name
        for action in sub._actions:
            if action.help in (None, argparse.SUPPRESS):
                continue
            one = " ".join(sub._get_formatter()._expand_help(action).split()) if action.help else ""
            assert one.count("default") <= 1, (name, action.option_strings, one)


def _option_help(text: str, flag: str) -> str:
    m = re.search(re.escape(flag) + r" [A-Z_]+ (.*?)(?= --|$)", text)
    assert m, flag
    return m.group(1)


def test_train_help_gives_the_defaults_of_epochs_lr_seed_batch_size(monkeypatch):
    """The defaults the help names are the ones a run records (TrainConfig resolved for each preset)."""
    from fastvae.config import PRESETS, TrainConfig

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside "pytorch-example"
    text = " ".join(_subparsers(build_parser())["train"].format_help().split())
    groups = _option_help(text, "--batch-size").split("from the preset; ")[1].rstrip(")").split("; ")
    batch = {n: int(b) for g in groups for names, b in [g.split(": ")] for n in names.split(", ")}
    for name in PRESETS:
        cfg = TrainConfig(preset=name)
        assert batch[name] == cfg.batch_size, name
        assert f"default: {cfg.epochs} for every preset" in _option_help(text, "--epochs")
        assert f"default: {cfg.lr:g} for every preset" in _option_help(text, "--lr")
        assert f"default: {cfg.seed})" in _option_help(text, "--seed")


def test_quality_help_names_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTVAE_CACHE", str(tmp_path / "judge-cache"))
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside the path
    text = " ".join(_subparsers(build_parser())["quality"].format_help().split())
    assert str(tmp_path / "judge-cache") in text and "cache_dir()" not in text


def test_sample_writes_samples_png_in_the_current_folder_by_default(capsys, strokes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_samples = (strokes[0] / "samples.png").read_bytes()
    assert main(["sample", str(strokes[0]), "-n", "4", "--device", "cpu"]) == 0
    assert (tmp_path / "samples.png").stat().st_size > 0 and "samples.png" in capsys.readouterr().out
    assert (strokes[0] / "samples.png").read_bytes() == run_samples  # the run's own record is untouched


# ---- torchrun ------------------------------------------------------------------------------------------
def test_error_line_becomes_torchruns_root_cause(tmp_path, monkeypatch, capsys):
    """The worker's error file, read back by torch.distributed.elastic itself: its ChildFailedError report
    names fastvae's line instead of "To enable traceback see: ..."."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    assert main(["train", "--epochs", "0"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("fastvae: error:") and "--epochs" in line
    report = ChildFailedError("fastvae", {0: ProcessFailure(0, 1, 2, str(path))}).format_msg()
    assert f"traceback : {line}" in report and "To enable traceback" not in report


@pytest.mark.slow  # two torch processes and torchrun: a minute on a loaded 2-core machine
def test_torchrun_bad_flag_gives_one_fastvae_line_and_names_it_as_root_cause(tmp_path):
    """What a user sees under torchrun (gloo, 2 CPU ranks): fastvae's line once, then torchrun's own
    ChildFailedError report (which torchrun always prints for a failed worker) naming that line."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "--monitor-interval=0.5", "-m", "fastvae", "train", "--epochs", "0", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("fastvae: error:")]
    assert len(ours) <= 1 and all("--epochs" in ln for ln in ours)
    root = proc.stderr.split("Root Cause")[1]
    assert "traceback : fastvae: error: fastvae train: argument --epochs" in root, proc.stderr
