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


@pytest.mark.slow
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


# ---- the fused engine step (FusedVAE + Adam over uint8 resident data) --------------------------------
CFG2 = VAEConfig(input_dim=50, hidden_dims=(33, 19), latent_dim=5, activation="tanh")


def _fused_engine(cfg, batch=32, seed=0, lr=1e-2, binarize=False, **adam):
    torch.manual_seed(seed)
    model = FusedVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr, **adam)
    eng = TrainStep(model, opt, _data(), batch, binarize=binarize, seed=seed)
    assert eng._fused is not None
    return model, opt, eng


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, CFG2], ids=["1-layer", "2-layers"])
def test_fused_engine_step_equals_the_eager_fused_path_with_torch_adam(cfg):
    """Same order, same in-kernel noise (keyed by the same counter), same init: the engine's fused step
    (Adam in the weight-gradient epilogue) against FusedVAE under autograd + torch.optim.Adam."""
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    model, opt, eng = _fused_engine(cfg, weight_decay=1e-3)
    twin = FusedVAE(cfg)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2, weight_decay=1e-3)
    eng.load_epoch(perm)
    for _ in range(4):
        eng.step()
    engine_loss = eng.read_loss()
    data, total = _data(), 0.0
    for i in range(4):
        loss = twin.negative_elbo(data.batch(perm[i * 32 : (i + 1) * 32]))
        twin_opt.zero_grad()
        loss.mean().backward()
        twin_opt.step()
        total += loss.double().sum().item()
    assert engine_loss == pytest.approx(total, rel=1e-6)
    assert eng.cursor.item() == 4 and model.rng_state[1].item() == 4 == twin.rng_state[1].item()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # the optimizer's state is the engine's: a checkpoint of it holds the fused moments and step
    st, twin_st = opt.state_dict()["state"], twin_opt.state_dict()["state"]
    assert float(st[0]["step"]) == 4.0
    for i in st:
        torch.testing.assert_close(st[i]["exp_avg"], twin_st[i]["exp_avg"], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_fused_engine_adam_update_equals_float64_reference():
    """One engine step against float64: the same x and eps through ReferenceVAE in float64, then
    torch.optim.Adam in float64; the parameter update (p_after - p_before) of every tensor."""
    from fastvae.kernels.latent import draw_eps

    model, _, eng = _fused_engine(CFG, batch=37, lr=3e-3)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    eng.load_epoch(perm)
    ref = ReferenceVAE(CFG).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    before = [p.detach().double().clone() for p in model.parameters()]
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    for step in range(2):
        x = _data().batch(perm[step * 37 : (step + 1) * 37]).double()
        eps = draw_eps(model.rng_state.clone(), 37, CFG.latent_dim).double()
        eng.step()
        ref_opt.zero_grad()
        ref.negative_elbo(x, eps).mean().backward()
        ref_opt.step()
    for (name, p), q, b in zip(model.named_parameters(), ref.parameters(), before):
        delta, ref_delta = p.detach().double() - b, q.detach() - b
        assert ((delta - ref_delta).norm() / ref_delta.norm()).item() < 1e-4, name


@pytest.mark.slow
def test_fused_engine_is_bit_identical_across_runs():
    runs = []
    for _ in range(2):
        model, _, eng = _fused_engine(CFG2, binarize=True)
        eng.load_epoch(torch.arange(256))
        for _ in range(3):
            eng.step()
        runs.append(([p.detach().clone() for p in model.parameters()], eng.loss_acc.clone()))
    for a, b in zip(runs[0][0] + [runs[0][1]], runs[1][0] + [runs[1][1]]):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_fused_engine_binarizes_in_kernel_by_the_row_rule():
    """The first kernel binarizes the gathered uint8 rows exactly as ``fastvae.noise.binarize`` does for the
    autograd step: keyed by (seed, salt, epoch * N + data index), whatever the batch or step."""
    from fastvae.noise import binarize
    from fastvae.schedules import TRAIN_BINARIZE_SALT, sample_ids

    torch.manual_seed(0)
    model = FusedVAE(CFG)
    eng = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), _data(), 64, binarize=True, seed=7)
    assert eng._fused is not None
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    eng.load_epoch(perm, epoch=5, first=1)
    for step in (1, 2):
        eng.step()
        idx = perm[step * 64 : (step + 1) * 64]
        expected = binarize(_data().batch(idx), 7, TRAIN_BINARIZE_SALT, sample_ids(5, 256, idx))
        assert torch.equal(eng._fused.buf.view("x", 50), expected)


@pytest.mark.parametrize("cfg, limit", [(CFG, 6), (CFG2, 10)], ids=["1-layer", "2-layers"])
def test_engine_step_kernel_count(cfg, limit):
    """Every kernel one engine step issues (aten ops that launch + Triton launches), traced on the CPU. The
    count depends on the depth only: 1 hidden layer (pytorch-example, paper) <= 6, 2 (iwae) <= 10."""
    from fastvae.launches import trace_kernels

    _, _, eng = _fused_engine(cfg, binarize=True)
    eng.load_epoch(torch.arange(256))
    eng.step()
    trace = trace_kernels(eng.step)
    assert trace.aten == [], trace.summary()
    assert trace.total <= limit, trace.summary()


def test_engine_step_kernel_count_at_the_pytorch_example_preset():
    """The same count at the real shapes (784-400-20, B = 128) on meta tensors (launches recorded)."""
    from fastvae.kernels.resources import record_step

    for preset_name, limit in (("pytorch-example", 6), ("iwae", 10)):
        for dtype in ("fp32", "bf16"):
            _, launches = record_step(preset_name, 128, dtype)
            assert len(launches) <= limit, [ln.name for ln in launches]


@pytest.mark.slow
def test_fused_engine_resumes_from_the_optimizer_state_dict():
    """Checkpoint round trip (model and optimizer state_dicts, as the trainer saves them) mid-epoch: the
    resumed fused engine continues exactly as an uninterrupted one (moments, step count, noise counter)."""
    import copy

    perm = torch.randperm(256, generator=torch.Generator().manual_seed(4))
    model, opt, eng = _fused_engine(CFG, binarize=True)
    eng.load_epoch(perm)
    for _ in range(2):
        eng.step()
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), model.rng_state.clone())
    for _ in range(2):
        eng.step()
    torch.manual_seed(9)
    resumed = FusedVAE(CFG)
    resumed.load_state_dict(saved[0])
    resumed.rng_state.copy_(saved[2])
    ropt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    ropt.load_state_dict(saved[1])
    reng = TrainStep(resumed, ropt, _data(), 32, binarize=True)
    assert reng._fused is not None
    reng.load_epoch(perm, first=2)
    for _ in range(2):
        reng.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert float(ropt.state_dict()["state"][0]["step"]) == 4.0


def test_fused_model_with_another_optimizer_takes_the_autograd_step():
    """FusedVAE stays an ordinary nn.Module: with SGD the engine runs the autograd step (the same kernels
    under autograd, eps drawn in-kernel, then SGD) and matches ReferenceVAE under SGD with that eps."""
    from fastvae.kernels.latent import draw_eps

    torch.manual_seed(0)
    model = FusedVAE(CFG)
    ref = ReferenceVAE(CFG)
    ref.load_state_dict(model.state_dict())
    eng = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1e-2), _data(), 32)
    assert eng._fused is None
    eng.load_epoch(torch.arange(256))
    eps = draw_eps(model.rng_state.clone(), 32, CFG.latent_dim)
    eng.step()
    opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    ref.negative_elbo(_data().batch(torch.arange(32)), eps).mean().backward()
    opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
