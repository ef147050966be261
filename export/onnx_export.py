"""Export a trained run to ONNX, part by part, each checked before it is kept.

Parts (one self-contained file each, opset 18, dynamic batch):

- ``decoder``: z (B, Z) float32 -> x_prob (B, D), E[x|z].
- ``encoder``: x (B, D) -> mu, logvar (B, Z): q(z|x).
- ``scorer``: x (B, D), eps (B, Z) [, eps_iw (B, K, Z)] -> neg_elbo, rec, kl (B,) [, iw_nll (B,)]: the
  true -ELBO (beta = 1) and its parts, and with ``iw=K`` the K-sample importance-weighted NLL, both from
  ``fastvae.objective`` (its ``iw_log_weights``/``iw_nll`` are also ``importance_weighted_bound``'s). The noise is a graph input, not drawn in the graph: ONNX's
  RandomNormal(Like) takes its seed as a static attribute, so a per-call or per-row seed is impossible
  with a standard op, and its stream is the runtime's own, so no check could compare it with PyTorch. The
  torch-free ``Scorer`` draws eps with fastvae's per-row keyed noise ported to numpy
  (``fastvae.export.keyed_noise``): the same seed gives the same scores in any batching, and on a run's
  test images exactly the eps of ``fastvae.evaluate``.

The plain PyTorch layers are exported (a Triton launch cannot be traced), through the dynamo exporter.
After writing: the full ONNX checker, strict shape inference, and onnxruntime against PyTorch on batches
1, 7 and 1024 (the decoder on random z, the encoder and scorer on the run's test images as it evaluates
them, the scorer against ``fastvae.evaluate``'s ``elbo_terms_by_row``/``iw_bound_by_row``). Any failure
deletes the file and raises FastVAEError. Files are written to a temporary name and renamed.

``int8=True`` adds dynamic int8 weight quantization (onnxruntime.quantization: s8 weights, u8
activations quantized per call). ``reduce_range`` (7-bit weights) is off by default: on the benchmark
VM (a 2-core AMD EPYC guest that exposes AVX2 only, no AVX-512/VNNI) int8 ran at the same speed either
way and full 8-bit weights were more accurate for every part (``benchmarks/results/cpu-parts.json``).
reduce_range exists for int8 kernels that add pairs of u8 x s8 products into saturating int16
(``vpmaddubsw``, AVX2 without VNNI): 2 x 255 x 127 = 64770 can exceed 32767, 2 x 255 x 63 = 32130
cannot; with VNNI (``vpdpbusd``, int32 accumulation) nothing saturates. Whether it bites depends on the
weights, so the measured error against fp32 goes into the metadata (pass ``reduce_range=True`` /
``--int8-reduce-range`` if full range loses on yours); a decoder or scorer whose test -ELBO worsens by
more than 1 nat on average is refused.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fastvae
from fastvae import objective as objectives
from fastvae.errors import FastVAEError, require
from fastvae.export.runtime import MAX_IW
from fastvae.export.score import DECODED_ROWS
from fastvae.runs import load_model, load_run, read_run_config

OPSET = 18
PARTS = ("decoder", "encoder", "scorer")
CHECK_BATCHES = (1, 7, 1024)
MAX_ABS_DIFF = 1e-5  # probabilities (decoder)
MAX_REL_DIFF = 1e-5  # encoder outputs and scores: |delta| <= MAX_REL_DIFF * (1 + |reference|)
INT8_MAX_ELBO_INCREASE = 1.0  # nats
INT8_EVAL_SAMPLES = 2000  # test images used to measure the int8 -ELBO change
INT8_REDUCE_RANGE = False  # the default; see the module docstring
PROB_CLIP = 1e-7  # probabilities are clipped to [1e-7, 1 - 1e-7] when -ELBO is computed from them


class _ProbDecoder(torch.nn.Module):
    """z -> E[x|z]: probabilities for a Bernoulli decoder, the mean for a Gaussian one."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.mean_output(self.model.decode(z, y))


