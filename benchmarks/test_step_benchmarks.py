"""Regression tracking with pytest-benchmark: one training step per contender.

    pytest benchmarks/ --benchmark-only [--benchmark-autosave]

The CPU cell (eager reference) runs anywhere; the GPU cells (eager + CUDA graph, fastvae) are marked
`gpu`. Cross-contender ratios and the published tables come from `fastvae bench`, which measures
all contenders side by side with CUDA events; this suite tracks each one over commits.
"""

import pytest
import torch

from fastvae.bench import _make_contender
from fastvae.config import preset
from fastvae.data import DeviceData, load_dataset

PRESETS = ["pytorch-example", "iwae"]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist").x_train


def _bench(benchmark, mnist, name, preset_name, batch, device):
    data = DeviceData(mnist, device)
    step, engine, _ = _make_contender(name, preset(preset_name), data, batch, "fp32", torch.device(device))
    for i in range(5):
        step(i)

    def one():
        step(1)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(one, rounds=30, iterations=5, warmup_rounds=2)
    engine.read_loss()


@pytest.mark.parametrize("preset_name", PRESETS)
def test_cpu_eager_step(benchmark, mnist, preset_name):
    _bench(benchmark, mnist, "eager", preset_name, 128, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["eager", "eager+graph", "fastvae"])
@pytest.mark.parametrize("batch", [128, 16384])
def test_gpu_step(benchmark, mnist, name, batch):
    _bench(benchmark, mnist, name, "pytorch-example", batch, "cuda")
