"""The baseline users run first: the pytorch/examples ``vae/main.py`` training loop, one epoch, timed.

Faithful to that script (github.com/pytorch/examples, vae/main.py) as its users run it:

- the data: ``torchvision.datasets.MNIST(transform=transforms.ToTensor())`` read through a
  ``DataLoader(batch_size=128, shuffle=True)``, with ``num_workers=1, pin_memory=True`` on CUDA (its
  ``kwargs``). torchvision is not a dependency here, so ``ExamplesMNIST`` reproduces what its
  ``__getitem__`` does per sample: a PIL image from the uint8 array, then ``ToTensor`` (float, / 255,
  (1, 28, 28)). Same bundled MNIST training split as every other contender.
- the model: its ``VAE`` (fc1 784-400, fc21/fc22 400-20, fc3 20-400, fc4 400-784, ReLU, sigmoid
  output), its ``loss_function`` (``binary_cross_entropy(reduction="sum")`` + KLD), and
  ``optim.Adam(lr=1e-3)`` with PyTorch's default implementation.
- the loop: ``data.to(device)`` per batch, ``zero_grad()``, forward, ``backward()``,
  ``train_loss += loss.item()`` (a host sync every step), ``optimizer.step()``. The script's every-10-
  batches ``print`` is left out (it is host-side text; the ``.item()`` sync it relies on is kept).

The epoch is the script's: 469 batches (60,000 samples, the last batch 96), no ``drop_last``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EXAMPLES_BATCH = 128


class ExamplesMNIST(torch.utils.data.Dataset):
    """torchvision's MNIST + ``ToTensor``, per sample, over a uint8 (N, 28, 28) array."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images.reshape(len(images), 28, 28)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i].numpy(), mode="L")  # torchvision MNIST.__getitem__
        # transforms.ToTensor on a mode-"L" PIL image: HWC uint8 -> CHW float in [0, 1]
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(28, 28, 1).permute(2, 0, 1)
        return t.contiguous().to(torch.float32).div(255), 0


class ExamplesVAE(nn.Module):
    """pytorch/examples vae/main.py ``VAE``, verbatim in structure."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar) -> torch.Tensor:
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def examples_epoch(images: np.ndarray, device: torch.device, *, warmup_batches: int = 5) -> dict[str, float]:
    """Seconds of one full training epoch of the examples loop (after a few untimed warm-up batches,
    which are not part of the timed epoch), and the epoch's mean loss per sample."""
    torch.manual_seed(1)
    kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    loader = torch.utils.data.DataLoader(
        ExamplesMNIST(images), batch_size=EXAMPLES_BATCH, shuffle=True, **kwargs
    )
    model = ExamplesVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for batch_idx, (data, _) in enumerate(loader):  # warm-up: allocator, kernels, optimizer state
        _train_batch(model, optimizer, data.to(device))
        if batch_idx + 1 >= warmup_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    train_loss, n = 0.0, 0
    for data, _ in loader:
        data = data.to(device)
        train_loss += _train_batch(model, optimizer, data)
        n += len(data)
    seconds = time.perf_counter() - t  # the last .item() synced: the epoch is done
    return {"epoch_s": seconds, "steps": len(loader), "mean_loss": train_loss / n}


def examples_applies(cfg, dtype: str) -> bool:
    """Is a cell's work the examples' own: their network (784-400-20, ReLU, Bernoulli), in fp32?"""
    return (dtype == "fp32" and cfg.flat_dim == 784 and tuple(cfg.hidden_dims) == (400,) and cfg.latent_dim == 20
            and cfg.activation == "relu" and cfg.likelihood == "bernoulli" and not cfg.is_ae
            and not cfg.conditional and cfg.k == 1 and cfg.beta == 1)  # fmt: skip


def examples_step(cfg, data, batch: int, dtype: str) -> tuple[Callable[[], None], Callable[[], float], int]:
    """The examples loop as a step contender's parts (step, read_loss, steps per epoch; the contender is
    built by ``fastvae.bench.contenders``, which imports this module, never the reverse): each step the
    next DataLoader batch (a fresh shuffled pass when one ends, as the script's next epoch), to the
    device, forward, backward, ``loss.item()``, Adam."""
    if not examples_applies(cfg, dtype):
        raise ValueError("the examples loop runs the pytorch-example network in fp32 only")
    device = data.x.device
    torch.manual_seed(1)
    loader = torch.utils.data.DataLoader(
        ExamplesMNIST(data.x.cpu().numpy()), batch_size=batch, shuffle=True,
        **({"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}),
    )  # fmt: skip
    model = ExamplesVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"it": iter(loader), "loss": 0.0}

    def step() -> None:
        try:
            data_b, _ = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            data_b, _ = next(state["it"])
        state["loss"] += _train_batch(model, optimizer, data_b.to(device))

    def read_loss() -> float:
        value, state["loss"] = state["loss"], 0.0
        return value

    return step, read_loss, len(loader)


def _train_batch(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor) -> float:
    optimizer.zero_grad()
    recon_batch, mu, logvar = model(data)
    loss = loss_function(recon_batch, data, mu, logvar)
    loss.backward()
    value = loss.item()
    optimizer.step()
    return value
