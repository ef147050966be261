"""``python -m fastvae.bench.gpu``: the GPU record of issue 24 in one process, within a time budget.

    python -m fastvae.bench.gpu --out record.json [--md record.md] [--budget 170] [--dry-run]

Stage 3 of ``benchmarks/gpu_acceptance.sh``. Cells in order of value (pytorch-example: B 128 fp32,
16384 bf16, 128 bf16, 16384 fp32, 128 TF32); per cell the contenders of ``fastvae bench`` (eager, eager + a
CUDA graph of the whole step, whole-step ``torch.compile``, fastvae), built, warmed up and timed
interleaved with ``fastvae.bench``'s own machinery (CUDA events; median, p20/p80; peak memory from a reset
before the build). Added here:

- the compile mode: ``COMPILE_MODES`` are tried in order, each under a deadline (SIGALRM interrupts a
  compile that runs past it); a mode that misses is dropped for the later cells. Every attempt (mode,
  seconds, outcome) and the mode that ran are recorded per cell;
- kernels per step and per-kernel device times from ``torch.profiler`` over ``PROFILE_STEPS`` steps;
- full MNIST epochs at B 128 fp32: the pytorch/examples loop against the contenders of the first cell;
- the budget: a cell is started only when the seconds left allow it; the rest are listed as not run. The
  JSON is rewritten after every cell, so a process killed at its limit leaves the finished cells.

``--dry-run`` (the CPU rehearsal): a tiny model (784-32-4) on 1024 MNIST images, two cells, few steps, a
2-second compile deadline; CUDA-only parts are recorded as skipped. Its timings are of that tiny CPU run
and are labelled so: no GPU figure is written without a GPU.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastvae import bench
from fastvae.atomic import atomic_write_bytes
from fastvae.bench import contenders as bench_contenders
from fastvae.bench.report import machine
from fastvae.config import VAEConfig, preset
from fastvae.data import DeviceData, load_dataset

GPU_CELLS = (("pytorch-example", 128, "fp32"), ("pytorch-example", 16384, "bf16"), ("pytorch-example", 128, "bf16"),
             ("pytorch-example", 16384, "fp32"), ("pytorch-example", 128, "tf32"))  # fmt: skip
DRY_CELLS = (("tiny", 128, "fp32"), ("tiny", 64, "fp32"))
TINY = VAEConfig(input_dim=784, hidden_dims=(32,), latent_dim=4)
COMPILE_MODES = ("max-autotune-no-cudagraphs", "reduce-overhead", "default")
GPU_GRID = bench.Grid("gpu-acceptance", ("pytorch-example",), (128, 16384), ("fp32", "bf16", "tf32"), 200, 20)
DRY_GRID = bench.Grid("dry-run", ("tiny",), (128, 64), ("fp32",), steps=10, warmup=1, rounds=2)
PROFILE_STEPS = 20
DRY_IMAGES = 1024  # 8 steps per epoch at B 128: the examples loop stays seconds long on a busy CPU
TOP_KERNELS = 15


class CompileDeadline(Exception):
    """The compile of one mode ran past its deadline."""


@contextmanager
def deadline(seconds: float) -> Iterator[dict[str, bool]]:
    """Raise CompileDeadline in the main thread after ``seconds``; the yielded dict says whether it fired
    (inductor may wrap the exception in its own, so the flag, not the type, is the test)."""
    fired = {"fired": False}

    def on_alarm(signum, frame):
        fired["fired"] = True
        raise CompileDeadline(f"past the {seconds:.0f} s compile deadline")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build_compile(cfg, data, x, batch, dtype, warmup, modes: list[str], limit_s: float):
    """Build the compile contender with the first mode of ``modes`` that compiles within ``limit_s``.

    Returns (contender or None, entry, dynamo snapshot, attempts); a mode that missed its deadline is
    removed from ``modes`` (the caller's list) so later cells do not pay for it again."""
    attempts: list[dict[str, Any]] = []
    for mode in list(modes):
        bench_contenders.COMPILE_MODE = mode
        t = time.perf_counter()
        try:
            with deadline(limit_s) as fired:
                c, entry, warm = bench._build("compile", cfg, data, x, batch, dtype, warmup)
        except Exception as exc:
            late = fired["fired"]
            attempts.append({"mode": mode, "seconds": round(time.perf_counter() - t, 1),
                             "result": "missed the deadline" if late else bench._err(exc)})  # fmt: skip
            torch._dynamo.reset()
            if late:
                modes.remove(mode)
            continue
        attempts.append({"mode": mode, "seconds": round(time.perf_counter() - t, 1), "result": "compiled"})
        entry["compile_mode"] = mode
        return c, entry, warm, attempts
    return None, {"error": "no compile mode finished within its deadline or without an error"}, None, attempts


def profile_kernels(step: Callable[[], None], device: torch.device, steps: int) -> dict[str, Any]:
    """Kernels per step and per-kernel device time (µs per step) from torch.profiler over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    count: dict[str, int] = defaultdict(int)
    us: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            count[e.name] += 1
            us[e.name] += e.time_range.elapsed_us()
    total = sum(count.values())
    rows = sorted(us, key=us.get, reverse=True)
    return {
        "steps": steps, "kernels_per_step": total / steps, "device_us_per_step": sum(us.values()) / steps,
        "kernels": [{"name": n[:120], "per_step": count[n] / steps, "us_per_step": us[n] / steps,
                     "us_per_launch": us[n] / count[n]} for n in rows[:TOP_KERNELS]],
        "kernels_left_out": max(0, len(rows) - TOP_KERNELS),
    }  # fmt: skip


def run_cell(cfg, batch, dtype, data, x, grid, contenders, modes, compile_s, keep) -> dict[str, Any]:
    """One cell: bench's build / warm-up / interleaved timing, the compile contender under its deadline,
    then the profile of every contender."""
    dev = x.device
    n_params = sum(p.numel() for p in bench.ReferenceVAE(cfg).parameters())
    cell: dict[str, Any] = {"preset": cfg.preset or "tiny", "hidden_dims": list(cfg.hidden_dims),
                            "latent_dim": cfg.latent_dim, "batch": batch, "dtype": dtype,
                            "flops": bench.step_flops(cfg, batch), "min_bytes": bench.step_min_bytes(cfg, batch, n_params),
                            "gemm_lower_bound_ms": bench._gemm_lower_bound_ms(cfg, batch, dtype, dev), "contenders": {}}  # fmt: skip
    built: dict[str, tuple] = {}
    for name in contenders:
        try:
            if name == "compile":
                c, entry, warm, cell["compile_attempts"] = build_compile(cfg, data, x, batch, dtype, grid.warmup,
                                                                         modes, compile_s)  # fmt: skip
                cell["contenders"][name] = entry
                if c is not None:
                    built[name] = (c, entry, warm)
                continue
            built[name] = bench._build(name, cfg, data, x, batch, dtype, grid.warmup)
            cell["contenders"][name] = built[name][1]
        except Exception as exc:  # a contender that cannot run here is recorded, not fatal
            cell["contenders"][name] = {"error": bench._err(exc)}
    _time_interleaved(cell, built, grid, dev)
    for c, entry, _ in built.values():
        if dev.type == "cuda":
            entry["profile"] = profile_kernels(c.step, dev, PROFILE_STEPS)
            entry["launches_per_step"], entry["launches_source"] = entry["profile"]["kernels_per_step"], "profiled"
        else:
            entry["launches_per_step"], entry["launches_source"] = bench._launches(c, dev)
        c.read_loss()
    keep.update({name: c for name, (c, _, _) in built.items()})
    bench._ratios(cell)
    return cell


def _time_interleaved(cell: dict[str, Any], built: dict[str, tuple], grid: bench.Grid, dev: torch.device) -> None:
    times: dict[str, list[float]] = {n: [] for n in built}
    per_block = max(1, grid.steps // grid.rounds)
    for _ in range(grid.rounds):
        for name, (c, _, _) in built.items():
            times[name] += bench._time_steps(c.step, per_block, dev)
    after = bench.bench_dynamo.snapshot()
    for name, (_, entry, warm) in built.items():
        t = bench.Timing.of(times[name])
        entry.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, timed_steps=len(times[name]),
                     samples_per_s=cell["batch"] / (t.median_ms / 1e3))  # fmt: skip
        if warm is not None:
            entry["dynamo"] = bench.bench_dynamo.stats(warm, after).to_dict()


def epochs(images, keep: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """One full epoch each at B 128: the pytorch/examples loop, then every contender of the first cell."""
    from fastvae.bench.examples import examples_epoch

    out: dict[str, Any] = {}
    runs = {"examples-loop": lambda: examples_epoch(images, dev)}
    runs.update({n: (lambda c=c: bench._contender_epoch(c, dev)) for n, c in keep.items()})
    for name, fn in runs.items():
        try:
            out[name] = fn()
        except Exception as exc:
            out[name] = {"error": bench._err(exc)}
    return out


def run(out: Path, md: Path | None, budget: float, dry: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    grid = DRY_GRID if dry else GPU_GRID
    cells = DRY_CELLS if dry else GPU_CELLS
    if dev.type == "cuda":
        from fastvae.backends import triton_available

        contenders = bench_contenders.STEP_CONTENDERS if triton_available() else bench_contenders.STEP_CONTENDERS[:3]
    else:
        contenders = ("eager", "compile")
    mnist = load_dataset("mnist")
    images = mnist.x_train[:DRY_IMAGES] if dry else mnist.x_train
    data = DeviceData(images, dev)
    x = data.batch(torch.arange(len(data), device=dev))
    modes = list(COMPILE_MODES)
    rec: dict[str, Any] = {**machine(dev), "dry_run": dry, "budget_s": budget, "grid": grid.__dict__,
                           "contenders": list(contenders), "compile_modes": list(COMPILE_MODES), "cells": [],
                           "not_run": [], "skipped": [] if dev.type == "cuda" else
                           ["eager+graph (needs CUDA)", "fastvae (needs CUDA)", "profiler kernel times (needs CUDA)"]}  # fmt: skip
    if dry:
        rec["note"] = "dry run: a 784-32-4 model on 1024 MNIST images on the CPU; plumbing only, no GPU figures"
    for i, (name, batch, dtype) in enumerate(cells):
        left = budget - (time.perf_counter() - t0)
        if left < (5 if dry else 25):
            rec["not_run"].append({"cell": f"{name} B={batch} {dtype}", "reason": f"{left:.0f} s of the budget left"})
            continue
        print(f"cell {name} B={batch} {dtype} ({left:.0f} s left)", flush=True)
        cfg = TINY if name == "tiny" else preset(name)
        keep: dict[str, Any] = {}
        compile_s = 2.0 if dry else min(40.0, 0.3 * left)
        rec["cells"].append(run_cell(cfg, batch, dtype, data, x, replace(grid), contenders, modes, compile_s, keep))
        if i == 0:  # the first cell is B 128 fp32: its warm contenders run the epochs
            print("epochs at B 128 fp32", flush=True)
            rec["mnist_epoch"] = epochs(images, keep, dev)
        del keep
        rec["wall_s"] = time.perf_counter() - t0
        write(rec, out, md)
    rec["wall_s"] = time.perf_counter() - t0
    write(rec, out, md)
    return rec


def write(rec: dict[str, Any], out: Path, md: Path | None) -> None:
    atomic_write_bytes(out, (json.dumps(rec, indent=2) + "\n").encode())
    if md is not None:
        atomic_write_bytes(md, markdown(rec).encode())


def _contender_row(cell: dict[str, Any], name: str, v: dict[str, Any]) -> str:
    head = f"| {cell['batch']} | {cell['dtype']} | {name} |"
    if "median_ms" not in v:
        return f"{head} — | — | — | — | {v.get('error', 'not timed')[:120]} |"
    mem = f"{v['peak_allocated_bytes'] / 2**20:.1f}" if "peak_allocated_bytes" in v else "—"
    kern = v.get("launches_per_step")
    kern = "—" if kern is None else f"{kern:g} ({v['launches_source']})"
    note = f"mode {v['compile_mode']}" if "compile_mode" in v else ""
    return (f"{head} {v['median_ms']:.4f} ({v['p20_ms']:.4f}–{v['p80_ms']:.4f}) | {v['samples_per_s']:,.0f} | "
            f"{kern} | {mem} | {note} |")  # fmt: skip


def markdown(rec: dict[str, Any]) -> str:
    """The record's tables for summary.md and the results README."""
    lines = [f"Device: {rec['device']}; torch {rec['torch']}, triton {rec['triton']}"
             + (f"; **{rec['note']}**" if rec.get("note") else "") + ".", "",
             "| B | dtype | contender | step ms, median (p20–p80) | samples/s | kernels/step | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in rec["cells"]:
        lines += [_contender_row(cell, n, v) for n, v in cell["contenders"].items()]
    attempts = [f"B={c['batch']} {c['dtype']}: " + ", ".join(f"{a['mode']} {a['result']} ({a['seconds']} s)"
                                                            for a in c["compile_attempts"])
                for c in rec["cells"] if c.get("compile_attempts")]  # fmt: skip
    if attempts:
        lines += ["", "torch.compile attempts: " + "; ".join(attempts) + "."]
    if rec["not_run"]:
        lines += ["", "Not run: " + "; ".join(f"{n['cell']} ({n['reason']})" for n in rec["not_run"]) + "."]
    if rec["skipped"]:
        lines += ["", "Skipped: " + ", ".join(rec["skipped"]) + "."]
    if rec.get("mnist_epoch"):
        lines += ["", "| full MNIST epoch, B 128 fp32 | seconds | steps |", "|---|---|---|"]
        for n, v in rec["mnist_epoch"].items():
            lines.append(f"| {n} | {v['epoch_s']:.3f} | {v['steps']} |" if "epoch_s" in v else f"| {n} | {v.get('error')} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--budget", type=float, default=170.0, help="seconds; no cell starts past it")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    rec = run(a.out, a.md, a.budget, a.dry_run)
    print(markdown(rec))
    return 0 if rec["cells"] else 1


if __name__ == "__main__":
    sys.exit(main())