class _Encoder(torch.nn.Module):
    """x (B, D) -> (mu, logvar): the model's ``encode``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x, y)


class _Scorer(torch.nn.Module):
    """x (B, D), eps (B, Z)[, eps_iw (B, K, Z)] -> neg_elbo, rec, kl[, iw_nll], each (B,).

    Both through ``fastvae.objective``, the values training and evaluation use: the -ELBO is one draw at
    beta = 1 (``single_draw``: the autoencoder's rec NLL), the IW NLL the ``IWAE(K)`` bound at beta = 1
    (``iw_log_weights``/``iw_nll``, as ``importance_weighted_bound``)."""

    def __init__(self, model: torch.nn.Module, k: int = 0) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None
    ):
        m = self.model
        eps_iw, y = (a, b) if self.k else (None, a)  # eps_iw with an IW bound; the labels y come last
        t = objectives.single_draw(m.config).terms(m, x, eps, y=y)  # whatever the training objective
        if not self.k:
            return t.neg_elbo, t.rec, t.kl
        return t.neg_elbo, t.rec, t.kl, objectives.IWAE(self.k).terms(m, x, eps_iw, y=y).loss


@dataclass(frozen=True)
class Int8Record:
    """What an int8 export measured against its fp32 graph, read back from the file's metadata."""

    reduce_range: bool  # 7-bit weights
    errors: dict[str, float]  # by name, e.g. "max prob error", "mean mu error" (the metadata's int8_*_error)
    elbo_change: float | None  # mean test -ELBO change in nats (decoder and scorer; None for the encoder)


@dataclass
class ExportResult:
    path: Path
    metadata: dict[str, str]
    max_abs_diff: float  # worst onnxruntime-vs-PyTorch difference of the check (absolute)
    part: str = "decoder"

    @property
    def int8(self) -> Int8Record | None:
        """The int8 quantization's measurements (None for an fp32 export)."""
        m = self.metadata
        if "int8_reduce_range" not in m:
            return None
        errors = {
            k[5:].replace("_", " "): float(v) for k, v in m.items() if k.startswith("int8_") and "error" in k
        }
        change = m.get("int8_test_elbo_change")
        return Int8Record(m["int8_reduce_range"] == "true", errors, None if change is None else float(change))


@dataclass
class _Spec:
    """What one part exports and how it is checked."""

    part: str
    module: torch.nn.Module
    examples: tuple[torch.Tensor, ...]  # example inputs, batch 2
    inputs: list[str]
    outputs: list[str]
    doc: str
    dynamic: tuple  # dynamic_shapes, one entry per input
    check: Callable[[object], float]  # (onnxruntime session) -> worst |delta|, raises on failure


def export_decoder(
    model_or_run_dir: torch.nn.Module | str | os.PathLike, out: str | os.PathLike, *, int8: bool = False,
    reduce_range: bool = INT8_REDUCE_RANGE,
) -> ExportResult:  # fmt: skip
    """Export the decoder of a trained run directory, or of a fastvae model in memory (e.g. trained in your
    own loop), to ``out`` (and check it); see the module docstring."""
    if isinstance(model_or_run_dir, torch.nn.Module):
        from fastvae.runs import save_model

        with tempfile.TemporaryDirectory(prefix="fastvae-export-") as tmp:
            return export_part(
                save_model(model_or_run_dir, tmp), out, "decoder", int8=int8, reduce_range=reduce_range
            )
    return export_part(model_or_run_dir, out, "decoder", int8=int8, reduce_range=reduce_range)


def export_encoder(
    run_dir: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False,
    reduce_range: bool = INT8_REDUCE_RANGE,
) -> ExportResult:  # fmt: skip
    """Export the encoder x (B, D) -> mu, logvar (B, Z) of a trained run to ``out`` (and check it)."""
    return export_part(run_dir, out, "encoder", int8=int8, reduce_range=reduce_range)


def export_scorer(
    run_dir: str | os.PathLike, out: str | os.PathLike, *, iw: int = 0, int8: bool = False,
    reduce_range: bool = INT8_REDUCE_RANGE,
) -> ExportResult:  # fmt: skip
    """Export the anomaly scorer (-ELBO, its parts, and with ``iw`` = K the K-sample IW NLL)."""
    return export_part(run_dir, out, "scorer", iw=iw, int8=int8, reduce_range=reduce_range)


def export_parts(
    run_dir: str | os.PathLike, out: str | os.PathLike, part: str = "all", *, iw: int = 0,
    int8: bool = False, reduce_range: bool = INT8_REDUCE_RANGE, progress: bool = False,
) -> list[ExportResult]:  # fmt: skip
    """``part`` (decoder | encoder | scorer) to the file ``out`` (or ``out/<part>.onnx`` when ``out`` is a
    folder), or ``all`` of them to the folder ``out`` as decoder.onnx, encoder.onnx, scorer.onnx."""
    if part != "all" and part not in PARTS:
        raise FastVAEError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}, all")
    _check_iw(iw)
    out = Path(out)
    if part == "all":
        if out.suffix == ".onnx":
            raise FastVAEError(f"{out}: --part all writes three files; give a folder")
        out.mkdir(parents=True, exist_ok=True)
    elif out.is_dir():
        out = out / f"{part}.onnx"
    parts = PARTS if part == "all" else (part,)
    if iw and "scorer" not in parts:
        raise FastVAEError("--iw applies to the scorer only")
    return [
        export_part(
            run_dir,
            out / f"{p}.onnx" if part == "all" else out,
            p,
            iw=iw if p == "scorer" else 0,
            int8=int8,
            reduce_range=reduce_range,
            progress=progress,
        )  # fmt: skip
        for p in parts
    ]


