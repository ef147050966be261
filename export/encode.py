"""Torch-free embedding with an exported fastvae encoder: numpy + onnxruntime (+ Pillow for PNG folders).

    python -m fastvae.export.encode ENCODER.onnx INPUT --out mu.npy|mu.csv [--logvar FILE.npy]

INPUT is a .npy array, an .npz archive (its ``x``, ``x_test`` or only array) or a folder of PNG/JPEG
images (at its top level or in class subfolders, read as training reads them), uint8 pixels or floats in
[0, 1]. ``--out`` gets the posterior means mu (N, Z) as .npy, or as CSV with
the columns index, mu_0.., logvar_0...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from fastvae.errors import FastVAEError
from fastvae.export.runtime import GraphIO, OnnxPart, check_out, input_labels, read_inputs, write_table

CHUNK_ROWS = 1024  # CPU throughput peaks near here


class Encoder(OnnxPart):
    """q(z|x) from a fastvae ONNX encoder on the CPU: ``encode(x) -> (mu, logvar)``, each (N, Z)."""

    part = "encoder"

    def __init__(self, path, threads: int | None = None) -> None:
        super().__init__(path, threads)
        warm = np.zeros(1, np.int64) if self.classes else None
        self.encode(np.zeros((1, self.in_dim), np.float32), warm)  # warm-up

    def graph_io(self) -> GraphIO:
        z = self.latent_dim
        return [("x", 2, {1: self.in_dim})], [("mu", 2, {1: z}), ("logvar", 2, {1: z})]

    def encode(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, logvar) of x (N, D) or (N, *data_shape): uint8 pixels or floats in [0, 1]; a conditional
        VAE's encoder also takes the labels ``y`` (N,)."""
        x = self.check_x(x)
        labels = self.check_y(y, len(x))
        mu = np.empty((len(x), self.latent_dim), np.float32)
        logvar = np.empty_like(mu)
        for i in range(0, len(x), CHUNK_ROWS):
            feed = {"x": x[i : i + CHUNK_ROWS], **{k: v[i : i + CHUNK_ROWS] for k, v in labels.items()}}
            mu[i : i + CHUNK_ROWS], logvar[i : i + CHUNK_ROWS] = self.run(["mu", "logvar"], feed)
        return mu, logvar


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastvae.export.encode", description=__doc__.splitlines()[0])
    p.add_argument("model", help="ONNX encoder written by `fastvae export --part encoder`")
    p.add_argument("input", help=".npy / .npz file or a folder of PNG/JPEG images")
    p.add_argument("--out", required=True, help="mu as .npy (N, Z), or .csv with mu and logvar columns")
    p.add_argument("--logvar", help="also save logvar as a .npy array")
    p.add_argument("--labels", help="conditional VAE: labels, a .npy or the y_test / y of a .npz (default: the "
                   "input's own, when it is a .npz that has them)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.error = lambda message: (print(f"fastvae: error: {message}", file=sys.stderr), sys.exit(2))  # one line
    a = p.parse_args(argv)
    try:
        out = check_out(a.out, (".npy", ".csv"))
        if a.logvar:
            check_out(a.logvar, (".npy",))
        enc = Encoder(a.model, threads=a.threads)
        x = read_inputs(a.input, enc.data_shape)
        mu, logvar = enc.encode(x, input_labels(enc, a, len(x)))
        if out.suffix.lower() == ".npy":
            write_table(out, {f"mu_{j}": mu[:, j] for j in range(mu.shape[1])})
        else:
            cols = {f"mu_{j}": mu[:, j] for j in range(mu.shape[1])}
            cols.update({f"logvar_{j}": logvar[:, j] for j in range(logvar.shape[1])})
            write_table(out, cols)
        if a.logvar:
            write_table(a.logvar, {f"logvar_{j}": logvar[:, j] for j in range(logvar.shape[1])})
    except FastVAEError as exc:
        print(f"fastvae: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(mu)} embeddings of dimension {mu.shape[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
