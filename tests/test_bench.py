"""The bench harness: contenders wrap within the epoch table, grids, the table's flags, the examples loop."""

import numpy as np
import pytest
import torch

from fastvae.bench import CPU_DEFAULT, CPU_FULL, Grid, resolve_grid, run_cell
from fastvae.bench.contenders import WholeStep, make_contender
from fastvae.bench.examples import ExamplesMNIST, ExamplesVAE, loss_function
from fastvae.bench.report import format_table
from fastvae.config import VAEConfig
from fastvae.data import DeviceData

CFG = VAEConfig(input_dim=(1, 28, 28), hidden_dims=(16,), latent_dim=4)


def _data(n=48):
    x = (np.random.default_rng(0).random((n, 784)) * 255).astype(np.uint8)
    data = DeviceData(x, "cpu")
    return data, data.batch(torch.arange(n))


@pytest.mark.parametrize("name", ["eager", "fastvae"])
def test_contender_wraps_when_rotation_equals_steps_per_epoch(name):
    """48 rows at batch 16: 3 steps per epoch (as B = 16384 on 60,000 MNIST rows). 3k+1 steps must
    stay inside the (3, B) index table, where the old harness indexed past it."""
    data, x = _data()
    c = make_contender(name, CFG, data, x, 16, "fp32")
    assert c.steps_per_epoch == 3
    for _ in range(3 * 3 + 1):
        c.step()
    assert np.isfinite(c.read_loss())


def test_whole_step_cursor_wraps_on_the_device_and_visits_every_batch():
    data, x = _data()
    ws = WholeStep(CFG, x, 16, "fp32", "fused")
    seen = []
    for _ in range(7):
        seen.append(int(ws.cursor))
        ws.opt.zero_grad(set_to_none=True)
        ws.body()
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_cpu_default_grid_is_bounded_and_full_is_one_flag_away():
    cpu = torch.device("cpu")
    assert resolve_grid(cpu, full=False) == CPU_DEFAULT
    assert resolve_grid(cpu, full=True) == CPU_FULL
    # 2 cells of 2 contenders: what keeps `fastvae bench --device cpu` within 3 minutes on 2 cores
    assert len(CPU_DEFAULT.presets) * len(CPU_DEFAULT.batch_sizes) * len(CPU_DEFAULT.dtypes) <= 2
    assert 16384 in CPU_FULL.batch_sizes and len(CPU_FULL.presets) == 3
    custom = resolve_grid(cpu, full=False, steps=7, presets=None)
    assert custom.steps == 7 and custom.name == "cpu-default+custom" and custom.presets == CPU_DEFAULT.presets


def test_cell_at_rotation_equal_to_steps_per_epoch_runs_more_steps_than_the_table():
    data, x = _data()
    grid = Grid("t", (), (), (), steps=10, warmup=2, rounds=2)
    cell = run_cell(CFG, 16, "fp32", data, x, grid, ("eager",))
    e = cell["contenders"]["eager"]
    assert "error" not in e, e
    assert e["timed_steps"] == 10 and e["launches_source"] == "traced" and e["launches_per_step"] > 10


def _record(dynamo):
    c = {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "launches_per_step": None}
    return {
        "device": "cpu", "cpu_cores": 2, "cpu_isa_flags": ["avx2"], "torch_cpu_capability": "AVX2",
        "torch": "x", "triton": None, "cuda": None, "grid": {"name": "g"}, "skipped": [],
        "cells": [{"preset": "p", "batch": 8, "dtype": "fp32", "contenders": {"eager": c, "compile": {**c, "dynamo": dynamo}}}],
    }  # fmt: skip


def test_table_flags_a_compile_cell_that_fell_back_or_broke():
    clean = {"graphs": 1, "graph_breaks": 0, "fallbacks": 0, "recompiles": 0, "flagged": False, "fell_back": False,
             "break_reasons": [], "fallback_reasons": []}  # fmt: skip
    assert "*" not in format_table(_record(clean)).split("\n")[4]
    fell = {**clean, "graphs": 3, "graph_breaks": 2, "fallbacks": 1, "flagged": True, "fell_back": True,
            "fallback_reasons": ["Dynamo recompile limit exceeded"]}  # fmt: skip
    table = format_table(_record(fell))
    row = table.split("\n")[4]
    assert " *" in row and "FELL BACK x1" in row and "3 graphs" in row
    assert "recompile limit" in table and "ran eager (fallback or recompile): p 8 fp32" in table


