"""Sample quality judged by a small digit classifier: confidence, class coverage and a Fréchet distance.

A classifier MLP (D -> 256 -> 128 -> classes, ReLU) is trained on the run's labelled training split (the
bundled MNIST labels: a few seconds on a CPU), seeded and cached under ``~/.cache/fastvae`` (or
``$FASTVAE_CACHE``), keyed by the data, the labels and its settings. It judges a set of decoded images by

- the mean confidence: the mean of the largest softmax probability (sharp, digit-like images score high);
- the class histogram of its predictions and that histogram's entropy in bits (log2(10) = 3.32 when all
  ten digits come equally often: does the model cover every class?);
- the Fréchet distance between Gaussians fitted to its penultimate (128-d) features of the images and
  of real test images: the MNIST analogue of FID (Heusel et al., 2017), called "MNIST-FD" here. It is
  computed in float64 and is not comparable with Inception-FID numbers.

The reference set is a seeded random half of the test split; the other half, scored the same way, gives
the floor a perfect model would reach (the FD of real images against real images is not 0: it is the
sampling noise of n images).

A conditional VAE's images are drawn for known labels (prior samples: row r of a 10-wide grid shows label
r % C; midpoints: both ends encoded with their own labels, decoded with the first end's), and each row also
gets its label agreement: the share of images the judge assigns to the label they were drawn for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvae.cache import cache_dir
from fastvae.errors import FastVAEError

HIDDEN = (256, 128)
EPOCHS = 3
BATCH = 128
LR = 1e-3
CLASSIFIER_VERSION = 1  # bump when the recipe changes: old cache files are then ignored


class DigitClassifier(nn.Module):
    """MLP classifier; ``features`` is its penultimate layer, the space the Fréchet distance uses."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        widths = (in_dim, *HIDDEN)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], n_classes)

    def features(self, x: Tensor) -> Tensor:
        h = x.flatten(1)  # (N, D) in [0, 1]
        for layer in self.layers:
            h = F.relu(layer(h))
        return h  # (N, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))  # (N, classes) logits


def _key(x_train: np.ndarray, y_train: np.ndarray, seed: int) -> str:
    h = hashlib.sha256()
    for a in (x_train, y_train):
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([HIDDEN, EPOCHS, BATCH, LR, seed, CLASSIFIER_VERSION]).encode())
    return h.hexdigest()[:20]


def _as_float(x: np.ndarray) -> Tensor:
    from fastvae.data import unit_float

    return torch.from_numpy(unit_float(x))


def check_labels(y: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Integer class labels 0..C-1, one per sample; FastVAEError otherwise."""
    if y is None:
        raise FastVAEError(f"{what}: no labels")
    y = np.asarray(y).reshape(-1)
    if len(y) != n or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise FastVAEError(f"{what}: labels must be {n} integer classes, got {y.dtype} of length {len(y)}")
    if y.min() < 0:
        raise FastVAEError(f"{what}: labels must be integers >= 0")
    return y.astype(np.int64)


def train_classifier(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Adam on cross-entropy for ``EPOCHS`` epochs on the CPU, seeded; returns (model, test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    x, y = _as_float(x_train), torch.from_numpy(check_labels(y_train, len(x_train), "training split"))
    n_classes = int(max(y.max().item(), check_labels(y_test, len(x_test), "test split").max()) + 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = DigitClassifier(x.shape[1], n_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=LR)
    with torch.enable_grad():  # callers may hold no_grad (compare's summarize does): training needs grads
        _fit(clf, opt, x, y, g)
    clf.eval()
    with torch.no_grad():
        pred = clf(_as_float(x_test)).argmax(1).numpy()
    return clf, float((pred == check_labels(y_test, len(x_test), "test split")).mean())


def _fit(clf: DigitClassifier, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, g: torch.Generator) -> None:
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def load_classifier(dataset, *, seed: int = 0, cache: bool = True) -> tuple[DigitClassifier, float]:
    """The judge for a labelled :class:`fastvae.data.Dataset`: from the cache, or trained and cached."""
    from safetensors.torch import load, save

    from fastvae.checkpoint import atomic_write_bytes

    y_train = check_labels(dataset.y_train, len(dataset.x_train), f"{dataset.name} training split")
    path = cache_dir() / f"classifier-{_key(dataset.x_train, y_train, seed)}.safetensors"
    if cache and path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                acc = float(f.metadata()["test_accuracy"])
            tensors = load(path.read_bytes())
            clf = DigitClassifier(dataset.x_train[0].size, tensors["out.bias"].shape[0])
            clf.load_state_dict(tensors)
            return clf.eval(), acc
        except Exception:  # a damaged cache file: train again and replace it
            pass
    clf, acc = train_classifier(dataset.x_train, y_train, dataset.x_test, dataset.y_test, seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in clf.state_dict().items()}
        atomic_write_bytes(path, save(state, metadata={"test_accuracy": repr(acc)}))
    return clf, acc


# ---- the scores ---------------------------------------------------------------------------------------
def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (F,), covariance (F, F)) of features (N, F) in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64. Tr (S_a S_b)^(1/2) is the trace of
    the square root of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues."""
    (mu_a, s_a), (mu_b, s_b) = ((m.double(), s.double()) for m, s in (a, b))
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    mid = root_a @ s_b @ root_a
    tr_root = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_root)


@dataclass
class Scores:
    """The judge's verdict on n images."""

    n: int
    confidence: float  # mean max softmax probability
    histogram: list[int]  # predicted class counts
    entropy_bits: float  # of the predicted class histogram; log2(classes) is perfect coverage
    mnist_fd: float  # Fréchet distance of penultimate features to the reference test images
    # images drawn for known labels (a conditional VAE's): the share the judge assigns to their label
    label_agreement: float | None = None

    def as_dict(self) -> dict:
        d = {"n": self.n, "confidence": self.confidence, "entropy_bits": self.entropy_bits,
             "mnist_fd": self.mnist_fd, "histogram": self.histogram}  # fmt: skip
        if self.label_agreement is not None:
            d["label_agreement"] = self.label_agreement
        return d


