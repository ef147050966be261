"""Compile every fastvae kernel ahead of time for a CUDA target, with no GPU needed.

    python -m fastvae.kernels.compile_check [--arch 90] [--arch 80]

Triton's interpreter (what the CPU tests use) runs kernels as numpy and never sees the compiler: type
errors in loop-carried variables, illegal dot shapes or dtypes, and bf16 paths only show up when the
kernel is compiled. This lowers each kernel through TTIR -> TTGIR -> LLVM -> PTX -> cubin for the given
architecture (sm_90 = H100/H200) in fp32 and bf16 and with every constexpr variant the launchers use.
It must run without TRITON_INTERPRET (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

# Pointers that are always fp32 (weights, biases, statistics, grad_output) or int64 (RNG state, tables);
# every other pointer holds activations in the compute dtype.
FP32_POINTERS = {
    "w_ptr", "b_ptr", "wh_ptr", "bh_ptr", "wd_ptr", "bd_ptr", "eps_ptr", "mulv_ptr", "kl_ptr", "loss_ptr",
    "beta_ptr", "s_ptr", "part_ptr", "out_ptr",
}  # fmt: skip
INT64_POINTERS = {"rng_ptr", "rng_used_ptr", "table_ptr"}


def _variants(quick: bool = False):
    """(kernel, constexpr choices) for every kernel and the constexpr values its launcher can pass;
    ``quick`` keeps one tile size (every flag and activation still compiles)."""
    from fastvae.kernels import bernoulli_output, latent, linear_act, weight_grad

    rows = {"BLOCK_M": [16] if quick else [16, 64], "BLOCK_N": [64], "BLOCK_K": [32]}
    zp = [32] if quick else [32, 64]
    return [
        (linear_act._linear_act_fwd_kernel, {**rows, "ACT": [1, 2]}),
        (linear_act._linear_bwd_input_kernel, {**rows, "ACT": [0, 1, 2], "ROW_SCALE": [False, True]}),
        (latent._latent_fwd_kernel, {**rows, "USE_RNG": [False, True], "ACT": [1, 2], "ZP": zp}),
        (latent._latent_bwd_kernel, {**rows, "USE_RNG": [False, True], "ACT": [1, 2], "ZP": zp}),
        (latent._draw_eps_kernel, {"BLOCK_M": [16], "ZP": [32]}),
        (bernoulli_output._bernoulli_output_kernel, {**rows, "ADVANCE_RNG": [False, True]}),
        (weight_grad._grouped_wgrad_kernel, {"BLOCK_N": [32], "BLOCK_K": [32], "BLOCK_R": [32]}),
        (weight_grad._split_sum_kernel, {"BLOCK": [1024]}),
    ]


def compile_all(archs: tuple[int, ...] = (90,), verbose: bool = True, quick: bool = False) -> int:
    """Compile every variant; return the number compiled (raise on the first failure)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    n = 0
    for kernel, choices in _variants(quick):
        names = [p.name for p in kernel.params]
        constexpr = {p.name for p in kernel.params if p.is_constexpr}
        for dt, arch in itertools.product(("fp32", "bf16"), archs):
            precision = "ieee" if dt == "fp32" else "tf32"
            keys = [k for k in choices if k in constexpr]
            for values in itertools.product(*(choices[k] for k in keys)):
                consts = dict(zip(keys, values))
                if "PRECISION" in constexpr:
                    consts["PRECISION"] = precision
                sig = {}
                for name in names:
                    if name in constexpr:
                        sig[name] = "constexpr"
                    elif name.endswith("_ptr"):
                        sig[name] = (
                            "*i64"
                            if name in INT64_POINTERS
                            else "*fp32"
                            if name in FP32_POINTERS
                            else f"*{dt}"
                        )
                    else:
                        sig[name] = "i32"
                t = time.perf_counter()
                try:
                    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                              target=GPUTarget("cuda", arch, 32))  # fmt: skip
                except Exception as exc:
                    raise RuntimeError(
                        f"{kernel.__name__} ({dt}, sm_{arch}, {consts}) failed to compile: {exc}"
                    ) from exc
                assert compiled.asm.get("cubin"), kernel.__name__
                n += 1
                if verbose:
                    print(
                        f"ok  {kernel.__name__:28s} {dt} sm_{arch} {consts}  {time.perf_counter() - t:.1f}s"
                    )
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true", help="one tile size per kernel")
    a = p.parse_args(argv)
    try:
        n = compile_all(tuple(a.arch or [90]), verbose=not a.quiet, quick=a.quick)
    except RuntimeError as exc:
        print(f"compile check failed: {exc}", file=sys.stderr)
        return 1
    print(f"{n} kernel variants compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
