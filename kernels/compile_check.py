"""Compile every fastvae kernel variant ahead of time for a CUDA target, with no GPU needed.

    python -m fastvae.kernels.compile_check [--arch 90] [--arch 80] [--quick]

Triton's interpreter (what the CPU tests use) runs kernels as numpy and never sees the compiler: type
errors in loop-carried variables, illegal dot shapes or dtypes, and bf16 paths only show up when the
kernel is compiled. The variants are not listed by hand: the launches of real steps are recorded
(``resources.record_step``: the engine's step and the autograd path with and without the caller's eps, for a
1-hidden-layer ReLU and a 2-hidden-layer tanh preset, the IWAE objective with K = 5 and a conditional VAE,
fp32 and bf16, at a batch without and with split-K)
and each is compiled exactly as its launcher specialises it. The resource report (``resources.py``) adds
ptxas's register and spill counts to the same compiles.
It must run without TRITON_INTERPRET (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

CASES = [  # (preset, batch, path, caller eps)
    ("pytorch-example", 128, "engine", False),
    ("pytorch-example", 128, "module", True),
    ("iwae", 128, "engine", False),
    ("iwae", 128, "module", False),
    ("iwae-k5", 128, "module", True),  # K samples: the reduction kernel, row weights, caller eps (B K, Z)
    ("pytorch-example+y10", 128, "module", False),  # conditional: label bias, label-weight groups
    ("pytorch-example", 16384, "engine", False),  # split-K weight gradients + Adam in the sum kernel
    ("paper", 16384, "module", False),
]
QUICK = 6  # --quick: the first cases (every kernel and flag at B = 128)


def compile_all(archs: tuple[int, ...] = (90,), verbose: bool = True, quick: bool = False) -> int:
    """Compile every distinct variant; return the number compiled (raise on the first failure)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    import torch

    from fastvae.kernels.heuristics import Launch
    from fastvae.kernels.latent import DRAW_EPS_ROWS, _draw_eps_kernel
    from fastvae.kernels.resources import compile_launch, record_step

    launches = [Launch(_draw_eps_kernel, (1,), dict(rng_ptr=torch.empty(2, dtype=torch.int64, device="meta"),
                       out_ptr=torch.empty(16, 20, device="meta"), M=16, Z=20, row_offset=0, BLOCK_M=DRAW_EPS_ROWS,
                       ZP=32))]  # fmt: skip
    for (preset, batch, path, eps), dt in itertools.product(
        CASES[:QUICK] if quick else CASES, ("fp32", "bf16")
    ):
        launches += record_step(preset, batch, dt, path, caller_eps=eps)[1]
    n = 0
    seen = set()
    for ln, arch in itertools.product(launches, archs):
        t = time.perf_counter()
        try:
            res = compile_launch(ln, arch)
        except Exception as exc:
            raise RuntimeError(f"{ln.name} (sm_{arch}, grid {ln.grid}) failed to compile: {exc}") from exc
        if id(res) in seen:
            continue
        seen.add(id(res))
        n += 1
        if verbose:
            flags = {k: v for k, v in ln.kwargs.items() if k.isupper()}
            print(
                f"ok  {ln.name:26s} sm_{arch} {res['registers']:3d} regs  {flags}  {time.perf_counter() - t:.1f}s"
            )
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true", help="the batch-128 cases only")
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        n = compile_all(tuple(a.arch or [90]), verbose=not a.quiet, quick=a.quick)
    except RuntimeError as exc:
        print(f"compile check failed: {exc}", file=sys.stderr)
        return 1
    print(f"{n} kernel variants compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