def test_examples_dataset_and_loss_match_torchvision_to_tensor_and_the_elbo():
    imgs = (np.arange(2 * 784) % 256).astype(np.uint8).reshape(2, 28, 28)
    x, label = ExamplesMNIST(imgs)[1]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and label == 0
    torch.testing.assert_close(x, torch.from_numpy(imgs[1]).float().div(255)[None])
    torch.manual_seed(0)
    model = ExamplesVAE()
    recon, mu, logvar = model(x[None])
    loss = loss_function(recon, x[None], mu, logvar)
    assert loss.ndim == 0 and loss.item() > 0


def test_epoch_times_runs_every_contender_each_round_and_keeps_the_fastest(monkeypatch):
    import fastvae.bench.examples as ex
    from fastvae.bench import EPOCH_ROUNDS, epoch_times

    calls = []
    monkeypatch.setattr(
        ex,
        "examples_epoch",
        lambda images, device: calls.append(1) or {"epoch_s": 9.0 - len(calls), "steps": 469},
    )
    data, x = _data()
    out = epoch_times(None, {"eager": make_contender("eager", CFG, data, x, 16, "fp32")}, torch.device("cpu"))
    assert len(calls) == EPOCH_ROUNDS >= 2
    assert out["examples-loop"]["epoch_s"] == 9.0 - EPOCH_ROUNDS == min(out["examples-loop"]["epoch_s_runs"])
    e = out["eager"]
    assert len(e["epoch_s_runs"]) == EPOCH_ROUNDS and e["steps"] == 3 and np.isfinite(e["mean_loss"])


# ---- issue 28: the CPU table answers "how much faster is fastvae?", threads, records never overwritten ----
def _mnist_like(n=64):
    x = (np.random.default_rng(1).random((n, 784)) * 255).astype(np.uint8)
    data = DeviceData(x, "cpu")
    return data, data.batch(torch.arange(n))


def test_cpu_fastvae_contender_is_the_trainers_step_and_matches_train_bit_for_bit(tmp_path):
    """The CPU 'fastvae' contender is `fastvae train`'s step: from the same seed and data, 4 steps of it
    leave the same parameters as fastvae.train(max_steps=4) with batch 16 (4 steps = one epoch of 64)."""
    from fastvae import train
    from fastvae.config import preset

    cfg = preset("pytorch-example")
    data, x = _mnist_like()
    c = make_contender("fastvae", cfg, data, x, 16, "fp32")
    for _ in range(4):
        c.step()
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=data.x.numpy().reshape(-1, 28, 28), x_test=data.x.numpy()[:20].reshape(-1, 28, 28))
    res = train(data=str(npz), out=str(tmp_path / "run"), batch_size=16, max_steps=4, device="cpu",
                backend="torch", progress=False, binarize=False, seed=0)  # fmt: skip
    assert c.steps_per_epoch == 4
    want = torch.nn.utils.parameters_to_vector(res.model.parameters())
    got = torch.nn.utils.parameters_to_vector(c.model.parameters())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_cell_puts_fastvae_against_the_examples_loop_and_eager_in_the_table():
    from fastvae.bench import _for_cell
    from fastvae.bench.contenders import CPU_CONTENDERS
    from fastvae.bench.report import speed_words
    from fastvae.config import preset

    data, x = _mnist_like()
    grid = Grid("t", (), (), (), steps=6, warmup=1, rounds=2)
    names = tuple(n for n in _for_cell(CPU_CONTENDERS, "pytorch-example", "fp32") if n != "compile")
    assert names == ("examples-loop", "eager", "fastvae")
    assert "examples-loop" not in _for_cell(CPU_CONTENDERS, "paper", "fp32")
    cell = run_cell(preset("pytorch-example"), 16, "fp32", data, x, grid, names)
    ms = {n: cell["contenders"][n]["median_ms"] for n in names}
    record = {**_record(None), "device_type": "cpu", "cells": [cell]}
    table = format_table(record)
    head, row = table.split("\n")[2], table.split("\n")[4]
    assert "fastvae vs examples-loop" in head and "fastvae vs eager" in head
    assert "kernels/step" not in head and "GEMM" not in head and "n/a" not in row
    for other in ("examples-loop", "eager"):  # the words follow the medians, whichever way they go
        assert speed_words(ms[other] / ms["fastvae"]) in row
    assert "fastvae on a CPU: the step `fastvae train` runs there" in table


def test_speed_words_read_right_either_way():
    from fastvae.bench.report import speed_words

    assert speed_words(1.8) == "1.80x faster"
    assert speed_words(0.55) == "1.82x slower"  # was "0.55x faster"
    assert speed_words(1.0) == "1.00x faster"


