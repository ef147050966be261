"""``fastvae bench``: one training step of each contender, side by side in one run.

Contenders (GPU): eager PyTorch reference; the reference under ``torch.compile(mode="max-autotune")``;
the reference captured in a CUDA graph (the strongest cheap baseline); fastvae (fused kernels in a CUDA
graph). On the CPU (``--device cpu``): eager and compile only, the GPU cells reported as skipped.

Per cell (preset x batch x dtype): median and p20/p80 step time over ``--steps`` timed steps after
``--warmup`` (CUDA events on a GPU, the host clock on the CPU), input batches rotated among
``ROTATE`` resident batches so no cache is flattered; samples/s; kernel launches per step (profiler);
peak memory; the ratio of fastvae to each baseline; the step's FLOPs and minimum bytes, and the time of
the same GEMM shapes through cuBLAS (``torch.matmul``) as the attainable floor. Also a full MNIST epoch
(60,000 samples at batch 128) for each contender. The table is printed last; the JSON record goes to
``benchmarks/results/<device>.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastvae.config import VAEConfig, preset
from fastvae.data import DeviceData, load_dataset
from fastvae.engine import TrainStep, make_optimizer, set_matmul_precision
from fastvae.errors import FastVAEError
from fastvae.model import ReferenceVAE

ROTATE = 8  # distinct input batches cycled through by every timed loop
CONTENDERS_GPU = ("eager", "compile", "eager+graph", "fastvae")
CONTENDERS_CPU = ("eager", "compile")


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


def _time_steps(fn: Callable[[int], None], n: int, device: torch.device) -> list[float]:
    """Seconds of each of n calls fn(i): CUDA events around each call on a GPU, else the host clock."""
    out = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def _count_launches(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _make_contender(
    name: str, cfg: VAEConfig, data: DeviceData, batch: int, dtype: str, device: torch.device
):
    """(step(i), the TrainStep or None): a training step over rotating resident batches."""
    torch.manual_seed(0)
    if name == "fastvae":
        from fastvae.fused import FusedVAE

        model = FusedVAE(cfg).to(device)
    else:
        model = ReferenceVAE(cfg).to(device)
    graph = name in ("eager+graph", "fastvae")
    opt = make_optimizer(model, 1e-3, cuda_graph=graph)
    if name == "compile":
        model.elbo_terms = torch.compile(model.elbo_terms, mode="max-autotune")
    engine = TrainStep(model, opt, data, batch, dtype=dtype, cuda_graph=graph)
    n_batches = max(1, len(data) // batch)
    rotate = min(ROTATE, n_batches)
    g = torch.Generator(device="cpu").manual_seed(0)
    engine.load_epoch(torch.randperm(len(data), generator=g).to(device))

    def step(i: int) -> None:
        if i % rotate == 0:  # back to the first of ROTATE batches (a cursor write, outside any graph)
            engine.cursor.zero_()
        engine.step()

    return step, engine, model


def _gemm_floor_ms(cfg: VAEConfig, batch: int, dtype: str, device: torch.device) -> float | None:
    """Median time of the step's GEMM shapes through cuBLAS (torch.matmul), replayed as one CUDA graph."""
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
    return Timing.of(_time_steps(lambda i: g.replay(), 200, device)).median_ms


