"""Resource report: every kernel of a training step compiled for sm_90 exactly as the launchers specialise it.

    python -m fastvae.kernels.resources [--preset pytorch-example] [--batch 128] [--dtype fp32] [--json FILE]
    python -m fastvae.kernels.resources --matrix          # presets x batches x dtypes (fp32, tf32, bf16)
    python -m fastvae.kernels.resources --cell iwae:128:bf16 --markdown   # one cell, as the README's table

No GPU needed. The step is the one each preset trains: its TrainConfig (the preset's binarization,
objective and K; ``+y10``: conditional over MNIST's 10 labels; the batch and dtype asked for) builds the
trainer's own ``fastvae.engine.TrainStep`` over a FusedVAE on ``meta`` tensors, with the dtype's matmul
precision (fp32: IEEE dots, tf32: TF32 dots), and its step is run with launches recorded instead of run
(``heuristics.recording``), so every launch keeps its real arguments, grid and launch options. Each one is
specialised as Triton's JIT would specialise it at run time (integers divisible by 16 or equal to 1;
pointers aligned to 16 bytes, from the tensor's storage offset; None as a constexpr), compiled for
``GPUTarget("cuda", 90, 32)``, and its PTX is run through the ``ptxas`` bundled with Triton with ``-v``
(results cached by PTX hash next to Triton's cache). For each launch the report gives grid and CTAs,
registers, spill bytes, shared memory, warps, occupancy on an H100 (65,536 registers, 64 warps, 228 KB
shared memory and 32 CTAs per SM), the dot instruction in the PTX (wgmma, mma.sync or FMA), the synchronous
global loads in its main loop, and an ESTIMATE of its time from ``estimate.py``'s paper model (with the
step's total). The resources are compiled, not timed; the estimate is a model, not a measurement.
It must run without TRITON_INTERPRET (the tests start it in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from fastvae.config import DTYPES  # fp32 (IEEE dots), tf32 (TF32 dots), bf16

# "+y10": the preset as a conditional VAE over 10 labels (MNIST's digits).
PRESETS = ("pytorch-example", "paper", "iwae", "iwae-k5", "pytorch-example+y10")
CONDITIONAL_SUFFIX = "+y10"
BATCHES = (128, 1024, 16384)
# H100 SXM per-SM limits used for occupancy.
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_CTAS = 32
SM_SHARED_BYTES = 228 * 1024
CTA_RESERVED_SHARED = 1024  # the driver reserves 1 KB of shared memory per CTA
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MNIST_ROWS = 60000
MNIST_SHAPE = (1, 28, 28)
MNIST_CLASSES = 10


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
    async_copy: bool = False  # the PTX has cp.async (pipelined loads)
    loop_sync_loads: int = 0  # ld.global in the main (dot) loop: each trip waits on its loads
    loop_async_copies: int = 0  # cp.async in the main loop
    estimate: dict | None = None  # estimate.estimate_kernel: a paper model, not a timing


def train_config(preset_name: str, batch: int, dtype: str, conditional: bool = False):
    """The TrainConfig of ``preset_name`` (``+y10`` or ``conditional``: a conditional VAE) trained at
    ``batch`` in ``dtype``: every other setting (binarization, objective, K) is the preset's own, as
    ``fastvae train --preset NAME`` uses it."""
    from fastvae.config import TrainConfig

    name = preset_name.removesuffix(CONDITIONAL_SUFFIX)
    return TrainConfig(
        preset=name, batch_size=batch, dtype=dtype, conditional=conditional or name != preset_name
    )


@contextlib.contextmanager
def _matmul_precision(dtype: str) -> Iterator[None]:
    """The engine's matmul precision for ``dtype`` (``engine.set_matmul_precision``: it decides IEEE or TF32
    dots), restored afterwards: recording must not change the process's settings."""
    from fastvae.engine import set_matmul_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_matmul_precision(dtype)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _meta_data(rows: int, dim: int, labelled: bool):
    """A resident MNIST-sized uint8 data set (``DeviceData``) on ``meta``: shapes only, no memory."""
    from fastvae.data import DeviceData

    dev = torch.device("meta")
    data = DeviceData.__new__(DeviceData)  # its constructor copies a host array; here nothing is copied
    data.scaled = True
    data.x = torch.empty(rows, dim, dtype=torch.uint8, device=dev)
    data.y = torch.empty(rows, dtype=torch.int64, device=dev) if labelled else None
    return data


