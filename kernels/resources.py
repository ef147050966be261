"""Resource report: every kernel of a training step compiled for sm_90 exactly as the launchers specialise it.

    python -m fastvae.kernels.resources [--preset pytorch-example] [--batch 128] [--dtype fp32] [--json]
    python -m fastvae.kernels.resources --matrix          # presets x batches x dtypes, spill check

No GPU needed. The step is run on ``meta`` tensors with launches recorded instead of run
(``heuristics.recording``), so every launch keeps its real arguments, grid and launch options. Each one is
specialised as Triton's JIT would specialise it at run time (integers divisible by 16 or equal to 1;
pointers aligned to 16 bytes, from the tensor's storage offset; None as a constexpr), compiled for
``GPUTarget("cuda", 90, 32)``, and its PTX is run through the ``ptxas`` bundled with Triton with ``-v``. For
each launch the report gives grid and CTAs, registers, spill bytes, shared memory, warps, occupancy on an
H100 (65,536 registers, 64 warps, 228 KB shared memory and 32 CTAs per SM), and the dot instruction in the
PTX (wgmma, mma.sync or FMA). These numbers are compiled, not timed.
It must run without TRITON_INTERPRET (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace

import torch

# "+y10": the preset as a conditional VAE over 10 labels (MNIST's digits).
PRESETS = ("pytorch-example", "paper", "iwae", "iwae-k5", "pytorch-example+y10")
CONDITIONAL_SUFFIX = "+y10"
BATCHES = (128, 1024, 16384)
DTYPES = ("fp32", "bf16")
# H100 SXM per-SM limits used for occupancy.
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_CTAS = 32
SM_SHARED_BYTES = 228 * 1024
CTA_RESERVED_SHARED = 1024  # the driver reserves 1 KB of shared memory per CTA
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MNIST_ROWS = 60000


@dataclass
class KernelReport:
    kernel: str
    grid: tuple[int, ...]
    ctas: int
    warps: int
    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    occupancy: float  # resident warps / 64
    waves: float  # CTAs / (132 SMs x CTAs per SM)
    dot: str  # wgmma / mma / FMA / none
    large_gemm: bool  # carries one of the 784 x H GEMMs (first encoder layer, output layer, their gradients)
    flags: dict


def record_step(
    preset_name: str, batch: int, dtype: str, path: str = "engine", caller_eps: bool = False, classes: int = 0
):
    """The launches of one training step (``engine``: the replayed step; ``module``: FusedVAE under autograd,
    with the caller's eps when ``caller_eps``); ``classes`` > 0: the preset as a conditional VAE."""
    from fastvae.config import preset
    from fastvae.kernels.heuristics import recording
    from fastvae.kernels.vae import EngineStep, FusedObjective, Plan
    from fastvae.kernels.weight_grad import AdamBuffers

    if preset_name.endswith(CONDITIONAL_SUFFIX):
        preset_name, classes = preset_name.removesuffix(CONDITIONAL_SUFFIX), 10
    cfg = preset(preset_name)
    dev = torch.device("meta")
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    plan = Plan.of(replace(cfg, classes=classes), batch, dt)
    shapes = plan.param_shapes()
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    p = sum(sizes)
    f32 = dict(dtype=torch.float32, device=dev)
    params = torch.empty(p, **f32)
    lowp = torch.empty(p, dtype=dt, device=dev) if dt != torch.float32 else None
    src = lowp if lowp is not None else params
    views, o = [], 0
    for s, n in zip(shapes, sizes):
        views.append(src[o : o + n].view(s))
        o += n
    core, label_w = views[: plan.n_core], tuple(views[plan.n_core :]) or None
    rng = torch.empty(2, dtype=torch.int64, device=dev)
    beta = torch.empty((), **f32)
    with recording() as launches:
        if path == "engine":
            adam = AdamBuffers(params, torch.empty(p, **f32), torch.empty(p, **f32),
                               torch.empty(5, dtype=torch.float64, device=dev), torch.empty((), **f32), lowp)  # fmt: skip
            steps = MNIST_ROWS // batch
            step = EngineStep(
                plan, weights=core[0::2], biases=core[1::2], adam=adam, label_weights=label_w,
                labels=torch.empty(MNIST_ROWS, dtype=torch.int64, device=dev) if classes else None,
                data=torch.empty(MNIST_ROWS, cfg.flat_dim, dtype=torch.uint8, device=dev),
                batches=torch.empty(steps, batch, dtype=torch.int64, device=dev),
                grad=torch.empty(p, **f32), cursor=torch.empty(1, dtype=torch.int64, device=dev), rng_state=rng, beta=beta,
                loss_acc=torch.empty(batch, **f32), grad_weight=torch.empty(batch, **f32),
                binarize=(torch.empty((), dtype=torch.int64, device=dev), 123456789, -987654321),
            )  # fmt: skip
            step()
        else:
            ps = [v.detach().requires_grad_() for v in views]
            x = torch.empty(batch, cfg.flat_dim, dtype=dt, device=dev)
            eps = torch.empty(batch * cfg.k, cfg.latent_dim, **f32) if caller_eps else None
            labels = torch.empty(batch, dtype=torch.int32, device=dev) if classes else None
            loss = FusedObjective.apply(x, eps, labels, rng, beta, plan, 0, *ps)[0]
            loss.backward(torch.empty(batch, **f32))
    return plan, launches


def _ptxas_cmd(arch: int, src: str, out: str) -> list[str]:
    """The ptxas Triton itself runs for this arch, with the flags it uses (``make_cubin``), plus -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    return [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
            src, "-o", out]  # fmt: skip


_SPEC_CACHE: dict = {}


def _specialise(kernel, kwargs):
    """(signature, constexprs, attrs) as the JIT would build them for these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend

    sig, consts, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        val = kwargs.get(name, param.default if param.has_default else None)
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[(i,)] = val
            continue
        if isinstance(val, torch.Tensor):
            key = val.dtype
            if key not in _SPEC_CACHE:
                _SPEC_CACHE[key] = native_specialize_impl(
                    BaseBackend, torch.empty(1, dtype=key), False, True, True
                )[0]
            ty = _SPEC_CACHE[key]
            attr = "D" if (val.storage_offset() * val.element_size()) % 16 == 0 else ""
        else:
            ty, attr = native_specialize_impl(BaseBackend, val, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            consts[(i,)] = val
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return sig, consts, attrs


_COMPILED: dict = {}


def compile_launch(launch, arch: int = 90) -> dict:
    """Compile one recorded launch for sm_``arch``; ptxas -v resource usage and the dot instruction."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = launch.kwargs
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    sig, consts, attrs = _specialise(launch.kernel, kwargs)
    key = (launch.name, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in consts.items())),
           tuple(sorted(attrs)), tuple(sorted(options.items())), arch)  # fmt: skip
    if key in _COMPILED:
        return _COMPILED[key]
    compiled = triton.compile(ASTSource(fn=launch.kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)  # fmt: skip
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            _ptxas_cmd(arch, src, os.path.join(tmp, "k.cubin")), capture_output=True, text=True
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {launch.name}: {proc.stderr[-2000:]}")
    info = proc.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else 0  # noqa: E731
    if "wgmma" in ptx:
        dot = "wgmma"
    elif "mma.sync" in ptx:
        dot = "mma"
    elif "tt.dot" in compiled.asm.get("ttgir", "") or "warp_group_dot" in compiled.asm.get("ttgir", ""):
        dot = "FMA"
    else:
        dot = "none"
    res = dict(
        registers=num(r"Used (\d+) registers"),
        spill_bytes=num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
        stack_bytes=num(r"(\d+) bytes stack frame"),
        shared_bytes=int(compiled.metadata.shared),
        warps=int(compiled.metadata.num_warps),
        dot=dot,
    )
    _COMPILED[key] = res
    return res


def occupancy(registers: int, warps: int, shared: int) -> int:
    """CTAs per SM on an H100 from registers, warps and shared memory."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
    by_regs = (SM_REGISTERS // per_warp) // warps
    by_warps = SM_MAX_WARPS // warps
    by_smem = SM_SHARED_BYTES // (shared + CTA_RESERVED_SHARED)
    return max(0, min(by_regs, by_warps, by_smem, SM_MAX_CTAS))


def _is_large_gemm(launch, plan) -> bool:
    """Does this launch carry the D x H GEMM of the first encoder or the output layer (either direction)?"""
    kw, d, name = launch.kwargs, plan.d, launch.name
    if name == "_grouped_wgrad_kernel":
        return True
    if name == "_layer_fwd_kernel":
        return kw["K"] == d
    if name == "_bernoulli_output_kernel":
        return True
    if name == "_layer_bwd_kernel":
        return kw["N"] == d
    return False


def report(
    preset_name: str, batch: int, dtype: str, path: str = "engine", arch: int = 90
) -> list[KernelReport]:
    from fastvae.kernels.heuristics import H100_SMS

    plan, launches = record_step(preset_name, batch, dtype, path)
    rows = []
    for ln in launches:
        r = compile_launch(ln, arch)
        cps = occupancy(r["registers"], r["warps"], r["shared_bytes"])
        flags = {k: v for k, v in ln.kwargs.items() if k.isupper() and not k.startswith("BLOCK")}
        flags.update({k: v for k, v in ln.kwargs.items() if k.startswith("BLOCK")})
        rows.append(KernelReport(
            kernel=ln.name, grid=ln.grid, ctas=ln.ctas, warps=r["warps"], registers=r["registers"],
            spill_bytes=r["spill_bytes"], stack_bytes=r["stack_bytes"], shared_bytes=r["shared_bytes"],
            ctas_per_sm=cps, occupancy=round(cps * r["warps"] / SM_MAX_WARPS, 3),
            waves=round(ln.ctas / (H100_SMS * max(cps, 1)), 2), dot=r["dot"], large_gemm=_is_large_gemm(ln, plan),
            flags={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flags.items()},
        ))  # fmt: skip
    return rows


def format_table(title: str, rows: list[KernelReport]) -> str:
    out = [f"{title}  (compiled for sm_90, not timed)",
           f"{'kernel':26s} {'grid':>12s} {'CTAs':>6s} {'warps':>5s} {'regs':>4s} {'spill':>5s} {'smem':>6s} "
           f"{'CTA/SM':>6s} {'occ':>5s} {'waves':>5s} {'dot':>5s}  flags"]  # fmt: skip
    for r in rows:
        flags = " ".join(
            f"{k}={v}" for k, v in r.flags.items() if v not in (False, None, 0) or k.startswith("BLOCK")
        )
        out.append(
            f"{r.kernel:26s} {'x'.join(map(str, r.grid)):>12s} {r.ctas:6d} {r.warps:5d} {r.registers:4d} "
            f"{r.spill_bytes:5d} {r.shared_bytes:6d} {r.ctas_per_sm:6d} {r.occupancy:5.2f} {r.waves:5.2f} "
            f"{r.dot:>5s}  {'*' if r.large_gemm else ' '} {flags}"
        )
    out.append(f"{len(rows)} kernels per step; * = carries a large (784 x H) GEMM")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", choices=PRESETS)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--dtype", action="append", choices=DTYPES)
    p.add_argument("--path", choices=("engine", "module"), default="engine")
    p.add_argument("--matrix", action="store_true", help="every preset x batch (128, 1024, 16384) x dtype")
    p.add_argument(
        "--json", metavar="FILE", help="also write every row as JSON to FILE ('-' for stdout only)"
    )
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 1
    os.environ.setdefault(
        "TRITON_DEFAULT_FP_FUSION", "1"
    )  # Triton 3.9's default, stated (silences its warning)
    presets = a.preset or (PRESETS if a.matrix else ("pytorch-example",))
    batches = a.batch or (BATCHES if a.matrix else (128,))
    dtypes = a.dtype or (DTYPES if a.matrix else ("fp32",))
    doc, spills = [], 0
    for pr in presets:
        for b in batches:
            for dt in dtypes:
                rows = report(pr, b, dt, a.path)
                spills += sum(r.spill_bytes for r in rows)
                doc.append({"preset": pr, "batch": b, "dtype": dt, "path": a.path, "arch": "sm_90",
                            "kernels": [asdict(r) for r in rows]})  # fmt: skip
                if a.json != "-":
                    print(format_table(f"{pr} B={b} {dt} ({a.path} step)", rows), flush=True)
                    print()
    if a.json:
        text = json.dumps(doc, indent=1)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text)
    if a.json != "-":
        print(f"total spill bytes: {spills}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
