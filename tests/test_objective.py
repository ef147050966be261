"""The objective has one home (``ReferenceVAE.objective``), and every training path honours every option
of it: beta, KL warm-up and free bits, on the eager step, the engine and DDP.

Each run is checked against a loop written here from the paper's formulas with torch.nn.functional and
torch.distributions, not with the objective under test: same initial weights, batches and noise.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

from fastvae import ReferenceVAE, TrainConfig, train
from fastvae.data import load_dataset, unit_float
from fastvae.schedules import epoch_permutation, sample_ids, step_noise

OPTIONS = {"beta": 0.7, "kl_warmup_steps": 8, "free_bits": 0.05}
COMMON = {"hidden_dims": (16,), "latent_dim": 3, "batch_size": 50, "max_steps": 20, "lr": 1e-2, "seed": 3,
          "device": "cpu", "progress": False, "backend": "torch"}  # fmt: skip


def reference_loop(data_path, *, beta=1.0, kl_warmup_steps=0, free_bits=0.0, ranks=1, binarize=False):
    """Adam on -log p(x|z) + beta_t * KL, free bits per rank share, as DDP averages per-rank objectives."""
    cfg = TrainConfig(data=str(data_path), binarize=binarize, beta=beta, **COMMON)
    data = load_dataset(str(data_path))
    x_all = torch.from_numpy(unit_float(data.x_train)).flatten(1)
    torch.manual_seed(cfg.seed)
    model = ReferenceVAE(cfg.model_config(data.data_shape))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n, b = len(x_all), cfg.batch_size
    for step in range(cfg.max_steps):
        epoch, i = divmod(step, n // b)
        idx = epoch_permutation(cfg.seed, epoch, n, torch.device("cpu"))[i * b : (i + 1) * b]
        x, eps = step_noise(cfg.seed, sample_ids(epoch, n, idx), x_all[idx], 3, binarize)
        beta_t = beta * min(1.0, (step + 1) / kl_warmup_steps) if kl_warmup_steps else beta
        total = 0.0
        for share in torch.arange(b).chunk(ranks):
            mu, logvar = model.encode(x[share])
            std = torch.exp(0.5 * logvar)
            logits = model.decode(mu + std * eps[share])
            rec = F.binary_cross_entropy_with_logits(logits, x[share], reduction="none").sum(-1)
            kl = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(std)))  # (B, Z)
            kl_term = kl.mean(0).clamp(min=free_bits).sum() if free_bits else kl.sum(-1).mean()
            total = total + (rec.mean() + beta_t * kl_term) / ranks
        opt.zero_grad()
        total.backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_weights(got, want, rtol=2e-4, atol=1e-5):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def test_objective_parts_and_free_bits_floor(tiny_config):
    """The per-sample loss averages to rec + beta * sum_d max(mean KL_d, floor): value and gradient."""
    torch.manual_seed(0)
    model = ReferenceVAE(tiny_config).double()
    x = torch.rand(40, 36, dtype=torch.float64)
    eps = torch.randn(40, 3, dtype=torch.float64)
    floor = 0.03
    o = model.objective(x, eps, beta=0.6, free_bits=floor)
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    kl = kl_divergence(Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(std)))
    rec = F.binary_cross_entropy_with_logits(model.decode(mu + std * eps), x, reduction="none").sum(-1)
    want = rec.mean() + 0.6 * kl.mean(0).clamp(min=floor).sum()
    under = kl.mean(0) < floor
    assert under.any() and not under.all()  # the floor holds some dimensions and not others
    torch.testing.assert_close(o.loss.mean(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.neg_elbo, rec + kl.sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.kl_per_dim, kl, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(o.loss.mean(), list(model.parameters()))
    g_want = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", [False, True], ids=["eager", "engine"])
def test_single_process_paths_honour_every_option(tmp_path, tiny_npz, engine):
    run = train(
        data=str(tiny_npz), out=str(tmp_path / "run"), engine=engine, binarize=True, **OPTIONS, **COMMON
    )
    want = reference_loop(tiny_npz, binarize=True, **OPTIONS)
    assert_same_weights(run.model.state_dict(), want)


def test_engine_honours_free_bits(tmp_path, tiny_npz):
    """The bug this home fixed: the engine once ignored --free-bits and wrote the same weights."""
    runs = {
        fb: train(data=str(tiny_npz), out=str(tmp_path / f"fb{fb}"), engine=True, free_bits=fb, **COMMON)
        for fb in (0.0, 0.05)
    }
    a, b = (runs[fb].model.state_dict() for fb in (0.0, 0.05))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert_same_weights(b, reference_loop(tiny_npz, free_bits=0.05))


@pytest.mark.slow
def test_ddp_honours_every_option(tmp_path, tiny_npz):
    """2 gloo ranks with beta, warm-up and free bits (per-rank batch means, as documented)."""
    out = tmp_path / "ddp"
    args = ["train", "--data", tiny_npz, "--out", out, "--hidden-dims", "16", "--latent-dim", "3", "--batch-size",
            "50", "--max-steps", "20", "--lr", "1e-2", "--seed", "3", "--device", "cpu", "--backend", "torch",
            "--quiet", "--beta", "0.7", "--kl-warmup-steps", "8", "--free-bits", "0.05"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastvae",
           *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(out / "model.safetensors")
    assert_same_weights(got, reference_loop(tiny_npz, ranks=2, **OPTIONS))
    one_rank_view = reference_loop(tiny_npz, ranks=1, **OPTIONS)  # the floor per rank share matters
    assert any(not np.allclose(got[k].numpy(), one_rank_view[k].numpy(), rtol=1e-6) for k in got)