def _check_iw(iw: int) -> None:
    if isinstance(iw, bool) or not isinstance(iw, int) or not 0 <= iw <= MAX_IW:
        raise FastVAEError(
            f"iw must be an integer in 0..{MAX_IW:,} (the scorer decodes a row's K draws in one call), "
            f"got {iw!r:.40}"
        )


def export_part(
    run_dir: str | os.PathLike, out: str | os.PathLike, part: str, *, iw: int = 0, int8: bool = False,
    reduce_range: bool = INT8_REDUCE_RANGE, progress: bool = False,
) -> ExportResult:  # fmt: skip
    """Export one part of a trained run to the file ``out``; see the module docstring."""
    if part not in PARTS:
        raise FastVAEError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    _check_iw(iw)
    if iw and part != "scorer":
        raise FastVAEError("--iw applies to the scorer only")
    out = Path(out)
    if not out.parent.resolve().is_dir():
        raise FastVAEError(f"{out}: the folder {out.parent} does not exist")
    config, doc = read_run_config(run_dir)
    if int8 and config.likelihood != "bernoulli":
        raise FastVAEError("--int8 is supported for Bernoulli decoders only")
    model = load_model(run_dir, "cpu").float().eval()
    spec = _spec(part, model, config, run_dir, iw)
    meta = {
        "fastvae_version": fastvae.__version__,
        "part": part,
        "latent_dim": str(config.latent_dim),
        "data_shape": json.dumps(list(config.data_shape)),
        "likelihood": config.likelihood,
        "classes": str(config.classes),  # > 0: a conditional VAE; its parts take labels y (B,) int64
        "objective": config.objective,
        "k": str(config.k),
        "preset": config.preset or "custom",
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "test_elbo": _fmt(doc.get("final_test_neg_elbo")),
        "inputs": ",".join(spec.inputs),
        "outputs": ",".join(spec.outputs),
        "quantization": "none",
    }
    if part == "scorer":
        meta["iw_k"] = str(iw)
        meta["noise"] = "inputs: eps (B, Z) and eps_iw (B, K, Z), standard normal; fastvae.export.keyed_noise"
        meta["eval_seed"] = str(int(doc.get("train", {}).get("seed", 0)))
    tmp = out.with_name(f".{out.name}.tmp")
    bar = _stages(part, 3 + int8, progress)
    try:
        _export(spec, tmp)
        bar.update()
        diff = _check(tmp, spec)
        bar.update()
        if int8:
            meta.update(_quantize(tmp, spec, model, run_dir, config, reduce_range))
            bar.update()
        _set_metadata(tmp, meta, spec.doc)
        os.replace(tmp, out)
        bar.update()
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return ExportResult(out, meta, diff, part)