def _record_engine(cfg, model_cfg) -> tuple:
    """The launches of one step of the trainer's engine (``fastvae.engine.TrainStep``, fused path) for ``cfg``."""
    from fastvae.engine import TrainStep
    from fastvae.fused import FusedVAE
    from fastvae.kernels.heuristics import recording

    with torch.device("meta"):
        model = FusedVAE(model_cfg, seed=cfg.seed)
    # The fused step replaces the optimizer's update; plain Adam is what it accepts (fused=True needs CUDA).
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = _meta_data(MNIST_ROWS, model_cfg.flat_dim, model_cfg.conditional)
    eng = TrainStep(model, opt, data, cfg.batch_size, binarize=cfg.binarize, dtype=cfg.dtype, cuda_graph=False,
                    seed=cfg.seed, free_bits=cfg.free_bits)  # fmt: skip
    if eng._fused is None:
        raise RuntimeError(f"preset {cfg.preset!r} does not take the fused engine step")
    with recording() as launches:
        eng.step()
    return eng._fused.plan, launches


def _record_module(plan, batch: int, caller_eps: bool) -> list:
    """The launches of FusedVAE's autograd path (forward + backward), the caller's eps when ``caller_eps``."""
    from fastvae.kernels.heuristics import recording
    from fastvae.kernels.vae import FusedObjective

    dev = torch.device("meta")
    f32 = dict(dtype=torch.float32, device=dev)
    # a user's FusedVAE: one tensor per parameter (in the compute dtype, as autocast would hand them over)
    ps = [torch.empty(s, dtype=plan.dtype, device=dev).requires_grad_() for s in plan.param_shapes()]
    x = torch.empty(batch, plan.d, dtype=plan.dtype, device=dev)
    eps = torch.empty(batch * plan.k, plan.z, **f32) if caller_eps else None
    labels = torch.empty(batch, dtype=torch.int32, device=dev) if plan.classes else None
    rng, beta = torch.empty(2, dtype=torch.int64, device=dev), torch.empty((), **f32)
    with recording() as launches:
        loss = FusedObjective.apply(x, eps, labels, rng, beta, plan, 0, *ps)[0]
        loss.backward(torch.empty(batch, **f32))
    return launches


def record_step(
    preset_name: str, batch: int, dtype: str, path: str = "engine", caller_eps: bool = False, classes: int = 0
):
    """(plan, launches) of one training step of ``preset_name`` (``+y10``: conditional over 10 labels) at
    ``batch`` in ``dtype`` (fp32 / tf32 / bf16), recorded on ``meta`` tensors.

    ``engine``: the step the trainer replays, built by the trainer's own code from the preset's TrainConfig
    (its binarization, objective, K and labels, the dtype's matmul precision); ``module``: FusedVAE under
    autograd (the caller's eps when ``caller_eps``). ``classes`` > 0: the preset as a conditional VAE."""
    from fastvae.kernels.vae import Plan

    cfg = train_config(preset_name, batch, dtype, classes > 0)
    model_cfg = cfg.model_config(MNIST_SHAPE, (classes or MNIST_CLASSES) if cfg.conditional else 0)
    with _matmul_precision(dtype):
        if path == "engine":
            return _record_engine(cfg, model_cfg)
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        plan = Plan.of(model_cfg, batch, dt)
        return plan, _record_module(plan, batch, caller_eps)


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


def _ptxas_info(ptx: str, arch: int, name: str) -> str:
    """ptxas -v's report for ``ptx``, cached on disk next to Triton's own cache (keyed by the PTX and the
    ptxas command): Triton caches its front end, and ptxas is the other half of a compile's CPU time."""
    import hashlib

    import triton

    from fastvae.atomic import atomic_write_bytes

    cmd = _ptxas_cmd(arch, "k.ptx", "k.cubin")
    key = hashlib.sha256((ptx + "\0" + " ".join(cmd)).encode()).hexdigest()
    cached = os.path.join(triton.knobs.cache.dir, "fastvae-ptxas", key + ".txt")
    if os.path.exists(cached):
        with open(cached) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            _ptxas_cmd(arch, src, os.path.join(tmp, "k.cubin")), capture_output=True, text=True
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name}: {proc.stderr[-2000:]}")
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        atomic_write_bytes(cached, proc.stderr.encode())
    except OSError:
        pass  # a read-only cache only costs the next run a recompile
    return proc.stderr


_BLOCK = re.compile(r"^(\$L__BB\d+_\d+):(.*)$")


