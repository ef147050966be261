"""The training engine (one step over resident data) and the benchmark harness."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastvae import FusedVAE, ReferenceVAE, VAEConfig
from fastvae.bench import step_flops
from fastvae.config import preset
from fastvae.data import DeviceData
from fastvae.engine import TrainStep, make_optimizer
from fastvae.noise import row_normal
from fastvae.schedules import TRAIN_EPS_SALT

CFG = VAEConfig(input_dim=50, hidden_dims=(33,), latent_dim=5)


def _data(device="cpu"):
    x = (np.random.default_rng(0).random((256, 50)) * 255).astype(np.uint8)
    return DeviceData(x, device)


def test_engine_step_equals_a_plain_loop_over_the_same_order():
    data = _data()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = ReferenceVAE(CFG)
    twin = ReferenceVAE(CFG)
    twin.load_state_dict(model.state_dict())
    eng = TrainStep(model, make_optimizer(model, 1e-2, False), data, 32)
    eng.load_epoch(perm, epoch=2)
    for _ in range(6):
        eng.step()
    engine_loss = eng.read_loss()
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    total = 0.0
    for i in range(6):
        idx = perm[i * 32 : (i + 1) * 32]
        x = data.x[idx].float() / 255
        eps = row_normal(0, TRAIN_EPS_SALT, 2 * 256 + idx, CFG.latent_dim)  # keyed by epoch * N + index
        rec, kl = twin.elbo_terms(x, eps)
        loss = rec + kl.sum(-1)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        total += loss.double().sum().item()
    assert engine_loss == pytest.approx(total, rel=1e-6)
    assert eng.cursor.item() == 6
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_engine_schedule_inputs_are_read_every_step():
    data = _data()
    torch.manual_seed(0)
    model = ReferenceVAE(CFG)
    eng = TrainStep(model, make_optimizer(model, 1e-2, False), data, 32)
    eng.load_epoch(torch.arange(256))
    eng.set_lr(0.0)  # lr 0: the parameters must not move
    before = [p.clone() for p in model.parameters()]
    eng.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    eng.set_lr(1e-2)
    eng.set_beta(0.0)
    eng.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_engine_with_fused_model_draws_noise_in_kernel():
    data = _data()
    torch.manual_seed(0)
    model = FusedVAE(CFG)
    eng = TrainStep(model, make_optimizer(model, 1e-2, False), data, 32, binarize=True)
    eng.load_epoch(torch.arange(256))
    eng.step()
    eng.step()
    assert model.rng_state[1].item() == 2 and np.isfinite(eng.read_loss())


def test_step_flops_by_hand():
    macs = 784 * 400 + 400 * 40 + 20 * 400 + 400 * 784  # encoder, head, decoder, output
    assert step_flops(preset("pytorch-example"), 128) == 2 * 128 * (3 * macs - 784 * 400)


def test_bench_cli_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvae", "bench", "--device", "cpu", "--presets", "pytorch-example", "--batch-sizes",
         "64", "--steps", "6", "--warmup", "2", "--no-epoch", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["device_type"] == "cpu" and rec["torch"] and "date" in rec and rec["skipped"]
    (cell,) = rec["cells"]
    assert (cell["preset"], cell["batch"], cell["dtype"]) == ("pytorch-example", 64, "fp32")
    for name in ("eager", "compile"):
        c = cell["contenders"][name]
        assert c["p20_ms"] <= c["median_ms"] <= c["p80_ms"] and c["samples_per_s"] > 0, (name, c)
    assert "skipped here" in proc.stdout and proc.stdout.rstrip().splitlines()[-1].startswith("record:")


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_steps():
    """Fused model, in-kernel noise: the replayed graph takes the same steps as the eager engine."""
    data = _data("cuda")
    perm = torch.randperm(256, device="cuda")
    models = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = FusedVAE(CFG).cuda()
        eng = TrainStep(model, make_optimizer(model, 1e-2, graph), data, 32, cuda_graph=graph)
        eng.load_epoch(perm)
        for _ in range(7):  # 3 warm-up, 1 capture, 3 replays
            eng.step()
        models.append(model)
        assert model.rng_state[1].item() == 7  # new noise every replay
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