def _stages(part: str, total: int, progress: bool):
    """A progress bar over an export's stages (trace, check against PyTorch, [int8,] metadata)."""
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"export {part}", unit="stage", disable=not progress, leave=False, file=sys.stderr
    )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _spec(part: str, model, config, run_dir, k: int) -> _Spec:
    """A conditional VAE's parts take the labels y (B,) int64 as their last input: the label enters the first
    encoder / decoder layer as the reference computes it ([h, onehot(y)] [W | W_y]^T, one-hot by comparison
    in the graph; the C extra columns cost nothing next to D or H). The graph cannot refuse a label out of
    range (it would decode with no label): the runtimes check labels against the ``classes`` metadata."""
    batch = torch.export.Dim("batch")
    z_dim, d = config.latent_dim, config.flat_dim
    lab = (torch.tensor([0, config.classes - 1]),) if config.conditional else ()
    lab_in, lab_dyn = (["y"], ({0: batch},)) if lab else ([], ())
    y_doc = ", y (B,) int64" if lab else ""
    if part == "decoder":
        return _Spec(part, _ProbDecoder(model).eval(), (torch.randn(2, z_dim), *lab), ["z", *lab_in], ["x_prob"],
                     f"fastvae decoder: z (B, Z){y_doc} -> x_prob (B, D)", ({0: batch}, *lab_dyn),
                     lambda sess: _check_decoder(sess, model, z_dim))  # fmt: skip
    if part == "encoder":
        return _Spec(part, _Encoder(model).eval(), (torch.rand(2, d), *lab), ["x", *lab_in], ["mu", "logvar"],
                     f"fastvae encoder: x (B, D){y_doc} -> mu, logvar (B, Z)", ({0: batch}, *lab_dyn),
                     lambda sess: _check_encoder(sess, model, run_dir))  # fmt: skip
    inputs, outputs = ["x", "eps"], ["neg_elbo", "rec", "kl"]
    examples = (torch.rand(2, d), torch.randn(2, z_dim))
    dynamic: tuple = ({0: batch}, {0: batch})
    if k:
        inputs.append("eps_iw")
        outputs.append("iw_nll")
        examples += (torch.randn(2, k, z_dim),)
        dynamic += ({0: batch},)
    inputs, examples, dynamic = inputs + lab_in, examples + lab, dynamic + lab_dyn
    desc = "fastvae scorer: x (B, D), eps (B, Z)" + (f", eps_iw (B, {k}, Z)" if k else "") + y_doc
    desc += " -> neg_elbo, rec, kl" + (f", iw_nll (k={k})" if k else "") + " (B,), nats"
    return _Spec(part, _Scorer(model, k).eval(), examples, inputs, outputs, desc, dynamic,
                 lambda sess: _check_scorer(sess, model, run_dir, k))  # fmt: skip


def _log_sigmoid_translation():
    """aten.log_sigmoid as min(x, 0) - log(1 + exp(-|x|)). The exporter's default, Log(Sigmoid(x)), is
    wrong in onnxruntime for the confident logits of a trained decoder: its Sigmoid saturates, so a
    background pixel's -log p came out too small by up to ~1 nat per image, and -inf where it reached 0.
    ``reconstruction_nll``'s BCE-with-logits decomposes into log_sigmoid, so the scorer needs this."""
    op = require("onnxscript", "ONNX export").opset18

    def log_sigmoid(x):
        one = op.CastLike(1.0, x)
        return op.Sub(op.Min(x, op.CastLike(0.0, x)), op.Log(op.Add(one, op.Exp(op.Neg(op.Abs(x))))))

    return {torch.ops.aten.log_sigmoid.default: log_sigmoid}


def _export(spec: _Spec, path: Path) -> None:
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                spec.module, spec.examples, dynamo=True, input_names=spec.inputs, output_names=spec.outputs,
                dynamic_shapes=spec.dynamic, opset_version=OPSET, external_data=False, verbose=False,
                custom_translation_table=_log_sigmoid_translation(),
            )  # fmt: skip
            program.save(str(path))
        except Exception as exc:  # the exporter raises many types; report one line
            raise FastVAEError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    if path.with_name(path.name + ".data").exists():
        path.with_name(path.name + ".data").unlink()
        raise FastVAEError("ONNX export wrote an external-data side file; expected one self-contained file")


