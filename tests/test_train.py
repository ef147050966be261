"""Training, checkpoints and the run directory (the reference backend, on the CPU)."""

import json

import pytest
import torch

from fastvae import TrainConfig, load_model, train
from fastvae.data import DeviceData, load_dataset
from fastvae.errors import FastVAEError
from fastvae.evaluate import elbo_stats
from fastvae.runs import read_run_config


def _cfg(tmp_path, data, **kw):
    base = dict(
        data=str(data),
        hidden_dims=(32,),
        latent_dim=4,
        epochs=2,
        batch_size=50,
        device="cpu",
        out=str(tmp_path / "run"),
        progress=False,
        backend="torch",
    )
    return TrainConfig(**{**base, **kw})


def test_short_training_lowers_the_test_loss(tmp_path, tiny_npz):
    cfg = _cfg(tmp_path, tiny_npz, epochs=8, lr=5e-3)
    torch.manual_seed(cfg.seed)
    from fastvae import ReferenceVAE

    untrained = ReferenceVAE(cfg.model_config((8, 8)))
    test = DeviceData(load_dataset(str(tiny_npz)).x_test, "cpu")
    before = elbo_stats(untrained, test).neg_elbo
    result = train(cfg)
    after = result.metrics[-1]["test_neg_elbo"]
    assert after < 0.8 * before, (before, after)
    assert [m["epoch"] for m in result.metrics] == list(range(1, 9))
    for key in (
        "epoch",
        "train_loss",
        "test_neg_elbo",
        "seconds",
        "samples_per_s",
        "kl_per_dim",
        "active_units",
    ):
        assert key in result.metrics[0]


def test_run_directory_contents_and_round_trip(tmp_path, tiny_npz):
    result = train(_cfg(tmp_path, tiny_npz))
    out = result.out
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "samples.png", "reconstructions.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[-1]["test_neg_elbo"] == pytest.approx(
        result.metrics[-1]["test_neg_elbo"]
    )
    loaded = load_model(out)
    x = torch.rand(5, 64)
    eps = torch.randn(5, 4)
    assert torch.equal(loaded.negative_elbo(x, eps), result.model.negative_elbo(x, eps))
    config, doc = read_run_config(out)
    assert config.data_shape == (8, 8) and doc["train"]["batch_size"] == 50


def test_same_seed_same_run(tmp_path, tiny_npz):
    a = train(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "a"), epochs=1))
    b = train(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "b"), epochs=1))
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_existing_run_is_not_overwritten_silently(tmp_path, tiny_npz):
    train(_cfg(tmp_path, tiny_npz, epochs=1))
    with pytest.raises(FastVAEError, match="already holds a run"):
        train(_cfg(tmp_path, tiny_npz, epochs=1))
    train(_cfg(tmp_path, tiny_npz, epochs=1, overwrite=True))


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"preset": "nope"}, "unknown preset"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_train_settings(tmp_path, tiny_npz, kw, fragment):
    with pytest.raises(FastVAEError, match=fragment):
        _cfg(tmp_path, tiny_npz, **kw)


def test_batch_larger_than_data(tmp_path, tiny_npz):
    with pytest.raises(FastVAEError, match="exceeds"):
        train(_cfg(tmp_path, tiny_npz, batch_size=10_000))


@pytest.mark.slow
def test_triton_backend_follows_the_reference_trajectory(tmp_path, tiny_npz):
    """Same init, batches and noise: the fused backend's run ends where the reference's does."""
    ref = train(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "ref"), epochs=1, backend="torch"))
    fused = train(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "fused"), epochs=1, backend="triton"))
    for (name, p), q in zip(ref.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert fused.metrics[-1]["test_neg_elbo"] == pytest.approx(ref.metrics[-1]["test_neg_elbo"], rel=1e-4)


def test_time_limit_stops_cleanly_with_a_saved_model(tmp_path):
    res = train(
        device="cpu",
        out=str(tmp_path / "t"),
        time_limit=1e-3,
        progress=False,
        hidden_dims=(16,),
        latent_dim=2,
    )
    assert res.step == 50  # checked every 50 steps: stops at the first check past the limit
    assert (res.out / "model.safetensors").exists() and res.metrics[-1]["step"] == 50


def test_engine_path_of_the_trainer_on_cpu(tmp_path, tiny_npz):
    """The device-resident engine (eager on the CPU): metrics, periodic checkpoints and resume work."""
    cfg = _cfg(tmp_path, tiny_npz, epochs=3, engine=True, checkpoint_every=4, lr=5e-3)
    res = train(cfg)
    assert [m["epoch"] for m in res.metrics] == [1, 2, 3] and res.metrics[-1]["test_neg_elbo"] < res.metrics[
        0
    ]["test_neg_elbo"]
    from fastvae.checkpoint import list_checkpoints

    assert [c.name for c in list_checkpoints(res.out)] == [
        "step-000000024",
        "step-000000028",
        "step-000000030",
    ]
    more = train(_cfg(tmp_path, tiny_npz, epochs=4, engine=True, checkpoint_every=4, lr=5e-3, resume=True))
    assert more.step == 40 and [m["epoch"] for m in more.metrics] == [1, 2, 3, 4]
    with pytest.raises(FastVAEError, match="cuda-graph"):
        train(_cfg(tmp_path, tiny_npz, out=str(tmp_path / "g"), cuda_graph=True))


@pytest.mark.parametrize("engine", [False, True])
def test_cosine_lr_schedule_is_what_adam_uses(tmp_path, tiny_npz, engine, monkeypatch):
    import math

    used = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        lr = self.param_groups[0]["lr"]
        used.append(float(lr.item() if torch.is_tensor(lr) else lr))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    res = train(_cfg(tmp_path, tiny_npz, epochs=4, lr=1e-2, lr_schedule="cosine", engine=engine))
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 40)) for s in range(40)]
    assert used == pytest.approx(expected, rel=1e-6)  # every one of the 40 steps
    assert [m["lr"] for m in res.metrics] == pytest.approx([expected[s - 1] for s in (10, 20, 30, 40)])


def test_training_on_the_reference_backend_needs_no_triton(tmp_path, tiny_npz):
    """Triton is an optional extra: the CPU training path must not import it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any import of triton now fails
        "from fastvae.cli import main\n"
        f"raise SystemExit(main(['train', '--data', {str(tiny_npz)!r}, '--out', {str(tmp_path / 'r')!r}, "
        "'--hidden-dims', '8', '--latent-dim', '2', '--max-steps', '3', '--device', 'cpu', '--quiet']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
