"""The conditional VAE and the K-sample objectives (mean ELBO, IWAE) through the fused kernels, against
float64 ReferenceVAE (issue 16).

The reference writes them plainly: the label concatenated to the encoder's and the decoder's inputs, the
K samples decoded as B K rows and reduced by torch.logsumexp. The kernels add the label weight's column as
a per-row bias, scatter-add its gradient by label inside the grouped weight-gradient GEMM, and reduce the
K samples in their own small kernel. Tolerances as in test_kernels.py (fp32 IEEE dots: 1e-5).
"""

import numpy as np
import pytest
import torch

from fastvae import FusedVAE
from fastvae.data import DeviceData
from fastvae.engine import TrainStep
from fastvae.kernels import heuristics
from fastvae.kernels.latent import draw_eps
from fastvae.launches import trace_kernels
from tests.test_kernels import DEVICE, ODD, ODD_TANH_2, TOL, pair, rel

FP32 = TOL[torch.float32]


def inputs(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.flat_dim, generator=g)
    x[:, :10] = x[:, :10].round()  # some exact 0/1 pixels
    y = torch.randint(0, cfg.classes, (batch,), generator=g) if cfg.conditional else None
    eps = torch.randn(batch, cfg.k, cfg.latent_dim, generator=g)
    return x, y, eps


CASES = {
    "conditional": (ODD.replace(classes=4), 37),
    "elbo-k3-2layers": (ODD_TANH_2.replace(k=3), 21),
    "iwae-k3": (ODD.replace(objective="iwae", k=3), 21),
    "iwae-k1": (ODD.replace(objective="iwae"), 37),
    "conditional-iwae-k4-2layers": (ODD_TANH_2.replace(classes=3, objective="iwae", k=4, beta=0.6), 19),
}


@pytest.mark.parametrize("case", list(CASES))
def test_objective_and_every_gradient_equal_the_float64_reference(case):
    cfg, batch = CASES[case]
    ref, fused = pair(cfg)
    x, y, eps = inputs(cfg, batch)
    g = torch.rand(batch)  # a non-uniform grad_output reaches every row scale
    yd = None if y is None else y.to(DEVICE)
    o = fused.objective(x.to(DEVICE), eps.to(DEVICE), y=yd)
    (o.loss * g.to(DEVICE)).sum().backward()
    r = ref.objective(x.double(), eps.double(), y=y)
    (r.loss * g.double()).sum().backward()
    for name, a, b in (("loss", o.loss, r.loss), ("rec", o.rec, r.rec), ("kl", o.kl, r.kl)):
        assert rel(a, b) < FP32, name
    names = [n for n, _ in ref.named_parameters()]
    if cfg.conditional:
        assert names[-2:] == ["encoder_label.weight", "decoder_label.weight"]
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) < FP32, name


@pytest.mark.slow
def test_iwae_with_split_k_weight_gradients(monkeypatch):
    """B K = 600 decoder rows, B = 150 encoder rows: the weight-gradient launch splits each group's own rows."""
    monkeypatch.setattr(heuristics, "WGRAD_MIN_ROWS_PER_SPLIT", 128)  # 4 splits
    cfg = ODD.replace(classes=5, objective="iwae", k=4)
    ref, fused = pair(cfg, seed=3)
    x, y, eps = inputs(cfg, 150, seed=3)
    fused.objective(x.to(DEVICE), eps.to(DEVICE), y=y.to(DEVICE)).loss.mean().backward()
    ref.objective(x.double(), eps.double(), y=y).loss.mean().backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) < FP32, name


def test_k_samples_of_in_kernel_noise_are_keyed_by_row_and_sample_and_regenerated():
    """Sample j of row i is keyed by the global sample row (row_offset + i) K + j: the backward regenerates
    the same draws, and they equal draw_eps over the B K rows."""
    cfg = ODD.replace(objective="iwae", k=3)
    ref, fused = pair(cfg, seed=2)
    x = torch.rand(11, 50)
    fused.rng_state.copy_(torch.tensor([99, 5]))
    eps = draw_eps(fused.rng_state.clone(), 11 * 3, 5).view(11, 3, 5)
    loss = fused.objective(x.to(DEVICE)).loss
    loss.sum().backward()
    assert fused.rng_state.tolist() == [99, 6]
    r = ref.objective(x.double(), eps.double().cpu()).loss
    r.sum().backward()
    assert rel(loss, r) < FP32
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert rel(p.grad, q.grad) < FP32, name
    # the draws differ between samples of a row (not one draw repeated K times)
    assert (eps[:, 0] - eps[:, 1]).abs().min() > 0


