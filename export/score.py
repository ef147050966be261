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
from fastvae.export.runtime import OnnxPart, check_out, input_labels, read_inputs, write_table

DECODED_ROWS = 16384  # rows x draws per call: the IW scorer decodes K rows per input row


class Scorer(OnnxPart):
    """Anomaly scores from a fastvae ONNX scorer on the CPU: ``score(x) -> {name: (N,) float32}``."""

    part = "scorer"

    def __init__(self, path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        self.k = int(self.metadata.get("iw_k", "0"))
        self.seed = int(self.metadata.get("eval_seed", "0"))
        self.chunk = max(1, min(1024, DECODED_ROWS // max(self.k, 1)))
        warm = np.zeros(1, np.int64) if self.classes else None
        self.score(np.zeros((1, self.in_dim), np.float32), y=warm)  # warm-up

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
        seed = self.seed if seed is None else int(seed)
        if row_offset < 0:
            raise FastVAEError(f"row_offset must be >= 0, got {row_offset}")
        out = {name: np.empty(len(x), np.float32) for name in self.outputs}
        for i in range(0, len(x), self.chunk):
            xc = x[i : i + self.chunk]
            rows = np.arange(row_offset + i, row_offset + i + len(xc), dtype=np.int64)
            for name, v in zip(
                self.outputs,
                self.session.run(
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
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's)")
    p.add_argument("--labels", help="conditional VAE: labels, a .npy or the y_test / y of a .npz (default: the "
                   "input's own, when it is a .npz that has them)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.error = lambda message: (print(f"fastvae: error: {message}", file=sys.stderr), sys.exit(2))  # one line
    a = p.parse_args(argv)
    try:
        out = check_out(a.out, (".csv", ".npy"))
        scorer = Scorer(a.model, threads=a.threads)
        x = read_inputs(a.input)
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