def test_two_graphs_split_at_backward_are_not_starred_but_a_third_graph_is():
    from fastvae.bench.dynamo import EXPECTED_BREAKS

    expected = {"graphs": 2, "graph_breaks": 3, "fallbacks": 0, "recompiles": 0, "flagged": True,
                "fell_back": False, "break_reasons": list(EXPECTED_BREAKS), "fallback_reasons": []}  # fmt: skip
    row = format_table(_record(expected)).split("\n")[4]
    assert "*" not in row and "2 graphs, as expected" in row
    odd = {**expected, "graphs": 3, "break_reasons": [*EXPECTED_BREAKS, "Unsupported: some op"]}
    row = format_table(_record(odd)).split("\n")[4]
    assert " *" in row and "3 graphs" in row


def test_bench_uses_trains_thread_default(monkeypatch):
    import fastvae.bench as bench
    from fastvae.cli import main

    seen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["bench", "--device", "cpu"]) == 0
        assert main(["bench", "--device", "cpu", "--threads", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 3]


def test_bench_refuses_an_existing_record_before_timing_anything(tmp_path, capsys, monkeypatch):
    import fastvae.bench as bench
    from fastvae.cli import main

    monkeypatch.setattr(bench, "run_cell", lambda *a, **k: pytest.fail("timed before checking --out"))
    old = tmp_path / "cpu.json"
    old.write_text("{}")
    assert main(["bench", "--device", "cpu", "--out", str(old), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and old.read_text() == "{}"
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path / "no" / "r.json"), "--threads", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_default_record_is_a_new_file_and_each_cell_is_saved_at_once(tmp_path, monkeypatch):
    """A failure in the second cell keeps the first cell's figures on disk; the default name is new and
    in the current folder, not benchmarks/results/."""
    import json
    from types import SimpleNamespace

    import fastvae.bench as bench

    monkeypatch.chdir(tmp_path)
    small = (np.random.default_rng(0).random((64, 784)) * 255).astype(np.uint8)
    monkeypatch.setattr(bench, "load_dataset", lambda name: SimpleNamespace(x_train=small))
    calls = []

    def cell(cfg, batch, *a, **k):
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("late failure")
        return {"preset": "pytorch-example", "batch": batch, "dtype": "fp32", "contenders": {}}

    monkeypatch.setattr(bench, "run_cell", cell)
    with pytest.raises(RuntimeError, match="late failure"):
        bench.run_bench("cpu", print_fn=lambda s: None, batch_sizes=(16, 32), epoch=False)
    files = list(tmp_path.glob("fastvae-bench-cpu-*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    assert [c["batch"] for c in rec["cells"]] == [16] and rec["complete"] is False
    from fastvae.errors import FastVAEError

    with pytest.raises(FastVAEError, match="exists"):
        bench.record_path(str(files[0]), rec)


def _bench_script(name):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(root))  # bench_parts imports bench_sampler
    spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", ["bench_sampler", "bench_parts"])
def test_bench_scripts_check_run_and_out_before_any_work(tmp_path, capsys, monkeypatch, script):
    mod = _bench_script(script)
    monkeypatch.setattr(mod, "_interleaved_medians", lambda *a, **k: pytest.fail("timed before the checks"))
    old = tmp_path / "old.json"
    old.write_text("{}")
    assert mod.main(["--run", str(tmp_path / "nope"), "--out", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and old.read_text() == "{}"
    assert mod.main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "new.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]
    assert not (tmp_path / "new.json").exists()


@pytest.mark.slow  # about 2 minutes on a loaded 2-core machine: an export and two cold Python starts
def test_bench_sampler_takes_a_relative_run_and_saves_each_batch(tmp_path, monkeypatch, tiny_npz):
    """`--run runs/x` (relative) used to crash in the cold-start processes, which run in another folder,
    after minutes of timing, losing every row."""
    import json

    from fastvae import train

    mod = _bench_script("bench_sampler")
    monkeypatch.chdir(tmp_path)
    train(data=str(tiny_npz), out="runs/tiny", hidden_dims=(8,), latent_dim=2, max_steps=3, batch_size=50,
          device="cpu", progress=False, backend="torch")  # fmt: skip
    monkeypatch.setattr(mod, "BATCHES", (1, 4))
    monkeypatch.setattr(mod, "_interleaved_medians", lambda fns, b, rounds=6: {k: (fns[k](), 1e-3)[1] for k in fns})
    cold = mod._cold_start
    monkeypatch.setattr(mod, "_cold_start", lambda code: cold(code, runs=1))
    assert mod.main(["--run", "runs/tiny", "--threads", "1", "--out", "rec.json"]) == 0
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["complete"] and [r["batch"] for r in rec["rows"]] == [1, 4] and rec["cold_start_s"]["torch"] > 0
