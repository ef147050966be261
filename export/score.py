"""Torch-free anomaly scores with an exported fastvae scorer: numpy + onnxruntime (+ Pillow for PNGs).

    python -m fastvae.export.score SCORER.onnx INPUT --out scores.csv|scores.npy [--seed S]

Per sample, in nats (higher = more unusual): the -ELBO (``neg_elbo``, beta = 1), its reconstruction
(``rec``) and KL (``kl``) parts, and for a scorer exported with ``--iw K`` the K-sample
importance-weighted NLL (``iw_nll``). The noise is fastvae's per-row keyed noise
(``fastvae.export.keyed_noise``): row i of the input draws eps keyed by (seed, i), so a row scores the
same in any batch, and the same seed always gives the same scores. The default seed is the run's own,
so the scores of its test images are those of ``fastvae evaluate`` / ``fastvae score``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from fastvae.errors import FastVAEError
from fastvae.export import keyed_noise
from fastvae.export.runtime import (
    MAX_IW,
    MAX_SEED,
    GraphIO,
    OnnxPart,
    check_out,
    check_seed,
    input_labels,
    meta_int,
    read_inputs,
    write_table,
)

DECODED_ROWS = 16384  # rows x draws per call: the IW scorer decodes K rows per input row


class Scorer(OnnxPart):
    """Anomaly scores from a fastvae ONNX scorer on the CPU: ``score(x) -> {name: (N,) float32}``."""

    part = "scorer"

    def __init__(self, path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        self.chunk = max(1, min(1024, DECODED_ROWS // max(self.k, 1)))
        warm = np.zeros(1, np.int64) if self.classes else None
        self.score(np.zeros((1, self.in_dim), np.float32), y=warm)  # warm-up

    def _read_metadata(self) -> None:
        self.k = meta_int(self.path, self.metadata, "iw_k", 0, MAX_IW)
        self.seed = meta_int(self.path, self.metadata, "eval_seed", 0, MAX_SEED)

    def graph_io(self) -> GraphIO:
        z, k = self.latent_dim, self.k
        inputs = [
            ("x", 2, {1: self.in_dim}),
            ("eps", 2, {1: z}),
            *([("eps_iw", 3, {1: k, 2: z})] if k else []),
        ]
        outputs = [(name, 1, {}) for name in ("neg_elbo", "rec", "kl", *(["iw_nll"] if k else []))]
        return inputs, outputs

    def noise(self, rows: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """The noise inputs for input rows ``rows`` (their indices)."""
        feeds = {"eps": keyed_noise.elbo_eps(seed, rows, self.latent_dim)}
        if self.k:
            feeds["eps_iw"] = keyed_noise.iw_eps(seed, rows, self.k, self.latent_dim)
        return feeds

    def score(
        self, x: np.ndarray, seed: int | None = None, *, row_offset: int = 0, y: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Scores of x (N, D) or (N, *data_shape) (uint8 pixels or floats in [0, 1]): ``neg_elbo``,
        ``rec``, ``kl`` and, for an IW scorer, ``iw_nll``, each (N,). Row i draws the noise keyed by
        (seed, row_offset + i); ``seed`` defaults to the run's. A conditional VAE's scorer takes the labels
        ``y`` (N,) and bounds -log p(x|y)."""
        x = self.check_x(x)
        labels = self.check_y(y, len(x))
        seed = self.seed if seed is None else check_seed(seed)
        if (
            isinstance(row_offset, bool)
            or not isinstance(row_offset, (int, np.integer))
            or not 0 <= row_offset <= MAX_SEED - len(x)
        ):  # rows are int64 keys of the noise
            raise FastVAEError(
                f"row_offset must be an integer in 0..{MAX_SEED - len(x)}, got {row_offset!r:.40}"
            )
        row_offset = int(row_offset)
        out = {name: np.empty(len(x), np.float32) for name in self.outputs}
        for i in range(0, len(x), self.chunk):
            xc = x[i : i + self.chunk]
            rows = np.arange(row_offset + i, row_offset + i + len(xc), dtype=np.int64)
            for name, v in zip(
                self.outputs,
                self.run(
                    self.outputs,
                    {"x": xc, **self.noise(rows, seed), **{k: v[i : i + len(xc)] for k, v in labels.items()}},
                ),
            ):
                out[name][i : i + len(xc)] = v
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastvae.export.score", description=__doc__.splitlines()[0])
    p.add_argument("model", help="ONNX scorer written by `fastvae export --part scorer [--iw K]`")
    p.add_argument("input", help=".npy / .npz file or a folder of PNG images")
    p.add_argument("--out", required=True, help=".csv (index and one column per score) or .npy (N, scores)")
    p.add_argument("--seed", type=int, default=None, help=f"noise seed, 0..{MAX_SEED} (default: the run's)")
    p.add_argument("--labels", help="conditional VAE: labels, a .npy or the y_test / y of a .npz (default: the "
                   "input's own, when it is a .npz that has them)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.error = lambda message: (print(f"fastvae: error: {message}", file=sys.stderr), sys.exit(2))  # one line
    a = p.parse_args(argv)
    try:
        out = check_out(a.out, (".csv", ".npy"))
        scorer = Scorer(a.model, threads=a.threads)
        x = read_inputs(a.input, scorer.data_shape)
        scores = scorer.score(x, a.seed, y=input_labels(scorer, a, len(x)))
        write_table(out, scores)
    except FastVAEError as exc:
        print(f"fastvae: error: {exc}", file=sys.stderr)
        return 2
    n = len(scores["neg_elbo"])
    print(
        f"wrote {a.out}: {n} samples ({', '.join(scores)}), mean -ELBO {scores['neg_elbo'].mean():.2f} nats"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