def main_loop(ptx: str) -> dict:
    """The largest loop of the PTX (the dot's reduction loop): its synchronous global loads (``ld.global``)
    and asynchronous copies (``cp.async``). Blocks belong to a loop by LLVM's own comments: ``Loop Header``
    on the header, ``in Loop: Header=BBx_y`` on the others."""
    loops: dict[str, dict] = {}
    current = None
    for line in ptx.splitlines():
        m = _BLOCK.match(line)
        if m:
            label, note = m.group(1).removeprefix("$L__"), m.group(2)
            h = re.search(r"in Loop: Header=(BB\d+_\d+)", note)
            current = label if "Loop Header" in note else (h.group(1) if h else None)
            if current is not None:
                loops.setdefault(current, {"lines": 0, "sync": 0, "async": 0})
            continue
        if current is not None:
            lp = loops[current]
            lp["lines"] += 1
            lp["sync"] += "ld.global" in line
            lp["async"] += "cp.async.c" in line or "cp.async.bulk" in line
    if not loops:
        return {"loop_sync_loads": 0, "loop_async_copies": 0}
    big = max(loops.values(), key=lambda v: v["lines"])
    return {"loop_sync_loads": big["sync"], "loop_async_copies": big["async"]}


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
    info = _ptxas_info(ptx, arch, launch.name)
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
        async_copy="cp.async" in ptx,  # cp.async / cp.async.bulk (TMA): a pipelined load
        **main_loop(ptx),
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
) -> tuple[object, list[KernelReport]]:
    """(plan, one row per launch of the step): compiled resources, occupancy and the estimated time."""
    from fastvae.kernels.estimate import estimate_kernel, kernel_work, l2_resident
    from fastvae.kernels.heuristics import H100_SMS

    plan, launches = record_step(preset_name, batch, dtype, path)
    compiled = [compile_launch(ln, arch) for ln in launches]
    # the main loop's loads are all asynchronous (or it has none): one latency for its prologue
    works = [kernel_work(ln, plan, r["loop_sync_loads"] == 0) for ln, r in zip(launches, compiled)]
    resident = l2_resident(works)
    rows = []
    for ln, r, work in zip(launches, compiled, works):
        cps = occupancy(r["registers"], r["warps"], r["shared_bytes"])
        flags = {k: v for k, v in ln.kwargs.items() if k.isupper() and not k.startswith("BLOCK")}
        flags.update({k: v for k, v in ln.kwargs.items() if k.startswith("BLOCK")})
        est = estimate_kernel(work, ln.ctas, cps, r["dot"], plan.dtype, resident)
        rows.append(KernelReport(
            kernel=ln.name, grid=ln.grid, ctas=ln.ctas, warps=r["warps"], registers=r["registers"],
            spill_bytes=r["spill_bytes"], stack_bytes=r["stack_bytes"], shared_bytes=r["shared_bytes"],
            ctas_per_sm=cps, occupancy=round(cps * r["warps"] / SM_MAX_WARPS, 3),
            waves=round(ln.ctas / (H100_SMS * max(cps, 1)), 2), dot=r["dot"], large_gemm=_is_large_gemm(ln, plan),
            flags={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flags.items()},
            async_copy=r["async_copy"], loop_sync_loads=r["loop_sync_loads"],
            loop_async_copies=r["loop_async_copies"], estimate=est,
        ))  # fmt: skip
    return plan, rows


def cell(preset_name: str, batch: int, dtype: str, path: str = "engine") -> dict:
    """The JSON record of one (preset, batch, dtype): the step as trained, every kernel, the step estimate."""
    from fastvae.kernels.estimate import step_summary

    plan, rows = report(preset_name, batch, dtype, path)
    kernels = [asdict(r) for r in rows]
    cfg = train_config(preset_name, batch, dtype)
    return {"preset": preset_name, "batch": batch, "dtype": dtype, "path": path, "arch": "sm_90",
            "binarize": bool(cfg.binarize) if path == "engine" else False, "classes": plan.classes, "k": plan.k,
            "iw": plan.iw, "kernels": kernels, "estimate": step_summary(kernels, plan.dtype)}  # fmt: skip


def format_table(doc: dict) -> str:
    """One cell as text: a row per kernel (compiled resources, the estimated time and what bounds it)."""
    head = f"{doc['preset']} B={doc['batch']} {doc['dtype']} ({doc['path']} step"
    head += (
        f", binarize={doc['binarize']}, k={doc['k']}{', iw' if doc['iw'] else ''}, classes={doc['classes']})"
    )
    out = [f"{head}  (compiled for sm_90, not timed; est = ESTIMATE, kernels/estimate.py)",
           f"{'kernel':26s} {'grid':>12s} {'CTAs':>6s} {'warps':>5s} {'regs':>4s} {'spill':>5s} {'smem':>6s} "
           f"{'CTA/SM':>6s} {'occ':>5s} {'waves':>5s} {'dot':>5s} {'ldg':>3s} {'est us':>7s} {'bound':>7s}  flags"]  # fmt: skip
    for r in doc["kernels"]:
        flags = " ".join(
            f"{k}={v}" for k, v in r["flags"].items() if v not in (False, None, 0) or k.startswith("BLOCK")
        )
        e = r["estimate"]
        out.append(
            f"{r['kernel']:26s} {'x'.join(map(str, r['grid'])):>12s} {r['ctas']:6d} {r['warps']:5d} "
            f"{r['registers']:4d} {r['spill_bytes']:5d} {r['shared_bytes']:6d} {r['ctas_per_sm']:6d} "
            f"{r['occupancy']:5.2f} {r['waves']:5.2f} {r['dot']:>5s} {r['loop_sync_loads']:3d} {e['time_us']:7.2f} "
            f"{e['bound']:>7s}  "
            f"{'*' if r['large_gemm'] else ' '} {flags}"
        )
    out.append(
        f"{len(doc['kernels'])} kernels per step; * = carries a large (784 x H) GEMM; "
        "ldg = synchronous loads (ld.global) in the main loop's PTX"
    )
    out.append(summary_line(doc))
    return "\n".join(out)


