"""Configuration: the model (:class:`VAEConfig`), its named presets, and a training run
(:class:`TrainConfig`), with the option vocabularies the CLI offers. Torch-free."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from fastvae.errors import FastVAEError

# The option vocabularies: the CLI offers these choices and the configs validate against them.
ACTIVATIONS = ("relu", "tanh")
LIKELIHOODS = ("bernoulli", "gaussian")
BACKENDS = ("auto", "torch", "triton")
DTYPES = ("fp32", "tf32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
# "vae": the variational autoencoder. "ae": a deterministic autoencoder with the same networks (z = mu(x),
# no noise, no KL), the baseline the VAE is taught against.
MODELS = ("vae", "ae")
# The training objective over k latent samples per row: "elbo", the mean of k single-sample ELBOs (k = 1:
# the plain VAE; k > 1: the IWAE paper's "VAE, k" baseline); "iwae", the k-sample importance-weighted bound
# -log (1/k) sum_j p(x, z_j) / q(z_j|x) (Burda et al., 2015).
OBJECTIVES = ("elbo", "iwae")
# Bound of k: the decoder runs on B * k rows per step.
MAX_SAMPLES = 4096
# Bound of lr, beta and free bits: they become float32 device values (1e308 overflowed there); any
# meaningful setting is far below.
MAX_WEIGHT = 1e6
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; the noise keys mix 63


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
    # "vae", or "ae": the same encoder and decoder as a plain autoencoder (z = mu(x), loss -log p(x|z) only;
    # the head's log-variance half is kept, unused, so every backend shares the state_dict keys).
    model: str = "vae"
    # Labels of a conditional VAE (Sohn et al., 2015): 0 is unconditional; with C > 0 the encoder sees
    # [x, onehot(y)] and the decoder [z, onehot(y)] for a label y in 0..C-1.
    classes: int = 0
    # Training objective ("elbo" or "iwae") and k, the latent samples drawn per training row.
    objective: str = "elbo"
    k: int = 1
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
        if not 0 <= self.beta <= MAX_WEIGHT:
            raise FastVAEError(f"beta must be a number in 0..{MAX_WEIGHT:g}, got {self.beta!r}")
        self.beta = float(self.beta)
        if self.model not in MODELS:
            raise FastVAEError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "ae" and self.beta != 1.0:
            raise FastVAEError("the autoencoder (model 'ae') has no KL term: beta does not apply to it")
        if (
            not isinstance(self.classes, int)
            or isinstance(self.classes, bool)
            or not 0 <= self.classes <= 2**20
        ):
            raise FastVAEError(
                f"classes must be an integer in 0..{2**20} (0: unconditional), got {self.classes!r}"
            )
        if self.objective not in OBJECTIVES:
            raise FastVAEError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not _is_pos_int(self.k) or self.k > MAX_SAMPLES:
            raise FastVAEError(f"k must be an integer in 1..{MAX_SAMPLES}, got {self.k!r}")
        if self.model == "ae" and (self.objective != "elbo" or self.k != 1):
            raise FastVAEError(
                "the autoencoder (model 'ae') draws no latent samples: objective and k do not apply"
            )

    @property
    def conditional(self) -> bool:
        """A conditional VAE: encoder and decoder both see a one-hot label."""
        return self.classes > 0

    @property
    def is_ae(self) -> bool:
        """The deterministic autoencoder: z = mu(x), no KL."""
        return self.model == "ae"

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one data sample: (D,) for a flat input, else the image shape."""
        return self.input_dim if isinstance(self.input_dim, tuple) else (self.input_dim,)

    @property
    def flat_dim(self) -> int:
        """D, the number of input features after flattening."""
        return math.prod(self.data_shape)

    @property
    def n_parameters(self) -> int:
        """Parameters of the MLP VAE this config describes (computed, nothing allocated)."""
        enc = (self.flat_dim, *self.hidden_dims)
        dec = (self.latent_dim, *reversed(self.hidden_dims), self.flat_dim)
        layers = [
            *zip(enc[:-1], enc[1:]),
            (self.hidden_dims[-1], 2 * self.latent_dim),
            *zip(dec[:-1], dec[1:]),
        ]
        gaussian = self.flat_dim if self.likelihood == "gaussian" else 0
        labels = self.classes * (self.hidden_dims[0] + self.hidden_dims[-1])  # encoder_label, decoder_label
        return sum(a * b + b for a, b in layers) + gaussian + labels

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
    # The same network trained on the IWAE objective with k = 5 and k = 50 (the paper's Table 1: 84.78 nats
    # at k = 50 against the VAE's 86.76).
    "iwae-k5": VAEConfig((1, 28, 28), (200, 200), 50, "tanh", objective="iwae", k=5, preset="iwae-k5"),
    "iwae-k50": VAEConfig((1, 28, 28), (200, 200), 50, "tanh", objective="iwae", k=50, preset="iwae-k50"),
    # Higgins et al. (beta-VAE, ICLR 2017), appendix Table 1, "2D shapes (VAE)": input 4096 (64x64x1),
    # encoder FC 1200-1200 ReLU, 10 latents, decoder FC 1200-1200-1200-4096 tanh, Bernoulli, Adagrad lr
    # 1e-2, beta = 4 for dSprites. The same MLP is Chen et al.'s (beta-TCVAE, 2018) dSprites model
    # (github.com/rtqichen/beta-tcvae, vae_quant.py MLPEncoder/MLPDecoder). fastvae mirrors one width list,
    # so this preset is 4096-1200-1200-10 / 10-1200-1200-4096, ReLU on both sides (one decoder layer and
    # the tanh fewer), trained with fastvae's Adam (--lr); batch 64 as disentanglement_lib's study.
    "beta-vae-dsprites": VAEConfig(
        (1, 64, 64), (1200, 1200), 10, "relu", beta=4.0, preset="beta-vae-dsprites"
    ),
}


