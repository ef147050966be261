"""Stage 2 of benchmarks/gpu_acceptance.sh: the TF32 / bf16 question, measured rather than argued.

    python tf32_error.py --out tf32.json [--dry-run]

On the inputs of tests/test_kernels.py::test_gpu_reduced_precision_parity (seed 0, 1000 rows of the
784-400-20 VAE), for TF32 and bf16: the relative Frobenius error against float64 of every gradient and the
loss, (a) from fastvae's fused kernels and (b) from PyTorch itself (cuBLAS TF32 matmuls, or bf16 autocast)
on the same model and inputs. The test's bound is max(flat tolerance, 2 x PyTorch's own error); both errors
and the bound are recorded per parameter. On a machine without CUDA (the dry run) only PyTorch's fp32 error
is measured, on 64 rows, and the fused side is recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

FLAT_TOL = {"tf32": 5e-3, "bf16": 3e-2, "fp32": 1e-5}  # tests/test_kernels.py's TOL


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(rows: int):
    """The test's models and inputs, drawn in the test's order (pair(), then x and eps)."""
    from fastvae import FusedVAE, ReferenceVAE, VAEConfig

    cfg = VAEConfig(input_dim=784, hidden_dims=(400,), latent_dim=20)
    torch.manual_seed(0)
    ref = ReferenceVAE(cfg).double()
    fused = FusedVAE(cfg)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x, eps = torch.rand(rows, 784), torch.randn(rows, 20)
    return ref, fused, x, eps


def _precision(mode: str, device: str):
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    if mode == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reference_grads(ref, x, eps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The float64 loss and gradients on the CPU: the truth both errors are measured against."""
    ref = copy.deepcopy(ref)
    loss = ref.negative_elbo(x.double(), eps.double())
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _errors(loss, model, truth) -> dict[str, float]:
    out = {"loss": rel(loss.detach(), truth[0])}
    out.update({n: rel(p.grad, truth[1][n]) for n, p in model.named_parameters()})
    return out


def torch_errors(ref, x, eps, truth, mode: str, device: str) -> dict[str, float]:
    """PyTorch's own error in ``mode``: the reference model in fp32 with TF32 matmuls or bf16 autocast."""
    model = copy.deepcopy(ref).float().to(device)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        with _precision(mode, device):
            loss = model.negative_elbo(x.float().to(device), eps.to(device))
        loss.float().mean().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return _errors(loss.float(), model, truth)


def fused_errors(fused, x, eps, truth, mode: str) -> dict[str, float]:
    """fastvae's fused kernels in ``mode`` (TF32 dots, or bf16 operands) against float64."""
    fused = copy.deepcopy(fused).to("cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        loss = fused.negative_elbo(x.to("cuda", torch.bfloat16 if mode == "bf16" else torch.float32), eps.to("cuda"))
        loss.mean().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return _errors(loss.float(), fused, truth)


def measure(mode: str, rows: int, cuda: bool) -> dict[str, Any]:
    ref, fused, x, eps = inputs(rows)
    if mode == "bf16":  # the test feeds bf16 data: every side sees the same rounded pixels
        x = x.to(torch.bfloat16).float()
    truth = reference_grads(ref, x, eps)
    base = torch_errors(ref, x, eps, truth, mode, "cuda" if cuda else "cpu")
    fz = fused_errors(fused, x, eps, truth, mode) if cuda else None
    params = {}
    for name, t_err in base.items():
        bound = max(FLAT_TOL[mode], 2 * t_err)
        row = {"torch_rel": t_err, "flat_tol": FLAT_TOL[mode], "bound": bound}
        if fz is not None:
            row.update(fused_rel=fz[name], within_flat=fz[name] < FLAT_TOL[mode], within_bound=fz[name] < bound)
        params[name] = row
    return {"mode": mode, "rows": rows, "fused": "measured" if cuda else "skipped: needs CUDA", "errors": params}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.dry_run
    modes = ("tf32", "bf16") if cuda else ("fp32",)
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "results": []}
    for mode in modes:
        doc["results"].append(measure(mode, 1000 if cuda else 64, cuda))
        a.out.write_text(json.dumps(doc, indent=2) + "\n")  # after each mode: a timeout keeps the first
    for r in doc["results"]:
        for name, e in r["errors"].items():
            fused = f"fused {e['fused_rel']:.2e}  " if "fused_rel" in e else ""
            print(f"{r['mode']:5s} {name:22s} {fused}torch {e['torch_rel']:.2e}  bound {e['bound']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