@torch.no_grad()
def judge(
    clf: DigitClassifier, x: Tensor, reference: tuple[Tensor, Tensor], labels: Tensor | None = None
) -> Scores:
    """Scores of images x (N, D) in [0, 1] against the reference feature statistics; with ``labels`` (N,),
    the labels the images were drawn for, also the share of them the judge agrees with."""
    x = x.float().cpu().flatten(1)
    feats = torch.cat([clf.features(x[i : i + 2000]) for i in range(0, len(x), 2000)])
    probs = torch.softmax(clf.out(feats), -1)
    pred = probs.argmax(1)
    counts = torch.bincount(pred, minlength=probs.shape[1])
    p = counts.double() / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    fd = frechet_distance(gaussian_stats(feats), reference)
    agree = None if labels is None else float((pred == labels.cpu()).double().mean())
    return Scores(len(x), float(probs.max(1).values.mean()), counts.tolist(), entropy, fd, agree)


def max_entropy_bits(n_classes: int) -> float:
    return math.log2(n_classes)


# ---- a run's report ----------------------------------------------------------------------------------
ROWS = ("prior samples", "interpolation midpoints", "test images (held-out half)")
SCORE_NAMES = ("mean confidence", "class histogram and its entropy", "MNIST-FD")


@dataclass
class QualityReport:
    """The judge's scores of a run's prior samples and interpolation midpoints, with the real-data floor;
    ``unavailable`` says why there are none (a data set without labels)."""

    rows: dict[str, Scores]
    classifier_accuracy: float | None = None
    n_classes: int = 0
    unavailable: str | None = None

    def as_dict(self) -> dict:
        return {"classifier_test_accuracy": self.classifier_accuracy, "unavailable": self.unavailable,
                "rows": {k: v.as_dict() for k, v in self.rows.items()}}  # fmt: skip


@torch.no_grad()
def midpoints(
    model: torch.nn.Module, x: Tensor, n: int, seed: int = 0, y: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Decoded midpoints (mu(a) + mu(b)) / 2 of n random pairs of rows of x (seeded): (n, D), and for a
    conditional VAE (labels ``y`` of the rows) the label each is decoded with, a's (each end is encoded
    with its own label)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(len(x), (2, n), generator=g)
    device = next(model.parameters()).device
    label = (lambda rows: None) if y is None else (lambda rows: y[rows].to(device))  # noqa: E731
    out = []
    for i in range(0, n, 1000):
        ia, ib = a[i : i + 1000], b[i : i + 1000]
        mu_a = model.encode(x[ia].to(device), label(ia))[0]
        mu_b = model.encode(x[ib].to(device), label(ib))[0]
        out.append(model.mean_output(model.decode((mu_a + mu_b) / 2, label(ia))).float().cpu())
    return torch.cat(out), (None if y is None else y[a].cpu())


def check_seed(seed: object) -> int:
    """A seed torch's generators take (0..MAX_SEED), else one FastVAEError line: a larger one overflowed
    inside ``torch.Generator.manual_seed`` with a raw RuntimeError."""
    from fastvae.config import MAX_SEED

    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise FastVAEError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r:.40}")
    return int(seed)


def run_quality(run, n: int = 5000, seed: int = 0, cache: bool = True) -> QualityReport:
    """Scores of ``n`` prior samples and ``n`` interpolation midpoints of a loaded run
    (:func:`fastvae.runs.load_run`), against a seeded random half of its test split; the other half is
    scored as the real-data floor (n is capped at that half's size, so every row uses as many images)."""
    from fastvae.data import load_dataset
    from fastvae.toolkit import prior_samples, sample_labels

    seed = check_seed(seed)
    source = run.doc.get("train", {}).get("data", "mnist")
    dataset = load_dataset(source, run.config.likelihood)
    if dataset.y_train is None or dataset.y_test is None:
        why = (f"{source} has no labels (y_train / y_test in a .npz): {', '.join(SCORE_NAMES)} need a "
               "classifier trained on them and are unavailable")  # fmt: skip
        return QualityReport({}, unavailable=why)
    real = run.test_images(raw=True).float().cpu()
    half = len(real) // 2
    if half < 100:
        raise FastVAEError(f"{source}: the quality scores need a test split of at least 200 images")
    n = min(n, half)
    clf, acc = load_classifier(dataset, seed=seed, cache=cache)
    # A seeded random split: MNIST's first and last 5000 test images come from different writers (its
    # first/second-half split alone gives an MNIST-FD of 12 between real images; a random one, 0.3).
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    real = real[perm]
    y_real = None if run.test.y is None else run.test.y.cpu()[perm]  # a conditional VAE's test labels
    reference = gaussian_stats(clf.features(real[:half]).detach())
    model = run.model
    mid, y_mid = midpoints(model, real, n, seed, y_real)
    y_prior = sample_labels(model, n)  # prior_samples' labels: None, or row r of 10 shows label r % C
    images = {  # name: (images, the labels they were drawn for, or None)
        ROWS[0]: (prior_samples(model, n, seed).float().cpu(), y_prior),
        ROWS[1]: (mid, y_mid),
        ROWS[2]: (real[half : half + n], None if y_real is None else y_real[half : half + n]),
    }
    rows = {name: judge(clf, x, reference, y) for name, (x, y) in images.items()}
    return QualityReport(rows, acc, clf.out.out_features)
