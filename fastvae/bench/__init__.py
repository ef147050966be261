"""``fastvae bench``: whole training steps of every contender, side by side in one run.

Contenders (``fastvae.bench.contenders``): eager; eager + a CUDA graph of the whole step; the whole
step under ``torch.compile(mode="max-autotune")``; fastvae. On a CPU the CUDA-graph contender is skipped,
fastvae is ``fastvae train``'s own CPU step (resident data, keyed noise, no DataLoader), and the
pytorch/examples loop (``fastvae.bench.examples``) is a step contender too, in the cells of its own
network. Beside them, full MNIST epochs: the examples loop as users run it against the step contenders at
batch 128.

The record is written to a new file (``--out``, or ``fastvae-bench-<device>-<time>.json`` in the current
folder; an existing file is never replaced), after every cell, so a late failure keeps what was measured.

Per cell (config x batch x dtype): every contender is built and warmed up, then timed in ``rounds``
interleaved blocks (each block ``steps / rounds`` steps of one contender, contenders alternating), so
drift in a shared machine's speed hits all alike; median and p20/p80 of the per-step times (CUDA events
on a GPU, the host clock on the CPU). Also: samples/s; kernels per step (``torch.profiler`` on CUDA, the
traced count of ``fastvae.launches`` on the CPU, labelled "traced"); peak device memory from a
reset before the contender is built, so CUDA-graph pools and capture count, allocated and reserved,
without the resident data set every contender shares; dynamo's graphs, graph breaks, fallbacks and
recompiles for the compile contender (dynamo is reset before every cell); the step's GEMM FLOPs and
minimum bytes, and the time of its GEMM shapes alone through cuBLAS as a lower bound.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fastvae.bench import dynamo as bench_dynamo
from fastvae.bench.contenders import CPU_CONTENDERS, STEP_CONTENDERS, Contender, make_contender
from fastvae.bench.report import format_table, machine, new_record_path, save_record, slug
from fastvae.config import VAEConfig, preset
from fastvae.data import DeviceData, load_dataset
from fastvae.errors import FastVAEError
from fastvae.model import ReferenceVAE


@dataclass
class Grid:
    """What one ``fastvae bench`` run measures."""

    name: str
    presets: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    steps: int
    warmup: int
    rounds: int = 5
    epoch: bool = True


# Default on the CPU: bounded to <= 3 minutes on 2 cores. Measured here (2-core EPYC, busy): ~40 s per
# compile cell (max-autotune), ~6 s per examples epoch; 3 presets x 3 batches would take > 10 minutes.
CPU_DEFAULT = Grid("cpu-default", ("pytorch-example",), (128, 1024), ("fp32",), steps=30, warmup=5)
CPU_FULL = Grid("cpu-full", ("pytorch-example", "paper", "iwae"), (128, 1024, 16384), ("fp32",), 30, 5)
GPU_FULL = Grid("gpu-full", ("pytorch-example", "paper", "iwae"), (128, 1024, 16384), ("fp32", "tf32", "bf16"),
                steps=200, warmup=20)  # fmt: skip


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        q = statistics.quantiles([s * 1e3 for s in seconds], n=10, method="inclusive")
        return cls(statistics.median(seconds) * 1e3, q[1], q[7])


def layer_shapes(cfg: VAEConfig) -> list[tuple[int, int]]:
    """(in, out) of every linear layer: encoder, head (H -> 2Z), decoder, output."""
    enc = (cfg.flat_dim, *cfg.hidden_dims)
    dec = (cfg.latent_dim, *reversed(cfg.hidden_dims), cfg.flat_dim)
    return [*zip(enc[:-1], enc[1:]), (cfg.hidden_dims[-1], 2 * cfg.latent_dim), *zip(dec[:-1], dec[1:])]


def step_flops(cfg: VAEConfig, batch: int) -> int:
    """FLOPs of one training step's GEMMs: forward, input gradients (none for the first layer) and
    weight gradients, 2 per multiply-add."""
    macs = sum(a * b for a, b in layer_shapes(cfg))
    return 2 * batch * (3 * macs - cfg.flat_dim * cfg.hidden_dims[0])


def step_min_bytes(cfg: VAEConfig, batch: int, n_params: int) -> int:
    """Fewest bytes one step must move: the batch read once (uint8 pixels), and fused Adam reading
    parameter, gradient and two moments and writing parameter and two moments (fp32: 28 B/param)."""
    return batch * cfg.flat_dim + 28 * n_params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(fn: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Seconds of each of n calls: CUDA events around each call on a GPU, else the host clock."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _gemm_lower_bound_ms(cfg: VAEConfig, batch: int, dtype: str, device: torch.device) -> float | None:
    """Median time of the step's GEMM shapes alone through cuBLAS (torch.matmul), one CUDA graph.

    A lower bound, not an attainable step time: no optimizer, no gather, no elementwise work, and the
    weight gradients are written in the compute dtype (bf16 in bf16 cells)."""
    if device.type != "cuda":
        return None
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    ops = []
    for j, (k, n) in enumerate(layer_shapes(cfg)):
        x, w, dy = (torch.randn(batch, k, device=device, dtype=dt), torch.randn(n, k, device=device, dtype=dt),
                    torch.randn(batch, n, device=device, dtype=dt))  # fmt: skip
        ops.append(lambda x=x, w=w: torch.matmul(x, w.T))  # forward
        if j > 0:
            ops.append(lambda dy=dy, w=w: torch.matmul(dy, w))  # input gradient
        ops.append(lambda dy=dy, x=x: torch.matmul(dy.T, x))  # weight gradient
    for op in ops:
        op()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for op in ops:
            op()
    return Timing.of(_time_steps(g.replay, 200, device)).median_ms


def _launches(c: Contender, device: torch.device) -> tuple[int | None, str]:
    """Kernels of one step: profiled on CUDA; traced on the CPU (not for compile: inductor's C++
    kernels do not dispatch through aten, so a trace would miss them)."""
    from fastvae.launches import profiled_kernels, trace_kernels

    if device.type == "cuda":
        return profiled_kernels(c.step, device), "profiled"
    if c.name in ("compile", "examples-loop"):  # the examples' DataLoader work is host Python, not aten
        return None, "n/a"
    return trace_kernels(c.step).total, "traced"


def _build(name: str, cfg: VAEConfig, data: DeviceData, x: torch.Tensor, batch: int, dtype: str, warmup: int):
    """Build and warm up one contender; (contender, entry with memory, dynamo's snapshot after warm-up)."""
    dev = x.device
    entry: dict[str, Any] = {}
    if name == "compile":
        bench_dynamo.reset()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = (torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev))
        torch.cuda.reset_peak_memory_stats(dev)  # before build and capture: graph pools count
    c = make_contender(name, cfg, data, x, batch, dtype)
    for _ in range(max(warmup, 5)):  # >= 5: the CUDA-graph contenders capture at their 4th step
        c.step()  # compile: dynamo compiles here (Adam's lazy state init recompiles once at step 2)
    _sync(dev)
    warm = bench_dynamo.snapshot() if name == "compile" else None
    if dev.type == "cuda":
        entry["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev) - base[0] - c.extra_bytes
        entry["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev) - base[1] - c.extra_bytes
    entry["optimizer"] = c.optimizer
    entry.update(c.notes)
    return c, entry, warm


def run_cell(
    cfg: VAEConfig, batch: int, dtype: str, data: DeviceData, x: torch.Tensor, grid: Grid,
    contenders: tuple[str, ...], keep: dict[str, Contender] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One (config, batch, dtype) cell: every contender built, warmed up, timed interleaved. ``keep``
    receives the built contenders (the epoch timing reuses them instead of compiling again)."""
    dev = x.device
    n_params = sum(p.numel() for p in ReferenceVAE(cfg).parameters())
    cell: dict[str, Any] = {
        "preset": cfg.preset or "custom", "hidden_dims": list(cfg.hidden_dims), "latent_dim": cfg.latent_dim,
        "batch": batch, "dtype": dtype, "flops": step_flops(cfg, batch),
        "min_bytes": step_min_bytes(cfg, batch, n_params), "contenders": {},
    }  # fmt: skip
    cell["gemm_lower_bound_ms"] = _gemm_lower_bound_ms(cfg, batch, dtype, dev)
    built: dict[str, tuple[Contender, dict, Any]] = {}
    for name in contenders:
        try:
            built[name] = _build(name, cfg, data, x, batch, dtype, grid.warmup)
            cell["contenders"][name] = built[name][1]
        except Exception as exc:  # a contender that cannot run here is recorded, not fatal
            cell["contenders"][name] = {"error": _err(exc)}
    times: dict[str, list[float]] = {n: [] for n in built}
    per_block = max(1, grid.steps // grid.rounds)
    for _ in range(grid.rounds):
        for name, (c, _, _) in built.items():
            times[name] += _time_steps(c.step, per_block, dev)
    after = bench_dynamo.snapshot()  # before the launch counts: tracing runs more steps
    for name, (_, entry, warm) in built.items():
        t = Timing.of(times[name])
        entry.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, timed_steps=len(times[name]),
                     samples_per_s=batch / (t.median_ms / 1e3))  # fmt: skip
        if warm is not None:
            entry["dynamo"] = bench_dynamo.stats(warm, after).to_dict()
    for c, entry, _ in built.values():
        entry["launches_per_step"], entry["launches_source"] = _launches(c, dev)
        c.read_loss()
    if keep is not None:
        keep.update({name: c for name, (c, _, _) in built.items()})
    _ratios(cell)
    return cell


def _ratios(cell: dict[str, Any]) -> None:
    fv = cell["contenders"].get("fastvae", {})
    if "median_ms" not in fv:
        return
    cell["fastvae_speedup"] = {
        k: v["median_ms"] / fv["median_ms"] for k, v in cell["contenders"].items() if "median_ms" in v
    }
    if cell["gemm_lower_bound_ms"]:
        cell["fastvae_over_gemm_lower_bound"] = fv["median_ms"] / cell["gemm_lower_bound_ms"]


def _err(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


EPOCH_CELL = ("pytorch-example", 128, "fp32")  # the examples' recipe: the cell whose contenders run epochs


EPOCH_ROUNDS = 2  # epochs per contender, in alternating order, so a busy spell does not hit one alone


def epoch_times(images, built: dict[str, Contender], device: torch.device) -> dict[str, Any]:
    """Full MNIST epochs at batch 128 (pytorch-example, fp32): the examples loop as users run it, and
    each step contender (already built and warm, from the EPOCH_CELL cell, so compile does not compile
    again) over ``steps_per_epoch`` steps and one loss read (one sync). EPOCH_ROUNDS epochs each, the
    order reversed every round; ``epoch_s`` is the fastest (the least disturbed), all are recorded."""
    from fastvae.bench.examples import examples_epoch

    runs: dict[str, Callable[[], dict[str, Any]]] = {"examples-loop": lambda: examples_epoch(images, device)}
    runs.update({name: (lambda c=c: _contender_epoch(c, device))
                 for name, c in built.items() if name != "examples-loop"})  # fmt: skip
    out: dict[str, Any] = {name: {"epoch_s_runs": []} for name in runs}
    order = list(runs)
    for r in range(EPOCH_ROUNDS):
        for name in order if r % 2 == 0 else order[::-1]:
            if "error" in out[name]:
                continue
            try:
                res = runs[name]()
            except Exception as exc:
                out[name] = {"error": _err(exc)}
                continue
            out[name]["epoch_s_runs"].append(res.pop("epoch_s"))
            out[name].update(res)
    for v in out.values():
        if v.get("epoch_s_runs"):
            v["epoch_s"] = min(v["epoch_s_runs"])
    return out


def _contender_epoch(c: Contender, device: torch.device) -> dict[str, Any]:
    c.read_loss()
    _sync(device)
    t = time.perf_counter()
    for _ in range(c.steps_per_epoch):
        c.step()
    loss = c.read_loss()  # one host sync: the epoch is done
    return {"epoch_s": time.perf_counter() - t, "steps": c.steps_per_epoch,
            "mean_loss": loss / (c.steps_per_epoch * 128)}  # fmt: skip


def resolve_grid(device: torch.device, full: bool, **overrides: Any) -> Grid:
    """The default grid for the device (bounded on the CPU), or the full one; explicit flags override."""
    base = GPU_FULL if device.type == "cuda" else (CPU_FULL if full else CPU_DEFAULT)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return base
    return replace(base, name=base.name + "+custom", **given)


def run_bench(
    device: str = "auto", *, full: bool = False, out: str | None = None,
    print_fn: Callable[[str], None] = print, **overrides: Any,
) -> dict[str, Any]:  # fmt: skip
    """Run the grid, write the JSON record (after every cell), print the table; returns the record.

    ``out``: a new file (an existing one is refused); None: ``fastvae-bench-<device>-<time>.json`` here.
    ``overrides``: presets, batch_sizes, dtypes, steps, warmup, rounds, epoch (None: the grid's)."""
    from fastvae.backends import resolve_device

    dev = resolve_device(device)
    grid = resolve_grid(dev, full, **overrides)
    for p in grid.presets:
        preset(p)
    if grid.steps < 5 or grid.warmup < 0 or grid.rounds < 1:
        raise FastVAEError("need --steps >= 5, --warmup >= 0 and --rounds >= 1")
    contenders, skipped = _contenders(dev)
    record: dict[str, Any] = {**machine(dev), "grid": grid.__dict__ | {"contenders": list(contenders)},
                              "cells": [], "skipped": skipped, "complete": False}  # fmt: skip
    path = record_path(out, record)  # checked before minutes of timing
    print_fn(f"fastvae bench: grid {grid.name}: presets {', '.join(grid.presets)}; batches "
             f"{', '.join(map(str, grid.batch_sizes))}; {', '.join(grid.dtypes)}; {grid.steps} timed steps "
             f"in {grid.rounds} interleaved rounds after {grid.warmup} warm-up; {torch.get_num_threads()} "
             f"torch thread(s); contenders {', '.join(contenders)}"
             + ("" if dev.type == "cuda" or full else "  (the full grid: --full)"))  # fmt: skip
    mnist = load_dataset("mnist")
    data = DeviceData(mnist.x_train, dev)
    x = data.batch(torch.arange(len(data), device=dev))  # the float data set, shared by the contenders
    t0, load0 = time.perf_counter(), _load()
    for p in grid.presets:
        for b in grid.batch_sizes:
            if b > len(data):
                raise FastVAEError(f"batch {b} exceeds the {len(data)} MNIST training samples")
            for d in grid.dtypes:
                print_fn(f"  {p} batch {b} {d} ...")
                keep: dict[str, Contender] = {}
                record["cells"].append(run_cell(preset(p), b, d, data, x, grid, _for_cell(contenders, p, d), keep))
                if grid.epoch and (p, b, d) == EPOCH_CELL:  # before the next cell resets dynamo
                    print_fn("  full MNIST epochs ...")
                    record["mnist_epoch"] = epoch_times(mnist.x_train, keep, dev)
                del keep
                save_record(path, record)
    if grid.epoch and "mnist_epoch" not in record:
        print_fn("  full MNIST epochs (pytorch-example, batch 128, fp32) ...")
        keep = {}
        run_cell(preset(EPOCH_CELL[0]), 128, "fp32", data, x, replace(grid, steps=5, rounds=1),
                 _for_cell(contenders, *EPOCH_CELL[::2]), keep)  # fmt: skip
        record["mnist_epoch"] = epoch_times(mnist.x_train, keep, dev)
    record["wall_s"] = time.perf_counter() - t0
    record["load_avg_1min"] = {"start": load0, "end": _load()}  # > cpu_cores: others shared the cores
    record["complete"] = True
    save_record(path, record)
    print_fn(format_table(record))
    print_fn(f"record: {path}")
    return record


def _contenders(dev: torch.device) -> tuple[tuple[str, ...], list[str]]:
    """(the step contenders on this device, what is skipped and why)."""
    from fastvae.backends import triton_available

    if dev.type == "cuda":
        if triton_available():
            return STEP_CONTENDERS, []
        return STEP_CONTENDERS[:3], ["fastvae (needs Triton)"]
    return CPU_CONTENDERS, ["eager+graph (needs CUDA)", "fastvae's fused engine (needs CUDA and Triton; on a CPU "
                            "fastvae is the step `fastvae train` runs there)"]  # fmt: skip


def _for_cell(contenders: tuple[str, ...], preset_name: str, dtype: str) -> tuple[str, ...]:
    """The examples loop runs only its own network in fp32 (the pytorch-example cells)."""
    from fastvae.bench.examples import examples_applies

    if examples_applies(preset(preset_name), dtype):
        return contenders
    return tuple(c for c in contenders if c != "examples-loop")


def record_path(out: str | None, record: dict[str, Any]) -> Path:
    """``out``, or ``fastvae-bench-<device>-<time>.json`` here; never an existing file (checked first)."""
    name = slug(record["device"]) if record["device_type"] == "cuda" else f"cpu-{slug(record['device'])}"
    return new_record_path(out, f"fastvae-bench-{name}")


def main_args(a) -> int:
    from fastvae.backends import set_threads

    set_threads(a.threads)  # as `fastvae train`: $OMP_NUM_THREADS, else 1 (see the README's 'Threads')
    run_bench(a.device, full=a.full, out=a.out, print_fn=lambda s: print(s, file=sys.stdout, flush=True),
              presets=_tuple(a.presets), batch_sizes=_tuple(a.batch_sizes), dtypes=_tuple(a.dtypes),
              steps=a.steps, warmup=a.warmup, rounds=a.rounds, epoch=False if a.no_epoch else None)  # fmt: skip
    return 0


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _tuple(v) -> tuple | None:
    return tuple(v) if v else None