def _check(path: Path, spec: _Spec) -> float:
    """Full checker, strict shape inference, and onnxruntime against PyTorch; returns the max |delta|."""
    onnx = require("onnx", "ONNX export")
    ort = require("onnxruntime", "ONNX export")

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as exc:
        raise FastVAEError(f"exported model fails the ONNX checks: {str(exc).splitlines()[0]}") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return spec.check(sess)


def _compare(got: np.ndarray, ref: np.ndarray, name: str, batch: int, rel: bool) -> float:
    """Max |got - ref|; raises if shapes differ or it exceeds the tolerance."""
    if got.shape != ref.shape:
        raise FastVAEError(
            f"onnxruntime output {name} has shape {got.shape} for batch {batch}, expected {ref.shape}"
        )
    diff = np.abs(got.astype(np.float64) - ref)
    if rel:
        bad = not (diff <= MAX_REL_DIFF * (1.0 + np.abs(ref))).all()
        tol = f"{MAX_REL_DIFF:g} x (1 + |reference|)"
    else:
        bad, tol = not (diff <= MAX_ABS_DIFF).all(), f"{MAX_ABS_DIFF:g}"
    worst = float(diff.max()) if diff.size else 0.0
    if bad:
        raise FastVAEError(
            f"onnxruntime differs from PyTorch by {worst:.2e} in {name} at batch {batch} (> {tol})"
        )
    return worst


def random_check_labels(model, b: int, g: torch.Generator) -> tuple[torch.Tensor | None, dict[str, np.ndarray]]:
    """Random labels for a check of a conditional VAE's part (None and no feed for an unconditional one)."""
    if not model.config.conditional:
        return None, {}
    y = torch.randint(0, model.config.classes, (b,), generator=g)
    return y, {"y": y.numpy()}


def _check_decoder(sess, model, latent_dim: int) -> float:
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in CHECK_BATCHES:
        z = torch.randn(b, latent_dim, generator=g)
        y, feed = random_check_labels(model, b, g)
        with torch.inference_mode():
            ref = _ProbDecoder(model)(z, y).double().numpy()
        got = sess.run(["x_prob"], {"z": z.numpy(), **feed})[0]
        worst = max(worst, _compare(got, ref, "x_prob", b, rel=False))
    return worst