def kernel_label(row: dict) -> str:
    """The kernel's name with what the launch fuses: (gather) / (latent) first layers, +head, +dz, +loss."""
    from fastvae.kernels.linear_act import AMode

    f = row["flags"]
    label = row["kernel"] + {AMode.GATHER: " (gather)", AMode.LATENT: " (latent)"}.get(f.get("A_MODE"), "")
    for flag, tag in (("BINARIZE", " +binarize"), ("LABEL", " +label"), ("HEAD", " +head"), ("DZ", " +dz"),
                      ("FINALIZE", " +loss"), ("ROW_WEIGHTS", " +weights"), ("FUSED_ADAM", " +adam")):  # fmt: skip
        label += tag if f.get(flag) else ""
    return label


def format_markdown(doc: dict) -> str:
    """One cell as the README's markdown table (compiled resources; the time column is the ESTIMATE)."""
    out = ["| kernel | grid | CTAs | warps | registers | spill B | smem B | CTAs/SM | occupancy | dot | est. µs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["kernels"]:
        star = " *" if r["large_gemm"] else ""
        out.append(
            f"| `{kernel_label(r)}`{star} | {'×'.join(map(str, r['grid']))} | {r['ctas']} | {r['warps']} | "
            f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['ctas_per_sm']} | "
            f"{r['occupancy']:.2f} | {r['dot']} | {r['estimate']['time_us']:.1f} |"
        )
    return "\n".join(out)


def summary_line(doc: dict) -> str:
    e = doc["estimate"]
    return (
        f"ESTIMATE {doc['preset']} B={doc['batch']} {doc['dtype']}: step {e['total_us']:.1f} us "
        f"({e['kernels']} kernels, launch floor {e['launch_floor_us']:.0f} us), persistent whole-step "
        f"{e['persistent_us']:.1f} us, GEMM floor {e['gemm_floor_us']:.2f} us (x{e['vs_gemm_floor']}), "
        f"padded/needed FLOPs {e['flops_padded'] / max(e['flops_needed'], 1):.2f}"
    )


def _parse_cell(text: str) -> tuple[str, int, str]:
    parts = text.split(":")
    if (
        len(parts) != 3
        or parts[0] not in PRESETS
        or not parts[1].isdigit()
        or int(parts[1]) < 1
        or parts[2] not in DTYPES
    ):
        raise ValueError(
            f"--cell wants PRESET:BATCH:DTYPE with PRESET in {PRESETS} and DTYPE in {DTYPES}, got {text!r}"
        )
    return parts[0], int(parts[1]), parts[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", choices=PRESETS)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--dtype", action="append", choices=DTYPES)
    p.add_argument("--path", choices=("engine", "module"), default="engine")
    p.add_argument("--matrix", action="store_true", help="every preset x batch (128, 1024, 16384) x dtype")
    p.add_argument("--markdown", action="store_true", help="print each cell as the README's markdown table")
    p.add_argument("--cell", action="append", metavar="PRESET:BATCH:DTYPE", help="one cell (repeatable)")
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
    cells = [(pr, b, dt) for pr in presets for b in batches for dt in dtypes]
    if a.cell:
        try:
            cells = [_parse_cell(c) for c in a.cell]
        except ValueError as exc:
            p.error(str(exc))
    docs = []
    for pr, b, dt in cells:
        docs.append(cell(pr, b, dt, a.path))
        if a.json != "-":
            print(format_markdown(docs[-1]) if a.markdown else format_table(docs[-1]), flush=True)
            print()
    if a.json:
        text = json.dumps(docs, indent=1)
        if a.json == "-":
            print(text)
        else:
            from fastvae.atomic import atomic_write_bytes

            atomic_write_bytes(a.json, text.encode())
    if a.json != "-":
        print("\n".join(summary_line(d) for d in docs))
        print(f"total spill bytes: {sum(k['spill_bytes'] for d in docs for k in d['kernels'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
