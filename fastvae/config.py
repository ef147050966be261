"""Model configuration (:class:`VAEConfig`) and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fastvae.errors import FastVAEError

ACTIVATIONS = ("relu", "tanh")
LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class VAEConfig:
    """An MLP VAE: encoder q(z|x) = N(mu, diag exp(logvar)), decoder p(x|z), prior N(0, I).

    Validated on construction; a bad value raises :class:`FastVAEError` (a ``ValueError``).
    """

    # An int (flat input) or a data shape such as (1, 28, 28); images are flattened to prod(shape).
    input_dim: int | tuple[int, ...] = (1, 28, 28)
    # Encoder hidden widths, input side first; the decoder uses them mirrored.
    hidden_dims: tuple[int, ...] = (400,)
    latent_dim: int = 20
    activation: str = "relu"
    # "bernoulli": decoder outputs logits, loss is BCE-with-logits. "gaussian": decoder outputs a mean and
    # a learned per-pixel log-variance (one vector shared by all samples, see ReferenceVAE).
    likelihood: str = "bernoulli"
    # KL weight (beta-VAE); 1.0 is the plain ELBO.
    beta: float = 1.0
    # Name of the preset this config came from, if any (informational: stored in checkpoints and exports).
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.input_dim, (list, tuple)):
            shape = tuple(self.input_dim)
            if not shape or not all(_is_pos_int(s) for s in shape):
                raise FastVAEError(
                    f"input_dim must be a positive int or a shape of positive ints, got {shape!r}"
                )
            self.input_dim = shape
        elif not _is_pos_int(self.input_dim):
            raise FastVAEError(
                f"input_dim must be a positive int or a shape of positive ints, got {self.input_dim!r}"
            )
        if isinstance(self.hidden_dims, int) or not isinstance(self.hidden_dims, (list, tuple)):
            raise FastVAEError(f"hidden_dims must be a tuple of positive ints, got {self.hidden_dims!r}")
        self.hidden_dims = tuple(self.hidden_dims)
        if not self.hidden_dims or not all(_is_pos_int(h) for h in self.hidden_dims):
            raise FastVAEError(f"hidden_dims must be one or more positive ints, got {self.hidden_dims!r}")
        if not _is_pos_int(self.latent_dim):
            raise FastVAEError(f"latent_dim must be a positive int, got {self.latent_dim!r}")
        if self.activation not in ACTIVATIONS:
            raise FastVAEError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.likelihood not in LIKELIHOODS:
            raise FastVAEError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not math.isfinite(self.beta)
        ):
            raise FastVAEError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.beta < 0:
            raise FastVAEError(f"beta must be a finite number >= 0, got {self.beta!r}")
        self.beta = float(self.beta)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one data sample: (D,) for a flat input, else the image shape."""
        return self.input_dim if isinstance(self.input_dim, tuple) else (self.input_dim,)

    @property
    def flat_dim(self) -> int:
        """D, the number of input features after flattening."""
        return math.prod(self.data_shape)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_dim"] = list(self.input_dim) if isinstance(self.input_dim, tuple) else self.input_dim
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        if not isinstance(d, dict):
            raise FastVAEError(f"a config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FastVAEError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> VAEConfig:
        return dataclasses.replace(self, **changes)


def _is_pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# The reference points the project measures itself against.
PRESETS: dict[str, VAEConfig] = {
    # pytorch/examples vae/main.py: 784-400-20, ReLU (Adam 1e-3, batch 128, 10 epochs -> ~105.6 nats).
    "pytorch-example": VAEConfig((1, 28, 28), (400,), 20, "relu", preset="pytorch-example"),
    # Kingma & Welling (2013), MNIST: one hidden layer of 500 tanh units, 20 latents (batch 100).
    "paper": VAEConfig((1, 28, 28), (500,), 20, "tanh", preset="paper"),
    # Burda et al. (IWAE, 2015): 784-200-200-50 tanh VAE on dynamically binarized MNIST (NLL 86.76).
    "iwae": VAEConfig((1, 28, 28), (200, 200), 50, "tanh", preset="iwae"),
}


def preset(name: str) -> VAEConfig:
    """A fresh copy of the named preset's config."""
    if name not in PRESETS:
        raise FastVAEError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