def _test_rows(run_dir, n: int):
    """(run, its first n test images as it evaluates them (B, D) float32, row ids)."""
    run = load_run(run_dir, "cpu")
    x = run.test_images(0, n).float()
    if len(x) < n:  # a small test split: repeat it (the check is about the graph, not the data)
        x = x.repeat(-(-n // len(x)), 1)[:n]
    return run, x.flatten(1), torch.arange(n)


def _check_encoder(sess, model, run_dir) -> float:
    _, x_all, _ = _test_rows(run_dir, max(CHECK_BATCHES))
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in CHECK_BATCHES:
        x = x_all[:b]
        y, feed = random_check_labels(model, b, gen)
        with torch.inference_mode():
            ref = [t.double().numpy() for t in model.encode(x, y)]
        got = sess.run(["mu", "logvar"], {"x": x.numpy(), **feed})
        for name, g, r in zip(("mu", "logvar"), got, ref):
            worst = max(worst, _compare(g, r, name, b, rel=True))
    return worst


def scorer_noise(seed: int, rows: torch.Tensor, latent_dim: int, k: int = 0) -> dict[str, np.ndarray]:
    """The scorer's noise inputs for rows ``rows``, keyed as fastvae's evaluation keys them."""
    from fastvae.evaluate import EVAL_SALT, IW_SALT
    from fastvae.noise import row_normal

    feeds = {"eps": row_normal(seed, EVAL_SALT, rows, latent_dim).numpy()}
    if k:
        feeds["eps_iw"] = row_normal(seed, IW_SALT, rows, k * latent_dim).view(-1, k, latent_dim).numpy()
    return feeds


def _check_scorer(sess, model, run_dir, k: int) -> float:
    """onnxruntime against fastvae.evaluate's row-keyed -ELBO and IW bound on the run's test images. An IW
    scorer runs in chunks of DECODED_ROWS // k rows, as ``Scorer`` runs it, and its largest check batch
    is cut to about 2^20 decoded draws, so any k up to MAX_IW checks in bounded memory and time."""
    from fastvae.evaluate import elbo_terms_by_row, iw_bound_by_row

    batches = sorted({min(b, max(7, (1 << 20) // k)) for b in CHECK_BATCHES} if k else set(CHECK_BATCHES))
    run, x_all, rows_all = _test_rows(run_dir, max(batches))
    gen = torch.Generator().manual_seed(2)
    chunk = max(1, DECODED_ROWS // max(k, 1))
    worst = 0.0
    for b in batches:
        x, rows = x_all[:b], rows_all[:b]
        y, feed = random_check_labels(model, b, gen)
        o = elbo_terms_by_row(model, x, rows, run.seed, y)
        refs = {"neg_elbo": o.neg_elbo, "rec": o.rec, "kl": o.kl}
        if k:
            refs["iw_nll"] = iw_bound_by_row(model, x, rows, k, run.seed, y)
        parts = []
        for i in range(0, b, chunk):
            noise = scorer_noise(run.seed, rows[i : i + chunk], model.config.latent_dim, k)
            parts.append(
                sess.run(list(refs), {"x": x[i : i + chunk].numpy(), **noise, **_rows(feed, i, chunk)})
            )
        got = [np.concatenate(col) for col in zip(*parts)]
        for (name, ref), g in zip(refs.items(), got):
            worst = max(worst, _compare(g, ref.double().numpy(), name, b, rel=True))
    return worst


def _set_metadata(path: Path, meta: dict[str, str], doc: str) -> None:
    onnx = require("onnx", "ONNX export")

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, meta)
    model.doc_string = doc
    onnx.save(model, str(path))


def _decoder_elbo(
    probs_fn, model, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None
) -> float:
    """Mean -ELBO of ``model`` (one draw, ``fastvae.objective.single_draw``; labels ``y`` for a conditional VAE) with the decoder
    swapped for ``probs_fn``, a function (z, y) -> probabilities (numpy), read as the logits of those
    probabilities clipped to [1e-7, 1 - 1e-7]."""

    def decode(z: torch.Tensor, yb: torch.Tensor | None = None) -> torch.Tensor:
        p = torch.from_numpy(probs_fn(z.float().numpy(), yb)).double().clamp(PROB_CLIP, 1 - PROB_CLIP)
        return torch.log(p) - torch.log1p(-p)

    swapped = copy.deepcopy(model).double()  # the encoder in float64; only ``decode`` differs
    swapped.decode = decode
    with torch.inference_mode():
        t = objectives.single_draw(swapped.config).terms(swapped, x.double(), eps.double(), y=y)
        return float(t.neg_elbo.mean())


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, *, reduce_range: bool) -> None:
    """Dynamic int8 weight quantization (QInt8 weights, u8 activations) of the ONNX file ``src``."""
    onnx = require("onnx", "int8 quantization")
    quantization = require("onnxruntime.quantization", "int8 quantization")
    QuantType, quantize_dynamic = quantization.QuantType, quantization.quantize_dynamic

    fp32 = onnx.load(str(src))
    init_names = {i.name for i in fp32.graph.initializer}
    # value_info entries on initializers make quantize_dynamic's shape inference fail on dynamo exports
    kept = [v for v in fp32.graph.value_info if v.name not in init_names]
    del fp32.graph.value_info[:]
    fp32.graph.value_info.extend(kept)
    # the IW scorer decodes twice with the same weights; quantize_dynamic mangles a weight two Gemms
    # share (the second gets the first one's transposed int8 copy), so each use gets its own copy
    inits, seen = {i.name: i for i in fp32.graph.initializer}, set()
    for node in fp32.graph.node:
        for j, name in enumerate(node.input):
            if name in inits and node.op_type in ("Gemm", "MatMul"):
                if name in seen:
                    dup = copy.deepcopy(inits[name])
                    dup.name = f"{name}__{node.name or j}"
                    fp32.graph.initializer.append(dup)
                    node.input[j] = dup.name
                seen.add(name)
    with tempfile.TemporaryDirectory() as d:
        clean = Path(d) / "fp32.onnx"
        onnx.save(fp32, str(clean))
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)
            try:  # DefaultTensorType: shape inference cannot type the IW scorer's reshaped activations
                quantize_dynamic(str(clean), str(dst), weight_type=QuantType.QInt8, reduce_range=reduce_range,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
            except Exception as exc:
                raise FastVAEError(f"int8 quantization failed: {str(exc).splitlines()[0][:200]}") from None


def _quantize(path: Path, spec: _Spec, model, run_dir, config, reduce_range: bool) -> dict[str, str]:
    """Replace ``path`` by its int8 version; return the metadata that describes the quantization."""
    ort = require("onnxruntime", "int8 quantization")

    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "int8.onnx"
        quantize_file(path, dst, reduce_range=reduce_range)
        s32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        run = load_run(run_dir, "cpu")
        x = run.test_images(0, INT8_EVAL_SAMPLES).float().flatten(1)  # as the run evaluates them
        rows = torch.arange(len(x))
        y = run.test_labels(0, len(x))  # a conditional VAE's test labels, else None
        labels = {"y": y.numpy()} if y is not None else {}
        if spec.part == "decoder":

            def feeds(z, yb):
                return {"z": z.astype(np.float32), **({"y": yb.numpy()} if yb is not None else {})}

            run32 = lambda z, yb=None: s32.run(["x_prob"], feeds(z, yb))[0]  # noqa: E731
            run8 = lambda z, yb=None: s8.run(["x_prob"], feeds(z, yb))[0]  # noqa: E731
            z = np.random.default_rng(0).standard_normal((1024, config.latent_dim)).astype(np.float32)
            yz = random_check_labels(model, 1024, torch.Generator().manual_seed(3))[0]
            err = np.abs(run8(z, yz) - run32(z, yz))
            eps = torch.from_numpy(np.random.default_rng(1).standard_normal((len(x), config.latent_dim)))
            change = _decoder_elbo(run8, model, x, eps, y) - _decoder_elbo(run32, model, x, eps, y)
            errors = {"int8_max_prob_error": err.max(), "int8_mean_prob_error": err.mean()}
        elif spec.part == "encoder":
            a, b = (
                s32.run(["mu"], {"x": x.numpy(), **labels})[0],
                s8.run(["mu"], {"x": x.numpy(), **labels})[0],
            )
            err = np.abs(a - b)
            change = None
            errors = {"int8_max_mu_error": err.max(), "int8_mean_mu_error": err.mean()}
        else:
            feeds = {
                "x": x.numpy(),
                **scorer_noise(run.seed, rows, config.latent_dim, spec.module.k),
                **labels,
            }
            if spec.module.k:  # the IW part in chunks, to bound memory
                a = np.concatenate([s32.run(None, _rows(feeds, i, 256))[0] for i in range(0, len(x), 256)])
                b = np.concatenate([s8.run(None, _rows(feeds, i, 256))[0] for i in range(0, len(x), 256)])
            else:
                a, b = s32.run(["neg_elbo"], feeds)[0], s8.run(["neg_elbo"], feeds)[0]
            err = np.abs(b.astype(np.float64) - a)
            change = float((b.astype(np.float64) - a).mean())
            errors = {"int8_max_score_error": err.max(), "int8_mean_score_error": err.mean()}
        if change is not None and (not math.isfinite(change) or change > INT8_MAX_ELBO_INCREASE):
            raise FastVAEError(
                f"int8 quantization worsens the test -ELBO by {change:.3f} nats (> {INT8_MAX_ELBO_INCREASE:g}); "
                "keep the fp32 export"
            )
        os.replace(dst, path)
    meta = {
        "quantization": "int8 dynamic (QInt8 weights" + (", reduce_range)" if reduce_range else ")"),
        "int8_reduce_range": str(bool(reduce_range)).lower(),
        **{k: f"{float(v):.6g}" for k, v in errors.items()},
        "int8_eval_samples": str(len(x)),
    }
    if change is not None:
        meta["int8_test_elbo_change"] = f"{change:.6f}"
    return meta


def _rows(feeds: dict[str, np.ndarray], start: int, n: int) -> dict[str, np.ndarray]:
    return {k: v[start : start + n] for k, v in feeds.items()}
