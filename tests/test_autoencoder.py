"""``--model ae``: the deterministic autoencoder beside the VAE.

Checked against an autoencoder written here in float64 from its definition (z = mu(x), -log p(x|z) with
the BCE / Gaussian formulas spelled out, no KL), not with the objective under test.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastvae import FusedVAE, ReferenceVAE, TrainConfig, VAEConfig, train
from fastvae.data import DeviceData, load_dataset, unit_float
from fastvae.errors import FastVAEError
from fastvae.evaluate import elbo_stats
from fastvae.schedules import epoch_permutation

AE = VAEConfig(input_dim=(1, 6, 6), hidden_dims=(17, 9), latent_dim=3, activation="tanh", model="ae")
COMMON = {"hidden_dims": (16,), "latent_dim": 3, "batch_size": 50, "max_steps": 20, "lr": 1e-2, "seed": 3,
          "device": "cpu", "progress": False, "backend": "torch", "model": "ae"}  # fmt: skip


def reference_ae_loss(params: dict, x: torch.Tensor, act, likelihood: str = "bernoulli") -> torch.Tensor:
    """Per-sample -log p(x | z = mu(x)) of an MLP autoencoder, from the weights by name, in float64."""
    n_enc = sum(k.startswith("encoder.") and k.endswith(".weight") for k in params)
    h = x
    for i in range(n_enc):
        h = act(h @ params[f"encoder.{i}.weight"].T + params[f"encoder.{i}.bias"])
    z_dim = params["head.weight"].shape[0] // 2
    z = h @ params["head.weight"][:z_dim].T + params["head.bias"][:z_dim]  # the mean half of the head
    for i in range(n_enc):
        z = act(z @ params[f"decoder.{i}.weight"].T + params[f"decoder.{i}.bias"])
    out = z @ params["output.weight"].T + params["output.bias"]
    if likelihood == "bernoulli":  # -[x log s(l) + (1 - x) log(1 - s(l))] = softplus(l) - x l
        return (torch.logaddexp(torch.zeros_like(out), out) - x * out).sum(-1)
    lv = params["output_logvar"]
    return 0.5 * (math.log(2 * math.pi) + lv + (x - out) ** 2 / torch.exp(lv)).sum(-1)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_ae_objective_and_gradients_equal_a_float64_reference(likelihood):
    torch.manual_seed(0)
    model = ReferenceVAE(AE.replace(likelihood=likelihood)).double()
    x = torch.rand(40, 36, dtype=torch.float64)
    eps = torch.randn(40, 3, dtype=torch.float64)  # ignored: the autoencoder draws no noise
    o = model.objective(x, eps, beta=0.3)
    params = dict(model.named_parameters())
    want = reference_ae_loss(params, x, torch.tanh, likelihood)
    torch.testing.assert_close(o.loss, want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(o.rec, want, rtol=1e-12, atol=1e-10)
    assert torch.equal(o.kl, torch.zeros(40, dtype=torch.float64))
    torch.testing.assert_close(model.objective(x).loss, want, rtol=1e-12, atol=1e-10)  # eps drawn: same
    g_got = torch.autograd.grad(o.loss.mean(), list(params.values()))
    g_want = torch.autograd.grad(want.mean(), list(params.values()))
    for name, a, b in zip(params, g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert g_got[list(params).index("head.weight")][3:].abs().max() == 0  # the log-variance half is unused


def test_fused_ae_equals_the_reference():
    """FusedVAE's autoencoder: the VAE kernels with eps = 0 and beta = 0 (interpreted on the CPU)."""
    cfg = VAEConfig(input_dim=50, hidden_dims=(33,), latent_dim=5, activation="relu", model="ae")
    torch.manual_seed(1)
    ref = ReferenceVAE(cfg).double()
    fused = FusedVAE(cfg)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.rand(37, 50)
    o = fused.objective(x)
    o.loss.mean().backward()
    want = reference_ae_loss(dict(ref.named_parameters()), x.double(), torch.relu)
    want.mean().backward()
    torch.testing.assert_close(o.loss.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(o.kl, torch.zeros(37))
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


def reference_ae_loop(data_path) -> dict:
    """Adam on the mean reconstruction loss with the trainer's batches (no noise to share)."""
    cfg = TrainConfig(data=str(data_path), **COMMON)
    data = load_dataset(str(data_path))
    x_all = torch.from_numpy(unit_float(data.x_train)).flatten(1)
    torch.manual_seed(cfg.seed)
    model = ReferenceVAE(cfg.model_config(data.data_shape))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n, b = len(x_all), cfg.batch_size
    for step in range(cfg.max_steps):
        epoch, i = divmod(step, n // b)
        x = x_all[epoch_permutation(cfg.seed, epoch, n, torch.device("cpu"))[i * b : (i + 1) * b]]
        loss = reference_ae_loss(dict(model.named_parameters()), x, torch.relu).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_weights(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [False, True], ids=["eager", "engine"])
def test_ae_training_follows_the_reference_and_lowers_its_loss(tmp_path, tiny_npz, engine):
    run = train(data=str(tiny_npz), out=str(tmp_path / "run"), engine=engine, **COMMON)
    assert_same_weights(run.model.state_dict(), reference_ae_loop(tiny_npz))
    torch.manual_seed(COMMON["seed"])
    untrained = ReferenceVAE(run.model.config)
    test = DeviceData(load_dataset(str(tiny_npz)).x_test, "cpu")
    before, after = elbo_stats(untrained, test).rec, elbo_stats(run.model, test).rec
    assert after < 0.8 * before
    assert run.metrics[-1]["test_kl"] == 0 and run.metrics[-1]["test_neg_elbo"] == pytest.approx(after)


@pytest.mark.slow
def test_ae_resume_and_ddp_match_one_uninterrupted_process(tmp_path, tiny_npz):
    want = reference_ae_loop(tiny_npz)
    out = tmp_path / "resumed"
    train(data=str(tiny_npz), out=str(out), **{**COMMON, "max_steps": 10, "checkpoint_every": 5})
    resumed = train(data=str(tiny_npz), out=str(out), resume=True, **COMMON)
    assert_same_weights(resumed.model.state_dict(), want)
    args = ["train", "--data", tiny_npz, "--out", tmp_path / "ddp", "--hidden-dims", "16", "--latent-dim", "3",
            "--batch-size", "50", "--max-steps", "20", "--lr", "1e-2", "--seed", "3", "--device", "cpu",
            "--backend", "torch", "--quiet", "--model", "ae"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastvae",
           *map(str, args)]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(load_file(tmp_path / "ddp" / "model.safetensors"), want)


def test_ae_options_without_a_kl_term_are_refused():
    for bad in ({"beta": 2.0}, {"free_bits": 0.1}, {"kl_warmup_steps": 5}):
        with pytest.raises(FastVAEError, match="no KL term"):
            TrainConfig(model="ae", **bad)
    with pytest.raises(FastVAEError, match="model must be one of"):
        VAEConfig(model="gan")
    with pytest.raises(FastVAEError, match="undefined for an autoencoder"):
        ReferenceVAE(AE).importance_weighted_bound(torch.rand(2, 36), 4)
    assert (
        VAEConfig.from_dict({k: v for k, v in VAEConfig().to_dict().items() if k != "model"}).model == "vae"
    )


@pytest.mark.slow
def test_fused_ae_on_the_engine_follows_the_reference(tmp_path, tiny_npz):
    """The fused engine step draws eps in-kernel; an AE must take the eps = 0 path instead."""
    run = train(data=str(tiny_npz), out=str(tmp_path / "run"), engine=True, **{**COMMON, "backend": "triton"})
    assert_same_weights(run.model.state_dict(), reference_ae_loop(tiny_npz))
