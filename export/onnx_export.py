"""Export a trained decoder to ONNX: z (B, Z) float32 -> x_prob (B, D), checked before it is kept.

The plain PyTorch layers are exported (a Triton launch cannot be traced), through the dynamo exporter
with a dynamic batch dimension, opset 18, as one self-contained file. After writing: the full ONNX
checker, strict shape inference, and onnxruntime against PyTorch on batches 1, 7 and 1024
(max |delta| <= 1e-5). Any failure deletes the file and raises FastVAEError.

``int8=True`` adds dynamic int8 weight quantization (onnxruntime.quantization) with 7-bit weight range
(``reduce_range``): plain signed 8-bit weights saturate the u8 x s8 multiply of AVX2 CPUs without VNNI
(max probability error ~9e-2 seen on such a CPU against ~5e-3 with reduce_range). The measured max
probability error and the test -ELBO change go into the metadata; a model whose -ELBO worsens by more
than 1 nat is refused.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fastvae
from fastvae.errors import FastVAEError
from fastvae.runs import load_model, load_run, read_run_config

OPSET = 18
CHECK_BATCHES = (1, 7, 1024)
MAX_ABS_DIFF = 1e-5
INT8_MAX_ELBO_INCREASE = 1.0  # nats
INT8_EVAL_SAMPLES = 2000  # test images used to measure the int8 -ELBO change
PROB_CLIP = 1e-7  # probabilities are clipped to [1e-7, 1 - 1e-7] when -ELBO is computed from them


class _ProbDecoder(torch.nn.Module):
    """z -> E[x|z]: probabilities for a Bernoulli decoder, the mean for a Gaussian one."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.mean_output(self.model.decode(z))


@dataclass
class ExportResult:
    path: Path
    metadata: dict[str, str]
    max_abs_diff: float


def export_decoder(run_dir: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False) -> ExportResult:
    """Export the decoder of a trained run directory to ``out`` (and check it); see the module docstring."""
    out = Path(out)
    if not out.parent.resolve().is_dir():
        raise FastVAEError(f"{out}: the folder {out.parent} does not exist")
    config, doc = read_run_config(run_dir)
    model = load_model(run_dir, "cpu").float().eval()
    meta = {
        "fastvae_version": fastvae.__version__,
        "latent_dim": str(config.latent_dim),
        "data_shape": json.dumps(list(config.data_shape)),
        "likelihood": config.likelihood,
        "preset": config.preset or "custom",
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "test_elbo": _fmt(doc.get("final_test_neg_elbo")),
        "quantization": "none",
    }
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _export(model, config.latent_dim, tmp)
        diff = _check(tmp, model, config.latent_dim)
        if int8:
            meta.update(_quantize(tmp, model, run_dir, config, doc))
        _set_metadata(tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, meta, diff)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def _export(model: torch.nn.Module, latent_dim: int, path: Path) -> None:
    dec = _ProbDecoder(model).eval()
    example = torch.randn(2, latent_dim)  # batch >= 2, so the exporter keeps the dimension symbolic
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                dec, (example,), dynamo=True, input_names=["z"], output_names=["x_prob"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET, external_data=False,
                verbose=False,
            )  # fmt: skip
            program.save(str(path))
        except Exception as exc:  # the exporter raises many types; report one line
            raise FastVAEError(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    if path.with_name(path.name + ".data").exists():
        raise FastVAEError("ONNX export wrote an external-data side file; expected one self-contained file")


def _check(path: Path, model: torch.nn.Module, latent_dim: int) -> float:
    """Full checker, strict shape inference, and onnxruntime against PyTorch; returns the max |delta|."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as exc:
        raise FastVAEError(f"exported model fails the ONNX checks: {str(exc).splitlines()[0]}") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in CHECK_BATCHES:
        z = torch.randn(b, latent_dim, generator=g)
        with torch.inference_mode():
            ref = _ProbDecoder(model)(z).numpy()
        got = sess.run(["x_prob"], {"z": z.numpy()})[0]
        if got.shape != ref.shape:
            raise FastVAEError(
                f"onnxruntime output has shape {got.shape} for batch {b}, expected {ref.shape}"
            )
        worst = max(worst, float(np.abs(got - ref).max()))
    if not worst <= MAX_ABS_DIFF:
        raise FastVAEError(f"onnxruntime differs from PyTorch by {worst:.2e} (> {MAX_ABS_DIFF:g})")
    return worst


def _set_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, meta)
    model.doc_string = "fastvae decoder: z (B, Z) -> x_prob (B, D)"
    onnx.save(model, str(path))


def _decoder_elbo(probs_fn, model, x: torch.Tensor, eps: torch.Tensor) -> float:
    """Mean -ELBO of ``model`` (its own objective) with the decoder swapped for ``probs_fn``, a function
    z -> probabilities (numpy), read as the logits of those probabilities clipped to [1e-7, 1 - 1e-7]."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        p = torch.from_numpy(probs_fn(z.float().numpy())).double().clamp(PROB_CLIP, 1 - PROB_CLIP)
        return torch.log(p) - torch.log1p(-p)

    swapped = copy.deepcopy(model).double()  # the encoder in float64; only ``decode`` differs
    swapped.decode = decode
    with torch.inference_mode():
        return float(swapped.objective(x.double(), eps.double(), beta=1.0).neg_elbo.mean())


def _quantize(path: Path, model, run_dir, config, doc) -> dict[str, str]:
    """Replace ``path`` by its int8 version; return the metadata that describes the quantization."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if config.likelihood != "bernoulli":
        raise FastVAEError("--int8 is supported for Bernoulli decoders only")
    fp32 = onnx.load(str(path))
    init_names = {i.name for i in fp32.graph.initializer}
    # value_info entries on initializers make quantize_dynamic's shape inference fail on dynamo exports
    kept = [v for v in fp32.graph.value_info if v.name not in init_names]
    del fp32.graph.value_info[:]
    fp32.graph.value_info.extend(kept)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        onnx.save(fp32, str(src))
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=True)
        s32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        run32 = lambda z: s32.run(["x_prob"], {"z": z.astype(np.float32)})[0]
        run8 = lambda z: s8.run(["x_prob"], {"z": z.astype(np.float32)})[0]
        z = np.random.default_rng(0).standard_normal((1024, config.latent_dim)).astype(np.float32)
        err = np.abs(run8(z) - run32(z))
        max_err, mean_err = float(err.max()), float(err.mean())
        x = load_run(run_dir, "cpu").test_images(0, INT8_EVAL_SAMPLES)  # as the run evaluates them
        eps = torch.from_numpy(np.random.default_rng(1).standard_normal((len(x), config.latent_dim)))
        elbo32 = _decoder_elbo(run32, model, x, eps)
        elbo8 = _decoder_elbo(run8, model, x, eps)
        change = elbo8 - elbo32
        if not math.isfinite(change) or change > INT8_MAX_ELBO_INCREASE:
            raise FastVAEError(
                f"int8 quantization worsens the test -ELBO by {change:.3f} nats (> {INT8_MAX_ELBO_INCREASE:g}); "
                "keep the fp32 export"
            )
        os.replace(dst, path)
    return {
        "quantization": "int8 dynamic (QInt8 weights, reduce_range)",
        "int8_max_prob_error": f"{max_err:.6g}",
        "int8_mean_prob_error": f"{mean_err:.6g}",
        "int8_test_elbo_change": f"{change:.6f}",
        "int8_eval_samples": str(len(x)),
    }
