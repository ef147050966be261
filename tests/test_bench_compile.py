"""The bench's compile contender really compiles, cell after cell in one process, and the detector that
would say otherwise works."""

import numpy as np
import pytest
import torch

from fastvae.bench import Grid, run_cell
from fastvae.bench import dynamo as bench_dynamo
from fastvae.config import VAEConfig
from fastvae.data import DeviceData

# Small widths keep inductor's CPU compile (max-autotune) to a few seconds a cell.
CFG = VAEConfig(input_dim=(1, 28, 28), hidden_dims=(32,), latent_dim=8)


@pytest.mark.slow
def test_compile_cells_never_fall_back_across_batches_and_dtypes_in_one_process():
    """The old harness compiled one function for every cell: guards failed on batch and dtype, and from
    about the 12th cell dynamo's recompile limit made every "compile" cell run eager. Now dynamo is reset
    before each cell: every cell compiles the whole step, with no fallback and no recompile while timed."""
    x8 = (np.random.default_rng(0).random((512, 784)) * 255).astype(np.uint8)
    data = DeviceData(x8, "cpu")
    x = data.batch(torch.arange(len(data)))
    grid = Grid("test", (), (), (), steps=6, warmup=3, rounds=2)
    cells = [(b, d) for d in ("fp32", "bf16") for b in (64, 128)] + [(64, "fp32")]  # back to the first
    for b, d in cells:
        cell = run_cell(CFG, b, d, data, x, grid, ("compile",))
        c = cell["contenders"]["compile"]
        assert "error" not in c, (b, d, c)
        dyn = c["dynamo"]
        assert dyn["fallbacks"] == 0 and dyn["recompiles"] == 0 and not dyn["fell_back"], (b, d, dyn)
        assert not any("recompile limit" in r for r in dyn["fallback_reasons"]), dyn
        # Forward in one graph, Adam in another: PyTorch's Optimizer.step breaks the graph on purpose
        # (torch/optim/optimizer.py, _use_grad), and Tensor.backward() is not traced by default. That is
        # the expected shape the table does not star (issue 28): check it is what really happens.
        assert dyn["graphs"] == bench_dynamo.EXPECTED_GRAPHS, dyn
        assert set(dyn["break_reasons"]) <= set(bench_dynamo.EXPECTED_BREAKS) and not dyn["flagged"], dyn


def test_detector_reports_a_recompile_limit_fallback():
    """A function recompiled per Python int hits recompile_limit = 2 on the third value and runs eager;
    the stats must say so."""
    import torch._dynamo

    bench_dynamo.reset()
    f = torch.compile(lambda t, k: t * k + 1, backend="eager")
    t = torch.ones(3)
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False, specialize_int=True):
        f(t, 1)
        warm = bench_dynamo.snapshot()
        for k in (2, 3, 4):
            f(t, k)
    s = bench_dynamo.stats(warm, bench_dynamo.snapshot())
    assert s.fell_back and s.recompiles >= 1, s
    assert any("recompile limit" in r for r in s.fallback_reasons), s


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    bench_dynamo.reset()