def test_label_gradient_is_a_deterministic_scatter_add():
    """Two runs give bit-identical label-weight gradients; a label absent from the batch gets exactly zero."""
    cfg = ODD.replace(classes=6)
    grads = []
    for _ in range(2):
        _, fused = pair(cfg, seed=4)
        x, _, eps = inputs(cfg.replace(k=1), 37, seed=4)
        y = torch.randint(0, 5, (37,), generator=torch.Generator().manual_seed(5))  # label 5 never occurs
        fused.objective(x.to(DEVICE), eps[:, 0].to(DEVICE), y=y.to(DEVICE)).loss.sum().backward()
        grads.append([fused.encoder_label.weight.grad.clone(), fused.decoder_label.weight.grad.clone()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
        assert torch.count_nonzero(a[:, 5]) == 0 and torch.count_nonzero(a[:, :5]) > 0


def test_bad_labels_give_one_line():
    from fastvae.errors import FastVAEError

    _, fused = pair(ODD.replace(classes=3))
    x = torch.rand(4, 50).to(DEVICE)
    with pytest.raises(FastVAEError, match="labels must be in 0..2"):
        fused.objective(x, y=torch.tensor([0, 1, 3, 0]).to(DEVICE))
    with pytest.raises(FastVAEError, match="needs labels"):
        fused.objective(x)
    _, plain = pair(ODD)
    with pytest.raises(FastVAEError, match="unconditional"):
        plain.objective(x, y=torch.tensor([0, 1, 2, 0]).to(DEVICE))


# ---- the engine's fused step ------------------------------------------------------------------------------


def _data(classes=0, rows=256):
    rng = np.random.default_rng(0)
    data = DeviceData((rng.random((rows, 50)) * 255).astype(np.uint8), "cpu")
    if classes:
        data.y = torch.from_numpy(rng.integers(0, classes, rows)).to(torch.int64)
    return data


ENGINE_CASES = {
    "conditional": ODD.replace(classes=4),
    "iwae-k3-2layers": ODD_TANH_2.replace(objective="iwae", k=3),
    "conditional-elbo-k2": ODD.replace(classes=3, k=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_step_equals_the_autograd_fused_path_with_torch_adam(case):
    """Same order, same in-kernel noise, same init: the engine's step (labels gathered in-kernel, K samples
    reduced, Adam in the epilogue) against FusedVAE under autograd + torch.optim.Adam."""
    cfg = ENGINE_CASES[case]
    data = _data(cfg.classes)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = FusedVAE(cfg)
    twin = FusedVAE(cfg)
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    eng = TrainStep(model, opt, data, 32)
    assert eng._fused is not None
    eng.load_epoch(perm)
    for _ in range(3):
        eng.step()
    engine_loss = eng.read_loss()
    total = 0.0
    for i in range(3):
        idx = perm[i * 32 : (i + 1) * 32]
        y = data.y[idx] if cfg.conditional else None
        loss = twin.objective(data.batch(idx), y=y).loss
        twin_opt.zero_grad()
        loss.mean().backward()
        twin_opt.step()
        total += loss.double().sum().item()
    assert engine_loss == pytest.approx(total, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "cfg, limit",
    [
        (ODD.replace(classes=4), 6),
        (ODD.replace(objective="iwae", k=3), 7),
        (ODD_TANH_2.replace(classes=2, k=2), 11),
    ],
    ids=["conditional-1layer", "iwae-1layer", "conditional-k2-2layers"],
)
def test_engine_step_kernel_count_of_the_extensions(cfg, limit):
    """The label adds no launch; K samples add one (the K-sample reduction). Traced on the CPU."""
    torch.manual_seed(0)
    model = FusedVAE(cfg)
    eng = TrainStep(
        model, torch.optim.Adam(model.parameters(), lr=1e-3), _data(cfg.classes), 32, binarize=True
    )
    assert eng._fused is not None
    eng.load_epoch(torch.arange(256))
    eng.step()
    trace = trace_kernels(eng.step)
    assert trace.aten == [], trace.summary()
    assert trace.total <= limit, trace.summary()


def test_engine_kernel_count_at_the_preset_shapes():
    """iwae-k5 / iwae-k50 (784-200-200-50, B = 100) and a conditional pytorch-example, on meta tensors.
    iwae-k50's decoder has B K = 5,000 rows, so its weight gradients split the batch: +1 split-K sum."""
    from fastvae.kernels.resources import record_step

    for name, classes, limit in (("iwae-k5", 0, 11), ("iwae-k50", 0, 12), ("pytorch-example", 10, 6)):
        _, launches = record_step(name, 100, "fp32", classes=classes)
        assert len(launches) <= limit, [ln.name for ln in launches]
