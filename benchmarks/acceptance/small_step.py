"""One small fused training step for ``compute-sanitizer --tool memcheck`` (stage 2 of gpu_acceptance.sh).

Odd shapes (37 rows, every tile edge masked): the fused forward and backward of the 784-400-20 VAE, then
three engine steps (fused Adam) without a CUDA graph, so every kernel launch is seen by the sanitizer.
Exits 0 with "skipped" where there is no CUDA device. Checks the loss is finite (a NaN is a failure).
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    from fastvae import FusedVAE, VAEConfig
    from fastvae.data import DeviceData
    from fastvae.engine import TrainStep, make_optimizer

    torch.manual_seed(0)
    cfg = VAEConfig(input_dim=784, hidden_dims=(400,), latent_dim=20)
    model = FusedVAE(cfg).cuda()
    loss = model.negative_elbo(torch.rand(37, 784, device="cuda"), torch.randn(37, 20, device="cuda"))
    loss.mean().backward()
    rng = np.random.default_rng(0)
    data = DeviceData(rng.integers(0, 256, size=(37 * 4, 784), dtype=np.uint8), "cuda")
    engine = TrainStep(model, make_optimizer(model, 1e-3, cuda_graph=False), data, 37, cuda_graph=False)
    engine.load_epoch(torch.randperm(len(data), device="cuda"))
    for _ in range(3):
        engine.step()
    total = engine.read_loss()
    torch.cuda.synchronize()
    ok = bool(torch.isfinite(loss).all()) and np.isfinite(total)
    print(f"small step: loss finite {ok}; 3 engine steps, accumulated loss {total:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
