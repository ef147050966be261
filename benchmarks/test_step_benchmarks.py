"""Regression tracking with pytest-benchmark: one whole training step per contender.

    pytest benchmarks/ --benchmark-only [--benchmark-autosave]

The CPU cells (eager reference) run anywhere; the GPU cells (eager + CUDA graph, fastvae) are marked
`gpu`. Cross-contender ratios and the published tables come from `fastvae bench`, which measures
all contenders side by side; this suite tracks each one over commits. Every contender's step wraps
within its epoch's index table, so any number of calls is valid at any batch size (at B = 16384 the
60,000 MNIST rows give 3 steps per epoch, fewer than one round of calls here).
"""

import math

import pytest
import torch

from fastvae.bench.contenders import make_contender
from fastvae.config import preset
from fastvae.data import DeviceData, load_dataset

PRESETS = ["pytorch-example", "iwae"]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist").x_train


def _bench(benchmark, mnist, name, preset_name, batch, device, rounds=30, iterations=5):
    data = DeviceData(mnist, device)
    x = data.batch(torch.arange(len(data), device=device))
    c = make_contender(name, preset(preset_name), data, x, batch, "fp32")
    for _ in range(5):  # >= 4: the CUDA-graph contenders capture at their 4th step
        c.step()

    def one():
        c.step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(one, rounds=rounds, iterations=iterations, warmup_rounds=2)
    assert math.isfinite(c.read_loss())  # the steps trained: a finite summed loss


@pytest.mark.parametrize("preset_name", PRESETS)
def test_cpu_eager_step(benchmark, mnist, preset_name):
    _bench(benchmark, mnist, "eager", preset_name, 128, "cpu")


def test_cpu_eager_step_rotation_equals_steps_per_epoch(benchmark, mnist):
    """B = 16384: 3 steps per epoch, so the 2 + 3 x 2 calls here wrap the cursor twice (the old suite
    indexed past the table here). Few rounds: one CPU step at this batch takes about 0.3 s."""
    _bench(benchmark, mnist, "eager", "pytorch-example", 16384, "cpu", rounds=3, iterations=2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["eager", "eager+graph", "fastvae"])
@pytest.mark.parametrize("batch", [128, 1024, 16384])
def test_gpu_step(benchmark, mnist, name, batch):
    _bench(benchmark, mnist, name, "pytorch-example", batch, "cuda")