def preset(name: str) -> VAEConfig:
    """A fresh copy of the named preset's config."""
    if name not in PRESETS:
        raise FastVAEError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# Training settings that come with a preset unless given explicitly.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "pytorch-example": {"batch_size": 128, "binarize": False},
    "paper": {"batch_size": 100, "binarize": False},
    "iwae": {"batch_size": 100, "binarize": True},  # dynamically binarized MNIST, as in the IWAE paper
    "iwae-k5": {"batch_size": 100, "binarize": True},
    "iwae-k50": {"batch_size": 100, "binarize": True},
    "beta-vae-dsprites": {"batch_size": 64, "binarize": False},  # dSprites is binary already
}


@dataclass
class TrainConfig:
    """Everything a run needs; stored in the run's config.json."""

    preset: str = "pytorch-example"
    # "mnist" (bundled), a .npy/.npz file or a folder of images; in the API also an array, a tensor, a
    # (train, test) pair or a map-style Dataset. config.json records a path as given and in-memory data as a
    # description ("<array (1000, 784) uint8>"): such a run resumes or evaluates only with the same data
    # passed again (data= in the API, or saved to a .npy for --data).
    data: Any = "mnist"
    image_size: tuple[int, ...] | None = None  # a folder of images: resize every image to (H, W) (H: square)
    grayscale: bool = False  # a folder of images: read as greyscale (default: RGB unless all are greyscale)
    # CPU threads for torch (torch.set_num_threads); None: DEFAULT_THREADS, see default_threads().
    threads: int | None = None
    images_every: int | None = None  # also write samples and reconstructions every N epochs (images/)
    epochs: int = 10
    batch_size: int | None = None  # global batch; None: the preset's (128, or 100 for paper/iwae)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "constant", or "cosine": lr * (1 + cos(pi * step / total_steps)) / 2
    seed: int = 0
    device: str = "auto"
    out: str | None = None  # default runs/<preset>-<timestamp>
    backend: str = "auto"
    binarize: bool | None = None  # dynamic binarization, re-drawn every batch; None: the preset's
    max_steps: int | None = None  # stop after this many optimizer steps
    time_limit: float | None = None  # stop (evaluate, save) after this many seconds of training
    checkpoint_every: int | None = None  # also checkpoint every N steps (always at each epoch end)
    keep_checkpoints: int = 3
    resume: bool = False  # continue the run in `out` if there is one (else start it: torchrun restarts)
    overwrite: bool = False
    kl_warmup_steps: int = 0  # beta rises linearly from 0 to its value over this many steps
    kl_warmup_epochs: int = 0  # the same in epochs (used when kl_warmup_steps is 0)
    free_bits: float = 0.0  # per-dimension KL floor in nats (batch-averaged, Kingma et al. 2016)
    eval_batch_size: int = 1000
    progress: bool = True
    # fp32 | tf32 | bf16 (bf16: fp32 master weights, bf16 compute; needs the CUDA engine)
    dtype: str = "fp32"
    # Run the step through fastvae.engine (batches, noise and schedule on the device; eps drawn in-kernel
    # by the fused backend); None: on for CUDA in a single process.
    engine: bool | None = None
    # Capture that step in a CUDA graph; None: whenever the engine runs on CUDA.
    cuda_graph: bool | None = None
    # Model overrides of the preset (None keeps the preset's value).
    hidden_dims: tuple[int, ...] | None = None
    latent_dim: int | None = None
    activation: str | None = None
    likelihood: str | None = None
    beta: float | None = None
    model: str | None = None  # "vae" | "ae" (None: the preset's, "vae")
    # A conditional VAE on the data's labels (y_train / y_test): encoder and decoder both see onehot(y).
    conditional: bool = False
    objective: str | None = None  # "elbo" | "iwae" (None: the preset's)
    k: int | None = None  # latent samples per training row (None: the preset's)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded only

    def __post_init__(self) -> None:
        preset(self.preset)  # validates the name
        defaults = PRESET_TRAINING.get(self.preset, {})
        if self.batch_size is None:
            self.batch_size = defaults.get("batch_size", 128)
        if self.binarize is None:
            self.binarize = defaults.get("binarize", False)
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        _check_int("kl_warmup_steps", self.kl_warmup_steps, 0)
        _check_int("kl_warmup_epochs", self.kl_warmup_epochs, 0)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        if self.time_limit is not None and (not _finite(self.time_limit) or self.time_limit <= 0):
            raise FastVAEError(f"time_limit must be a number of seconds > 0, got {self.time_limit!r}")
        if self.checkpoint_every is not None:
            _check_int("checkpoint_every", self.checkpoint_every, 1)
        if not _finite(self.lr) or not 0 < self.lr <= MAX_WEIGHT:
            raise FastVAEError(f"lr must be a number in (0, {MAX_WEIGHT:g}], got {self.lr!r}")
        if not _finite(self.free_bits) or not 0 <= self.free_bits <= MAX_WEIGHT:
            raise FastVAEError(
                f"free_bits must be a number of nats in 0..{MAX_WEIGHT:g}, got {self.free_bits!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise FastVAEError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.backend not in BACKENDS:
            raise FastVAEError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise FastVAEError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise FastVAEError("--resume and --overwrite exclude each other")
        self._check_data_options()
        for name in ("binarize", "resume", "overwrite", "progress", "grayscale", "conditional"):
            if not isinstance(getattr(self, name), bool):
                raise FastVAEError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("engine", "cuda_graph"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise FastVAEError(f"{name} must be true, false or null, got {getattr(self, name)!r}")
        for name in ("preset", "device"):
            if not isinstance(getattr(self, name), str):
                raise FastVAEError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.out is not None and not isinstance(self.out, str):
            raise FastVAEError(f"out must be a path string, got {self.out!r}")
        self.model_config()  # validates the overrides
        if self.model_config().objective == "iwae" and self.free_bits > 0:
            raise FastVAEError(
                "free bits floor the ELBO's closed-form KL: they do not apply to the IWAE objective"
            )
        if self.model_config().is_ae:
            ae_unused = {"free_bits": self.free_bits > 0, "kl_warmup_steps": self.kl_warmup_steps > 0,
                         "kl_warmup_epochs": self.kl_warmup_epochs > 0}  # fmt: skip
            bad = [k for k, v in ae_unused.items() if v]
            if bad:
                verb = "does" if len(bad) == 1 else "do"
                raise FastVAEError(
                    f"the autoencoder (model 'ae') has no KL term: {', '.join(bad)} {verb} not apply"
                )

    def _check_data_options(self) -> None:
        if self.data is None or isinstance(self.data, (bool, int, float)):
            raise FastVAEError(
                f"data must be a path, an array, a tensor, a (train, test) pair or a Dataset, got {self.data!r}"
            )
        if self.image_size is not None:
            size = self.image_size
            if isinstance(size, int) and not isinstance(size, bool):
                size = (size,)
            if (
                not isinstance(size, (list, tuple))
                or len(size) not in (1, 2)
                or not all(_is_pos_int(v) for v in size)
            ):
                raise FastVAEError(
                    f"image_size must be H or (H, W) of positive ints, got {self.image_size!r}"
                )
            self.image_size = (size[0], size[-1])
        for name in ("threads", "images_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)

    @property
    def data_label(self) -> str:
        """What config.json records as the data: a path as given, in-memory data as a description."""
        if isinstance(self.data, str):
            return self.data
        if hasattr(self.data, "__fspath__"):
            return str(self.data.__fspath__())
        return describe_data(self.data)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A TrainConfig from a run's recorded ``train`` section (unknown keys and wrong types refused)."""
        if not isinstance(d, dict):
            raise FastVAEError(f"a training config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise FastVAEError(f"unknown training config key(s): {', '.join(unknown)}")
        if not isinstance(d.get("extra", {}), dict):
            raise FastVAEError("extra must be an object")
        return cls(**d)

    def model_config(self, data_shape: tuple[int, ...] | None = None, classes: int = 0) -> VAEConfig:
        """The model of this run: the preset with the overrides, the data's shape and, for a conditional
        run, its ``classes`` (from the data's labels)."""
        changes = {
            k: getattr(self, k)
            for k in (
                "hidden_dims",
                "latent_dim",
                "activation",
                "likelihood",
                "beta",
                "model",
                "objective",
                "k",
            )
            if getattr(self, k) is not None
        }
        if data_shape is not None:
            changes["input_dim"] = tuple(data_shape)
        if self.conditional and classes:
            changes["classes"] = classes
        return preset(self.preset).replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable record (in-memory data as its description, never copied)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["data"] = self.data_label
        d["extra"] = dict(self.extra)
        for k in ("hidden_dims", "image_size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


# torch's CPU threads when --threads / threads= is not given and OMP_NUM_THREADS is not set. Measured on a
# shared 2-core machine (README, "Threads"): torch's default (one thread per core) thrashes when other jobs
# use the cores, and one thread is never much slower at these model sizes.
DEFAULT_THREADS = 1


def default_threads() -> int:
    """OMP_NUM_THREADS when set to a positive integer, else DEFAULT_THREADS."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else DEFAULT_THREADS


def describe_data(source: Any) -> str:
    """What a run records as its data: a path as given, in-memory data as a description such as
    ``"<array (1000, 784) uint8>"`` (such a run is resumed or evaluated by passing the same data again).
    Duck-typed: no numpy or torch import."""
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        return str(source)
    if hasattr(source, "x_train") and hasattr(source, "x_test"):  # a fastvae.data.Dataset
        return f"<dataset {source.name} {tuple(source.x_train.shape)}+{tuple(source.x_test.shape)}>"
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return f"<pair {describe_data(source[0])} {describe_data(source[1])}>"
    shape, dtype = getattr(source, "shape", None), getattr(source, "dtype", None)
    if shape is not None and dtype is not None:
        kind = "tensor" if type(source).__module__.startswith("torch") else "array"
        return f"<{kind} {tuple(shape)} {str(dtype).replace('torch.', '')}>"
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return f"<{type(source).__name__} of {len(source)} items>"
    return f"<{type(source).__name__}>"


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(name: str, v: object, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise FastVAEError(f"{name} must be an integer {bound}, got {v!r:.40}")