def run_cell(
    preset_name: str, batch: int, dtype: str, device: torch.device, data: DeviceData, steps: int, warmup: int,
    contenders: tuple[str, ...],
) -> dict[str, Any]:  # fmt: skip
    cfg = preset(preset_name)
    set_matmul_precision(dtype if device.type == "cuda" else "fp32")
    cell: dict[str, Any] = {"preset": preset_name, "batch": batch, "dtype": dtype, "contenders": {}}
    n_params = sum(p.numel() for p in ReferenceVAE(cfg).parameters())
    cell["flops"] = step_flops(cfg, batch)
    cell["min_bytes"] = step_min_bytes(cfg, batch, n_params)
    cell["gemm_floor_ms"] = _gemm_floor_ms(cfg, batch, dtype, device)
    for name in contenders:
        if dtype == "bf16" and name == "compile" and device.type != "cuda":
            continue
        try:
            step, engine, _ = _make_contender(name, cfg, data, batch, dtype, device)
            for i in range(warmup):
                step(i)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = Timing.of(_time_steps(step, steps, device))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            launches = _count_launches(lambda step=step: step(1), device)  # step(1): no cursor reset
            cell["contenders"][name] = {
                "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
                "samples_per_s": batch / (timing.median_ms / 1e3), "launches_per_step": launches,
                "peak_memory_bytes": peak,
            }  # fmt: skip
            engine.read_loss()
        except Exception as exc:  # a contender that cannot run here is recorded, not fatal
            cell["contenders"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    fv = cell["contenders"].get("fastvae", {})
    if "median_ms" in fv:
        cell["fastvae_speedup"] = {
            k: v["median_ms"] / fv["median_ms"] for k, v in cell["contenders"].items() if "median_ms" in v
        }
        if cell["gemm_floor_ms"]:
            cell["fastvae_over_gemm_floor"] = fv["median_ms"] / cell["gemm_floor_ms"]
    return cell


def epoch_times(device: torch.device, data: DeviceData, dtype: str, contenders: tuple[str, ...]) -> dict:
    """Wall time of a full MNIST epoch (60,000 samples, batch 128, 468 steps) per contender."""
    cfg = preset("pytorch-example")
    out = {}
    for name in contenders:
        try:
            step, engine, _ = _make_contender(name, cfg, data, 128, dtype, device)
            for i in range(5):
                step(i)
            engine.load_epoch(torch.randperm(len(data), device=device))
            _sync(device)
            t = time.perf_counter()
            for _ in range(len(data) // 128):
                engine.step()
            engine.read_loss()  # one sync: the epoch is done
            out[name] = {"epoch_s": time.perf_counter() - t}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return out


def _versions(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                                timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


def run_bench(
    device: str = "auto", presets: tuple[str, ...] = ("pytorch-example", "paper", "iwae"),
    batch_sizes: tuple[int, ...] = (128, 1024, 16384), dtypes: tuple[str, ...] | None = None, steps: int = 200,
    warmup: int = 20, epoch: bool = True, out: str | None = None, print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    from fastvae.backends import resolve_device, triton_available

    dev = resolve_device(device)
    for p in presets:
        preset(p)
    if steps < 5 or warmup < 0:
        raise FastVAEError("need --steps >= 5 and --warmup >= 0")
    if dev.type == "cuda":
        contenders = CONTENDERS_GPU if triton_available() else CONTENDERS_GPU[:3]
        dtypes = dtypes or ("fp32", "tf32", "bf16")
    else:
        contenders = CONTENDERS_CPU
        dtypes = dtypes or ("fp32",)
        print_fn("fastvae bench: no CUDA device: running eager and torch.compile on the CPU; the CUDA-graph and "
                 "fastvae (Triton) cells are skipped")  # fmt: skip
    mnist = load_dataset("mnist")
    data = DeviceData(mnist.x_train, dev)
    record: dict[str, Any] = {**_versions(dev), "steps": steps, "warmup": warmup, "cells": [], "skipped": []}
    if dev.type != "cuda":
        record["skipped"] = ["eager+graph (needs CUDA)", "fastvae (needs CUDA and Triton)"]
    for p in presets:
        for b in batch_sizes:
            if b > len(data):
                raise FastVAEError(f"batch {b} exceeds the {len(data)} MNIST training samples")
            for d in dtypes:
                print_fn(f"  {p} batch {b} {d} ...")
                record["cells"].append(run_cell(p, b, d, dev, data, steps, warmup, contenders))
    if epoch:
        record["mnist_epoch"] = epoch_times(dev, data, "fp32", contenders)
    path = Path(out) if out else Path("benchmarks") / "results" / f"{_slug(record['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print_fn(format_table(record))
    print_fn(f"record: {path}")
    return record


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "device"


def format_table(record: dict[str, Any]) -> str:
    names = sorted(
        {n for c in record["cells"] for n in c["contenders"]}, key=lambda n: list(CONTENDERS_GPU).index(n)
    )
    head = "| preset | batch | dtype | " + " | ".join(f"{n} ms (p20-p80)" for n in names)
    head += " | launches | fastvae speedup | over GEMM floor |"
    lines = [f"device: {record['device']} (torch {record['torch']}, triton {record['triton']}, CUDA {record['cuda']})",
             head, "|" + "---|" * (head.count("|") - 1)]  # fmt: skip
    for c in record["cells"]:
        row = [c["preset"], str(c["batch"]), c["dtype"]]
        for n in names:
            v = c["contenders"].get(n, {})
            row.append(
                f"{v['median_ms']:.3f} ({v['p20_ms']:.3f}-{v['p80_ms']:.3f})" if "median_ms" in v else "n/a"
            )
        launches = {
            n: v.get("launches_per_step") for n, v in c["contenders"].items() if v.get("launches_per_step")
        }
        row.append(", ".join(f"{n} {k}" for n, k in launches.items()) or "n/a")
        sp = c.get("fastvae_speedup")
        row.append(", ".join(f"{v:.2f}x vs {k}" for k, v in sp.items() if k != "fastvae") if sp else "n/a")
        floor = c.get("fastvae_over_gemm_floor")
        row.append(f"{floor:.2f}x" if floor else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    if "mnist_epoch" in record:
        ep = ", ".join(f"{n} {v['epoch_s'] * 1e3:.0f} ms" if "epoch_s" in v else f"{n} n/a"
                       for n, v in record["mnist_epoch"].items())  # fmt: skip
        lines.append(f"full MNIST epoch (60,000 samples, batch 128): {ep}")
    if record.get("skipped"):
        lines.append("skipped here: " + "; ".join(record["skipped"]))
    return "\n".join(lines)


def main_args(a) -> int:
    run_bench(a.device, tuple(a.presets), tuple(a.batch_sizes), tuple(a.dtypes) if a.dtypes else None, a.steps,
              a.warmup, not a.no_epoch, a.out, print_fn=lambda s: print(s, file=sys.stdout, flush=True))  # fmt: skip
    return 0
